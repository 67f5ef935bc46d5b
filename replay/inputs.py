"""Sources of events for replay: files of raw GitLab payloads, files of enriched records, Kafka.

File formats
------------

Raw GitLab payloads (``*.json``): one JSON object, a JSON array of objects (GitLab's batched
delivery), or several objects one after the other (JSON lines, or pretty-printed objects
concatenated). Each object is flattened with ``enrich.flatten`` exactly as the enrich stage does
(optionally with a destination name and GeoIP databases). A directory stands for its ``*.json``,
``*.jsonl`` and ``*.ndjson`` files, recursively, in sorted path order.

Enriched records: a stream of length-prefixed records, each a 4-byte big-endian unsigned length
followed by that many bytes of one msgpack ``EnrichedRecord`` (``falco_gitlab.model.encode_enriched``).
``write_enriched_file`` writes one; the format is detected by the first non-blank byte (``{`` or ``[``
means JSON; a length prefix starts with a zero byte for any record under 16 MB).
"""

from __future__ import annotations

import json
import struct
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Final, Literal

import msgspec

from falco_gitlab.model import EnrichedRecord, GeoInfo, decode_enriched, encode_enriched
from replay.errors import InputError

LENGTH: Final = struct.Struct(">I")
MAX_RECORD: Final = 64 * 1024 * 1024
RAW_SUFFIXES: Final = (".json", ".jsonl", ".ndjson")

Format = Literal["json", "enriched"]
# Called with (where, reason) for an event that cannot be used; the default raises InputError.
OnError = Callable[[str, str], None]
GeoLookup = Callable[[str], GeoInfo | None]


def _raise(where: str, reason: str) -> None:
    raise InputError(f"{where}: {reason}")


# --- enriched length-prefixed files ----------------------------------------------------------------


def write_enriched_file(path: str | Path | IO[bytes], records: Iterable[EnrichedRecord]) -> int:
    """Write records in the length-prefixed format; returns how many were written."""
    if isinstance(path, (str, Path)):
        with open(path, "wb") as handle:
            return write_enriched_file(handle, records)
    count = 0
    for record in records:
        data = encode_enriched(record)
        path.write(LENGTH.pack(len(data)))
        path.write(data)
        count += 1
    return count


def iter_enriched(data: bytes, *, origin: str = "<enriched>", on_error: OnError = _raise
                  ) -> Iterator[EnrichedRecord]:
    """Records of a length-prefixed buffer. A truncated tail is an error (reported via on_error)."""
    offset = 0
    index = 0
    size = len(data)
    while offset < size:
        where = f"{origin}: record {index} at byte {offset}"
        if size - offset < LENGTH.size:
            on_error(where, "truncated length prefix")
            return
        (length,) = LENGTH.unpack_from(data, offset)
        if length > MAX_RECORD or offset + LENGTH.size + length > size:
            on_error(where, f"record length {length} runs past the end of the data ({size - offset - 4} "
                     "bytes left): not a length-prefixed enriched file, or truncated")
            return
        body = data[offset + LENGTH.size:offset + LENGTH.size + length]
        offset += LENGTH.size + length
        index += 1
        try:
            yield decode_enriched(body)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            on_error(where, f"not an enriched record: {exc}")


# --- raw GitLab payloads ---------------------------------------------------------------------------


def detect_format(data: bytes) -> Format:
    """``json`` if the data starts (after blanks / a BOM) with ``{`` or ``[``, else ``enriched``."""
    stripped = data.lstrip(b" \t\r\n")
    if stripped.startswith(b"\xef\xbb\xbf"):
        stripped = stripped[3:].lstrip(b" \t\r\n")
    if not stripped or stripped[:1] in (b"{", b"["):
        return "json"
    return "enriched"


