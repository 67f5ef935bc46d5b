"""enrich without Kafka: GeoIP (test databases, cache, hot reload), transform, DLQ headers, config, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from enrich import config as enrich_config
from enrich import geo as geo_module
from enrich.config import EnrichConfig
from enrich.dlq import MAX_REASON, dlq_headers
from enrich.flatten import MalformedEvent, flatten, flatten_encoded, parse_created_at
from enrich.geo import GeoDatabaseError, GeoIP
from enrich.metrics import Counters, prometheus_text, serve
from enrich.worker import UidWindow, Worker, enrich_transform, passthrough_transform
from falco_gitlab.config import ConfigError
from falco_gitlab.model import GeoInfo, decode_enriched, encode_enriched
from tests.enrich_support import (
    CITY_TEST_DB,
    GEOIP2_CITY_TEST_DB,
    build_mmdb,
    city_record,
    replace_file,
    seed_payloads,
)

ROOT = Path(__file__).resolve().parent.parent

LONDON = GeoInfo(city="London", country="United Kingdom", country_iso="GB", continent="Europe",
                 region="England", region_iso="GB-ENG")
KNOWN = {
    "81.2.69.142": LONDON,
    # Boxford lies in West Berkshire, England: the region is the largest subdivision.
    "2.125.160.216": GeoInfo(city="Boxford", country="United Kingdom", country_iso="GB", continent="Europe",
                             region="England", region_iso="GB-ENG"),
    "89.160.20.112": GeoInfo(city="Linköping", country="Sweden", country_iso="SE", continent="Europe",
                             region="Östergötland County", region_iso="SE-E"),
    "216.160.83.56": GeoInfo(city="Milton", country="United States", country_iso="US",
                             continent="North America", region="Washington", region_iso="US-WA"),
    "175.16.199.0": GeoInfo(city="Changchun", country="China", country_iso="CN", continent="Asia",
                            region="Jilin Sheng", region_iso="CN-22"),
    "67.43.156.1": GeoInfo(country="Bhutan", country_iso="BT", continent="Asia"),
    "2001:218::1": GeoInfo(country="Japan", country_iso="JP", continent="Asia"),
    "::ffff:81.2.69.142": LONDON,  # IPv4-mapped IPv6 is the IPv4 address
}


def build_asn(path: Path) -> Path:
    return build_mmdb(path, {
        "81.2.69.0/24": {"autonomous_system_number": 20712,
                         "autonomous_system_organization": "Andrews & Arnold Ltd"},
        "2001:218::/32": {"autonomous_system_number": 2914, "autonomous_system_organization": "NTT"},
        "89.160.20.0/24": {"autonomous_system_number": 29518},
    }, database_type="GeoLite2-ASN")


def build_city(path: Path, city: str = "Testville") -> Path:
    return build_mmdb(path, {
        "81.2.69.0/24": city_record(city, "Testland", "TL", "Europe", "EU", [("North", "N")]),
        "198.41.0.0/24": city_record(None, "Rootland", "RL", "North America", "NA"),
    }, database_type="GeoLite2-City")


# --- lookups -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("database", [CITY_TEST_DB, GEOIP2_CITY_TEST_DB], ids=["GeoLite2", "GeoIP2"])
@pytest.mark.parametrize("mode", ["memory", "mmap"])
def test_known_addresses(database: Path, mode: str) -> None:
    geo = GeoIP(str(database), mode=mode)
    try:
        for address, expected in KNOWN.items():
            assert geo.lookup(address) == expected, address
    finally:
        geo.close()


@pytest.mark.parametrize("address", ["10.0.0.1", "192.168.1.1", "172.16.5.4", "127.0.0.1", "169.254.1.1",
                                     "::1", "fe80::1", "fd00::1", "0.0.0.0", "224.0.0.1",
                                     "::ffff:10.0.0.1", "240.0.0.1"])
def test_private_and_special_addresses_are_not_looked_up(address: str) -> None:
    geo = GeoIP(str(CITY_TEST_DB))
    assert geo.lookup(address) is None


def test_unknown_public_address_is_none() -> None:
    geo = GeoIP(str(CITY_TEST_DB))
    assert geo.lookup("198.41.0.4") is None  # the seed payloads' address is not in the test database
    assert geo.lookup("2a00:1450::1") is None


@pytest.mark.parametrize("text", ["bogus", "", "1.2.3", "81.2.69.142/32", " 81.2.69.142", "::g"])
def test_not_an_address_raises_value_error(text: str) -> None:
    geo = GeoIP(str(CITY_TEST_DB))
    with pytest.raises(ValueError):
        geo.lookup(text)


def test_asn_database(tmp_path: Path) -> None:
    geo = GeoIP(str(CITY_TEST_DB), str(build_asn(tmp_path / "asn.mmdb")))
    assert geo.lookup("81.2.69.142") == GeoInfo(
        city="London", country="United Kingdom", country_iso="GB", continent="Europe", region="England",
        region_iso="GB-ENG", asn=20712, as_org="Andrews & Arnold Ltd")
    assert geo.lookup("2001:218::1") == GeoInfo(country="Japan", country_iso="JP", continent="Asia",
                                                asn=2914, as_org="NTT")
    assert geo.lookup("89.160.20.112").asn == 29518  # type: ignore[union-attr]
    assert geo.lookup("89.160.20.112").as_org is None  # type: ignore[union-attr]


def test_asn_database_alone(tmp_path: Path) -> None:
    geo = GeoIP(None, str(build_asn(tmp_path / "asn.mmdb")))
    assert geo.enabled
    assert geo.lookup("81.2.69.142") == GeoInfo(asn=20712, as_org="Andrews & Arnold Ltd")
    assert geo.lookup("216.160.83.56") is None
    assert geo.describe().startswith("no City database configured: geo fields absent")


def test_no_database() -> None:
    geo = GeoIP()
    assert not geo.enabled
    assert geo.lookup("81.2.69.142") is None
    assert geo.describe() == ("no City database configured: geo fields absent; "
                              "no ASN database configured: asn/as_org absent")


def test_describe_names_the_databases(tmp_path: Path) -> None:
    geo = GeoIP(str(CITY_TEST_DB), str(build_asn(tmp_path / "asn.mmdb")))
    text = geo.describe()
    assert f"city={CITY_TEST_DB} (GeoLite2-City, built 1770245369, memory)" in text
    assert "asn=" in text and "GeoLite2-ASN" in text


def test_wrong_or_broken_databases_are_refused(tmp_path: Path) -> None:
    asn = build_asn(tmp_path / "asn.mmdb")
    with pytest.raises(GeoDatabaseError, match="not a City or Country database"):
        GeoIP(str(asn))
    with pytest.raises(GeoDatabaseError, match="not an ASN or ISP database"):
        GeoIP(None, str(CITY_TEST_DB))
    garbage = tmp_path / "garbage.mmdb"
    garbage.write_bytes(b"\0" * 1000)
    with pytest.raises(GeoDatabaseError, match="cannot open city database"):
        GeoIP(str(garbage))
    with pytest.raises(GeoDatabaseError, match="cannot open city database"):
        GeoIP(str(tmp_path / "missing.mmdb"))


def test_lookups_are_cached() -> None:
    geo = GeoIP(str(CITY_TEST_DB), cache_size=2)
    for _ in range(5):
        assert geo.lookup("81.2.69.142") == LONDON
    info = geo.cache_info()
    assert (info.hits, info.misses) == (4, 1)
    geo.lookup("89.160.20.112")
    geo.lookup("216.160.83.56")  # evicts 81.2.69.142 (cache of 2)
    geo.lookup("81.2.69.142")
    assert geo.cache_info().misses == 4


def test_reader_errors_do_not_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    geo = GeoIP(str(CITY_TEST_DB))

    class Broken:
        def get(self, address: object) -> object:
            raise RuntimeError("corrupt search tree")

    db = geo._dbs["city"]
    assert db is not None
    monkeypatch.setattr(db, "reader", Broken())
    geo._cached = geo._make_cached()
    assert geo.lookup("81.2.69.142") is None


# --- reload --------------------------------------------------------------------------------------------


def rewrite_in_place(source: Path, target: Path) -> None:
    """Overwrite ``target``'s content, keeping its inode (what `cp new.mmdb old.mmdb` does)."""
    target.write_bytes(source.read_bytes())


