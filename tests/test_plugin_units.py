"""The plugin's Python parts without the library or Kafka: config, schema, open params, extraction, events."""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_INVALID, KafkaError, Message, TopicPartition

from falco_gitlab.fields import CATALOGUE, lookup_path, plugin_fields
from falco_gitlab.model import EnrichedRecord, encode_enriched
from falco_source import meta
from falco_source.build import c_string
from falco_source.config import ConfigError, consumer_properties, init_schema, parse_config
from falco_source.extract import Extractor
from falco_source.hostlog import SEV_INFO, SEV_WARNING, HostLog, KafkaLogger
from falco_source.params import OpenParams, OpenParamsError, parse_open_params
from falco_source.source import (
    HEADER,
    HEADER_LEN,
    NO_VALUE,
    RC_EOF,
    RC_SUCCESS,
    Counters,
    KafkaSource,
    event_ts,
    pack_event,
)
from tests.plugin_support import expected_value, seed_records

# --- init_config ------------------------------------------------------------------------------------


def test_minimal_config_gets_the_defaults() -> None:
    config = parse_config('{"brokers": "k1:9092, k2:9092"}')
    assert config.topic == "gitlab.audit.enriched"
    assert config.batch_size == 128 and config.max_event_size == 1024 * 1024
    assert config.poll_timeout_ms == 30
    props = consumer_properties(config)
    assert props["bootstrap.servers"] == "k1:9092,k2:9092"
    assert props["enable.auto.commit"] is False
    assert props["enable.auto.offset.store"] is False
    assert props["isolation.level"] == "read_committed"
    assert props["security.protocol"] == "plaintext"


def test_empty_config_text_is_an_empty_object() -> None:
    with pytest.raises(ConfigError, match="missing required field `brokers`"):
        parse_config("  ")


def test_tls_and_sasl_map_to_librdkafka(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("CA")
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    config = parse_config(json.dumps({
        "brokers": ["k1:9093"],
        "tls": {"ca_file": str(ca), "verify_hostname": False},
        "sasl": {"mechanism": "SCRAM-SHA-256", "username": "falco", "password_file": str(secret)},
        "kafka": {"session.timeout.ms": 10000},
    }))
    props = consumer_properties(config)
    assert props["security.protocol"] == "sasl_ssl"
    assert props["ssl.ca.location"] == str(ca)
    assert props["ssl.endpoint.identification.algorithm"] == "none"
    assert props["sasl.mechanism"] == "SCRAM-SHA-256"
    assert props["sasl.username"] == "falco"
    assert props["sasl.password"] == "s3cret"
    assert props["session.timeout.ms"] == 10000


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"brokers": "k:1", "security_protocol": "plaintext", "tls": {}}, "tls is set but"),
        ({"brokers": "k:1", "security_protocol": "sasl_ssl"}, "needs a sasl section"),
        ({"brokers": "k:1", "sasl": {"username": "u", "password": "p", "password_file": "/x"}},
         "exactly one"),
        ({"brokers": "k:1", "tls": {"cert_file": "/etc/hostname"}}, "go together"),
        ({"brokers": "k:1", "kafka": {"group.id": "x"}}, "kafka.group.id is managed"),
        ({"brokers": "k:1", "max_event_size": 10}, "Expected `int` >= 1024 (at max_event_size)"),
        ({"brokers": "k:1", "initial_offset": "middle"}, "(at initial_offset)"),
        ({"brokers": "k:1", "tls": {"cafile": "x"}}, "unknown field `cafile` (at tls)"),
        ({"brokers": ""}, "brokers is empty"),
        ({"brokers": "k:99999"}, "is not host:port"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps(config))
    assert message in str(info.value)


def test_init_schema_is_self_contained_and_agrees_with_the_parser(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")  # a stand-in for Falco's valijson
    schema = init_schema()
    text = json.dumps(schema)
    assert "$ref" not in text and "$defs" not in text
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    good = [
        {"brokers": "k:1"},
        {"brokers": ["a:1", "b:2"], "batch_size": 1, "tls": {"verify_hostname": True}},
        {"brokers": "k:1", "sasl": {"username": "u", "password": "p"}, "kafka": {"a.b": 1, "c": "d"}},
    ]
    for config in good:
        assert list(validator.iter_errors(config)) == [], config
        parse_config(json.dumps(config))
    bad = [{}, {"brokers": "k:1", "unknown": 1}, {"brokers": "k:1", "batch_size": 0},
           {"brokers": "k:1", "tls": {"nope": 1}}, {"brokers": 5}, {"brokers": "k:1", "log_level": "loud"}]
    for config in bad:
        assert list(validator.iter_errors(config)), config
        with pytest.raises(ConfigError):
            parse_config(json.dumps(config))


# --- open params --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", OpenParams("live", None)),
        ("live", OpenParams("live", None)),
        ("live:earliest", OpenParams("live", "earliest")),
        ("replay", OpenParams("replay", "earliest")),
        ("replay:earliest", OpenParams("replay", "earliest")),
        ("replay:@1714521600000", OpenParams("replay", 1714521600000)),
        ("replay:2024-05-01T00:00:00Z", OpenParams("replay", 1714521600000)),
        ("replay:2024-05-01T02:00:00+02:00", OpenParams("replay", 1714521600000)),
        ("replay:-1h", OpenParams("replay", 1714521600000 - 3_600_000)),
        ("replay:-2d", OpenParams("replay", 1714521600000 - 2 * 86_400_000)),
    ],
)
def test_open_params(text: str, expected: OpenParams) -> None:
    assert parse_open_params(text, now_ms=1714521600000) == expected


