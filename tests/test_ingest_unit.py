"""ingest without a Kafka broker: auth, body splitting, dedup, spool, config, metrics, and the HTTP
layer against an unreachable Kafka (everything then lands in the spool)."""

from __future__ import annotations

import asyncio
import gc
import hmac
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from falco_gitlab.config import ConfigError
from falco_gitlab.contract import (
    HDR_DESTINATION,
    HDR_DLQ_REASON,
    HDR_DLQ_STAGE,
    HDR_EVENT_TYPE,
    HDR_EVENT_UID,
    HDR_RECEIVED_AT,
    HDR_REQUEST_ID,
    header_value,
)
from ingest import auth as auth_module
from ingest.app import GC_GEN0_THRESHOLD, tune_gc
from ingest.auth import Authenticator, client_address, network_allowed, parse_address
from ingest.body import BodyError, split_body
from ingest.config import (
    Destination,
    DestinationSettings,
    IngestConfig,
    TlsSettings,
    load_ingest_config,
    resolve_destinations,
    resolve_tls,
)
from ingest.dedup import DedupWindow
from ingest.metrics import IngestMetrics, Registry
from ingest.records import OutRecord
from ingest.spool import MAGIC, Spool, SpoolEntry, SpoolFull, acquire_slot, other_slots, try_lock_slot
from tests.ingest_support import (
    TOKEN_GROUP,
    TOKEN_PROD,
    TOKEN_PROD_NEXT,
    make_config,
    running_ingest,
    seed_payloads,
)

SEEDS = seed_payloads()


def test_seed_payloads_are_present() -> None:
    assert len(SEEDS) == 23


# --- auth ------------------------------------------------------------------------------------------------


def _destinations() -> list[Destination]:
    return [
        Destination("gitlab-prod", (TOKEN_PROD, TOKEN_PROD_NEXT), ()),
        Destination("acme-group", (TOKEN_GROUP,), ()),
    ]


def test_tokens_map_to_their_destination_including_rotation() -> None:
    auth = Authenticator(_destinations())
    assert auth.authenticate(TOKEN_PROD).name == "gitlab-prod"  # type: ignore[union-attr]
    assert auth.authenticate(TOKEN_PROD_NEXT).name == "gitlab-prod"  # type: ignore[union-attr]
    assert auth.authenticate(TOKEN_GROUP).name == "acme-group"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "presented",
    [None, "", TOKEN_PROD[:-1], TOKEN_PROD + "x", TOKEN_PROD.upper(), " " + TOKEN_PROD, "a" * 5000],
)
def test_wrong_or_missing_tokens_are_refused(presented: str | None) -> None:
    assert Authenticator(_destinations()).authenticate(presented) is None


@pytest.mark.parametrize("presented", [TOKEN_PROD, TOKEN_GROUP, "wrong-token-000000", None, "x" * 300])
def test_every_token_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch, presented: str | None
) -> None:
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    Authenticator(_destinations()).authenticate(presented)
    # All three tokens compared every time (no early exit), always as fixed-length digests.
    assert calls == [(32, 32)] * 3


def test_client_address_honours_forwarded_for_only_from_trusted_proxies() -> None:
    proxies = [ipaddress.ip_network("10.0.0.0/8")]
    # Direct client: X-Forwarded-For is ignored (it could be forged).
    assert str(client_address("203.0.113.9", "198.51.100.1", proxies)) == "203.0.113.9"
    # Through a trusted proxy: the right-most untrusted hop.
    assert str(client_address("10.1.1.1", "198.51.100.1, 10.2.2.2", proxies)) == "198.51.100.1"
    assert str(client_address("10.1.1.1", "6.6.6.6, 198.51.100.1", proxies)) == "198.51.100.1"
    assert str(client_address("10.1.1.1", None, proxies)) == "10.1.1.1"
    assert client_address("10.1.1.1", "198.51.100.1, garbage", proxies) is None
    assert str(client_address("::ffff:192.0.2.7", None, [])) == "192.0.2.7"
    assert str(parse_address("[2001:db8::1]:443")) == "2001:db8::1"
    assert str(parse_address("192.0.2.1:8080")) == "192.0.2.1"


