"""The plugin's event source: a confluent-kafka (librdkafka) consumer of the enriched topic.

Live mode consumes in the consumer group ``group_id`` and commits offsets only for records already
handed to Falco: the records of a batch become committable when the framework asks for the next batch
(or closes), and are committed at most every ``commit_interval_ms``. Bounded replay assigns every
partition from its low watermark (or from a time), stops at the end offsets read at open, never
commits, and then reports EOF.

Each record becomes one Falco plugin event (type 322): the 38-byte header, then the record value as
consumed (the enriched record, msgpack), stamped with the record's ``ts`` (GitLab's ``created_at``).
Records larger than ``max_event_size`` and records that are not enriched records are dropped, counted
and logged (rate-limited), never a failure.
"""

from __future__ import annotations

import struct
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, repeat
from operator import attrgetter, is_not
from typing import Any, Final

import msgspec
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Message, TopicPartition

from falco_gitlab.model import ENRICHED_SCHEMA_VERSION, EnrichedRecord, decode_enriched
from falco_source.config import ConfigError, PluginConfig, broker_list, consumer_properties
from falco_source.hostlog import SEV_WARNING, HostLog, KafkaLogger
from falco_source.params import OpenParams

# ss_plugin_rc
RC_SUCCESS: Final = 0
RC_FAILURE: Final = 1
RC_TIMEOUT: Final = -1
RC_EOF: Final = 2

PPME_PLUGINEVENT_E: Final = 322
HEADER: Final = struct.Struct("<QQIHIIII")  # ts, tid, len, type, nparams, len(id)=4, len(payload), id
HEADER_LEN: Final = HEADER.size  # 38
NO_VALUE: Final = 0xFFFF_FFFF_FFFF_FFFF  # ts "now" / tid "no thread"


class _BatchRecord(EnrichedRecord, gc=False):
    """An EnrichedRecord the cyclic GC does not track (its values are str/int/bool/bytes: no cycle).

    next_batch keeps a batch's decoded records alive until the next batch; as tracked objects they
    made the collector run (and walk them) every few hundred records, a cost the memory path, which
    frees each record at once, does not pay.
    """


# decode_enriched without the call around it (next_batch checks the version itself)
_decode_record: Final = msgspec.msgpack.Decoder(_BatchRecord).decode


# Per-message accessors for map(): C calls, no Python frame per message.
_error_of: Final[Callable[[Any], Any]] = Message.error
_value_of: Final[Callable[[Any], Any]] = Message.value
_partition_of: Final[Callable[[Any], Any]] = Message.partition
_offset_of: Final[Callable[[Any], Any]] = Message.offset
_version_of: Final = attrgetter("version")
_ts_of: Final = attrgetter("ts")
_HEADER_LEN_PLUS: Final = HEADER_LEN.__add__

# (rc, packed events, offset of each event, the decoded record of each event)
Batch = tuple[int, bytearray, "array[int]", list[EnrichedRecord]]
# (packed events, offset of each event, the decoded record of each event)
Packed = tuple[bytearray, "array[int]", list[EnrichedRecord]]


class SourceError(RuntimeError):
    """open/next_batch cannot go on; the message is for get_last_error()."""


@dataclass(slots=True)
class Counters:
    """Cumulative over the plugin handle's life (several open/close cycles)."""

    delivered: int = 0
    dropped_oversized: int = 0
    dropped_malformed: int = 0
    lag: int = 0
    kafka_errors: int = 0
    commits: int = 0


def pack_event(buf: bytearray, ts: int, payload: bytes, plugin_id: int) -> None:
    """Append one plugin event to ``buf``."""
    size = len(payload)
    buf += HEADER.pack(ts, NO_VALUE, HEADER_LEN + size, PPME_PLUGINEVENT_E, 2, 4, size, plugin_id)
    buf += payload


def event_ts(ts: int) -> int:
    return ts if 0 < ts < NO_VALUE else NO_VALUE