@pytest.mark.parametrize("text", ["tail", "live:middle", "replay:2024-05-01T00:00:00", "replay:@x",
                                  "replay:yesterday", "replay:-5w"])
def test_bad_open_params(text: str) -> None:
    with pytest.raises(OpenParamsError, match="open_params must be one of"):
        parse_open_params(text)


def test_listed_open_params_all_parse() -> None:
    for entry in json.loads(meta.open_params_json()):
        parse_open_params(entry["value"])
        assert entry["desc"]


# --- extraction --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeds() -> list[tuple[str, EnrichedRecord, bytes]]:
    return seed_records()


def test_extractor_serves_every_field_of_every_seed(seeds: list[tuple[str, EnrichedRecord, bytes]]) -> None:
    extractor = Extractor()
    for number, (name, record, value) in enumerate(seeds, start=1):
        extractor.load((number, 0, len(value)), value)
        got = extractor.values()
        expected = {f.name: expected_value(record, f.qualified) for f in CATALOGUE if f.arg is None}
        assert got == {k: v for k, v in expected.items() if v is not None}, name
        assert extractor.value_at("details.custom_message") == (
            None if (v := lookup_path(json.loads(record.raw), "details.custom_message")) is None
            else v.encode() + b"\0")


def test_extractor_decodes_each_event_once_and_reuses_next_batch_records(
    seeds: list[tuple[str, EnrichedRecord, bytes]],
) -> None:
    extractor = Extractor()
    _, record, value = seeds[0]
    for _ in range(5):
        extractor.load((1, 100, len(value)), value)
    assert extractor.decoded == 1
    extractor.load((2, 100, len(value)), b"ignored", record)
    assert extractor.reused == 1 and extractor.record is record
    extractor.load((3, 100, 3), b"\x00\x01\x02")
    assert extractor.record is None and extractor.table() == (b"", b"", b"", b"")
    assert extractor.values() == {}


def test_extractor_renders_odd_values_and_strips_nul_bytes() -> None:
    record = EnrichedRecord(version=1, ts=1, raw=b'{"a": {"b": [1, {"c": true}]}}', fields={
        "event_type": "x\0y", "author_id": 42, "op_changed_to": False, "asn": "64500", "ip_private": "true",
        "city": "Zürich", "not_in_catalogue": "z",
    })
    extractor = Extractor()
    extractor.load((1, 0, 0), encode_enriched(record))
    assert extractor.values() == {
        "event_type": "xy", "author_id": "42", "op_changed_to": "false", "asn": 64500, "ip_private": True,
        "city": "Zürich",
    }
    assert extractor.value_at("a.b.1.c") == b"true\0"
    assert extractor.value_at("a.b.1") == b'{"c":true}\0'
    assert extractor.value_at("a.b.5") is None
    numbers_only = EnrichedRecord(version=1, ts=1, raw=b"{}", fields={"asn": 1, "ip_private": False})
    extractor.load((2, 0, 0), encode_enriched(numbers_only))
    assert extractor.values() == {"asn": 1, "ip_private": False}
    invalid_numbers = EnrichedRecord(version=1, ts=1, raw=b"{}", fields={"asn": -1, "ip_private": 7})
    extractor.load((3, 0, 0), encode_enriched(invalid_numbers))
    assert extractor.values() == {}


def test_record_of_a_newer_schema_is_not_decoded() -> None:
    extractor = Extractor()
    extractor.load((1, 0, 0), encode_enriched(EnrichedRecord(version=2, ts=1, fields={}, raw=b"")))
    assert extractor.record is None and "newer" in (extractor.error or "")
    assert extractor.describe().startswith("<invalid gitlab event")


# --- events -------------------------------------------------------------------------------------------


