"""`falco-gitlab replay`: --check, file inputs (raw and enriched), output formats, Kafka replay."""

from __future__ import annotations

import io
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from falco_gitlab.cli import main
from falco_gitlab.model import EnrichedRecord, decode_enriched, encode_enriched
from replay.api import alerts_for_path, alerts_for_payloads, normalise_alert
from replay.errors import InputError
from replay.inputs import (
    detect_format,
    iter_enriched,
    iter_json_payloads,
    records_from_path,
    write_enriched_file,
)

SEED = Path(__file__).resolve().parent.parent / "samples" / "gitlab"
if not SEED.is_dir():
    SEED = Path(__file__).resolve().parent.parent / "tests" / "data" / "seed"

RULES = """
- required_engine_version: 0.31.0
- list: watched
  items: [user_impersonation, user_admin_status_updated]
- macro: watched_event
  condition: gitlab.event_type in (watched)
- rule: Watched event
  desc: a watched event type
  condition: watched_event
  output: >-
    Watched %gitlab.event_type by %gitlab.author_name at %gitlab.destination
    (to=%gitlab.value[details.to])
  priority: NOTICE
  source: gitlab
  tags: [gitlab, test]
- rule: Any event
  desc: everything
  condition: gitlab.event_type exists
  output: "Event %gitlab.event_type"
  priority: DEBUG
  source: gitlab
"""


def event(event_type: str, **extra: Any) -> dict[str, Any]:
    return {"id": 1, "author_id": 1, "author_name": "root", "event_type": event_type,
            "created_at": "2024-06-26T04:35:20.691Z", "details": {"to": True}, **extra}


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    rc = main(["replay", "--hostname", "test-host", *argv])
    captured = capsys.readouterr()
    return rc, [line for line in captured.out.splitlines() if line], captured.err


def rules_of(lines: list[str]) -> list[str]:
    return [json.loads(line)["rule"] for line in lines]


# --- --check ---------------------------------------------------------------------------------------


def test_check_prints_a_summary(capsys: pytest.CaptureFixture[str], rules_file: Path) -> None:
    rc, out, err = run(capsys, "--rules", str(rules_file), "--check")
    assert rc == 0, err
    assert out[0] == "OK: 2 rules (2 enabled, 0 disabled), 1 macros, 1 lists"
    assert "required_engine_version: 0.31.0" in out


def test_check_fails_on_unsupported_construct(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- rule: Bad\n  desc: d\n  condition: gitlab.entity_path pmatch (/a)\n  output: o\n"
                    "  priority: info\n  source: gitlab\n")
    rc, out, err = run(capsys, "--rules", str(path), "--check")
    assert rc == 1, err
    assert out == []
    assert f"{path}:1: rule 'Bad'" in err and "'pmatch'" in err and "not supported" in err


def test_check_fails_on_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _out, err = run(capsys, "--rules", str(tmp_path / "nope.yaml"), "--check")
    assert rc == 1 and "cannot read rules file" in err


