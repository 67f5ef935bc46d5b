"""The Kafka side: an idempotent librdkafka producer (confluent-kafka) with ``acks=all``, started lazily.

Ingest must serve even while Kafka is unreachable (the spool takes the events), so the producer is not
started before serving: the spool drainer starts it, and starts a new one if it breaks.

Why librdkafka rather than a pure-Python client: batching, compression, the wire protocol, retries and
the socket I/O run in librdkafka's own threads without the GIL, so the event loop only pays for one
``produce()`` call per record; with aiokafka that work shared the loop's thread with HTTP, and ingest
spent about a third of its CPU in it. Up to five produce requests per broker are in flight (the
idempotent producer keeps their order), where aiokafka sent one at a time.

Delivery reports are served on the event loop's own thread: while records are in flight, a timer
calls ``poll(0)`` every millisecond (once a second otherwise, for librdkafka's error and log
callbacks). A dedicated poll thread was measured first: it had to wait for the GIL behind the busy
event loop (up to the 5 ms switch interval) before it could report, which lengthened every request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Producer

from falco_gitlab.kafka_security import librdkafka_security_options
from ingest.config import KafkaSettings
from ingest.records import OutRecord

log = logging.getLogger(__name__)

DeliveryFuture = asyncio.Future[None]
# Called once per record, on the event loop: None when Kafka stored it, else why it will not.
Report = Callable[["PublishError | None"], None]

# librdkafka error codes after which retrying the same record can never succeed.
_PERMANENT_CODES: Final = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,  # also what produce() raises for a record over message.max.bytes
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
})
# How long produce() is retried while librdkafka's local queue is full (its queue.buffering.max.*),
# between tries: the caller's publish timeout bounds the whole wait.
_QUEUE_FULL_RETRY_S: Final = 0.005
_POLL_BUSY_S: Final = 0.001
_POLL_IDLE_S: Final = 1.0
_CONNECT_SLICE_S: Final = 0.5
# After a purge, how long close() serves the purged records' reports (each fails its future).
_PURGE_REPORTS_S: Final = 1.0


class PublishError(Exception):
    """A record was not (or cannot be) stored by Kafka.

    ``permanent``: sending the same record again can never succeed (too large, rejected as invalid).
    ``fatal``: the producer itself can deliver no more (idempotence state lost); it must be replaced.
    """

    def __init__(self, message: str, *, permanent: bool = False, fatal: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.fatal = fatal


def is_permanent(error: BaseException) -> bool:
    return isinstance(error, PublishError) and error.permanent


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text


def _publish_error(error: KafkaError) -> PublishError:
    return PublishError(
        f"{error.name()}: {error.str()}",
        permanent=error.code() in _PERMANENT_CODES,
        fatal=error.fatal(),
    )


def producer_config(settings: KafkaSettings, max_request_size: int) -> dict[str, Any]:
    """librdkafka properties for ingest's producer (secrets read here, at producer creation)."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": settings.linger_ms,
        "batch.size": min(settings.max_batch_size, max_request_size),
        "message.max.bytes": max_request_size,
        "request.timeout.ms": settings.request_timeout_ms,
        # A record not acknowledged by then fails; it is in the spool already (publish_timeout_s is
        # far shorter) and the drainer sends it again.
        "message.timeout.ms": settings.request_timeout_ms,
        "compression.type": settings.compression_type or "none",
        # The Java client's partitioner (murmur2 of the key): an actor's events land on the partition
        # the Java client, aiokafka and enrich's keyed sends pick for that key, so they stay in order.
        "partitioner": "murmur2_random",
        "logger": logging.getLogger("ingest.kafka"),
    }
    config.update(librdkafka_security_options(settings.security))
    return config


