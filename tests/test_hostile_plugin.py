"""Hostile enriched records against the plugin's field extraction (no Kafka).

Records that decode as enriched records but carry odd values (a number where a string belongs, a
string where a uint64 belongs, NUL bytes, huge strings, unknown fields, raw bytes that are not JSON...)
are fed to the C host from memory (``--baseline``), which extracts every catalogue field one call at a
time the way Falco does. The plugin must never fail or crash: each value is of its declared type or
absent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from falco_gitlab.fields import CATALOGUE, FieldType
from falco_gitlab.model import EnrichedRecord, encode_enriched
from tests.plugin_support import run_host, write_baseline
from tests.reliability_support import plugin_build, publish

SIMPLE = [f for f in CATALOGUE if f.arg is None]
PATHS = ["details.q", "id", "details", "a.b.c", "0", "details.q.0", ""]
CONFIG = json.dumps({"brokers": "127.0.0.1:9"})  # extraction only: never connects


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return plugin_build(tmp_path_factory)


def record(fields: dict[str, Any], raw: bytes = b'{"event_type":"x"}', ts: int = 1) -> bytes:
    return encode_enriched(EnrichedRecord(1, ts, fields, raw))


HOSTILE_FIELDS: dict[str, bytes] = {
    "int in a string field": record({"event_type": "x", "event_id": 123, "author_id": -1}),
    "bool in a string field": record({"event_type": True, "author_name": False}),
    "string in uint64": record({"event_type": "x", "asn": "AS15169"}),
    "negative uint64": record({"event_type": "x", "asn": -5}),
    "max uint64": record({"event_type": "x", "asn": 2**64 - 1}),
    "string in bool": record({"event_type": "x", "ip_private": "yes"}),
    "int in bool": record({"event_type": "x", "ip_private": 7}),
    "NUL in strings": record({"event_type": "x\0y", "author_name": "\0", "entity_path": "a\0b\0c"}),
    "huge string": record({"event_type": "x", "custom_message": "m" * 500_000}),
    "unknown fields": record({"event_type": "x", "no_such_field": "v", "": "", "asn\0": 1}),
    "no fields": record({}),
    "every field empty": record({f.name: "" if f.type is FieldType.STRING else 0 for f in SIMPLE}),
    "non-BMP text": record({"event_type": "x", "author_name": "\U0001f600" * 1000, "city": "\u202e"}),
    "ts extremes": record({"event_type": "x"}, ts=2**64 - 1),
    "ts zero": record({"event_type": "x"}, ts=0),
    "raw not JSON": record({"event_type": "x"}, raw=b"not json at all"),
    "raw JSON array": record({"event_type": "x"}, raw=b'[{"details":{"q":1}}]'),
    "raw empty": record({"event_type": "x"}, raw=b""),
    "raw scalar path": record({"event_type": "x"}, raw=b'{"details":{"q":[1,{"x":null},true]}}'),
}
# Raw bytes msgspec refuses with something else than DecodeError (UnicodeDecodeError, RecursionError).
HOSTILE_RAW: dict[str, bytes] = {
    "raw invalid UTF-8": record({"event_type": "x"}, raw=b'{"details":{"q":"\xff\xfe"}}'),
    "raw deeply nested": record({"event_type": "x"},
                                raw=b'{"details":{"q":' + b"[" * 5000 + b"]" * 5000 + b"}}"),
}
NOT_RECORDS: dict[str, bytes] = {
    "empty payload": b"",
    "garbage": b"\xc1\xff\x00garbage",
    "newer version": encode_enriched(EnrichedRecord(99, 1, {"event_type": "x"}, b"{}")),
    "truncated": record({"event_type": "x", "author_name": "abcdef"})[:-5],
}


def run(plugin: tuple[Path, Path], tmp_path: Path, values: list[bytes]) -> Any:
    library, host = plugin
    baseline = write_baseline(tmp_path / "records.bin", values)
    fields = [f.qualified for f in SIMPLE] + [f"gitlab.value[{p}]" for p in PATHS]
    args: list[str] = ["--config", CONFIG, "--baseline", str(baseline)]
    for name in fields:
        args += ["--field", name]
    return run_host(host, library, *args, timeout=120)


def check_types(values: dict[str, Any], what: str) -> None:
    for spec in SIMPLE:
        value = values[spec.qualified]
        if value is None:
            continue
        if spec.type is FieldType.STRING:
            assert isinstance(value, str), (what, spec.name, value)
        elif spec.type is FieldType.UINT64:
            assert isinstance(value, int) and 0 <= value < 2**64, (what, spec.name, value)
        else:
            assert isinstance(value, bool), (what, spec.name, value)


def test_hostile_enriched_records_never_break_extraction(
    plugin: tuple[Path, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cases = {**HOSTILE_FIELDS, **HOSTILE_RAW, **NOT_RECORDS}
    result = run(plugin, tmp_path, list(cases.values()))
    assert result.returncode == 0, result.explain()
    events = result.events()
    assert len(events) == len(cases), result.explain()
    for (what, _), event in zip(cases.items(), events, strict=True):
        check_types(event["values"], what)
    by_case = dict(zip(cases, (e["values"] for e in events), strict=True))
    # Spot checks: what a rule sees.
    assert by_case["int in a string field"]["gitlab.event_id"] == "123"
    assert by_case["max uint64"]["gitlab.asn"] == 2**64 - 1
    assert by_case["negative uint64"]["gitlab.asn"] is None
    assert by_case["string in uint64"]["gitlab.asn"] is None
    assert by_case["huge string"]["gitlab.custom_message"] == "m" * 500_000
    assert by_case["raw scalar path"]["gitlab.value[details.q.0]"] == "1"
    for what in NOT_RECORDS:
        assert all(v is None for v in by_case[what].values()), (what, by_case[what])
    publish(request.config, "hostile", "plugin_extraction",
            {"records": len(cases), "fields_per_record": len(SIMPLE) + len(PATHS)},
            f"plugin extraction: {len(cases)} hostile records x {len(SIMPLE) + len(PATHS)} fields, "
            "no failure")


def test_unparseable_raw_makes_value_fields_absent_without_internal_errors(
    plugin: tuple[Path, Path], tmp_path: Path
) -> None:
    result = run(plugin, tmp_path, list(HOSTILE_RAW.values()))
    assert result.returncode == 0, result.explain()
    for event in result.events():
        assert all(event["values"][f"gitlab.value[{p}]"] is None for p in PATHS)
    errors = [log["msg"][:200] for log in result.logs if log.get("sev", 99) <= 3]
    assert not errors, errors