def test_pack_event_layout() -> None:
    buf = bytearray()
    pack_event(buf, 123, b"payload", 999)
    assert len(buf) == HEADER_LEN + 7 == 45
    ts, tid, length, kind, nparams, len_id, len_payload, plugin_id = HEADER.unpack_from(buf)
    assert (ts, tid, length, kind, nparams, len_id, len_payload, plugin_id) == (
        123, NO_VALUE, 45, 322, 2, 4, 7, 999)
    assert bytes(buf[38:]) == b"payload"
    assert struct.unpack_from("<H", buf, 20)[0] == 322
    assert event_ts(0) == NO_VALUE and event_ts(-5) == NO_VALUE and event_ts(7) == 7


# --- next_batch: the batch-at-once path against the per-message one ---------------------------------------


class FakeConsumer:
    """consume/poll as confluent-kafka's Consumer answers them: ``queued`` records are there already,
    ``arriving`` ones come while poll waits."""

    def __init__(self, queued: list[Any]) -> None:
        self.queued = list(queued)
        self.arriving: list[Any] = []
        self.positions: dict[int, int] = {}
        self.calls: list[tuple[str, int | None, float]] = []
        self.paused: list[int] = []

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        self.calls.append(("consume", num_messages, timeout))
        taken, self.queued = self.queued[:num_messages], self.queued[num_messages:]
        return taken

    def poll(self, timeout: float = -1) -> Any:
        self.calls.append(("poll", None, timeout))
        if not self.queued:
            self.queued, self.arriving = self.arriving, []
        return self.queued.pop(0) if self.queued else None

    def pause(self, partitions: list[Any]) -> None:
        self.paused += [tp.partition for tp in partitions]

    def position(self, partitions: list[Any]) -> list[Any]:
        return [TopicPartition(tp.topic, tp.partition, self.positions.get(tp.partition, OFFSET_INVALID))
                for tp in partitions]

    def commit(self, **_: Any) -> None:
        pass


def make_source(mode: str, messages: list[Any], ends: dict[int, int] | None = None,
                **config: Any) -> KafkaSource:
    plugin_config = parse_config(json.dumps({"brokers": "k:1", "topic": "t", **config}))
    source = KafkaSource(plugin_config, parse_open_params(mode), 999, HostLog(lambda s, m: None, "debug"),
                         Counters())
    source._consumer = FakeConsumer(messages)
    for partition, end in (ends or {}).items():
        source._start[partition] = source._pos[partition] = 0
        source._end[partition] = end
        source._remaining.add(partition)
    return source


def message(partition: int, offset: int, value: bytes | None, error: Any = None) -> Any:
    return Message(topic="t", partition=partition, offset=offset, value=value, key=b"k", error=error)