@pytest.fixture
def city_copy(tmp_path: Path) -> Path:
    target = tmp_path / "GeoLite2-City.mmdb"
    shutil.copyfile(CITY_TEST_DB, target)
    return target


@pytest.mark.parametrize("mode", ["memory", "mmap"])
async def test_reload_after_atomic_replacement(city_copy: Path, tmp_path: Path, mode: str) -> None:
    geo = GeoIP(str(city_copy), mode=mode)
    assert geo.lookup("81.2.69.142") == LONDON
    assert await geo.reload_changed() == []  # nothing changed yet
    replace_file(build_city(tmp_path / "new.mmdb"), city_copy)
    assert await geo.reload_changed() == ["city"]
    assert geo.reloads == 1
    # The cache was cleared together with the swap: the new answer, not the cached London.
    assert geo.lookup("81.2.69.142") == GeoInfo(city="Testville", country="Testland", country_iso="TL",
                                                continent="Europe", region="North", region_iso="TL-N")
    assert geo.lookup("198.41.0.4") == GeoInfo(country="Rootland", country_iso="RL",
                                               continent="North America")
    assert geo.cache_info().currsize == 2
    assert await geo.reload_changed() == []
    geo.close()


async def test_reload_after_rewrite_in_place(city_copy: Path, tmp_path: Path) -> None:
    geo = GeoIP(str(city_copy), mode="memory")
    inode = os.stat(city_copy).st_ino
    assert geo.lookup("81.2.69.142") == LONDON
    rewrite_in_place(build_city(tmp_path / "new.mmdb"), city_copy)
    assert os.stat(city_copy).st_ino == inode
    assert await geo.reload_changed() == ["city"]
    assert geo.lookup("81.2.69.142").city == "Testville"  # type: ignore[union-attr]