def iter_json_payloads(data: bytes, *, origin: str = "<json>", on_error: OnError = _raise) -> Iterator[bytes]:
    """Each GitLab event of a JSON document or stream, as the bytes enrich would have received.

    A top-level object is passed through byte for byte; elements of a top-level array are re-encoded
    (compact JSON, same keys and values).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        on_error(origin, f"not UTF-8: {exc}")
        return
    decoder = json.JSONDecoder()
    idx = 0
    n = len(text)
    while True:
        while idx < n and text[idx] in " \t\r\n":
            idx += 1
        if idx >= n:
            return
        try:
            value, end = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as exc:
            on_error(origin, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")
            return
        where = f"{origin}: line {text.count(chr(10), 0, idx) + 1}"
        if isinstance(value, dict):
            yield text[idx:end].encode("utf-8")
        elif isinstance(value, list):
            for position, element in enumerate(value):
                if isinstance(element, dict):
                    yield msgspec.json.encode(element)
                else:
                    on_error(f"{where}, array element {position}", "not a JSON object")
        else:
            on_error(where, f"expected a JSON object or an array of objects, got {type(value).__name__}")
        idx = end


def flatten_payloads(payloads: Iterable[bytes], *, destination: str | None = None,
                     geo: GeoLookup | None = None, received_at_ns: int | None = None,
                     origin: str = "<payloads>", on_error: OnError = _raise) -> Iterator[EnrichedRecord]:
    """Raw GitLab payloads to enriched records, via enrich.flatten (MalformedEvent -> on_error)."""
    from enrich.flatten import MalformedEvent, flatten

    for index, raw in enumerate(payloads):
        try:
            yield flatten(raw, destination=destination, header_event_type=None,
                          received_at_ns=received_at_ns if received_at_ns is not None else time.time_ns(),
                          geo=geo)
        except MalformedEvent as exc:
            on_error(f"{origin}: event {index}", str(exc))


def records_from_bytes(data: bytes, *, origin: str = "<input>", destination: str | None = None,
                       geo: GeoLookup | None = None, on_error: OnError = _raise) -> Iterator[EnrichedRecord]:
    """Records of one buffer, whatever its format (raw JSON payloads or length-prefixed enriched)."""
    if detect_format(data) == "enriched":
        yield from iter_enriched(data, origin=origin, on_error=on_error)
    else:
        yield from flatten_payloads(iter_json_payloads(data, origin=origin, on_error=on_error),
                                    destination=destination, geo=geo, origin=origin, on_error=on_error)


def input_files(path: str | Path) -> list[Path]:
    """The files a path stands for: itself, or a directory's raw payload files (recursive, sorted)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in RAW_SUFFIXES and p.is_file())
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    return [path]


def records_from_path(path: str | Path, *, destination: str | None = None, geo: GeoLookup | None = None,
                      on_error: OnError = _raise) -> Iterator[EnrichedRecord]:
    """Records of a file, a directory of payload files, or ``-`` (standard input)."""
    if str(path) == "-":
        yield from records_from_bytes(sys.stdin.buffer.read(), origin="<stdin>", destination=destination,
                                      geo=geo, on_error=on_error)
        return
    for file in input_files(path):
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise InputError(f"{file}: cannot read: {exc.strerror or exc}") from None
        yield from records_from_bytes(data, origin=str(file), destination=destination, geo=geo,
                                      on_error=on_error)


def open_geoip(city_db: str | None, asn_db: str | None = None) -> GeoLookup:
    """A lookup function backed by enrich.geo.GeoIP (imported only when asked for)."""
    try:
        from enrich.geo import GeoIP
    except ImportError as exc:
        raise InputError(f"GeoIP enrichment is not available in this installation: {exc}") from None
    try:
        geoip = GeoIP(city_db=city_db, asn_db=asn_db)
    except Exception as exc:  # GeoDatabaseError and friends: report, do not guess
        raise InputError(f"cannot open GeoIP database: {exc}") from None
    lookup: GeoLookup = geoip.lookup
    return lookup


# --- Kafka -----------------------------------------------------------------------------------------


