"""The enrich worker: a transactional consume-transform-produce loop over Kafka.

One worker is one member of the consumer group (``kafka.group_id``) reading the raw topic. For every
batch (``getmany`` up to ``processing.batch_size`` records) it opens a Kafka transaction, writes one
record per input record to the enriched topic (or the dead-letter topic), adds the consumed offsets to
the same transaction and commits it. Readers with ``isolation_level=read_committed`` therefore see the
output of a batch and the advance of the group's offsets together or not at all.

The loop itself knows nothing about GitLab: it calls a ``Transform`` (raw value, headers, Kafka
timestamp in ms -> output value, or ``MalformedEvent``). ``enrich_transform`` is the real one;
``passthrough_transform`` copies the value and is what the benchmark compares against.

See docs/enrich.md ("Delivery guarantees") for what this guarantees, how rebalances, aborts, restarts and
crashes are handled, and the limits that come from aiokafka's transaction protocol versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import (
    IllegalStateError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordTooLargeError,
)
from aiokafka.partitioner import murmur2
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from enrich.config import EnrichConfig
from enrich.dlq import dlq_headers
from enrich.flatten import AddressCache, GeoLookup, LocalAddresses, MalformedEvent, event_fields
from enrich.geo import GeoIP
from enrich.metrics import Counters
from falco_gitlab.contract import (
    HDR_DESTINATION,
    HDR_EVENT_TYPE,
    HDR_EVENT_UID,
    HDR_RECEIVED_AT,
)
from falco_gitlab.kafka_security import aiokafka_security_options
from falco_gitlab.model import ENRICHED_SCHEMA_VERSION

log = logging.getLogger("enrich.worker")

RecordHeaders = Sequence[tuple[str, bytes]]
# (value, headers, kafka timestamp in ms) -> output value; raises MalformedEvent for a dead letter.
Transform = Callable[[bytes | None, RecordHeaders, int], bytes]

# Broker error codes that reject one record for what it is (so retrying cannot help): CORRUPT_MESSAGE,
# MESSAGE_TOO_LARGE, RECORD_LIST_TOO_LARGE, INVALID_TIMESTAMP, INVALID_RECORD.
_RECORD_ERRNOS: Final = frozenset({2, 10, 18, 32, 87})
# More session restarts than this within RESTART_WINDOW_S (e.g. fenced again and again: another live
# process has the same transactional id; or no broker reachable) is fatal.
MAX_RESTARTS: Final = 8
RESTART_WINDOW_S: Final = 300.0
# How long a worker handing partitions over waits for its last committed offsets to become visible.
OFFSETS_VISIBLE_TIMEOUT_S: Final = 5.0
# Record keys whose output partition is remembered (actor keys: a few per active user).
_PARTITION_CACHE_SIZE: Final = 65_536
_estimate_size: Final = DefaultRecordBatchBuilder.estimate_size_in_bytes
# enrich_transform: distinct header values kept decoded, and the initial size of its output buffer
# (it grows to the largest record seen).
_HEADER_TEXTS: Final = 4096
_OUTPUT_BUFFER: Final = 8192
_encoder: Final = msgspec.msgpack.Encoder()


class FatalWorkerError(Exception):
    """The worker cannot go on; the message says why. Exit code 1."""


# --- transforms ------------------------------------------------------------------------------------


def enrich_transform(geo: GeoIP | GeoLookup | None) -> Transform:
    """Decode + flatten + geolocate + encode: the real work of enrich.

    With a ``GeoIP`` (rather than just a lookup function), what is derived from each client address
    is cached in it as well (``GeoIP.derived``, emptied when a database is reloaded); without
    geolocation it is cached here. The returned function reuses one output buffer: call it from one
    thread at a time (the worker calls it from its event loop only)."""
    lookup: GeoLookup | None
    addresses: AddressCache | None
    if isinstance(geo, GeoIP):
        lookup, addresses = geo.lookup, geo
    elif geo is None:
        lookup, addresses = None, LocalAddresses()  # nothing that could change
    else:
        lookup, addresses = geo, None  # a function that may answer differently later: no cache
    # Header values decoded once: destinations and event types are a small set that repeats.
    texts: dict[bytes, str] = {}
    buffer = bytearray(_OUTPUT_BUFFER)
    encode_into = _encoder.encode_into

    def text(header: bytes) -> str:
        if len(texts) >= _HEADER_TEXTS:
            texts.clear()
        decoded = texts[header] = header.decode("utf-8", "replace")
        return decoded

    def transform(value: bytes | None, headers: RecordHeaders, timestamp_ms: int) -> bytes:
        if value is None:
            raise MalformedEvent("record has no value")
        found = dict(headers)  # a repeated header: the last one counts
        header = found.get(HDR_DESTINATION)
        destination = None if header is None else texts.get(header) or text(header)
        header = found.get(HDR_EVENT_TYPE)
        event_type = None if header is None else texts.get(header) or text(header)
        ts, fields = event_fields(value, destination, event_type, lookup, addresses)
        if ts is None:  # no usable created_at: the receive time, from ingest's header or Kafka's
            received = found.get(HDR_RECEIVED_AT)
            ts = timestamp_ms * 1_000_000 if timestamp_ms >= 0 else time.time_ns()
            if received is not None and received.isdigit():
                ts = int(received)
        # Into a buffer that keeps its size, then one exact copy: cheaper than letting the encoder
        # grow a fresh one for every record.
        encode_into((ENRICHED_SCHEMA_VERSION, ts, fields, value), buffer)
        return bytes(buffer)

    return transform


def passthrough_transform(value: bytes | None, headers: RecordHeaders, timestamp_ms: int) -> bytes:
    """No work at all: the benchmark's baseline."""
    return value if value is not None else b""