async def test_broken_replacement_keeps_the_loaded_database(city_copy: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    geo = GeoIP(str(city_copy))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a database")
    replace_file(garbage, city_copy)
    assert await geo.reload_changed() == []
    assert geo.reload_failures == 1
    assert "GeoIP reload failed, keeping the loaded database" in caplog.text
    assert geo.lookup("81.2.69.142") == LONDON
    # The same broken file is not retried on every check ...
    assert await geo.reload_changed() == []
    assert geo.reload_failures == 1
    # ... but a fixed one is loaded.
    replace_file(build_city(tmp_path / "new.mmdb", city="Fixedtown"), city_copy)
    assert await geo.reload_changed() == ["city"]
    assert geo.lookup("81.2.69.142").city == "Fixedtown"  # type: ignore[union-attr]


async def test_missing_file_keeps_the_loaded_database(city_copy: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    geo = GeoIP(str(city_copy))
    os.unlink(city_copy)
    assert await geo.reload_changed() == []
    assert await geo.reload_changed() == []
    assert caplog.text.count("is missing; keeping the loaded one") == 1
    assert geo.lookup("81.2.69.142") == LONDON


async def test_asn_reload(tmp_path: Path) -> None:
    asn_path = build_asn(tmp_path / "asn.mmdb")
    geo = GeoIP(str(CITY_TEST_DB), str(asn_path))
    assert geo.lookup("81.2.69.142").asn == 20712  # type: ignore[union-attr]
    new = build_mmdb(tmp_path / "asn2.mmdb", {"81.2.69.0/24": {"autonomous_system_number": 65001,
                                                                "autonomous_system_organization": "New"}},
                     database_type="GeoLite2-ASN")
    replace_file(new, asn_path)
    assert await geo.reload_changed() == ["asn"]
    info = geo.lookup("81.2.69.142")
    assert info is not None and (info.city, info.asn, info.as_org) == ("London", 65001, "New")


async def test_watch_reloads_without_blocking_the_loop(city_copy: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    geo = GeoIP(str(city_copy))
    real_open = geo_module.open_database

    def slow_open(kind: str, path: str, mode: str) -> object:
        time.sleep(0.5)  # a big database takes a while to read
        return real_open(kind, path, mode)

    monkeypatch.setattr(geo_module, "open_database", slow_open)
    watcher = asyncio.create_task(geo.watch(0.05))
    try:
        replace_file(build_city(tmp_path / "new.mmdb"), city_copy)
        ticks = 0
        longest_gap = 0.0
        last = time.monotonic()
        deadline = last + 10
        while geo.reloads == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest_gap, last = max(longest_gap, now - last), now
            ticks += 1
            # lookups keep being served (from the old database) while the new one loads
            assert geo.lookup("81.2.69.142") is not None
        assert geo.reloads == 1
        assert longest_gap < 0.3, f"event loop blocked for {longest_gap:.2f} s"
        assert ticks > 20
        assert geo.lookup("81.2.69.142").city == "Testville"  # type: ignore[union-attr]
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


# --- transform -----------------------------------------------------------------------------------------


HEADERS = [("gitlab-destination", b"gitlab-main"), ("gitlab-event-type", b"add_gpg_key"),
           ("gitlab-received-at", b"1707538200000000000"), ("gitlab-request-id", b"req-1"),
           ("gitlab-event-uid", b"req-1.0")]


def test_enrich_transform_uses_headers_and_geo() -> None:
    raw = seed_payloads()["add_gpg_key"].replace(b"198.41.0.4", b"81.2.69.142")
    geo = GeoIP(str(CITY_TEST_DB))
    record = decode_enriched(enrich_transform(geo.lookup)(raw, HEADERS, 1))
    assert record.fields["destination"] == "gitlab-main"
    assert (record.fields["city"], record.fields["country"], record.fields["countryisocode"],
            record.fields["continent"], record.fields["region"], record.fields["regionisocode"]) == (
        "London", "United Kingdom", "GB", "Europe", "England", "GB-ENG")
    assert record.ts == 1707538164597000000
    assert record.raw == raw


def test_enrich_transform_time_fallbacks() -> None:
    transform = enrich_transform(None)
    body = b'{"event_type": "x"}'
    assert decode_enriched(transform(body, HEADERS, 1)).ts == 1707538200000000000  # received-at header
    assert decode_enriched(transform(body, [], 1707538300123)).ts == 1707538300123000000  # Kafka timestamp
    bad = [("gitlab-received-at", b"soon")]
    assert decode_enriched(transform(body, bad, 1707538300123)).ts == 1707538300123000000
    before = time.time_ns()
    assert decode_enriched(transform(body, [], -1)).ts >= before


def test_enrich_transform_event_type_header_and_errors() -> None:
    transform = enrich_transform(None)
    record = decode_enriched(transform(b'{"id": 1}', HEADERS, 1))
    assert record.fields["event_type"] == "add_gpg_key"
    with pytest.raises(MalformedEvent, match="record has no value"):
        transform(None, HEADERS, 1)
    with pytest.raises(MalformedEvent, match="not JSON"):
        transform(b"\xff\xfe", HEADERS, 1)


def test_passthrough_transform() -> None:
    assert passthrough_transform(b"abc", HEADERS, 1) == b"abc"
    assert passthrough_transform(None, HEADERS, 1) == b""


@pytest.mark.parametrize("name", sorted(seed_payloads()))
def test_transform_writes_exactly_the_encoded_enriched_record(name: str) -> None:
    """The transform encodes (version, ts, fields, raw) directly: the same bytes as the record."""
    raw = seed_payloads()[name].replace(b"198.41.0.4", b"81.2.69.142")
    geo = GeoIP(str(CITY_TEST_DB))
    record = flatten(raw, destination="gitlab-main", header_event_type="add_gpg_key",
                     received_at_ns=1707538200000000000, geo=geo.lookup)
    expected = encode_enriched(record)
    assert flatten_encoded(raw, "gitlab-main", "add_gpg_key", 1707538200000000000, geo.lookup) == expected
    assert enrich_transform(geo.lookup)(raw, HEADERS, 1) == expected


class _MetadataOnly:
    """Enough of a producer for Worker._partitioner."""

    def __init__(self, partitions: set[int]) -> None:
        self.partitions = partitions

    async def partitions_for(self, topic: str) -> set[int]:
        return self.partitions


async def test_output_partitions_are_the_default_partitioners() -> None:
    """Enriched records are batched per partition by the worker itself: a key must land where
    aiokafka's (Java-compatible) default partitioner puts it, for any partition count."""
    worker = Worker(EnrichConfig(), passthrough_transform, transactional_id="t")
    default = DefaultPartitioner()
    keys = [b"id:%d" % n for n in range(-5, 300)] + [b"name:alice", b"", b"\xff" * 9, b"k" * 200]
    for partitions in ({0}, {0, 1, 2}, set(range(7)), set(range(64))):
        worker._producer = _MetadataOnly(partitions)
        partition_of = await worker._partitioner("out")
        assert partition_of is not None
        ordered = sorted(partitions)
        for key in keys * 2:  # the second time from the cache
            assert partition_of(key) == default(key, ordered, ordered), (partitions, key)
    worker._producer = _MetadataOnly(set())
    assert await worker._partitioner("out") is None  # no metadata: the producer's own send is used


# --- small pieces --------------------------------------------------------------------------------------


def test_uid_window_forgets_the_oldest() -> None:
    window = UidWindow(3)
    window.update([b"a", b"b"])
    window.update([b"c", b"a"])  # "a" becomes the newest
    window.update([b"d"])  # evicts "b"
    assert b"b" not in window
    assert all(uid in window for uid in (b"a", b"c", b"d"))
    assert len(window) == 3


def test_dlq_headers() -> None:
    original = [("gitlab-destination", b"main"), ("dlq-reason", b"older"), ("x", b"1")]
    headers = dlq_headers(original, "not JSON: boom", "gitlab.audit.raw", 3, 42)
    assert headers == [("gitlab-destination", b"main"), ("x", b"1"), ("dlq-reason", b"not JSON: boom"),
                       ("dlq-stage", b"enrich"), ("dlq-source", b"gitlab.audit.raw/3/42")]
    long = dict(dlq_headers([], "é" * 5000, "t", 0, 0))["dlq-reason"].decode()
    assert len(long) == MAX_REASON and long.endswith("…")


def test_prometheus_text() -> None:
    counters = Counters(records_in=5, dlq=1)
    text = prometheus_text(counters, {"group": "g"})
    assert 'falco_gitlab_enrich_records_in_total{group="g"} 5' in text
    assert 'falco_gitlab_enrich_dlq_total{group="g"} 1' in text
    assert "# TYPE falco_gitlab_enrich_batch_seconds_max gauge" in text
    assert 'falco_gitlab_enrich_batch_seconds_total{group="g"} 0.0' in text


async def _http_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_metrics_endpoint() -> None:
    counters = Counters(records_in=3)
    refreshed: list[bool] = []
    server = await serve(counters, "127.0.0.1", 0, {"group": "g"}, refresh=lambda: refreshed.append(True))
    try:
        port = server.sockets[0].getsockname()[1]
        data = await _http_get(port, "/metrics")
        assert data.startswith(b"HTTP/1.0 200 OK\r\n")
        assert b'falco_gitlab_enrich_records_in_total{group="g"} 3\n' in data
        assert refreshed == [True]
        assert (await _http_get(port, "/")).startswith(b"HTTP/1.0 404")
    finally:
        server.close()
        await server.wait_closed()


# --- configuration -------------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = enrich_config.load(None, environ={})
    assert config.kafka.input_topic == "gitlab.audit.raw"
    assert config.kafka.output_topic == "gitlab.audit.enriched"
    assert config.kafka.dlq_topic == "gitlab.audit.dlq"
    assert config.geoip.city_db is None
    assert enrich_config.transactional_id(config.kafka, "host-a") == (
        "falco-gitlab-enrich.falco-gitlab-enrich.host-a.0")


def test_config_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "enrich.toml"
    path.write_text(f"""
[kafka]
bootstrap_servers = "k1:9092,k2:9092"
group_id = "g1"
worker_index = 2

[geoip]
city_db = "{CITY_TEST_DB}"

[processing]
batch_size = 100
""")
    config = enrich_config.load(path, environ={"FALCO_GITLAB_ENRICH_PROCESSING__BATCH_SIZE": "50",
                                               "FALCO_GITLAB_ENRICH_KAFKA__TRANSACTIONAL_ID_PREFIX": "p"})
    assert config.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert config.processing.batch_size == 50
    assert enrich_config.transactional_id(config.kafka, "h") == "p.g1.h.2"
    assert config.geoip.city_db == str(CITY_TEST_DB)


def test_example_config_is_valid() -> None:
    config = enrich_config.load(ROOT / "examples" / "enrich.toml", environ={
        "FALCO_GITLAB_ENRICH_GEOIP__CITY_DB": str(CITY_TEST_DB),
        "FALCO_GITLAB_ENRICH_GEOIP__ASN_DB": str(CITY_TEST_DB)})
    assert config.kafka.group_id == "falco-gitlab-enrich"


@pytest.mark.parametrize(("toml", "message"), [
    ("[kafka]\nbootstrap = 'x'\n", "unknown field `bootstrap`"),
    ("[processing]\nbatch_size = 0\n", "`processing.batch_size` must be positive"),
    ("[kafka]\ntransaction_timeout_ms = 60000\n", "`kafka.transaction_timeout_ms` must not exceed"),
    ("[geoip]\ncity_db = '/nonexistent.mmdb'\n", "is not a readable file"),
    ("[geoip]\nmode = 'disk'\n", "Invalid enum value 'disk' - at `geoip.mode`"),
    ("[kafka.security]\nprotocol = 'SASL_SSL'\n", "sasl_username` is required"),
])
def test_config_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "enrich.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        enrich_config.load(path, environ={})
    assert message in str(info.value)


# --- command line --------------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "falco_gitlab.cli", "enrich", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**os.environ, **(env or {})})


def test_cli_module_imports_only_the_standard_library() -> None:
    code = ("import sys, enrich.cli; heavy = [m for m in ('aiokafka', 'msgspec', 'maxminddb', 'geoip2') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


def test_cli_check_config() -> None:
    result = _cli("--check-config", "--city-db", str(CITY_TEST_DB), "--group-id", "grp",
                  "--worker-index", "3", env={"FALCO_GITLAB_ENRICH_KAFKA__TRANSACTIONAL_ID_PREFIX": "pre"})
    assert result.returncode == 0, result.stderr
    assert '"group_id": "grp"' in result.stdout
    assert '"transactional_id": "pre.grp.' in result.stdout and '.3"' in result.stdout


def test_cli_config_error_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka]\nnope = 1\n")
    result = _cli("--config", str(bad))
    assert result.returncode == 2
    assert "unknown field `nope`" in result.stderr
    broken = tmp_path / "broken.mmdb"
    broken.write_bytes(b"x" * 100)
    result = _cli("--check-config", "--city-db", str(broken))
    assert result.returncode == 2
    assert "cannot open city database" in result.stderr


# --- speed-ups that must not change a byte ------------------------------------------------------------


def _transform_fields(transform: Any, raw: bytes, headers: list[tuple[str, bytes]] = HEADERS) -> Any:
    return decode_enriched(transform(raw, headers, 1)).fields


async def test_address_cache_is_emptied_by_a_database_reload(city_copy: Path, tmp_path: Path) -> None:
    """enrich_transform(GeoIP) caches what it derives from a client address in GeoIP.derived; a reload
    must empty it together with the lookup cache, or events would keep the old database's answers."""
    geo = GeoIP(str(city_copy))
    transform = enrich_transform(geo)
    raw = seed_payloads()["add_gpg_key"].replace(b"198.41.0.4", b"81.2.69.142")
    assert _transform_fields(transform, raw)["city"] == "London"
    assert geo.derived  # the address is cached ...
    assert _transform_fields(transform, raw)["city"] == "London"  # ... and served from there
    info = geo.cache_info()
    assert (info.hits, info.misses) == (1, 1)  # the answer from the address cache counts as a hit
    replace_file(build_city(tmp_path / "new.mmdb"), city_copy)
    assert await geo.reload_changed() == ["city"]
    assert not geo.derived
    assert _transform_fields(transform, raw)["city"] == "Testville"
    geo.close()
    assert not geo.derived
    assert "city" not in _transform_fields(transform, raw)  # closed: no databases, no geo fields


def test_address_cache_gives_what_the_uncached_path_gives(tmp_path: Path) -> None:
    """Same bytes with and without the address cache, for address shapes that take different paths:
    blank details address (the top-level one decides, so it is never cached under the blank text),
    proxy lists, mapped IPv6, private, unknown, not an address, none at all."""
    geo = GeoIP(str(CITY_TEST_DB), str(build_asn(tmp_path / "asn.mmdb")))
    cached, uncached = enrich_transform(geo), enrich_transform(geo.lookup)
    shapes: list[tuple[str | None, str | None]] = [
        ("81.2.69.142", None), (None, "81.2.69.142"), ("  ", "81.2.69.142"), ("  ", "89.160.20.112"),
        ("", "2001:218::1"), (" 81.2.69.142 , 10.0.0.1", None), ("::ffff:81.2.69.142", "x"),
        ("10.1.2.3", None), ("198.41.0.4", None), ("not-an-ip", None), ("not-an-ip, 81.2.69.142", None),
        (None, None), ("  ", None), (None, "  "), (",81.2.69.142", None),
    ]
    for _ in range(2):  # the second time from the cache
        for detail, top in shapes:
            event: dict[str, Any] = {"event_type": "x", "details": {}}
            if detail is not None:
                event["details"]["ip_address"] = detail
            if top is not None:
                event["ip_address"] = top
            raw = json.dumps(event).encode()
            assert cached(raw, HEADERS, 1) == uncached(raw, HEADERS, 1), (detail, top)
            assert cached(raw, HEADERS, 1) == flatten_encoded(raw, "gitlab-main", "add_gpg_key",
                                                              1707538200000000000, geo.lookup)
    assert "  " not in geo.derived and "" not in geo.derived


def test_address_cache_is_bounded() -> None:
    geo = GeoIP(str(CITY_TEST_DB), cache_size=3)
    transform = enrich_transform(geo)
    for n in range(10):
        transform(b'{"event_type": "x", "ip_address": "81.2.69.%d"}' % n, HEADERS, 1)
        assert len(geo.derived) <= 3


def test_transform_headers_last_one_counts_and_bad_utf8_is_replaced() -> None:
    transform = enrich_transform(None)
    headers = [("gitlab-destination", b"first"), ("gitlab-event-type", b"t\xff"),
               ("gitlab-destination", b"second"), ("gitlab-received-at", b"5")]
    for _ in range(2):  # the second time from the decoded-header cache
        record = decode_enriched(transform(b'{"id": 1}', headers, 1))
        assert record.fields["destination"] == "second"
        assert record.fields["event_type"] == "t\ufffd"
        assert record.ts == 5


@settings(max_examples=300, deadline=None)
@given(moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                           timezones=st.sampled_from([UTC, timezone(timedelta(hours=-11)),
                                                      timezone(timedelta(hours=5, minutes=30)),
                                                      timezone(timedelta(seconds=3601, microseconds=5))])),
       style=st.sampled_from(["milliseconds", "microseconds", "seconds", "auto"]),
       zulu=st.booleans())
def test_parse_created_at_equals_the_timestamp_formula(moment: datetime, style: str, zulu: bool) -> None:
    """parse_created_at computes whole seconds in integers where that equals int(timestamp()); it
    must give what the float formula gives (or fail the same way) for every time and offset."""
    text = moment.isoformat(timespec=style)
    if zulu and moment.utcoffset() == timedelta(0):
        text = text.replace("+00:00", "Z")

    def reference(text: str) -> int:
        value = datetime.fromisoformat(text)
        assert value.tzinfo is not None
        ns = int(value.timestamp()) * 1_000_000_000 + value.microsecond * 1_000
        if not 0 <= ns < 2**63:
            raise ValueError("out of range")
        return ns

    try:
        expected: int | None = reference(text)
    except (ValueError, OverflowError):
        expected = None
    try:
        got: int | None = parse_created_at(text)
    except (ValueError, OverflowError):
        got = None
    assert got == expected, text


def test_parse_created_at_edges() -> None:
    assert parse_created_at("2024-02-10T04:09:24.597Z") == 1707538164597000000
    assert parse_created_at("1970-01-01T00:00:00Z") == 0
    assert parse_created_at("1970-01-01T01:00:00.5+01:00") == 500_000_000  # the local microseconds
    with pytest.raises(ValueError, match="no time zone"):
        parse_created_at("2024-02-10T04:09:24.597")
    with pytest.raises(ValueError, match="outside the range"):
        parse_created_at("1969-12-31T23:59:58Z")
    with pytest.raises(ValueError, match="outside the range"):
        parse_created_at("2262-04-12T00:00:00Z")