def parse_since(text: str) -> int:
    """ISO-8601 (``Z`` or an offset; no zone means UTC) to ms since the epoch, for offsets_for_times."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"--since: not an ISO-8601 time: {text!r}") from None
    if moment.tzinfo is None:
        from datetime import UTC

        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def iter_kafka(bootstrap_servers: str, topic: str, *, from_beginning: bool = False,
               since_ms: int | None = None,
               follow: bool = False, group_id: str | None = None, on_error: OnError = _raise,
               poll_timeout: float = 0.5, extra_config: dict[str, Any] | None = None
               ) -> Iterator[EnrichedRecord]:
    """Enriched records of a topic, read with isolation.level=read_committed.

    Bounded (the default): every partition is read up to the end offset it had when the replay
    started, then the iterator ends. From the beginning unless ``since_ms`` (the first record at or
    after that time) or a ``group_id`` with committed offsets says otherwise. ``follow``: keep reading
    new records until the consumer is closed (the caller stops iterating); starts at the end unless
    ``from_beginning``/``since_ms``/committed offsets say otherwise.
    """
    from confluent_kafka import (
        OFFSET_BEGINNING,
        OFFSET_END,
        OFFSET_STORED,
        Consumer,
        KafkaError,
        TopicPartition,
    )

    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "group.id": group_id or f"falco-gitlab-replay-{uuid.uuid4().hex[:12]}",
        "enable.auto.commit": group_id is not None,
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest" if not follow or from_beginning else "latest",
        **(extra_config or {}),
    }
    consumer = Consumer(config)
    try:
        partitions = _topic_partitions(consumer, bootstrap_servers, topic)
        ends: dict[int, int] = {}
        starts: dict[int, int] = {}
        for partition in partitions:
            low, high = _watermarks(consumer, TopicPartition(topic, partition))
            ends[partition] = high
            starts[partition] = low
        assignment: list[Any] = []
        if since_ms is not None:
            found = consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in partitions],
                                               timeout=15)
            for tp in found:
                offset = tp.offset if tp.offset >= 0 else ends[tp.partition]
                starts[tp.partition] = offset
                assignment.append(TopicPartition(topic, tp.partition, offset))
        else:
            if from_beginning:
                initial = OFFSET_BEGINNING
            elif group_id is not None:
                initial = OFFSET_STORED
            else:
                initial = OFFSET_END if follow else OFFSET_BEGINNING
            assignment = [TopicPartition(topic, p, initial) for p in partitions]
        remaining = set(partitions) if not follow else set()
        if not follow and since_ms is not None:
            remaining = {p for p in partitions if starts[p] < ends[p]}
        elif not follow:
            remaining = {p for p in partitions if ends[p] > 0}
        if not follow and not remaining:
            return
        consumer.assign(assignment)
        while follow or remaining:
            message = consumer.poll(poll_timeout)
            if message is None:
                continue
            partition = message.partition() or 0
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    if not follow and (message.offset() or 0) >= ends.get(partition, 0):
                        remaining.discard(partition)
                    continue
                if error.fatal() or not error.retriable():
                    raise InputError(f"Kafka error on {topic}/{partition}: {error.str()}")
                continue
            offset = message.offset() or 0
            if not follow:
                if partition not in remaining or offset >= ends[partition]:
                    remaining.discard(partition)
                    continue
                if offset + 1 >= ends[partition]:
                    remaining.discard(partition)
            value = message.value()
            where = f"{topic}/{partition}/{offset}"
            if value is None:
                on_error(where, "record has no value")
                continue
            try:
                record = decode_enriched(value)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                on_error(where, f"not an enriched record: {exc}")
                continue
            yield record
    finally:
        consumer.close()


# How long to wait for a topic that was only just created (its metadata or leaders not yet known).
METADATA_WAIT_S = 15.0


def _topic_partitions(consumer: Any, bootstrap_servers: str, topic: str) -> list[int]:
    """The topic's partitions, waiting a little for a topic that was only just created."""
    deadline = time.monotonic() + METADATA_WAIT_S
    while True:
        metadata = consumer.list_topics(topic, timeout=METADATA_WAIT_S)
        topic_md = metadata.topics.get(topic)
        problem: Any = "no such topic" if topic_md is None else topic_md.error
        if problem is None and not topic_md.partitions:
            problem = "no partitions"
        if problem is None and any(p.leader < 0 for p in topic_md.partitions.values()):
            problem = "a partition has no leader"
        if problem is None:
            return sorted(topic_md.partitions)
        if time.monotonic() >= deadline:
            raise InputError(f"Kafka topic {topic!r} on {bootstrap_servers}: {problem}")
        time.sleep(0.25)


def _watermarks(consumer: Any, partition: Any) -> tuple[int, int]:
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + METADATA_WAIT_S
    while True:
        try:
            low, high = consumer.get_watermark_offsets(partition, timeout=METADATA_WAIT_S)
            return int(low), int(high)
        except KafkaException as exc:
            if time.monotonic() >= deadline:
                raise InputError(f"cannot read the offsets of {partition.topic}/{partition.partition}: "
                                 f"{exc}") from None
            time.sleep(0.25)