class KafkaSource:
    def __init__(
        self,
        config: PluginConfig,
        params: OpenParams,
        plugin_id: int,
        log: HostLog,
        counters: Counters,
    ) -> None:
        self.config = config
        self.params = params
        self.plugin_id = plugin_id
        self.log = log
        self.counters = counters
        self.topic = config.topic
        self.replay = params.mode == "replay"
        self._consumer: Any = None
        self._max_payload = config.max_event_size - HEADER_LEN
        self._timeout = config.poll_timeout_ms / 1000.0
        self._fatal: str | None = None
        # replay bookkeeping, by partition
        self._start: dict[int, int] = {}
        self._end: dict[int, int] = {}
        self._pos: dict[int, int] = {}
        self._remaining: set[int] = set()
        # live commit bookkeeping: partition -> next offset
        self._inflight: dict[int, int] = {}
        self._committable: dict[int, int] = {}
        self._last_commit = 0.0
        self._lag_at = 0.0

    # ---- open / close ---------------------------------------------------------------------------

    def open(self) -> None:
        try:
            props = consumer_properties(self.config)  # reads the secret files
        except ConfigError as exc:
            raise SourceError(str(exc)) from None
        start = self.params.start if self.params.mode == "live" else None
        props["auto.offset.reset"] = (
            "earliest" if self.replay else (start if isinstance(start, str) else self.config.initial_offset)
        )
        props["enable.partition.eof"] = self.replay
        props["logger"] = KafkaLogger(self.log)
        props["error_cb"] = self._on_error
        if not self.replay:
            props["on_commit"] = self._on_commit
        try:
            self._consumer = Consumer(props)
        except (KafkaException, ValueError, TypeError) as exc:
            raise SourceError(f"cannot create the Kafka consumer: {exc}") from None
        try:
            self._open_topic()
        except BaseException:
            self._close_consumer()
            raise

    def _open_topic(self) -> None:
        timeout = self.config.open_timeout_ms / 1000.0
        brokers = ",".join(broker_list(self.config))
        try:
            metadata = self._consumer.list_topics(self.topic, timeout=timeout)
        except KafkaException as exc:
            raise SourceError(
                f"cannot reach the Kafka brokers {brokers} within {timeout:g}s: {exc.args[0]}"
            ) from None
        topic = metadata.topics.get(self.topic)
        missing = topic is None or topic.error is not None or not topic.partitions
        if self.replay:
            if missing:
                reason = topic.error if topic is not None and topic.error is not None else "no partitions"
                raise SourceError(f"topic {self.topic} is not available on {brokers}: {reason}")
            self._assign_replay(sorted(topic.partitions), timeout)
            return
        if missing:
            self.log.warning(f"topic {self.topic} does not exist (yet) on {brokers}; waiting for it")
        self._consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self.log.info(f"consuming {self.topic} in group {self.config.group_id} ({self.params.describe()})")

    def _assign_replay(self, partitions: list[int], timeout: float) -> None:
        consumer = self._consumer
        starts: dict[int, int] = {}
        try:
            for p in partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=timeout, cached=False
                )
                self._end[p] = high
                starts[p] = low
            if isinstance(self.params.start, int):
                found = consumer.offsets_for_times(
                    [TopicPartition(self.topic, p, self.params.start) for p in partitions], timeout=timeout
                )
                for tp in found:
                    # -1: no record at or after the time in this partition
                    starts[tp.partition] = max(starts[tp.partition], tp.offset) if tp.offset >= 0 else (
                        self._end[tp.partition]
                    )
        except KafkaException as exc:
            raise SourceError(f"cannot read the offsets of {self.topic}: {exc.args[0]}") from None
        assignment = []
        for p in partitions:
            self._start[p] = self._pos[p] = starts[p]
            if starts[p] < self._end[p]:
                self._remaining.add(p)
                assignment.append(TopicPartition(self.topic, p, starts[p]))
        consumer.assign(assignment)
        total = sum(self._end[p] - self._start[p] for p in partitions)
        self.log.info(
            f"replaying {self.topic}: {len(assignment)}/{len(partitions)} partitions, up to {total} "
            f"records ({self.params.describe()})"
        )

    def close(self) -> None:
        if self._consumer is None:
            return
        if not self.replay:
            # The last batch was handed to Falco: its records are delivered. The consumer's close
            # waits for this commit before it leaves the group.
            self._committable.update(self._inflight)
            self._inflight.clear()
            self._commit(force=True, asynchronous=True)
        self._close_consumer()

    def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close()
            except (KafkaException, RuntimeError) as exc:
                self.log.warning(f"closing the Kafka consumer: {exc}")

    # ---- next_batch -------------------------------------------------------------------------------

    def next_batch(self, batch_size: int) -> Batch:
        """(rc, events, offset of each event in events, its decoded record). SUCCESS only with events."""
        offsets: array[int] = array("I")
        records: list[EnrichedRecord] = []
        if self._fatal is not None:
            raise SourceError(self._fatal)
        if self.replay and not self._remaining:
            return RC_EOF, bytearray(), offsets, records
        if not self.replay:
            self._committable.update(self._inflight)
            self._inflight.clear()
            if self._committable:
                self._commit(force=False, asynchronous=True)
        try:
            messages = self._receive(batch_size)
        except KafkaException as exc:
            self._kafka_error(exc.args[0])
            messages = []
        if self._fatal is not None:
            raise SourceError(self._fatal)

        if messages:
            packed = self._pack_fast(messages)
            if packed is None:
                packed = self._pack_each(messages)
            events, offsets, records = packed
            if offsets:
                self.counters.delivered += len(offsets)
                return RC_SUCCESS, events, offsets, records
        if self.replay:
            if not messages and self._remaining:
                self._check_positions()
            if not self._remaining:
                return RC_EOF, bytearray(), offsets, records
        return RC_TIMEOUT, bytearray(), offsets, records

    def _receive(self, batch_size: int) -> list[Any]:
        """What the consumer holds now, up to batch_size; when it holds nothing, wait for a record.

        consume(n, timeout) blocks until it has n records or the timeout expired: with fewer records
        queued (a low live rate, the end of a replay, a fetch not yet answered) it held them back for
        the whole poll timeout. Here records already fetched go to Falco at once, and the wait ends at
        the first record that arrives.
        """
        consumer = self._consumer
        messages: list[Any] = consumer.consume(num_messages=batch_size, timeout=0)
        if messages:
            return messages
        if self.replay and self._remaining:
            # the records before the end offsets may all be consumed already (the last positions
            # are transaction markers, which never come as records): EOF without waiting
            self._check_positions()
            if not self._remaining:
                return messages
        first = consumer.poll(self._timeout)
        if first is None:
            return messages
        if batch_size == 1:
            return [first]
        rest: list[Any] = consumer.consume(num_messages=batch_size - 1, timeout=0)
        rest.insert(0, first)
        return rest

    def _pack_fast(self, messages: list[Any]) -> Packed | None:
        """The batch when every message is a deliverable record (the usual case), else None.

        Iterates with map/zip/accumulate, in C, instead of a Python loop per message (about 900 fewer
        instructions per event, measured with callgrind). Nothing is changed before the batch is known to
        qualify, so the per-message loop can take over from scratch: an error or EOF message, a
        tombstone, an oversized or malformed record, a newer version, a record outside the replay
        range all go there, where each case is handled and counted.
        """
        # identity, not ==: confluent-kafka's KafkaError == None leaves a TypeError set (SystemError)
        if any(map(is_not, map(_error_of, messages), repeat(None))):
            return None
        values = list(map(_value_of, messages))
        try:
            sizes = list(map(len, values))  # TypeError: a tombstone (None)
            if max(sizes) > self._max_payload:
                return None
            records: list[EnrichedRecord] = list(map(_decode_record, values))
        except (TypeError, msgspec.MsgspecError):
            return None
        if max(map(_version_of, records)) > ENRICHED_SCHEMA_VERSION:
            return None
        # Kafka hands each partition's records in offset order: the last offset is the highest.
        last = dict(zip(map(_partition_of, messages), map(_offset_of, messages), strict=True))
        if self.replay:
            end = self._end
            remaining = self._remaining
            for partition, offset in last.items():
                if partition not in remaining or offset >= end[partition]:
                    return None
            for partition, offset in last.items():
                self._pos[partition] = offset + 1
                if offset + 1 >= end[partition]:
                    self._finish(partition)
        else:
            inflight = self._inflight
            for partition, offset in last.items():
                inflight[partition] = offset + 1

        stamps = list(map(_ts_of, records))
        if min(stamps) <= 0 or max(stamps) >= NO_VALUE:
            stamps = [ts if 0 < ts < NO_VALUE else NO_VALUE for ts in stamps]
        lengths = list(map(_HEADER_LEN_PLUS, sizes))
        count = len(values)
        parts: list[bytes] = [b""] * (2 * count)
        parts[0::2] = map(
            HEADER.pack, stamps, repeat(NO_VALUE), lengths, repeat(PPME_PLUGINEVENT_E), repeat(2),
            repeat(4), sizes, repeat(self.plugin_id),
        )
        parts[1::2] = values
        offsets = array("I", accumulate(lengths, initial=0))
        offsets.pop()  # the end of the last event
        return bytearray().join(parts), offsets, records

    def _pack_each(self, messages: list[Any]) -> Packed:
        """The batch, message by message: every case, including those _pack_fast leaves here."""
        offsets: array[int] = array("I")
        records: list[EnrichedRecord] = []
        # The batch is built as a list of parts (header, value, header, value, ...) joined once at
        # the end: one copy of each value, no reallocation of a growing buffer.
        parts: list[bytes] = []
        add_part = parts.append
        add_offset = offsets.append
        add_record = records.append
        decode = _decode_record
        header = HEADER.pack
        max_payload = self._max_payload
        plugin_id = self.plugin_id
        replay = self.replay
        end = self._end
        remaining = self._remaining
        inflight = self._inflight
        pos = self._pos
        position = 0
        for message in messages:
            if message.error() is not None:
                self._message_error(message)
                continue
            partition = message.partition()
            offset = message.offset()
            if replay:
                if partition not in remaining:
                    continue
                if offset >= end[partition]:
                    self._finish(partition)
                    continue
                pos[partition] = offset + 1
            else:
                inflight[partition] = offset + 1
            value = message.value()
            try:
                record = decode(value) if value is not None and len(value) <= max_payload else None
            except msgspec.MsgspecError:
                record = None
            if record is not None and record.version <= ENRICHED_SCHEMA_VERSION:
                size = len(value)
                ts = record.ts
                add_record(record)
                add_offset(position)
                position += HEADER_LEN + size
                add_part(header(
                    ts if 0 < ts < NO_VALUE else NO_VALUE, NO_VALUE, HEADER_LEN + size,
                    PPME_PLUGINEVENT_E, 2, 4, size, plugin_id,
                ))
                add_part(value)
            else:
                self._drop(partition, offset, value)
            if replay and offset + 1 >= end[partition]:
                self._finish(partition)

        return bytearray().join(parts), offsets, records

    def _message_error(self, message: Any) -> None:
        error = message.error()
        if error.code() == KafkaError._PARTITION_EOF:
            partition = message.partition()
            if self.replay and partition in self._remaining:
                self._finish(partition)
            return
        self._kafka_error(error)

    def _drop(self, partition: int, offset: int, value: bytes | None) -> None:
        """Count and log a record next_batch does not deliver (the slow path of next_batch)."""
        size = len(value) if value is not None else -1
        if size > self._max_payload:
            self.counters.dropped_oversized += 1
            self.log.limited(
                "oversized", SEV_WARNING,
                f"dropped record {self.topic}/{partition}/{offset}: {size} bytes is more than "
                f"max_event_size {self.config.max_event_size} allows",
            )
            return
        try:
            if value is None:
                raise ValueError("record has no value (tombstone)")
            decode_enriched(value)  # raises the error that explains why it is not a record
            raise ValueError("not a supported enriched record")  # pragma: no cover - defensive
        except (msgspec.MsgspecError, ValueError) as exc:
            self.counters.dropped_malformed += 1
            self.log.limited(
                "malformed", SEV_WARNING,
                f"dropped record {self.topic}/{partition}/{offset}: not an enriched record: {exc}",
            )

    def _finish(self, partition: int) -> None:
        self._remaining.discard(partition)
        self._pos[partition] = max(self._pos.get(partition, 0), self._end[partition])
        try:
            self._consumer.pause([TopicPartition(self.topic, partition)])
        except KafkaException as exc:
            self.log.debug(f"pausing partition {partition}: {exc}")

    def _check_positions(self) -> None:
        """A partition whose position passed its end offset is done (e.g. trailing txn markers)."""
        try:
            positions = self._consumer.position(
                [TopicPartition(self.topic, p) for p in sorted(self._remaining)]
            )
        except KafkaException:
            return
        for tp in positions:
            if tp.offset != OFFSET_INVALID and tp.offset >= self._end[tp.partition]:
                self._finish(tp.partition)

    # ---- commits (live mode) ----------------------------------------------------------------------

    def _commit(self, *, force: bool, asynchronous: bool) -> None:
        if not self._committable or self._consumer is None:
            return
        now = time.monotonic()
        interval = self.config.commit_interval_ms / 1000.0
        if not force and interval > 0 and now - self._last_commit < interval:
            return
        offsets = [TopicPartition(self.topic, p, o) for p, o in sorted(self._committable.items())]
        self._committable.clear()
        self._last_commit = now
        try:
            self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
            self.counters.commits += 1
        except KafkaException as exc:
            error = exc.args[0]
            if getattr(error, "code", lambda: None)() != KafkaError._NO_OFFSET:
                self.log.limited("commit", SEV_WARNING, f"offset commit failed: {error}")
                self._requeue(offsets)

    def _requeue(self, offsets: list[Any]) -> None:
        for tp in offsets:
            if tp.offset > self._committable.get(tp.partition, -1):
                self._committable[tp.partition] = tp.offset

    def _on_commit(self, error: Any, partitions: list[Any]) -> None:
        if error is None:
            return
        self.counters.kafka_errors += 1
        self.log.limited("commit", SEV_WARNING, f"offset commit failed: {error}")
        self._requeue([tp for tp in partitions if tp.offset >= 0])

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self.log.info(f"assigned {self.topic} partitions {[tp.partition for tp in partitions]}")

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        revoked = {tp.partition for tp in partitions}
        offsets = [
            TopicPartition(self.topic, p, o) for p, o in sorted(self._committable.items()) if p in revoked
        ]
        for p in revoked:
            self._committable.pop(p, None)
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
                self.counters.commits += 1
            except KafkaException as exc:
                self.log.warning(f"commit before revocation failed: {exc.args[0]}")
        self.log.info(f"revoked {self.topic} partitions {sorted(revoked)}")

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        for tp in partitions:
            self._committable.pop(tp.partition, None)
            self._inflight.pop(tp.partition, None)
        self.log.warning(f"lost {self.topic} partitions {[tp.partition for tp in partitions]}")

    # ---- errors, progress, lag --------------------------------------------------------------------

    def _on_error(self, error: Any) -> None:
        self._kafka_error(error)

    def _kafka_error(self, error: Any) -> None:
        self.counters.kafka_errors += 1
        fatal = getattr(error, "fatal", None)
        if callable(fatal) and fatal():
            self._fatal = f"fatal Kafka consumer error: {error}"
            self.log.error(self._fatal)
            return
        self.log.limited(f"kafka:{getattr(error, 'code', lambda: error)()}", SEV_WARNING, f"Kafka: {error}")

    def progress(self) -> tuple[int, str]:
        """(hundredths of a percent, text)."""
        if not self.replay:
            return 0, f"live: {self.counters.delivered} events delivered, consumer lag {self.lag()}"
        total = sum(self._end[p] - self._start[p] for p in self._end)
        done = sum(min(self._pos[p], self._end[p]) - self._start[p] for p in self._end)
        pct = 10000 if total <= 0 else min(10000, done * 10000 // total)
        return pct, f"{pct / 100:.2f}% ({done}/{total} records of {self.topic})"

    def lag(self) -> int:
        """Records behind the end of the assigned partitions (refreshed at most once a second)."""
        now = time.monotonic()
        if self._consumer is None or now - self._lag_at < 1.0:
            return self.counters.lag
        self._lag_at = now
        if self.replay:
            self.counters.lag = sum(self._end[p] - min(self._pos[p], self._end[p]) for p in self._end)
            return self.counters.lag
        try:
            assignment = self._consumer.assignment()
            positions = self._consumer.position(assignment) if assignment else []
            lag = 0
            for tp in positions:
                _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    lag += max(0, high - tp.offset)
            self.counters.lag = lag
        except KafkaException:
            pass
        return self.counters.lag
