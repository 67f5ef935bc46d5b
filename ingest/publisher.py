"""The Kafka side: an idempotent aiokafka producer with ``acks=all`` that can be (re)started lazily.

Ingest must serve even while Kafka is unreachable (the spool takes the events), so the producer is not
started before serving: the spool drainer starts it, and starts a new one if it breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordTooLargeError,
    UnknownProducerId,
)
from aiokafka.partitioner import DefaultPartitioner

from falco_gitlab.kafka_security import aiokafka_security_options
from ingest.config import KafkaSettings
from ingest.records import OutRecord

log = logging.getLogger(__name__)

DeliveryFuture = asyncio.Future[Any]

# Errors after which retrying the same record can never succeed.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (MessageSizeTooLargeError, RecordTooLargeError)
# Errors after which the producer itself can never deliver again: its idempotence state (producer id,
# epoch, sequence numbers) is out of step with the broker's (seen after a broker restart under load:
# every later send fails with OutOfOrderSequenceNumber). aiokafka does not reset it (no KIP-360): the
# producer must be replaced; a new one gets a new producer id.
FATAL_PRODUCER_ERRORS: tuple[type[BaseException], ...] = (
    OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch, ProducerFenced,
)


def is_permanent(error: BaseException) -> bool:
    return isinstance(error, PERMANENT_ERRORS)


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text


class CachingPartitioner:
    """aiokafka's default partitioner (murmur2 of the key, as the Java client: the same key always lands
    on the same partition), remembering the partition of recent keys: murmur2 is pure Python in aiokafka
    (~10 us per record) and the same actors send again and again."""

    def __init__(self, max_entries: int = 65_536) -> None:
        self._default = DefaultPartitioner()
        self._cache: dict[tuple[bytes, int], int] = {}
        self._max_entries = max_entries

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            partition: int = self._default(key, all_partitions, available)
            return partition
        # The partition depends on the key and the partition list (0..n-1, n only grows).
        slot = (key, len(all_partitions))
        partition = self._cache.get(slot, -1)
        if partition < 0:
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
            partition = self._cache[slot] = self._default(key, all_partitions, available)
        return partition


class KafkaPublisher:
    def __init__(self, settings: KafkaSettings, max_request_size: int) -> None:
        self._settings = settings
        self._max_request_size = max_request_size
        self._producer: Any = None
        self._failed_producer: Any = None  # the producer that reported a FATAL_PRODUCER_ERRORS error

    def _producer_kwargs(self) -> dict[str, Any]:
        s = self._settings
        sec = s.security
        kwargs: dict[str, Any] = {
            "bootstrap_servers": s.bootstrap_servers,
            "client_id": s.client_id,
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": s.linger_ms,
            "max_batch_size": s.max_batch_size,
            "max_request_size": self._max_request_size,
            "request_timeout_ms": s.request_timeout_ms,
            "compression_type": s.compression_type,
            "partitioner": CachingPartitioner(),
        }
        kwargs.update(aiokafka_security_options(sec))
        return kwargs

    @property
    def started(self) -> bool:
        return self._producer is not None

    @property
    def broken(self) -> bool:
        """The producer's background sender died, or a send failed with an error after which none can
        succeed (all its sends fail): it must be replaced."""
        if self._producer is None:
            return False
        if self._producer is self._failed_producer:
            return True
        sender = getattr(self._producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
        return task is not None and task.done()

    async def start(self) -> None:
        """Connect (raises KafkaError / OSError when Kafka cannot be reached)."""
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(**self._producer_kwargs())
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer
        log.info("kafka producer started", extra={"bootstrap_servers": self._settings.bootstrap_servers})

    async def send(self, record: OutRecord) -> DeliveryFuture:
        """Hand ``record`` to the producer; the returned future resolves when Kafka acknowledged it.

        Cancelling this coroutine before it returns guarantees the record is not sent.
        """
        if self._producer is None:
            raise KafkaConnectionError("the Kafka producer is not started")
        producer = self._producer
        future: DeliveryFuture = await producer.send(
            record.topic, value=record.value, key=record.key, headers=record.headers
        )
        future.add_done_callback(functools.partial(self._check_fatal, producer))
        return future

    def _check_fatal(self, producer: Any, future: DeliveryFuture) -> None:
        if future.cancelled() or producer is not self._producer:
            return
        error = future.exception()
        if isinstance(error, FATAL_PRODUCER_ERRORS) and self._failed_producer is not producer:
            self._failed_producer = producer
            log.warning("kafka: the producer cannot deliver any more", extra={"error": describe(error)})

    async def close(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for records in flight, then close.

        Records still unacknowledged after that are failed (their futures raise) rather than left to a
        background task: they stay in the spool, and the next start sends them.
        """
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            async with asyncio.timeout(max(wait_s, 0.01)):
                await producer.flush()
        except (TimeoutError, KafkaError):
            log.warning("kafka: records still unacknowledged at shutdown; they stay in the spool")
            await self._abandon(producer)
        try:
            async with asyncio.timeout(5.0):
                await producer.stop()
        except (TimeoutError, KafkaError) as exc:
            log.warning("kafka: producer did not close cleanly", extra={"error": describe(exc)})

    async def discard(self) -> None:
        """Drop a broken producer (after failing whatever it still holds)."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        await self._abandon(producer)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await producer.stop()

    @staticmethod
    async def _abandon(producer: Any) -> None:
        # aiokafka has no public "close now": stop its sender task, then fail the batches it held so
        # every delivery future resolves (with an error) instead of hanging.
        sender = getattr(producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        accumulator = getattr(producer, "_message_accumulator", None)
        if accumulator is None:
            return
        batches = [b for queue in getattr(accumulator, "_batches", {}).values() for b in queue]
        batches += list(getattr(accumulator, "_pending_batches", ()))
        accumulator.fail_all(KafkaConnectionError("ingest stopped before Kafka acknowledged"))
        # The records stay in the spool; nobody needs these errors (no "never retrieved" warnings).
        for batch in batches:
            futures = [batch.future, getattr(batch, "_drain_waiter", None)]
            futures += [f for f, _ in getattr(batch, "_msg_futures", ())]
            for future in futures:
                if future is None:
                    continue
                if future.done() and not future.cancelled():
                    future.exception()