class KafkaPublisher:
    def __init__(self, settings: KafkaSettings, max_request_size: int) -> None:
        self._settings = settings
        self._max_request_size = max_request_size
        self._producer: Producer | None = None
        self._poller: _Poller | None = None

    @property
    def started(self) -> bool:
        return self._producer is not None

    @property
    def broken(self) -> bool:
        """The producer reported a fatal error (every later send fails): it must be replaced."""
        poller = self._poller
        return poller is not None and poller.fatal is not None

    async def start(self, timeout_s: float = 10.0) -> None:
        """Connect (raises PublishError when Kafka cannot be reached within ``timeout_s``)."""
        if self._producer is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            poller = _Poller(loop)
            config = producer_config(self._settings, self._max_request_size)
            config["error_cb"] = poller.on_error
            producer = Producer(config)
        except (KafkaException, ValueError, TypeError) as exc:
            raise PublishError(f"cannot create the Kafka producer: {exc}") from None
        # Producer() connects in the background; a metadata answer proves a broker is there. Asked in
        # short slices, so that a cancelled start (shutdown) leaves no thread waiting for long.
        deadline = loop.time() + timeout_s
        while True:
            try:
                await asyncio.to_thread(
                    producer.list_topics, None, min(_CONNECT_SLICE_S, max(deadline - loop.time(), 0.01)))
                break
            except KafkaException as exc:
                if loop.time() < deadline:
                    continue
                await asyncio.to_thread(_destroy, producer)
                raise PublishError(f"Kafka not reachable at {self._settings.bootstrap_servers}: "
                                   f"{exc.args[0].str() if exc.args else exc}") from None
        poller.start(producer)
        self._producer, self._poller = producer, poller
        log.info("kafka producer started", extra={"bootstrap_servers": self._settings.bootstrap_servers})

    def try_send(self, record: OutRecord, on_report: Report) -> bool:
        """Hand ``record`` to the producer now, or return False when librdkafka's local queue is full
        (nothing was sent). ``on_report`` is called once, on the event loop, with None when Kafka
        acknowledged the record or with the PublishError saying why it will not."""
        producer, poller = self._producer, self._poller
        if producer is None or poller is None:
            raise PublishError("the Kafka producer is not started")
        try:
            producer.produce(record.topic, record.value, record.key,
                             headers=record.headers,  # type: ignore[arg-type]  # list is invariant
                             on_delivery=partial(poller.report, on_report))
        except BufferError:
            return False
        except KafkaException as exc:
            raise _publish_error(exc.args[0]) from None
        if not poller.busy:
            poller.hurry()
        return True

    async def hand_over(self, record: OutRecord, on_report: Report) -> None:
        """``try_send``, waiting for room while the local queue is full (Kafka slower than the traffic).

        Cancelling this coroutine before it returns guarantees the record is not sent.
        """
        # librdkafka signals nothing when its queue has room again: poll for it.
        while not self.try_send(record, on_report):  # noqa: ASYNC110
            await asyncio.sleep(_QUEUE_FULL_RETRY_S)

    async def send(self, record: OutRecord) -> DeliveryFuture:
        """``hand_over`` with a future that resolves when Kafka acknowledged the record and fails with
        PublishError when it will not."""
        future: DeliveryFuture = asyncio.get_running_loop().create_future()
        await self.hand_over(record, partial(settle, future))
        return future

    async def close(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for records in flight, then close.

        Records still unacknowledged after that are failed (their futures raise) rather than left to a
        background thread: they stay in the spool, and the next start sends them.
        """
        producer = self._detach()
        if producer is None:
            return
        await _serve_reports(producer, wait_s)
        if len(producer):
            log.warning("kafka: records still unacknowledged at shutdown; they stay in the spool",
                        extra={"records": len(producer)})
        await _abandon(producer)

    async def discard(self) -> None:
        """Drop a broken producer (after failing whatever it still holds)."""
        producer = self._detach()
        if producer is not None:
            await _abandon(producer)

    def _detach(self) -> Producer | None:
        producer, poller = self._producer, self._poller
        self._producer = self._poller = None
        if poller is not None:
            poller.stop()
        return producer


async def _serve_reports(producer: Producer, seconds: float) -> None:
    """Serve delivery reports on the loop until none is outstanding or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        producer.poll(0)
        if not len(producer) or time.monotonic() >= deadline:
            return
        await asyncio.sleep(_POLL_BUSY_S)


async def _abandon(producer: Producer) -> None:
    # Purged records get their delivery report (an error) from the next polls: every future resolves.
    producer.purge(in_queue=True, in_flight=True, blocking=False)
    await _serve_reports(producer, _PURGE_REPORTS_S)
    await asyncio.to_thread(_destroy, producer)


def _destroy(producer: Producer) -> None:
    # Closing joins librdkafka's threads (it may block briefly): called in a worker thread, never on the
    # event loop. Purged or flushed first, there is nothing left for it to wait for.
    producer.close()


def settle(future: DeliveryFuture, error: PublishError | None) -> None:
    """A Report that resolves ``future``."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _Poller:
    """Serves librdkafka's delivery reports and callbacks on the event loop's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fatal: PublishError | None = None
        # Polling every millisecond: records were handed over since the producer last had none.
        self.busy = False
        self._producer: Producer | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop_thread = threading.get_ident()

    def start(self, producer: Producer) -> None:
        self._producer = producer
        self._schedule(_POLL_IDLE_S)

    def stop(self) -> None:
        self._producer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def hurry(self) -> None:
        """Records are in flight: serve their reports every millisecond until none is left."""
        if self._producer is not None:
            self.busy = True
            self._schedule(_POLL_BUSY_S)

    def report(self, on_report: Report, error: KafkaError | None, _message: Any) -> None:
        """librdkafka's delivery callback (``on_report`` bound per record)."""
        if threading.get_ident() != self._loop_thread:  # served by close() in a worker thread: a straggler
            self.loop.call_soon_threadsafe(self.report, on_report, error, _message)
            return
        if error is None:
            on_report(None)
            return
        failure = _publish_error(error)
        if failure.fatal and self.fatal is None:
            self.fatal = failure
        on_report(failure)

    def on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self.fatal = _publish_error(error)
            log.error("kafka: the producer cannot deliver any more; it will be replaced",
                      extra={"error": f"{error.name()}: {error.str()}"})
        elif error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._AUTHENTICATION,
                              KafkaError._SSL, KafkaError.TOPIC_AUTHORIZATION_FAILED):
            log.warning("kafka: %s", error.str(), extra={"error": error.name()})
        else:
            log.debug("kafka: %s", error.str(), extra={"error": error.name()})

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._poll)

    def _poll(self) -> None:
        self._timer = None
        producer = self._producer
        if producer is None:
            return
        producer.poll(0)
        # len(): records (and requests) librdkafka still holds, i.e. reports still to come.
        self.busy = len(producer) > 0
        self._schedule(_POLL_BUSY_S if self.busy else _POLL_IDLE_S)