def seed_messages(count: int, partitions: int = 3) -> list[Any]:
    values = [value for _, _, value in seed_records()]
    return [message(i % partitions, i // partitions, values[i % len(values)]) for i in range(count)]


def state(source: KafkaSource) -> Any:
    return (dict(source._pos), set(source._remaining), dict(source._inflight), source.counters,
            sorted(source._consumer.paused))


@pytest.mark.parametrize("mode", ["replay", "live"])
def test_batch_at_once_equals_message_by_message(mode: str) -> None:
    messages = seed_messages(100)
    ends = {0: 34, 1: 100, 2: 100} if mode == "replay" else None  # partition 0 ends with this batch
    fast, each = make_source(mode, [], ends), make_source(mode, [], ends)
    packed = fast._pack_fast(messages)
    assert packed is not None
    assert packed == each._pack_each(messages)
    assert state(fast) == state(each)
    events, offsets, records = packed
    assert len(offsets) == len(records) == 100 and offsets[0] == 0
    for index, (offset, record) in enumerate(zip(offsets, records, strict=True)):
        ts, _, length, kind, _, _, size, plugin_id = HEADER.unpack_from(events, offset)
        assert (ts, kind, plugin_id) == (record.ts, 322, 999)
        assert bytes(events[offset + HEADER_LEN:offset + length]) == messages[index].value()
        assert length == HEADER_LEN + size
    if mode == "replay":
        assert fast._remaining == {1, 2} and fast._consumer.paused == [0]


def test_event_time_out_of_range_is_now_in_both_paths() -> None:
    values = [encode_enriched(EnrichedRecord(1, ts, {"event_type": "x"}, b"{}")) for ts in (0, 2**64 - 1, 5)]
    messages = [message(0, i, value) for i, value in enumerate(values)]
    packed = make_source("live", [])._pack_fast(messages)
    assert packed is not None and packed == make_source("live", [])._pack_each(messages)
    stamps = [HEADER.unpack_from(packed[0], offset)[0] for offset in packed[1]]
    assert stamps == [NO_VALUE, NO_VALUE, 5]


@pytest.mark.parametrize("case", ["tombstone", "garbage", "newer version", "oversized", "eof", "past end",
                                  "finished partition"])
def test_unusual_batches_go_message_by_message(case: str) -> None:
    messages = seed_messages(9)
    largest = max(len(m.value()) for m in messages)
    ends = {0: 100, 1: 100, 2: 100}
    if case == "tombstone":
        messages[4] = message(1, 1, None)
    elif case == "garbage":
        messages[4] = message(1, 1, b"\xc1garbage")
    elif case == "newer version":
        messages[4] = message(1, 1, encode_enriched(EnrichedRecord(99, 1, {}, b"")))
    elif case == "oversized":
        messages[4] = message(1, 1, b"\x00" * (largest + 1))
    elif case == "eof":
        messages.append(message(2, 3, None, KafkaError(KafkaError._PARTITION_EOF)))
    elif case == "past end":
        ends[2] = 2
    source = make_source("replay", messages, ends, max_event_size=largest + HEADER_LEN)
    if case == "finished partition":
        source._remaining.discard(2)
    before = state(source)
    assert source._pack_fast(messages) is None
    assert state(source) == before  # nothing changed: the per-message path starts from scratch
    rc, _, offsets, records = source.next_batch(64)
    assert rc == RC_SUCCESS and len(offsets) == len(records)
    delivered = source.counters.delivered
    dropped = source.counters.dropped_malformed + source.counters.dropped_oversized
    expected_dropped = {"tombstone": 1, "garbage": 1, "newer version": 1, "oversized": 1}.get(case, 0)
    assert dropped == expected_dropped
    skipped = {"past end": 1, "finished partition": 3}.get(case, 0)
    assert delivered == 9 - expected_dropped - skipped
    if case == "eof":
        assert 2 not in source._remaining


def test_receive_returns_what_is_queued_and_waits_only_when_nothing_is() -> None:
    source = make_source("live", seed_messages(5), poll_timeout_ms=30)
    consumer = source._consumer
    assert len(source._receive(3)) == 3
    assert consumer.calls == [("consume", 3, 0)]  # not held back until the batch is full
    assert len(source._receive(8)) == 2
    consumer.calls.clear()
    assert source._receive(8) == []
    assert consumer.calls == [("consume", 8, 0), ("poll", None, 0.03)]
    consumer.calls.clear()
    consumer.arriving = seed_messages(4)
    assert len(source._receive(8)) == 4  # the first record that arrives, with what came with it
    assert consumer.calls == [("consume", 8, 0), ("poll", None, 0.03), ("consume", 7, 0)]


def test_replay_ends_without_waiting_when_the_positions_passed_the_end() -> None:
    source = make_source("replay", [], {0: 10, 1: 10})
    source._consumer.positions = {0: 10, 1: 10}  # the last offsets are transaction markers
    rc, _, offsets, _ = source.next_batch(8)
    assert rc == RC_EOF and not offsets
    assert ("poll", None, 0.03) not in source._consumer.calls


# --- metadata and build helpers -------------------------------------------------------------------------


def test_metadata_comes_from_the_shared_catalogue() -> None:
    assert json.loads(meta.fields_json()) == plugin_fields()
    table = meta.field_table()
    assert len(table) == len(CATALOGUE)
    types = {f.name: code for f, (code, _) in zip(CATALOGUE, table, strict=True)}
    assert types["event_type"] == 9 and types["asn"] == 8 and types["ip_private"] == 25
    assert [arg for _, arg in table].count(True) == sum(1 for f in CATALOGUE if f.arg)
    assert len(meta.fields_digest()) == 16


@pytest.mark.parametrize(
    "text", ["plain", 'quote " and \\ backslash', "new\nline\ttab", "é ü 漢字", "x" * 350, ""]
)
def test_c_string_literal(text: str) -> None:
    literal = c_string(text)
    # adjacent C literals, one per line: the same in Python once each is a bytes literal
    pieces = [piece.strip().rstrip("\\").strip() for piece in literal.split("\n")]
    decoded = b"".join(ast.literal_eval("b" + piece) for piece in pieces if piece)
    assert decoded == text.encode("utf-8")
    assert literal.isascii()


# --- logging -----------------------------------------------------------------------------------------------


def test_host_log_levels_and_rate_limit() -> None:
    seen: list[tuple[int, str]] = []
    log = HostLog(lambda sev, msg: seen.append((sev, msg)), "info")
    log.debug("hidden")
    log.info("shown")
    for _ in range(5):
        log.limited("k", SEV_WARNING, "burst", every=60)
    assert seen == [(SEV_INFO, "shown"), (SEV_WARNING, "burst")]
    KafkaLogger(log).log(30, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "broker down")
    assert seen[-1] == (SEV_WARNING, "librdkafka: FAIL [rdkafka#consumer-1] broker down")
    log.detach()
    log.info("after detach")
    assert seen[-1][1] != "after detach"