# --- helpers ---------------------------------------------------------------------------------------


class UidWindow:
    """The last ``size`` event uids written for one partition (oldest forgotten first)."""

    __slots__ = ("_seen", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen: dict[bytes, None] = {}

    def __contains__(self, uid: bytes) -> bool:
        return uid in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def update(self, uids: list[bytes]) -> None:
        seen = self._seen
        for uid in uids:
            seen.pop(uid, None)
            seen[uid] = None
        excess = len(seen) - self._size
        if excess > 0:
            for old in list(seen)[:excess]:
                del seen[old]


class _Overtaken(Exception):
    """The group moved on (rebalance or eviction) while the batch was in flight: abort, do not commit."""

    def __init__(self, message: str, *, routine: bool = False) -> None:
        super().__init__(message)
        self.routine = routine  # an ordinary rebalance, not worth a warning


class _ProduceFailed(Exception):
    def __init__(self, cause: BaseException, tp: TopicPartition | None, offset: int | None) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.tp = tp
        self.offset = offset

    @property
    def record_specific(self) -> bool:
        cause = self.cause
        return isinstance(cause, RecordTooLargeError) or getattr(cause, "errno", None) in _RECORD_ERRNOS


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._worker._on_assigned(assigned)


# --- the worker ------------------------------------------------------------------------------------


class Worker:
    """One group member running transactional batches until ``stop`` is set."""

    def __init__(
        self,
        config: EnrichConfig,
        transform: Transform,
        *,
        transactional_id: str,
        counters: Counters | None = None,
    ) -> None:
        self.config = config
        self.transform = transform
        self.transactional_id = transactional_id
        self.counters = counters if counters is not None else Counters()
        self._consumer: Any = None
        self._producer: Any = None
        # Held while a batch is processed and committed; the rebalance listener takes it so partitions
        # never move while a transaction that covers them is open.
        self._lock = asyncio.Lock()
        self._assignment_epoch = 0
        self._windows: dict[TopicPartition, UidWindow] = {}
        # Offsets this worker committed, per partition, since it was assigned: checked for visibility
        # before a partition is handed over (see _await_offsets_visible).
        self._committed: dict[TopicPartition, int] = {}
        # Poison handling: partitions being replayed one record per transaction after a record was
        # rejected by the broker, and records known to be rejected (-> DLQ, or DLQ without the value).
        self._isolate: dict[TopicPartition, int] = {}
        self._poison: dict[tuple[TopicPartition, int], str] = {}
        self._poison_strip: set[tuple[TopicPartition, int]] = set()
        self._restarts: list[float] = []
        # When the group coordinator last accepted a heartbeat (see _install_heartbeat_probe).
        self._last_heartbeat_ok = time.monotonic()
        self._heartbeat_probe = False
        kafka = config.kafka
        self._membership_ttl = (kafka.session_timeout_ms - kafka.heartbeat_interval_ms) / 1000
        # True from partitions revoked until the new assignment: no batch may be processed then.
        self._rebalancing = True
        self._log_failures_until = 0.0
        # Output partition of each record key (see _partitioner), for one topic and partition list.
        self._partition_cache_for: tuple[str, tuple[int, ...]] | None = None
        self._partition_cache: dict[bytes, int] = {}

    @property
    def assigned_partitions(self) -> frozenset[TopicPartition]:
        """Partitions this worker owns right now (empty while a rebalance is in progress)."""
        if self._consumer is None or self._rebalancing:
            return frozenset()
        return frozenset(self._consumer.assignment())

    # -- clients ----------------------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        kafka = self.config.kafka
        return {
            "bootstrap_servers": kafka.bootstrap_servers,
            "request_timeout_ms": kafka.request_timeout_ms,
            **aiokafka_security_options(kafka.security),
        }

    def _new_consumer(self) -> Any:
        kafka = self.config.kafka
        return AIOKafkaConsumer(
            client_id=f"{kafka.client_id}-consumer",
            group_id=kafka.group_id,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset=kafka.auto_offset_reset,
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            rebalance_timeout_ms=kafka.rebalance_timeout_ms,
            max_poll_interval_ms=kafka.max_poll_interval_ms,
            fetch_max_bytes=kafka.fetch_max_bytes,
            max_partition_fetch_bytes=kafka.max_partition_fetch_bytes,
            **self._common(),
        )

    def _new_producer(self) -> Any:
        kafka = self.config.kafka
        return AIOKafkaProducer(
            client_id=f"{kafka.client_id}-producer",
            transactional_id=self.transactional_id,
            enable_idempotence=True,
            acks="all",
            transaction_timeout_ms=kafka.transaction_timeout_ms,
            linger_ms=kafka.linger_ms,
            max_batch_size=kafka.max_batch_size,
            max_request_size=kafka.max_request_size,
            compression_type=kafka.compression_type,
            **self._common(),
        )

    # -- main loop --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (then commit, leave the group and return) or a fatal error.

        A session (consumer + producer) that fails as a whole, e.g. because the producer was fenced or
        the brokers cannot be reached, is closed and started again from the committed offsets; more
        than ``MAX_RESTARTS`` restarts within ``RESTART_WINDOW_S`` is fatal.
        """
        backoff = self.config.processing.retry_backoff_ms / 1000
        while not stop.is_set():
            began = time.monotonic()
            try:
                await self._session(stop)
            except FatalWorkerError:
                raise
            except ProducerFenced as exc:
                self._note_restart(exc, "producer fenced (its transaction timed out, or another process "
                                        f"with transactional id {self.transactional_id!r} started)")
            except Exception as exc:
                self._note_restart(exc, "worker session failed")
            if time.monotonic() - began > RESTART_WINDOW_S:  # it ran well for a while: start afresh
                backoff = self.config.processing.retry_backoff_ms / 1000
            await _sleep_unless(stop, backoff)
            backoff = min(backoff * 2, self.config.processing.retry_backoff_max_ms / 1000)

    def _note_restart(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(self._restarts) > MAX_RESTARTS:
            raise FatalWorkerError(f"{what}: {exc!r}; {len(self._restarts)} restarts within "
                                   f"{RESTART_WINDOW_S:.0f} s, giving up") from exc
        log.warning("%s: %r; restarting from the committed offsets", what, exc)

    async def _session(self, stop: asyncio.Event) -> None:
        """One consumer + producer pair from start to stop (or until the producer is fenced)."""
        kafka, processing = self.config.kafka, self.config.processing
        self._consumer, self._producer = self._new_consumer(), self._new_producer()
        self._windows.clear()
        self._committed.clear()
        self._isolate.clear()
        self._rebalancing = True
        try:
            await self._producer.start()  # InitProducerId: fences a predecessor, aborts its transaction
            await self._check_topics()
            await self._consumer.start()
            self._install_heartbeat_probe()
            self._consumer.subscribe([kafka.input_topic], listener=_Listener(self))
            backoff = processing.retry_backoff_ms / 1000
            while not stop.is_set():
                epoch = self._assignment_epoch
                max_records = 1 if self._isolate else processing.batch_size
                batch = await self._consumer.getmany(timeout_ms=processing.poll_timeout_ms,
                                                     max_records=max_records)
                if not batch:
                    continue
                await self._fill(batch, max_records)
                try:
                    async with self._lock:
                        await self._transaction(batch, epoch)
                    backoff = processing.retry_backoff_ms / 1000
                except (KafkaError, OSError, TimeoutError, _ProduceFailed, _Overtaken) as exc:
                    if isinstance(exc, ProducerFenced) or (
                            isinstance(exc, _ProduceFailed) and isinstance(exc.cause, ProducerFenced)):
                        raise ProducerFenced() from exc
                    self._on_failure(exc, batch)
                    await _sleep_unless(stop, backoff)
                    backoff = min(backoff * 2, processing.retry_backoff_max_ms / 1000)
            # Graceful stop: the last batch is committed; make sure the next owner sees it, then leave.
            async with self._lock:
                await self._await_offsets_visible(set(self._committed))
        finally:
            await self._close_clients()

    async def _fill(self, batch: dict[TopicPartition, list[ConsumerRecord]], max_records: int) -> None:
        """Top the batch up with records already fetched (no waiting): with a backlog, transactions
        then carry ``batch_size`` records instead of whatever one partition's fetch held."""
        count = sum(len(records) for records in batch.values())
        while count < max_records:
            more = await self._consumer.getmany(timeout_ms=0, max_records=max_records - count)
            if not more:
                return
            for tp, records in more.items():
                batch.setdefault(tp, []).extend(records)
                count += len(records)

    async def _check_topics(self) -> None:
        """Warn early (not fatal: they may appear later) when an output topic has no metadata."""
        kafka = self.config.kafka
        for topic in (kafka.output_topic, kafka.dlq_topic):
            try:
                partitions = await asyncio.wait_for(self._producer.partitions_for(topic),
                                                    min(kafka.request_timeout_ms / 1000, 10))
            except (KafkaError, TimeoutError) as exc:
                partitions, reason = None, repr(exc)
            else:
                reason = "no partitions"
            if not partitions:
                log.error("topic %s is not available (%s); batches will be retried until it is",
                          topic, reason)

    async def _close_clients(self) -> None:
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()  # leaves the group
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()

    def _on_failure(self, exc: BaseException, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        if isinstance(exc, _Overtaken):
            self.counters.rewound += 1
            level = logging.DEBUG if exc.routine else logging.WARNING
            log.log(level, "batch not committed, it will be fetched again: %s", exc)
            return
        self.counters.aborted += 1
        if isinstance(exc, _ProduceFailed) and exc.record_specific:
            if len(batch) == 1 and sum(len(r) for r in batch.values()) == 1 and exc.tp is not None:
                key = (exc.tp, exc.offset if exc.offset is not None else -1)
                if key in self._poison:
                    self._poison_strip.add(key)
                self._poison[key] = f"the broker rejected the record: {exc.cause!r}"
                log.error("record %s/%s/%s rejected by the broker (%r); sending it to the DLQ",
                          key[0].topic, key[0].partition, key[1], exc.cause)
            else:
                for tp, records in batch.items():
                    self._isolate[tp] = max(self._isolate.get(tp, -1), records[-1].offset)
                log.warning("the broker rejected a record (%r); replaying the batch one record per "
                            "transaction to isolate it", exc.cause)
            return
        now = time.monotonic()
        if now >= self._log_failures_until:
            self._log_failures_until = now + 10
            log.warning("transaction aborted, batch will be retried: %r", exc)

    # -- rebalance --------------------------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Wait for the in-flight transaction to commit or abort; nothing starts until we return.
        async with self._lock:
            self._assignment_epoch += 1
            self._rebalancing = True
            await self._await_offsets_visible(revoked)
            for tp in revoked:
                self._committed.pop(tp, None)

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self._lock:
            self._assignment_epoch += 1
            self._rebalancing = False
            self._last_heartbeat_ok = time.monotonic()  # joining the group proves membership
            for tps in (self._windows, self._committed, self._isolate):
                for tp in [tp for tp in tps if tp not in assigned]:
                    del tps[tp]
            self._poison = {key: reason for key, reason in self._poison.items() if key[0] in assigned}
            self._poison_strip = {key for key in self._poison_strip if key[0] in assigned}
            log.info("assigned partitions: %s",
                     ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(assigned)) or "none")

    async def _await_offsets_visible(self, partitions: set[TopicPartition]) -> None:
        """Wait until the group coordinator serves the offsets this worker committed last.

        A transaction's commit returns once the coordinator has logged its decision; the offsets become
        visible to OffsetFetch when the commit markers are written a moment later. aiokafka's OffsetFetch
        cannot ask the broker to wait for that (no ``require_stable``), so the worker handing partitions
        over waits for it instead; otherwise the next owner could start from the previous offsets.
        """
        wanted = {tp: self._committed[tp] for tp in partitions if tp in self._committed}
        if not wanted or self._consumer is None:
            return
        timeout = OFFSETS_VISIBLE_TIMEOUT_S
        deadline = time.monotonic() + timeout
        consumer = self._consumer
        while True:
            try:
                seen = await asyncio.gather(*(consumer.committed(tp) for tp in wanted))
                if all(got is not None and got >= offset for got, offset in zip(seen, wanted.values(),
                                                                                strict=True)):
                    return
            except (KafkaError, OSError) as exc:
                log.debug("committed offsets check failed: %r", exc)
            if time.monotonic() >= deadline:
                log.warning("committed offsets of %d partition(s) not visible after %.0f s; "
                            "handing them over anyway", len(wanted), timeout)
                return
            await asyncio.sleep(0.02)

    def _generation(self) -> int | None:
        coordinator = getattr(self._consumer, "_coordinator", None)
        generation = getattr(coordinator, "generation", None)
        return generation if isinstance(generation, int) else None

    def _install_heartbeat_probe(self) -> None:
        """Record when a heartbeat succeeds, so a worker never commits after it may have been evicted.

        aiokafka does not expose the time of the last successful heartbeat; this wraps its coordinator's
        heartbeat call (a private method, present in every aiokafka release with transactions). If it is
        missing, the check is skipped and the transaction timeout alone limits zombie commits.
        """
        coordinator: Any = getattr(self._consumer, "_coordinator", None)
        original = getattr(coordinator, "_do_heartbeat", None)
        if original is None or not asyncio.iscoroutinefunction(original):
            log.warning("cannot observe consumer heartbeats in this aiokafka version; "
                        "relying on the transaction timeout to fence a stalled worker")
            self._heartbeat_probe = False
            return

        async def probe() -> Any:
            ok = await original()
            if ok:
                self._last_heartbeat_ok = time.monotonic()
            return ok

        coordinator._do_heartbeat = probe
        self._last_heartbeat_ok = time.monotonic()
        self._heartbeat_probe = True

    def _check_owner(self, generation: int | None, partitions: Any) -> None:
        if self._heartbeat_probe:
            silence = time.monotonic() - self._last_heartbeat_ok
            if silence > self._membership_ttl:
                # The session may have expired (the process stalled, or the group coordinator is
                # unreachable): another worker may own these partitions already. Never commit then.
                raise _Overtaken(f"no successful heartbeat for {silence:.1f} s")
        current = self._generation()
        if current != generation or (current is not None and current < 0):
            raise _Overtaken(f"group generation changed ({generation} -> {current})")
        assigned = self._consumer.assignment()
        lost = [tp for tp in partitions if tp not in assigned]
        if lost:
            raise _Overtaken(f"partitions no longer assigned: {lost}")

    def _rewind(self, firsts: dict[TopicPartition, int]) -> None:
        """Seek back to the first offset of an uncommitted batch so that it is fetched again."""
        if self._consumer is None:
            return
        assigned = self._consumer.assignment()
        for tp, offset in firsts.items():
            if tp in assigned:
                with contextlib.suppress(IllegalStateError, AssertionError):
                    self._consumer.seek(tp, offset)

    # -- one transaction --------------------------------------------------------------------------

    async def _transaction(self, batch: dict[TopicPartition, list[ConsumerRecord]], epoch: int) -> None:
        firsts = {tp: records[0].offset for tp, records in batch.items()}
        if epoch != self._assignment_epoch or self._rebalancing:
            # A rebalance started or completed while these records were fetched. They may come from the
            # new assignment (positions set from the committed offsets, then advanced past them) or be
            # left over from the old one; either way the first offset of the batch is the committed
            # offset, so seeking there and fetching again is exact.
            self._rewind(firsts)
            raise _Overtaken("rebalance during fetch", routine=True)
        generation = self._generation()
        try:
            self._check_owner(generation, batch)
        except _Overtaken:
            self._rewind(firsts)
            raise
        started = time.perf_counter()
        producer = self._producer
        await producer.begin_transaction()
        try:
            staged, offsets, counts = await self._produce(batch)
            self._check_owner(generation, batch)
            await producer.send_offsets_to_transaction(offsets, self.config.kafka.group_id)
            self._check_owner(generation, batch)
            await producer.commit_transaction()
        except BaseException as exc:
            cause = exc.cause if isinstance(exc, _ProduceFailed) else exc
            if not isinstance(cause, ProducerFenced | asyncio.CancelledError):
                # After a failed produce request the idempotent producer's sequence numbers no longer
                # match the broker's (aiokafka does not repair them): start a fresh producer epoch.
                await self._abort(replace=isinstance(exc, _ProduceFailed))
            self._rewind(firsts)
            raise
        # Committed: now (and only now) the uids count as enriched and the offsets as ours.
        for tp, uids in staged.items():
            window = self._windows.get(tp)
            if window is None:
                window = self._windows[tp] = UidWindow(self.config.processing.dedup_window)
            window.update(uids)
        self._committed.update(offsets)
        for tp, offset in offsets.items():
            limit = self._isolate.get(tp)
            if limit is not None and offset > limit:
                del self._isolate[tp]
        c = self.counters
        c.records_in += counts[0]
        c.enriched += counts[1]
        c.dlq += counts[2]
        c.duplicates += counts[3]
        c.batches += 1
        elapsed = time.perf_counter() - started
        c.batch_seconds_total += elapsed
        c.batch_seconds_max = max(c.batch_seconds_max, elapsed)

    async def _produce(
        self, batch: dict[TopicPartition, list[ConsumerRecord]]
    ) -> tuple[dict[TopicPartition, list[bytes]], dict[TopicPartition, int], tuple[int, int, int, int]]:
        """Transform the whole batch first (a tight loop, kind to CPU caches), then send it."""
        dedup = self.config.processing.dedup_window > 0
        transform = self.transform
        poison = self._poison
        # (record, partition, enriched value or None, dead-letter reason or None)
        prepared: list[tuple[ConsumerRecord, TopicPartition, bytes | None, str | None]] = []
        staged: dict[TopicPartition, list[bytes]] = {}
        offsets: dict[TopicPartition, int] = {}
        n_in = n_dup = 0
        for tp, records in batch.items():
            window = self._windows.get(tp) if dedup else None
            uids: list[bytes] = []
            batch_uids: set[bytes] = set()
            for record in records:
                n_in += 1
                if dedup:
                    uid = None
                    for key, header in record.headers:
                        if key == HDR_EVENT_UID:
                            uid = header
                            break
                    if uid is not None:
                        if uid in batch_uids or (window is not None and uid in window):
                            n_dup += 1
                            continue
                        batch_uids.add(uid)
                        uids.append(uid)
                reason = poison.get((tp, record.offset)) if poison else None
                value = None
                if reason is None:
                    try:
                        value = transform(record.value, record.headers, record.timestamp)
                    except MalformedEvent as exc:
                        reason = str(exc)
                    except Exception as exc:  # a bug must not stop the pipeline: dead-letter it
                        log.exception("enrich failed on %s/%s/%s", tp.topic, tp.partition, record.offset)
                        reason = f"enrich failed: {type(exc).__name__}: {exc}"
                prepared.append((record, tp, value, reason))
            offsets[tp] = records[-1].offset + 1
            if uids:
                staged[tp] = uids

        # Enriched records go into one batch per output partition, sent whole (send_batch): the
        # producer's per-record send costs more than a small event's enrichment (a pure-Python key
        # hash, two coroutines and a future per record). Partitions are the default partitioner's.
        producer = self._producer
        output_topic = self.config.kafka.output_topic
        partition_of: Callable[[bytes], int] | None = None
        resolved = False  # partition_of looked up (on the first enriched record: a batch of dead
        # letters only must not depend on the output topic)
        # output partition -> [batch, input partition and offset of its first record, record count]
        open_batches: dict[int, list[Any]] = {}
        # (future, input partition, input offset: None for a batch of several records)
        pending: list[tuple[Any, TopicPartition, int | None]] = []
        n_out = n_dlq = 0
        for record, tp, value, reason in prepared:
            if value is not None:
                key = record.key
                headers = list(record.headers)
                if not resolved:
                    partition_of, resolved = await self._partitioner(output_topic), True
                if key is not None and partition_of is not None:
                    reason = self._too_large(key, value, headers)
                    if reason is None:
                        partition = partition_of(key)
                        entry = open_batches.get(partition)
                        if entry is not None and entry[0].append(timestamp=None, key=key, value=value,
                                                                 headers=headers) is not None:
                            entry[3] += 1
                        else:
                            if entry is not None:  # full: send it, start the next one
                                pending.append(await self._send_batch(entry, output_topic, partition))
                            builder = producer.create_batch()
                            if builder.append(timestamp=None, key=key, value=value, headers=headers) is None:
                                raise RuntimeError("an empty producer batch refused a record")
                            open_batches[partition] = [builder, tp, record.offset, 1]
                        n_out += 1
                        continue
                else:
                    try:
                        future = await producer.send(output_topic, value, key=key, headers=headers)
                    except KafkaError as exc:
                        if not (isinstance(exc, RecordTooLargeError)
                                or getattr(exc, "errno", None) in _RECORD_ERRNOS):
                            raise
                        reason = f"enriched record too large for the producer: {exc}"
                    else:
                        pending.append((future, tp, record.offset))
                        n_out += 1
                        continue
            pending.append((await self._send_dead_letter(record, tp, reason or "no reason"), tp,
                            record.offset))
            n_dlq += 1
        for partition, entry in open_batches.items():
            pending.append(await self._send_batch(entry, output_topic, partition))
        if pending:
            results = await asyncio.gather(*(p[0] for p in pending), return_exceptions=True)
            for result, (_, tp, offset) in zip(results, pending, strict=True):
                if isinstance(result, BaseException):
                    raise _ProduceFailed(result, tp, offset)
        return staged, offsets, (n_in, n_out, n_dlq, n_dup)

    async def _send_batch(self, entry: list[Any], topic: str,
                          partition: int) -> tuple[Any, TopicPartition, int | None]:
        builder, tp, offset, count = entry
        builder.close()  # complete: no lingering
        future = await self._producer.send_batch(builder, topic, partition=partition)
        return future, tp, offset if count == 1 else None

    def _too_large(self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> str | None:
        """The dead-letter reason for a record the producer's ``send`` would refuse (``max_request_size``),
        worded like it; ``send_batch`` does not check."""
        size = _estimate_size(key, value, headers)
        if size <= self.config.kafka.max_request_size:
            return None
        exc = MessageSizeTooLargeError(
            f"The message is {size} bytes when serialized which is larger than the maximum request size "
            "you have configured with the max_request_size configuration")
        return f"enriched record too large for the producer: {exc}"

    async def _partitioner(self, topic: str) -> Callable[[bytes], int] | None:
        """key -> partition of ``topic`` as the producer's default partitioner picks it (murmur2 of the
        key over the partitions sorted by id), cached per key; None while the topic has no metadata."""
        partitions = await self._producer.partitions_for(topic)
        if not partitions:
            return None
        ordered = tuple(sorted(partitions))
        if self._partition_cache_for != (topic, ordered):
            self._partition_cache_for = (topic, ordered)
            self._partition_cache = {}
        cache = self._partition_cache
        count = len(ordered)

        def partition_of(key: bytes) -> int:
            partition = cache.get(key)
            if partition is None:
                if len(cache) >= _PARTITION_CACHE_SIZE:
                    cache.clear()
                partition = cache[key] = ordered[(murmur2(key) & 0x7FFFFFFF) % count]
            return partition

        return partition_of

    async def _send_dead_letter(self, record: ConsumerRecord, tp: TopicPartition, reason: str) -> Any:
        value = record.value
        key = (tp, record.offset)
        if key in self._poison_strip and value is not None:
            reason += f" (original value of {len(value)} bytes dropped: the DLQ topic rejected it)"
            value = None
        headers = dlq_headers(record.headers, reason, tp.topic, tp.partition, record.offset)
        try:
            return await self._producer.send(self.config.kafka.dlq_topic, value, key=record.key,
                                             headers=headers)
        except KafkaError as exc:
            if value is None or not (isinstance(exc, RecordTooLargeError)
                                     or getattr(exc, "errno", None) in _RECORD_ERRNOS):
                raise
            headers = dlq_headers(record.headers,
                                  reason + f" (original value of {len(value)} bytes dropped: {exc})",
                                  tp.topic, tp.partition, record.offset)
            return await self._producer.send(self.config.kafka.dlq_topic, None, key=record.key,
                                             headers=headers)

    async def _abort(self, *, replace: bool = False) -> None:
        """Abort the open transaction; if the producer cannot, or ``replace``, start a new producer with
        the same transactional id (its registration aborts whatever the old one left open)."""
        try:
            await asyncio.wait_for(self._producer.abort_transaction(),
                                   self.config.kafka.request_timeout_ms / 1000)
        except ProducerFenced:
            raise
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("abort failed (%r); replacing the producer", exc)
            replace = True
        if replace:
            old, self._producer = self._producer, self._new_producer()
            with contextlib.suppress(Exception):
                await old.stop()
            await self._producer.start()


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