def test_network_allow_list() -> None:
    nets = [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")]
    assert network_allowed(ipaddress.ip_address("192.0.2.200"), nets)
    assert network_allowed(ipaddress.ip_address("2001:db8::5"), nets)
    assert not network_allowed(ipaddress.ip_address("198.51.100.1"), nets)
    assert not network_allowed(None, nets)
    assert network_allowed(None, [])


# --- body ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_a_seed_object_is_one_event_with_its_exact_bytes(name: str) -> None:
    raw = SEEDS[name]
    [event] = split_body(raw)
    assert event.raw == raw  # including a trailing newline, if any
    decoded = json.loads(raw)
    assert event.event_type == decoded["event_type"]
    assert event.created_at == decoded["created_at"]
    assert event.event_id == str(decoded["id"])


def test_keys_group_actors_and_attempted_names() -> None:
    [user] = split_body(SEEDS["add_gpg_key"])
    assert user.key == b"id:1"
    [failed] = split_body(SEEDS["login_failed_with_standard_authentication"])  # author_id -1
    assert failed.key == b"name:root"
    [nameless] = split_body(b'{"author_id": -2, "details": {"author_name": "deployer"}}')
    assert nameless.key == b"name:deployer"
    [anonymous] = split_body(b'{"author_id": -3}')
    assert anonymous.key == b"id:-3"
    [nothing] = split_body(b"{}")
    assert nothing.key is None and nothing.event_id is None


def test_an_array_is_split_keeping_each_elements_exact_bytes() -> None:
    elements = [b'{"id": 1,  "event_type":"a"}', b'{\n "id":"2","x":[1, 2 ,{}]}', b'{"q":"a&b=c%20d+e"}']
    body = b" [ " + b" ,\n".join(elements) + b" ]\n"
    events = split_body(body)
    assert [e.raw for e in events] == elements
    assert [e.event_id for e in events] == ["1", "2", None]


def test_ampersand_and_equals_survive() -> None:
    raw = b'{"id":7,"details":{"custom_message":"a=1&b=2&token=%41","target_details":"x&y"},"event_type":"t"}'
    [event] = split_body(raw)
    assert event.raw == raw


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty body"),
        (b"  \n", "empty body"),
        (b'{"id": 1', "not valid JSON"),
        (b'{"id": 1} trailing', "not valid JSON"),
        (b"[]", "empty JSON array"),
        (b'[{"id": 1}, 2]', "array element 1 is a number, not a JSON object"),
        (b'[{"id": 1}, "x"]', "array element 1 is a string"),
        (b'[[{"id": 1}]]', "array element 0 is an array"),
        (b'"just a string"', "body is a string, not a JSON object or array"),
        (b"null", "body is null"),
        (b"id=1&event_type=x", "not valid JSON"),
        (b'{"a": "\xff"}', "not valid UTF-8 (byte 7)"),
    ],
)
def test_malformed_bodies_have_a_one_line_reason(body: bytes, reason: str) -> None:
    with pytest.raises(BodyError) as info:
        split_body(body)
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(st.dictionaries(st.text(max_size=10), json_values, max_size=6), min_size=1, max_size=5),
    st.sampled_from([b"", b" ", b"\n  "]),
)
def test_any_objects_round_trip_byte_for_byte(objects: list[dict[str, Any]], gap: bytes) -> None:
    encoded = [json.dumps(o, ensure_ascii=bool(len(o) % 2)).encode() for o in objects]
    body = b"[" + gap + (b"," + gap).join(encoded) + gap + b"]"
    assert [e.raw for e in split_body(body)] == encoded


# --- dedup -----------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_dedup_window_by_count_and_time() -> None:
    clock = FakeClock()
    window = DedupWindow(max_entries=3, window_s=60, clock=clock)
    assert window.reserve(b"a") and window.reserve(b"b") and window.reserve(b"c")
    assert not window.reserve(b"a")
    assert window.reserve(b"d")  # evicts the oldest ("a")
    assert len(window) == 3 and b"a" not in window
    assert window.reserve(b"a")
    clock.now += 61
    assert window.reserve(b"b") and len(window) == 1  # everything older than the window is gone
    window.release(b"b")
    assert window.reserve(b"b")


def test_dedup_keys() -> None:
    [a] = split_body(SEEDS["add_gpg_key"])
    [a_again] = split_body(SEEDS["add_gpg_key"].rstrip() + b"  \n")
    [other] = split_body(SEEDS["user_impersonation"])  # same id 1234567890, another type and time
    assert a.dedup_key("d") == a_again.dedup_key("d")
    assert a.dedup_key("d") != a.dedup_key("e")  # per destination
    assert a.dedup_key("d") != other.dedup_key("d")
    [x1] = split_body(b'{"event_type": "x", "n": 1}')  # no id: the content decides
    [x1_again] = split_body(b'  {"event_type": "x", "n": 1}\n')
    [x2] = split_body(b'{"event_type": "x", "n": 2}')
    assert x1.dedup_key("d") == x1_again.dedup_key("d") != x2.dedup_key("d")


# --- spool -----------------------------------------------------------------------------------------------


def _records(count: int, size: int = 100, start: int = 0) -> list[OutRecord]:
    return [
        OutRecord("raw", b"id:%d" % (i % 3), b'{"n":%d,"pad":"%s"}' % (i, b"x" * size), [("h", b"%d" % i)])
        for i in range(start, start + count)
    ]


def _spool(path: Path, **kwargs: Any) -> Spool:
    spool = Spool(
        path,
        max_bytes=kwargs.pop("max_bytes", 10_000_000),
        segment_bytes=kwargs.pop("segment_bytes", 4096),
        fsync=kwargs.pop("fsync", False),
    )
    spool.open()
    return spool