def test_rules_directory_loads_in_order(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(RULES)
    disable = "- rule: Any event\n  enabled: false\n  override:\n    enabled: replace\n"
    (tmp_path / "b.yml").write_text(disable)
    (tmp_path / "c.txt").write_text("not rules")
    rc, out, err = run(capsys, "--rules", str(tmp_path), "--check", "--quiet")
    assert rc == 0, err
    assert out[0] == "OK: 2 rules (1 enabled, 1 disabled), 1 macros, 1 lists"


def test_needs_exactly_one_input(capsys: pytest.CaptureFixture[str], rules_file: Path) -> None:
    rc, _out, err = run(capsys, "--rules", str(rules_file))
    assert rc == 1 and "exactly one of --input" in err


# --- raw payload inputs ----------------------------------------------------------------------------


def test_single_object_file(capsys: pytest.CaptureFixture[str], rules_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text(json.dumps(event("user_impersonation"), indent=2))
    rc, out, _err = run(capsys, "--rules", str(rules_file), "--input", str(path), "--destination", "prod")
    assert rc == 0
    assert len(out) == 1
    alert = json.loads(out[0])
    assert alert["rule"] == "Watched event"
    assert alert["priority"] == "Notice"
    assert alert["hostname"] == "test-host"
    assert alert["time"] == "2024-06-26T04:35:20.691000000Z"
    assert alert["output"].endswith(": Notice Watched user_impersonation by root at prod (to=true)")
    assert alert["output_fields"]["gitlab.destination"] == "prod"
    assert alert["tags"] == ["gitlab", "test"]
    assert out[0] == json.dumps(alert, ensure_ascii=False, separators=(",", ":"))


def test_array_jsonl_and_directory(capsys: pytest.CaptureFixture[str], rules_file: Path,
                                   tmp_path: Path) -> None:
    array = tmp_path / "dir" / "a_array.json"
    array.parent.mkdir()
    array.write_text(json.dumps([event("user_impersonation"), event("other")]))
    lines = tmp_path / "dir" / "sub" / "b_lines.jsonl"
    lines.parent.mkdir()
    lines.write_text("\n".join(json.dumps(event(t)) for t in ("user_admin_status_updated", "x")) + "\n")
    (tmp_path / "dir" / "ignored.txt").write_text("not an input")
    rc, out, _ = run(capsys, "--rules", str(rules_file), "--input", str(array))
    assert rules_of(out) == ["Watched event", "Any event"]
    rc, out, _ = run(capsys, "--rules", str(rules_file), "--input", str(lines))
    assert rules_of(out) == ["Watched event", "Any event"]
    rc, out, err = run(capsys, "--rules", str(rules_file), "--input", str(tmp_path / "dir"), "--stats")
    assert rc == 0
    assert rules_of(out) == ["Watched event", "Any event", "Watched event", "Any event"]
    assert "events: 4  alerts: 4" in err


def test_rule_matching_all(capsys: pytest.CaptureFixture[str], rules_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    path.write_text(json.dumps(event("user_impersonation")))
    _, out, _ = run(capsys, "--rules", str(rules_file), "--input", str(path), "--rule-matching", "all")
    assert rules_of(out) == ["Watched event", "Any event"]
    _, out, _ = run(capsys, "--rules", str(rules_file), "--input", str(path), "--min-priority", "notice",
                    "--rule-matching", "all")
    assert rules_of(out) == ["Watched event"]


def test_text_output(capsys: pytest.CaptureFixture[str], rules_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    path.write_text(json.dumps(event("other")))
    _, out, _ = run(capsys, "--rules", str(rules_file), "--input", str(path), "--output", "text")
    assert len(out) == 1 and out[0].endswith(": Debug Event other") and not out[0].startswith("{")


GEOIP_CITY = Path(__file__).resolve().parent / "data" / "geoip" / "GeoLite2-City-Test.mmdb"


@pytest.mark.skipif(not GEOIP_CITY.is_file(), reason="GeoIP test database not available")
def test_geoip_for_raw_payloads(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rules = tmp_path / "geo.yaml"
    rules.write_text("- rule: Geo\n  desc: d\n  condition: gitlab.country = 'United Kingdom'\n"
                     "  output: from %gitlab.city, %gitlab.countryisocode\n  priority: info\n"
                     "  source: gitlab\n")
    path = tmp_path / "e.json"
    path.write_text(json.dumps(event("other", ip_address="81.2.69.142")))
    rc, out, err = run(capsys, "--rules", str(rules), "--input", str(path), "--geoip-city", str(GEOIP_CITY))
    assert rc == 0, err
    assert json.loads(out[0])["output"].endswith(": Informational from London, GB")
    rc, out, err = run(capsys, "--rules", str(rules), "--input", str(path))
    assert (rc, out) == (0, [])
    rc, out, err = run(capsys, "--rules", str(rules), "--input", str(path), "--geoip-city", str(path))
    assert rc == 1 and "cannot open GeoIP database" in err


def test_malformed_events_are_skipped_with_a_warning(capsys: pytest.CaptureFixture[str], rules_file: Path,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"id": 1}) + "\n" + json.dumps(event("other")) + "\n[1]\n")
    rc, out, err = run(capsys, "--rules", str(rules_file), "--input", str(path), "--stats")
    assert rc == 0
    assert rules_of(out) == ["Any event"]
    assert "no event_type" in err and "not a JSON object" in err
    assert "skipped inputs: 2" in err


def test_stdin(capsys: pytest.CaptureFixture[str], rules_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(json.dumps(event("other")).encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    _, out, _ = run(capsys, "--rules", str(rules_file), "--input", "-")
    assert rules_of(out) == ["Any event"]


def test_json_payload_splitting() -> None:
    data = b'\xef\xbb\xbf {"a": 1}\n{"b": [1, 2]}  [{"c": "\xc3\xa9"}, {"d": null}]'
    assert list(iter_json_payloads(data)) == [
        b'{"a": 1}', b'{"b": [1, 2]}', '{"c":"é"}'.encode(), b'{"d":null}']
    with pytest.raises(InputError, match="invalid JSON at line 1"):
        list(iter_json_payloads(b'{"a": '))


# --- enriched length-prefixed files ----------------------------------------------------------------


def enriched(event_type: str, ts: int = 1_700_000_000_123_456_789) -> EnrichedRecord:
    raw = msgspec.json.encode(event(event_type))
    return EnrichedRecord(version=1, ts=ts, fields={"event_type": event_type, "author_name": "root"}, raw=raw)


def test_enriched_file_roundtrip_and_detection(capsys: pytest.CaptureFixture[str], rules_file: Path,
                                               tmp_path: Path) -> None:
    path = tmp_path / "events.enriched"
    assert write_enriched_file(path, [enriched("user_impersonation"), enriched("other")]) == 2
    data = path.read_bytes()
    assert detect_format(data) == "enriched"
    assert int.from_bytes(data[:4], "big") == len(encode_enriched(enriched("user_impersonation")))
    assert [r.fields["event_type"] for r in iter_enriched(data)] == ["user_impersonation", "other"]
    rc, out, _ = run(capsys, "--rules", str(rules_file), "--input", str(path))
    assert rc == 0
    alerts = [json.loads(line) for line in out]
    assert [a["rule"] for a in alerts] == ["Watched event", "Any event"]
    assert alerts[0]["time"] == "2023-11-14T22:13:20.123456789Z"
    assert alerts[0]["output_fields"]["gitlab.destination"] is None


def test_truncated_enriched_file(capsys: pytest.CaptureFixture[str], rules_file: Path,
                                 tmp_path: Path) -> None:
    path = tmp_path / "cut.enriched"
    write_enriched_file(path, [enriched("other"), enriched("other")])
    path.write_bytes(path.read_bytes()[:-3])
    rc, out, err = run(capsys, "--rules", str(rules_file), "--input", str(path))
    assert rc == 0 and len(out) == 1 and "runs past the end" in err
    with pytest.raises(InputError, match="runs past the end"):
        list(records_from_path(path))


# --- API helpers used by the rule fixtures ---------------------------------------------------------


def test_api_helpers(rules_file: Path, tmp_path: Path) -> None:
    alerts = alerts_for_payloads(rules_file, [json.dumps(event("user_impersonation"))], destination="d",
                                 rule_matching="all", hostname="h")
    assert [a["rule"] for a in alerts] == ["Watched event", "Any event"]
    normalised = normalise_alert(alerts[0])
    assert "hostname" not in normalised
    assert normalised["output"] == "Notice Watched user_impersonation by root at d (to=true)"
    (tmp_path / "e.json").write_text(json.dumps(event("other")))
    assert [a["rule"] for a in alerts_for_path(rules_file, tmp_path / "e.json")] == ["Any event"]
    with pytest.raises(InputError, match="no event_type"):
        alerts_for_payloads(rules_file, [b'{"id": 1}'])


@pytest.mark.skipif(not SEED.is_dir(), reason="seed payloads not available")
def test_seed_payloads_flatten_and_evaluate(rules_file: Path) -> None:
    records = list(records_from_path(SEED))
    assert len(records) == len(list(SEED.glob("*.json")))
    assert all(r.fields.get("event_type") for r in records)


# --- Kafka -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replay_bootstrap(request: pytest.FixtureRequest) -> str:
    try:
        return str(request.getfixturevalue("kafka_bootstrap"))
    except pytest.FixtureLookupError:
        pass
    address = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not address:
        pytest.skip("no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS (or provide the kafka_bootstrap fixture)")
    return address


def produce(bootstrap: str, topic: str, partitions: int, records: list[tuple[int, EnrichedRecord]], *,
            transactional: bool = False) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = NewTopic(topic, num_partitions=partitions, replication_factor=1)
    for future in admin.create_topics([new]).values():
        future.result(30)
    config: dict[str, Any] = {"bootstrap.servers": bootstrap}
    if transactional:
        config["transactional.id"] = f"replay-test-{uuid.uuid4().hex[:8]}"
    producer = Producer(config)
    if transactional:
        producer.init_transactions(30)
        producer.begin_transaction()
    for partition, rec in records:
        producer.produce(topic, encode_enriched(rec), partition=partition, timestamp=rec.ts // 1_000_000)
    if transactional:
        producer.commit_transaction(30)
    assert producer.flush(30) == 0
    _wait_for_end_offsets(bootstrap, topic, partitions, records, transactional)


def _wait_for_end_offsets(bootstrap: str, topic: str, partitions: int,
                          records: list[tuple[int, EnrichedRecord]], transactional: bool) -> None:
    """A bounded replay reads up to the end offsets it sees at start: wait until the broker reports
    every record (right after a commit, a partition's high watermark can lag for a moment)."""
    from confluent_kafka import Consumer, TopicPartition

    expected = {p: sum(1 for q, _ in records if q == p) for p in range(partitions)}
    if transactional:
        expected = {p: n + 1 if n else 0 for p, n in expected.items()}  # + the commit marker
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wait-{uuid.uuid4().hex[:8]}"})
    try:
        deadline = time.monotonic() + 30
        while True:
            ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in expected}
            if all(ends[p] >= n for p, n in expected.items()) or time.monotonic() > deadline:
                return
            time.sleep(0.05)
    finally:
        consumer.close()


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_bounded_kafka_replay(capsys: pytest.CaptureFixture[str], rules_file: Path,
                              replay_bootstrap: str) -> None:
    topic = f"replay-test-{uuid.uuid4().hex[:8]}"
    base = 1_700_000_000_000_000_000
    produce(replay_bootstrap, topic, 2, [
        (0, enriched("user_impersonation", base)), (1, enriched("other", base + 1_000_000_000)),
        (0, enriched("user_admin_status_updated", base + 2_000_000_000)),
    ], transactional=True)
    started = time.monotonic()
    rc, out, err = run(capsys, "--rules", str(rules_file), "--bootstrap-servers", replay_bootstrap,
                       "--topic", topic, "--stats")
    assert rc == 0, err
    assert time.monotonic() - started < 60
    assert sorted(rules_of(out)) == ["Any event", "Watched event", "Watched event"]
    assert "events: 3  alerts: 3" in err

    # --since skips what came before the time (record timestamps are the event times here)
    rc, out, err = run(capsys, "--rules", str(rules_file), "--bootstrap-servers", replay_bootstrap,
                       "--topic", topic, "--since", "2023-11-14T22:13:21.500Z")
    assert rc == 0, err
    assert rules_of(out) == ["Watched event"]
    assert json.loads(out[0])["output_fields"]["gitlab.event_type"] == "user_admin_status_updated"


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_kafka_replay_of_empty_topic_ends(capsys: pytest.CaptureFixture[str], rules_file: Path,
                                          replay_bootstrap: str) -> None:
    topic = f"replay-empty-{uuid.uuid4().hex[:8]}"
    produce(replay_bootstrap, topic, 1, [])
    rc, out, err = run(capsys, "--rules", str(rules_file), "--bootstrap-servers", replay_bootstrap,
                       "--topic", topic)
    assert (rc, out) == (0, []), err


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_kafka_undecodable_record_is_skipped(capsys: pytest.CaptureFixture[str], rules_file: Path,
                                             replay_bootstrap: str) -> None:
    from confluent_kafka import Producer

    topic = f"replay-bad-{uuid.uuid4().hex[:8]}"
    produce(replay_bootstrap, topic, 1, [(0, enriched("other"))])
    producer = Producer({"bootstrap.servers": replay_bootstrap})
    producer.produce(topic, b"garbage", partition=0)
    producer.flush(30)
    rc, out, err = run(capsys, "--rules", str(rules_file), "--bootstrap-servers", replay_bootstrap,
                       "--topic", topic)
    assert rc == 0
    assert rules_of(out) == ["Any event"]
    assert f"{topic}/0/1" in err and "not an enriched record" in err
    assert decode_enriched(encode_enriched(enriched("other"))).fields["event_type"] == "other"


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_missing_topic_is_an_error(capsys: pytest.CaptureFixture[str], rules_file: Path,
                                   replay_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("replay.inputs.METADATA_WAIT_S", 2.0)
    rc, _out, err = run(capsys, "--rules", str(rules_file), "--bootstrap-servers", replay_bootstrap,
                        "--topic", f"replay-missing-{uuid.uuid4().hex[:8]}")
    assert rc == 1 and "Kafka topic" in err