def _segments(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.spool"))


def _size(path: Path) -> int:
    return path.stat().st_size


def _append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def _flip_byte_of_second_record(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[data.find(MAGIC, 1) + 20] ^= 0xFF
    path.write_bytes(bytes(data))


async def _drain_all(spool: Spool, batch: int = 1000) -> list[SpoolEntry]:
    out: list[SpoolEntry] = []
    while True:
        entries = await spool.read_pending(batch)
        if not entries:
            return out
        out += entries


async def test_spool_append_read_ack_and_segment_deletion(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    records = _records(100)
    seqs: list[int] = []
    for start in range(0, 100, 10):
        seqs += await spool.append(records[start : start + 10])
    assert seqs == list(range(100)) and spool.pending == 100
    assert len(_segments(tmp_path)) > 3  # rolled over (between appends; an append is never split)
    entries = await _drain_all(spool, batch=7)
    assert [e.record for e in entries] == records
    assert spool.mark_done(range(50)) == 50 and spool.pending == 50
    assert spool.mark_done(range(50)) == 0  # idempotent
    segments_before = len(_segments(tmp_path))
    spool.mark_done(range(50, 100))
    assert spool.pending == 0 and spool.size_bytes == 0
    assert _segments(tmp_path) == [] and segments_before > 0
    assert await spool.read_pending(10) == []
    await spool.close()


async def test_spool_replays_what_is_not_done_after_a_restart(tmp_path: Path) -> None:
    spool = _spool(tmp_path, fsync=True)
    records = _records(30)
    await spool.append(records)
    spool.mark_done([0, 1, 2, 10, 29])
    await spool.close()

    again = _spool(tmp_path)
    assert again.pending == 25
    entries = await _drain_all(again)
    assert [e.seq for e in entries] == [s for s in range(30) if s not in (0, 1, 2, 10, 29)]
    assert [e.record for e in entries] == [r for i, r in enumerate(records) if i not in (0, 1, 2, 10, 29)]
    new = await again.append(_records(1, start=99))
    assert new == [30]  # numbering continues, never reused
    again.mark_done(range(31))
    await again.close()

    third = _spool(tmp_path)
    assert third.pending == 0
    assert await third.append(_records(1)) == [31]  # even after everything was drained and deleted
    await third.close()


async def test_spool_rewind_rereads_from_the_oldest_pending(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    await spool.append(_records(10))
    first = await spool.read_pending(4)
    assert [e.seq for e in first] == [0, 1, 2, 3]
    spool.mark_done([0, 2])
    spool.rewind()
    assert [e.seq for e in await spool.read_pending(4)] == [1, 3, 4, 5]
    await spool.close()


async def test_spool_is_bounded(tmp_path: Path) -> None:
    spool = _spool(tmp_path, max_bytes=3000)
    await spool.append(_records(10))
    with pytest.raises(SpoolFull):
        await spool.append(_records(30))
    assert spool.pending == 10  # all or nothing
    spool.mark_done(range(10))
    await spool.append(_records(10))  # room again once drained
    await spool.close()


async def test_spool_cuts_a_torn_last_record(tmp_path: Path) -> None:
    spool = _spool(tmp_path, segment_bytes=10_000_000)
    records = _records(5)
    await spool.append(records)
    await spool.close()
    [segment] = _segments(tmp_path)
    size = _size(segment)
    # A crash in the middle of the next write: a frame header promising 64 bytes, then 6 of them.
    _append_bytes(segment, MAGIC + b"\x40\x00\x00\x00\x01\x02\x03\x04" + b'{"half')
    again = _spool(tmp_path)
    assert again.pending == 5
    assert _size(segment) == size
    assert [e.record for e in await _drain_all(again)] == records
    await again.append(_records(1, start=5))
    await again.close()
    assert _spool(tmp_path).pending == 6


async def test_spool_skips_a_damaged_record_in_the_middle(tmp_path: Path) -> None:
    spool = _spool(tmp_path, segment_bytes=10_000_000)
    records = _records(5)
    await spool.append(records)
    await spool.close()
    [segment] = _segments(tmp_path)
    _flip_byte_of_second_record(segment)  # its checksum fails
    again = _spool(tmp_path)
    assert again.corrupt_bytes > 0
    assert [e.seq for e in await _drain_all(again)] == [0, 2, 3, 4]
    await again.close()


async def test_spool_quarantine(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    await spool.append(_records(2))
    [first, _] = await spool.read_pending(2)
    spool.quarantine(first, "too large")
    assert spool.pending == 1 and _size(tmp_path / "rejected.spool") > 0
    await spool.close()


async def test_concurrent_appends_are_group_committed_in_order(tmp_path: Path) -> None:
    spool = _spool(tmp_path, fsync=True)
    results = await asyncio.gather(*(spool.append(_records(3, start=10 * i)) for i in range(20)))
    assert sorted(s for r in results for s in r) == list(range(60))
    entries = await _drain_all(spool)
    assert [e.seq for e in entries] == list(range(60))
    await spool.close()


def test_spool_slots_are_locked_per_process(tmp_path: Path) -> None:
    first = acquire_slot(tmp_path, 0)
    second = acquire_slot(tmp_path, 0)  # w0 is held: the next free slot
    assert (first.name, second.name) == ("w0", "w1")
    assert try_lock_slot(tmp_path, "w0") is None
    assert list(other_slots(tmp_path, "w0")) == ["w1"]
    first.release()
    third = try_lock_slot(tmp_path, "w0")
    assert third is not None
    third.release()
    second.release()


# --- config ----------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_and_environment(tmp_path: Path) -> None:
    token_file = _write(tmp_path / "group.token", f"# rotation\n{TOKEN_GROUP}\n{TOKEN_GROUP}Z\n")
    tokens_file = _write(tmp_path / "tokens", "# shared\nthird-party  thirdPartyToken12345\n")
    config_file = _write(
        tmp_path / "ingest.toml",
        f"""
tokens_file = "{tokens_file}"
[server]
port = 9443
[kafka]
bootstrap_servers = "kafka:9092"
[[destinations]]
name = "gitlab-prod"
tokens = ["{TOKEN_PROD}"]
allow_networks = ["192.0.2.0/24"]
[[destinations]]
name = "acme-group"
token_files = ["{token_file}"]
""",
    )
    env = {
        "FALCO_GITLAB_INGEST_SERVER__PORT": "9000",
        "FALCO_GITLAB_INGEST_TOKEN_GITLAB_PROD": f"{TOKEN_PROD_NEXT}",
        "FALCO_GITLAB_INGEST_TOKEN": "defaultToken12345678",
        "FALCO_GITLAB_INGEST_TOKEN_FILE_SELF_MANAGED": str(_write(tmp_path / "sm", "selfManagedToken1234\n")),
    }
    config = load_ingest_config(config_file, env)
    assert config.server.port == 9000 and config.kafka.bootstrap_servers == "kafka:9092"
    dests = {d.name: d for d in resolve_destinations(config)}
    assert dests["gitlab-prod"].tokens == (TOKEN_PROD, TOKEN_PROD_NEXT)
    assert [str(n) for n in dests["gitlab-prod"].networks] == ["192.0.2.0/24"]
    assert dests["acme-group"].tokens == (TOKEN_GROUP, TOKEN_GROUP + "Z")
    assert dests["default"].tokens == ("defaultToken12345678",)
    assert dests["self_managed"].tokens == ("selfManagedToken1234",)
    assert dests["third-party"].tokens == ("thirdPartyToken12345",)


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[server]\nprot = 1\n", {}, "unknown field `prot` - at `server`"),
        ("[kafka]\npublish_timeout_s = 'soon'\n", {}, "kafka.publish_timeout_s"),
        ("", {"FALCO_GITLAB_INGEST_SPOOL__MAX_BYTES": "lots"}, "FALCO_GITLAB_INGEST_SPOOL__MAX_BYTES"),
        ("[kafka]\npublish_timeout_s = 9\n", {}, "kafka.publish_timeout_s"),
        ("[[destinations]]\nname='a'\ntokens=['short']\n", {}, "destinations.0.tokens.0"),
        (
            f"[[destinations]]\nname='a'\ntokens=['{TOKEN_PROD}']\nallow_networks=['10.0.0.300/8']\n",
            {},
            "destinations.0.allow_networks.0",
        ),
        (
            f"[[destinations]]\nname='a'\ntokens=['{TOKEN_PROD}']\n[[destinations]]\nname='b'\n"
            f"tokens=['{TOKEN_PROD}']\n",
            {},
            "share a token",
        ),
        ("[[destinations]]\nname='a b'\ntokens=['x']\n", {}, "destination name"),
        ("[[destinations]]\nname='a'\ntoken_files=['/nonexistent/t']\n", {}, "destinations.0.token_files.0"),
        ("", {}, "no destination configured"),
        ("", {"FALCO_GITLAB_INGEST_TOKEN_X": ""}, "FALCO_GITLAB_INGEST_TOKEN_X"),
        (
            "[server]\nmax_body_bytes = 0\n",
            {"FALCO_GITLAB_INGEST_TOKEN": TOKEN_PROD},
            "server.max_body_bytes",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    path = _write(tmp_path / "c.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_ingest_config(path, env)
    assert message in str(info.value)
    assert TOKEN_PROD not in str(info.value)


def test_tls_files(tmp_path: Path) -> None:
    assert resolve_tls(TlsSettings()) is None
    assert resolve_tls(TlsSettings(secrets_dir=str(tmp_path))) == (
        str(tmp_path / "server.crt"),
        str(tmp_path / "server.key"),
    )
    assert resolve_tls(TlsSettings(cert_file="c", key_file="k")) == ("c", "k")
    with pytest.raises(ConfigError):
        resolve_tls(TlsSettings(cert_file="c"))


def test_config_struct_defaults_are_sane() -> None:
    config = IngestConfig(destinations=[DestinationSettings(name="x", tokens=[TOKEN_PROD])])
    assert config.kafka.topic == "gitlab.audit.raw" and config.kafka.dlq_topic == "gitlab.audit.dlq"
    assert config.server.max_body_bytes == 1_048_576 and config.kafka.publish_timeout_s == 2.5


# --- metrics ---------------------------------------------------------------------------------------------


def test_metrics_exposition_and_merging() -> None:
    metrics = IngestMetrics()
    metrics.requests.inc("gitlab-prod", "200")
    metrics.requests.inc('we"ird\\', "401")
    metrics.publish_latency.observe(0.003)
    metrics.publish_latency.observe(20)
    other = IngestMetrics()
    other.requests.inc("gitlab-prod", "200", amount=2)
    text = metrics.registry.render([other.registry.snapshot()])
    assert 'falco_gitlab_ingest_requests_total{destination="gitlab-prod",status="200"} 3' in text
    assert 'destination="we\\"ird\\\\"' in text
    assert 'falco_gitlab_ingest_publish_latency_seconds_bucket{le="0.005"} 1' in text
    assert 'falco_gitlab_ingest_publish_latency_seconds_bucket{le="+Inf"} 2' in text
    assert "falco_gitlab_ingest_publish_latency_seconds_count 2" in text
    assert "# TYPE falco_gitlab_ingest_publish_latency_seconds histogram" in text


def test_metrics_snapshots_between_workers(tmp_path: Path) -> None:
    a, b = IngestMetrics(), IngestMetrics()
    b.duplicates.inc("x", amount=4)
    b.registry.write_snapshot(tmp_path / "w1.json")
    a.registry.write_snapshot(tmp_path / "w0.json")
    others = Registry.read_snapshots(tmp_path, "w0", max_age_s=10)
    assert len(others) == 1
    assert 'falco_gitlab_ingest_duplicates_dropped_total{destination="x"} 4' in a.registry.render(others)


# --- the HTTP layer, Kafka unreachable: everything authenticated lands in the spool ----------------------


async def _spooled(ingest: Any) -> list[SpoolEntry]:
    spool = ingest.state.delivery._own.spool  # white box: what would be published
    spool.rewind()
    return await _drain_all(spool)


async def test_gitlab_style_requests_are_spooled_when_kafka_is_down(tmp_path: Path) -> None:
    config = make_config(tmp_path, publish_timeout_s=1.0)
    async with running_ingest(config) as ingest:
        raw = SEEDS["login_failed_with_standard_authentication"]
        status, text, request_id = await ingest.post(
            raw, event_type="login_failed_with_standard_authentication"
        )
        assert status == 202 and "spool" in text and len(request_id) == 32
        status, _, _ = await ingest.post(raw)  # GitLab delivering the same event again
        assert status == 200
        status, _, _ = await ingest.post(
            b"[" + SEEDS["add_gpg_key"] + b"," + SEEDS["user_impersonation"] + b"]"
        )
        assert status == 202
        [first, second, third] = await _spooled(ingest)
        assert first.record.value == raw and first.record.key == b"name:root"
        headers = first.record.headers
        assert header_value(headers, HDR_DESTINATION) == "gitlab-prod"
        assert header_value(headers, HDR_EVENT_TYPE) == "login_failed_with_standard_authentication"
        assert header_value(headers, HDR_REQUEST_ID) == request_id
        assert header_value(headers, HDR_EVENT_UID) == f"{request_id}.0"
        assert int(header_value(headers, HDR_RECEIVED_AT) or 0) > 1_700_000_000 * 10**9
        assert second.record.value == SEEDS["add_gpg_key"].rstrip(b"\n")
        assert header_value(third.record.headers, HDR_EVENT_UID).endswith(".1")  # type: ignore[union-attr]
        assert header_value(third.record.headers, HDR_EVENT_TYPE) == "user_impersonation"
        metrics = await (await ingest.client.get("/metrics")).text()
        assert 'falco_gitlab_ingest_duplicates_dropped_total{destination="gitlab-prod"} 1' in metrics
        assert "falco_gitlab_ingest_spool_depth 3" in metrics
        assert "falco_gitlab_ingest_kafka_up 0" in metrics
        ready = await ingest.client.get("/readyz")
        assert ready.status == 200 and "kafka=down" in await ready.text()
        assert (await ingest.client.get("/healthz")).status == 200


async def test_routing_post_anywhere_is_the_webhook_pages_take_get_and_head_the_rest_is_405(
    tmp_path: Path,
) -> None:
    async with running_ingest(make_config(tmp_path)) as ingest:
        client = ingest.client
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(path)).status == 200, path
            head = await client.head(path)
            assert head.status == 200 and await head.read() == b"", path
            put = await client.put(path, data=b"{}")
            assert put.status == 405 and put.headers["Allow"] == "GET, HEAD, POST", path
        for method, path in (("GET", "/"), ("GET", "/gitlab/audit"), ("PUT", "/"), ("DELETE", "/x")):
            response = await client.request(method, path)
            assert response.status == 405 and response.headers["Allow"] == "POST", (method, path)
            assert method in await response.text()
        # POST is the webhook on every path, the pages' included: the token decides, not the path.
        for path in ("/", "/gitlab/audit", "/healthz"):
            assert (await ingest.post(SEEDS["add_gpg_key"], path=path, token=None))[0] == 401, path
        status, _, _ = await ingest.post(SEEDS["add_gpg_key"], path="/healthz")
        assert status == 202
        assert [entry.record.value for entry in await _spooled(ingest)] == [SEEDS["add_gpg_key"]]


async def test_refusals_and_dead_letters(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    config = make_config(
        tmp_path, publish_timeout_s=0.5, max_body_bytes=4096, allow_networks=["192.0.2.0/24"], debug_json=True
    )
    async with running_ingest(config) as ingest:
        raw = SEEDS["add_gpg_key"]
        assert (await ingest.post(raw, token=None))[0] == 401
        assert (await ingest.post(raw, token="nope-nope-nope-nope"))[0] == 401
        assert (await ingest.post(raw, token=TOKEN_PROD))[0] == 403  # 127.0.0.1 not allowed
        assert (await ingest.post(b"", token=TOKEN_GROUP))[0] == 400  # nothing to keep
        status, text, _ = await ingest.post(b'{"id": 1, "event_type": "x"', token=TOKEN_GROUP)
        assert status == 400 and text.startswith("malformed body: body is not valid JSON")
        status, text, _ = await ingest.post(b'[{"id": 1}, 7]', token=TOKEN_GROUP)
        assert status == 400 and "array element 1 is a number" in text
        big = b'{"pad": "' + b"x" * 5000 + b'"}'
        status, text, _ = await ingest.post(big, token=TOKEN_GROUP)
        assert status == 413 and "limit 4096 bytes" in text
        entries = await _spooled(ingest)
        assert {e.record.topic for e in entries} == {"gitlab.audit.dlq"}
        assert [e.record.value for e in entries] == [
            b'{"id": 1, "event_type": "x"',
            b'[{"id": 1}, 7]',
            big[:4096],
        ]
        reasons = [header_value(e.record.headers, HDR_DLQ_REASON) or "" for e in entries]
        assert "not valid JSON" in reasons[0] and "array element 1" in reasons[1]
        assert "Content-Length 5011" in reasons[2] and "first 4096 bytes" in reasons[2]
        assert all(header_value(e.record.headers, HDR_DLQ_STAGE) == "ingest" for e in entries)
        assert all(header_value(e.record.headers, HDR_DESTINATION) == "acme-group" for e in entries)
        metrics = await (await ingest.client.get("/metrics")).text()
        assert 'requests_total{destination="unauthenticated",status="401"} 2' in metrics
        assert 'requests_total{destination="gitlab-prod",status="403"} 1' in metrics
        assert 'dead_letters_total{destination="acme-group",cause="too_large"} 1' in metrics
    logged = caplog.text
    assert TOKEN_PROD not in logged and TOKEN_GROUP not in logged and "nope-nope" not in logged


async def test_debug_json_logs_the_body_but_not_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    config = make_config(tmp_path, publish_timeout_s=0.3, debug_json=True)
    async with running_ingest(config) as ingest:
        status, _, _ = await ingest.post(
            SEEDS["user_impersonation"], headers={"X-Custom-Secret": "hush", "X-Instance": "gitlab-eu"}
        )
        assert status == 202
    received = [r for r in caplog.records if r.getMessage() == "received"]
    assert len(received) == 1
    record: Any = received[0]
    assert record.body == SEEDS["user_impersonation"].decode()
    assert record.headers["X-Instance"] == "gitlab-eu"
    assert "X-Custom-Secret" not in record.headers
    assert not any(k.lower() == "x-gitlab-event-streaming-token" for k in record.headers)
    assert TOKEN_PROD not in caplog.text and "hush" not in caplog.text


async def test_a_body_that_never_completes_is_answered_408(tmp_path: Path) -> None:
    config = make_config(tmp_path, body_timeout_s=0.5, publish_timeout_s=0.3)
    async with running_ingest(config) as ingest:
        port = ingest.client.server.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            + f"X-Gitlab-Event-Streaming-Token: {TOKEN_PROD}\r\n\r\n".encode()
            + b'{"id": 1, '
        )
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        assert response.startswith(b"HTTP/1.1 408")
        [dead] = await _spooled(ingest)
        assert dead.record.value == b'{"id": 1, ' and dead.record.topic == "gitlab.audit.dlq"


async def test_oversized_headers_are_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with running_ingest(config) as ingest:
        status, _, _ = await ingest.post(SEEDS["add_gpg_key"], headers={"X-Big": "y" * 20000})
        assert status in (400, 431)
        assert await _spooled(ingest) == []


async def test_spool_full_answers_503_and_the_redelivery_is_not_lost(tmp_path: Path) -> None:
    config = make_config(tmp_path, publish_timeout_s=0.3, max_body_bytes=2048, spool_max_bytes=4096)
    async with running_ingest(config) as ingest:
        statuses = []
        for index in range(8):
            body = b'{"id": %d, "event_type": "t", "pad": "%s"}' % (index, b"p" * 700)
            statuses.append((await ingest.post(body))[0])
        assert statuses[:3] == [202, 202, 202] and statuses[-1] == 503
        metrics = await (await ingest.client.get("/metrics")).text()
        assert "falco_gitlab_ingest_spool_full_total" in metrics
        assert "falco_gitlab_ingest_spool_full_total 0" not in metrics
        # The refused event was not remembered as seen: once there is room, it is accepted.
        spool = ingest.state.delivery._own.spool
        spool.mark_done(range(100))
        body = b'{"id": 7, "event_type": "t", "pad": "%s"}' % (b"p" * 700)
        assert (await ingest.post(body))[0] == 202


async def test_leftovers_of_a_previous_run_are_adopted(tmp_path: Path) -> None:
    # A previous run with two workers left records in w0 and w1; a single new worker takes both.
    for slot in ("w0", "w1"):
        spool = _spool(tmp_path / slot)
        await spool.append(_records(2))
        await spool.close()
    config = make_config(tmp_path, publish_timeout_s=0.3)
    async with running_ingest(config) as ingest:
        assert ingest.state.delivery.spool_depth == 4
        names = sorted(s.name for s in ingest.state.delivery._states())
        assert names == ["w0", "w1"]


def test_cli_check_config_never_prints_tokens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from falco_gitlab.cli import main

    os.environ["FALCO_GITLAB_INGEST_TOKEN_CLI_TEST"] = TOKEN_PROD
    try:
        assert main(["ingest", "--check-config", "--spool-dir", str(tmp_path)]) == 0
    finally:
        del os.environ["FALCO_GITLAB_INGEST_TOKEN_CLI_TEST"]
    out = capsys.readouterr().out
    assert "destination cli_test: 1 token(s)" in out and TOKEN_PROD not in out
    assert main(["ingest", "--check-config", "--spool-dir", str(tmp_path)]) == 2  # no destination


def test_module_level_imports_stay_stdlib() -> None:
    import subprocess
    import sys

    code = (
        "import sys, ingest.cli; "
        "print(sorted(m for m in ('aiohttp', 'aiokafka', 'confluent_kafka', 'msgspec') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- processes: TLS, several workers on one port, SIGTERM ------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _self_signed(directory: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ingest-test",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(directory / "server.key"),
         "-out", str(directory / "server.crt")],
        check=True,
        capture_output=True,
    )  # fmt: skip


async def test_https_with_the_original_plugins_secrets_dir_layout(tmp_path: Path) -> None:
    import ssl

    import aiohttp

    from ingest.app import serve

    secrets = tmp_path / "secrets"
    await asyncio.to_thread(_self_signed, secrets)
    config = make_config(tmp_path / "spool", publish_timeout_s=0.3)
    config.server.port = _free_port()
    config.server.tls.secrets_dir = str(secrets)
    stop = asyncio.Event()
    server = asyncio.create_task(serve(config, stop=stop))
    context = ssl.create_default_context(cafile=str(secrets / "server.crt"))
    url = f"https://127.0.0.1:{config.server.port}/"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(url + "healthz", ssl=context) as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.05)
            headers = {
                "X-Gitlab-Event-Streaming-Token": TOKEN_PROD,
                "Content-Type": "application/x-www-form-urlencoded",
            }
            async with session.post(url, data=SEEDS["add_gpg_key"], headers=headers, ssl=context) as response:
                assert response.status == 202
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=15)


def test_workers_share_the_port_and_stop_gracefully_on_sigterm(tmp_path: Path) -> None:
    import http.client
    import signal
    import subprocess
    import sys
    import time

    port = _free_port()
    env = {**os.environ, "FALCO_GITLAB_INGEST_TOKEN": TOKEN_PROD}
    command = [
        sys.executable, "-m", "falco_gitlab", "ingest", "--workers", "2", "--host", "127.0.0.1",
        "--port", str(port), "--spool-dir", str(tmp_path), "--bootstrap-servers", "127.0.0.1:9",
        "--log-level", "warning",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)

    def request(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            headers = {
                "X-Gitlab-Event-Streaming-Token": TOKEN_PROD,
                "Content-Type": "application/x-www-form-urlencoded",
            }
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    try:
        deadline = time.monotonic() + 30
        # Both workers up: each has written its metrics snapshot. (Probing their slot locks instead
        # raced with start-up: a worker finding its slot held by the probe took the next one.)
        while len(list((tmp_path / "metrics").glob("w*.json"))) < 2:
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        for index in range(12):
            body = b'{"id": %d, "event_type": "user_impersonation", "author_id": 1}' % index
            status, _ = (0, b"")
            for _ in range(50):  # a worker may still be binding
                try:
                    status, _ = request("POST", "/", body)
                    break
                except ConnectionRefusedError:
                    time.sleep(0.1)
            assert status == 202
        total = 0.0
        while time.monotonic() < deadline:  # every worker's counters, whichever worker answers
            _, text = request("GET", "/metrics")
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.decode().splitlines()
                if line.startswith('falco_gitlab_ingest_requests_total{destination="default",status="202"}')
            )
            if total == 12:
                break
            time.sleep(0.3)
        assert total == 12
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0
    pending = 0
    for name in ("w0", "w1"):
        spool = _spool(tmp_path / name)
        pending += spool.pending
    assert pending == 12  # everything accepted is durable, for the next start


async def test_spool_reads_a_record_larger_than_its_read_chunk(tmp_path: Path) -> None:
    spool = _spool(tmp_path, segment_bytes=64 * 1024 * 1024, max_bytes=64 * 1024 * 1024)
    big = OutRecord("raw", None, b'{"pad":"' + b"b" * (5 * 1024 * 1024) + b'"}', [])
    await spool.append([*_records(2), big, *_records(2, start=2)])
    first = await spool.read_pending(10, max_bytes=100)  # at least one record, then the byte budget
    assert [e.seq for e in first] == [0]
    rest = await _drain_all(spool)
    assert [e.seq for e in rest] == [1, 2, 3, 4] and rest[1].record == big
    await spool.close()


def test_the_example_configuration_is_valid_but_refuses_its_placeholder() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "ingest.toml"
    with pytest.raises(ConfigError) as info:
        load_ingest_config(example, {})
    assert "destinations.0.token_files.0" in str(info.value)  # the example's secret file is absent
    from falco_gitlab.config import load_config

    config = load_config(IngestConfig, example, "UNUSED_", environ={})
    config.destinations[0].token_files = []
    config.destinations[0].tokens = [TOKEN_PROD]
    with pytest.raises(ConfigError) as info:
        resolve_destinations(config)
    assert "destinations.1.tokens.0" in str(info.value)  # "REPLACE-ME" is too short to be a token
    config.destinations[1].tokens = [TOKEN_GROUP]
    assert [d.name for d in resolve_destinations(config)] == ["gitlab-prod", "acme-group"]


# -- one request's acknowledgements (delivery._Acks) ---------------------------------------------------------


async def test_acks_wake_the_request_once_every_record_reported() -> None:
    from ingest.delivery import _Acks
    from ingest.publisher import PublishError

    loop = asyncio.get_running_loop()
    acks = _Acks(loop, 3)
    acks.sent = 3
    acks.report(1, None)
    acks.report(0, None)
    assert not acks.waiter.done() and not acks.all_stored
    acks.report(2, None)
    assert acks.waiter.done() and acks.all_stored

    failing = _Acks(loop, 2)
    failing.sent = 2
    failing.report(0, None)
    failing.report(1, PublishError("MSG_TIMED_OUT"))
    assert failing.waiter.done() and not failing.all_stored
    assert failing.outcomes[0] is None and isinstance(failing.outcomes[1], PublishError)


async def test_acks_after_the_deadline_resolve_the_spooled_copies_futures() -> None:
    from ingest.delivery import _Acks
    from ingest.publisher import PublishError

    loop = asyncio.get_running_loop()
    acks = _Acks(loop, 4)
    acks.sent = 3  # the fourth was never handed over
    acks.report(0, None)
    acks.report(1, PublishError("broker said no"))
    acks.expire()  # the deadline: records 2 (in flight) and 3 (never sent) are outstanding
    assert acks.waiter.done() and not acks.all_stored
    assert acks.late_future(0) is None  # stored: not spooled at all by the caller, but never tracked
    assert acks.late_future(1) is None  # failed: the spooled copy must be sent again
    assert acks.late_future(3) is None  # never sent
    late = acks.late_future(2)
    assert late is not None and not late.done()
    acks.report(2, None)  # the late acknowledgement marks the spooled copy done, through the future
    assert late.done() and late.exception() is None

    failed_late = _Acks(loop, 1)
    failed_late.sent = 1
    failed_late.expire()
    future = failed_late.late_future(0)
    assert future is not None
    failed_late.report(0, PublishError("MSG_TIMED_OUT"))
    assert isinstance(future.exception(), PublishError)


def test_actor_key_takes_only_plain_integers_as_ids() -> None:
    from falco_gitlab.contract import actor_key

    assert actor_key(42, None) == actor_key("42", None) == b"id:42"
    assert actor_key("-1", "alice") == b"name:alice"  # a non-user: the attempted name tells actors apart
    assert actor_key("-1", None) == b"id:-1"
    # Unicode digits and doubled signs pass str.isdigit but not int(): never an exception, never an id.
    for odd in ("²", "--5", "٣", "-", ""):
        assert actor_key(odd, "bob") == b"name:bob"
        assert actor_key(odd, None) is None


class _SilentPublisher:
    """Takes every record and reports only when the test says so (Kafka that stopped answering)."""

    started = True
    broken = False

    def __init__(self) -> None:
        self.reports: list[Any] = []

    def try_send(self, record: OutRecord, on_report: Any) -> bool:
        self.reports.append(on_report)
        return True


async def test_each_request_is_woken_at_its_own_deadline_and_answered_ones_are_not_kept(
    tmp_path: Path,
) -> None:
    from ingest.delivery import Delivery, Outcome

    spool = Spool(tmp_path / "w0", max_bytes=1 << 20, segment_bytes=1 << 16, fsync=False)
    spool.open()
    publisher = _SilentPublisher()
    timeout = 0.4
    delivery = Delivery(publisher, spool, IngestMetrics(), publish_timeout_s=timeout)  # type: ignore[arg-type]
    record = OutRecord("gitlab.audit.raw", b"id:1", b'{"id": 1}', [])
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = asyncio.create_task(delivery.deliver([record]))  # never acknowledged
    await asyncio.sleep(0.2)
    for _ in range(50):  # acknowledged at once
        answered = asyncio.create_task(delivery.deliver([record]))
        await asyncio.sleep(0)
        publisher.reports[-1](None)
        assert await answered is Outcome.PUBLISHED
    second_started = loop.time()
    second = asyncio.create_task(delivery.deliver([record]))  # never acknowledged either
    assert await first is Outcome.SPOOLED
    assert timeout - 0.01 <= loop.time() - started < timeout + 0.15
    assert not second.done()  # its own deadline, not the first one's
    # The first one's expiry dropped the answered requests queued behind it: only the second is left.
    assert len(delivery._deadlines) == 1
    assert await second is Outcome.SPOOLED
    assert loop.time() - second_started >= timeout - 0.01
    assert not delivery._deadlines and delivery._deadline_timer is None
    assert spool.pending == 2
    await spool.close()


def test_serving_raises_the_young_collection_threshold_and_keeps_cycles_collectable() -> None:
    class Node:
        partner: Any = None

    collected: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collected.append(info["collected"])

    before = gc.get_threshold()
    gc.callbacks.append(count)
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 0  # start-up's objects are out of every later collection
        assert gc.isenabled()
        first, second = Node(), Node()
        first.partner, second.partner = second, first
        del first, second
        gc.collect()
        assert sum(collected) >= 2  # a cycle made while serving is still freed
    finally:
        gc.callbacks.remove(count)
        gc.unfreeze()
        gc.set_threshold(*before)
