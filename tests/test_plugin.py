"""The built Falco plugin library, driven by a C host that calls the plugin API the way Falco does.

The library is built once per session (into a temporary directory) and loaded by
tests/host/plugin_host.c, compiled here with gcc: dlopen(RTLD_LOCAL|RTLD_NOW), metadata before init,
init / open / next_batch / extract_fields (one field per call) / close / destroy, several cycles, dlclose
and dlopen again. Kafka tests use the ``kafka_bootstrap`` fixture of tests/conftest.py when it exists,
else KAFKA_BOOTSTRAP_SERVERS, else they are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from enrich.flatten import parse_created_at
from falco_gitlab import __version__
from falco_gitlab.fields import CATALOGUE, plugin_fields
from falco_gitlab.model import EnrichedRecord, encode_enriched
from falco_source.config import init_schema
from tests.plugin_support import (
    HostRun,
    build_library,
    compile_host,
    create_topic,
    delete_topics,
    expected_value,
    field_args,
    plugin_config,
    produce,
    run_host,
    seed_records,
    unique,
    write_baseline,
)

SIMPLE_FIELDS = [f.qualified for f in CATALOGUE if f.arg is None]
ARG_FIELDS = [
    "gitlab.value[details.custom_message.protocol]",
    "gitlab.value[details.custom_message]",
    "gitlab.value[id]",
    "gitlab.value[details.change]",
    "gitlab.value[details.no_such_key]",
    "gitlab.value[entity_path]",
]
ALL_FIELDS = SIMPLE_FIELDS + ARG_FIELDS


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def plugin_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("plugin")
    return build_library(directory), compile_host(directory)


@pytest.fixture(scope="session")
def library(plugin_build: tuple[Path, Path]) -> Path:
    return plugin_build[0]


@pytest.fixture(scope="session")
def host(plugin_build: tuple[Path, Path]) -> Path:
    return plugin_build[1]


@pytest.fixture(scope="session")
def plugin_bootstrap(request: pytest.FixtureRequest) -> str:
    try:
        return str(request.getfixturevalue("kafka_bootstrap"))
    except pytest.FixtureLookupError:
        pass
    address = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not address:
        pytest.skip("no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS (or provide the kafka_bootstrap fixture)")
    return address


@pytest.fixture
def topic_factory(plugin_bootstrap: str) -> Iterator[Callable[..., str]]:
    created: list[str] = []

    def make(partitions: int = 1, prefix: str = "t") -> str:
        name = unique(prefix)
        create_topic(plugin_bootstrap, name, partitions)
        created.append(name)
        return name

    yield make
    delete_topics(plugin_bootstrap, created)


@pytest.fixture(scope="session")
def seeds() -> list[tuple[str, EnrichedRecord, bytes]]:
    return seed_records()


@pytest.fixture(scope="session")
def seed_topic(plugin_bootstrap: str, seeds: list[tuple[str, EnrichedRecord, bytes]]) -> Iterator[str]:
    """One partition holding the 23 seed records, produced in one transaction, in file-name order."""
    name = unique("seeds")
    create_topic(plugin_bootstrap, name, 1)
    produce(plugin_bootstrap, name, [value for _, _, value in seeds])
    yield name
    delete_topics(plugin_bootstrap, [name])


def assert_ok(run: HostRun) -> None:
    assert run.returncode == 0, run.explain()


def assert_values(event: dict[str, Any], record: EnrichedRecord, fields: list[str]) -> None:
    expected = {name: expected_value(record, name) for name in fields}
    assert event["values"] == expected


# --- without Kafka ----------------------------------------------------------------------------------

def test_metadata_is_answered_before_init_and_after_reload(host: Path, library: Path) -> None:
    run = run_host(host, library, "--metadata-only", "--reload")
    assert_ok(run)
    metas = run.of("meta")
    assert [m["load"] for m in metas] == [0, 1]
    for meta in metas:
        assert meta["name"] == "gitlabkafka"
        assert meta["id"] == 999
        assert meta["required_api_version"] == "3.10.0"
        assert meta["version"] == __version__
        assert meta["event_source"] == "gitlab"
        assert meta["extract_event_sources"] == ["gitlab"]
        assert meta["init_schema_type"] == 1
        assert meta["init_schema"] == init_schema()
        assert meta["fields"] == plugin_fields()
        assert meta["description"] and meta["contact"]
    # metadata needs no interpreter: nothing was logged, no Python was started
    assert run.logs == []


def test_library_exports_only_the_plugin_api_and_cannot_be_unmapped(library: Path) -> None:
    nm, readelf = shutil.which("nm"), shutil.which("readelf")
    if nm is None or readelf is None:
        pytest.skip("binutils not installed")
    symbols = subprocess.run([nm, "-D", "--defined-only", str(library)], capture_output=True, text=True,
                             check=True).stdout.split()
    exported = sorted(s for s in symbols if s.startswith(("plugin_", "PyInit_")))
    assert "plugin_get_required_api_version" in exported and "plugin_extract_fields" in exported
    assert all(s.startswith("plugin_") or s == "PyInit__gitlabkafka_cffi" for s in exported)
    dynamic = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "NODELETE" in dynamic
    assert "libpython3" in dynamic


class _Listener:
    """A TCP listener standing in for a broker: counts connection attempts."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def fake_broker() -> Iterator[_Listener]:
    listener = _Listener()
    yield listener
    listener.close()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{}", "missing required field `brokers`"),
        ('{"brokers": "B", "batch_size": 0}', "Expected `int` >= 1 (at batch_size)"),
        ('{"brokers": "B", "tpoic": "x"}', "unknown field `tpoic`"),
        ('{"brokers": "B", "sasl": {"username": "u"}}', "exactly one of sasl.password"),
        ('{"brokers": "B", "tls": {"ca_file": "/no/such/ca.pem"}}',
         "tls.ca_file: /no/such/ca.pem does not exist"),
        ('{"brokers": "B", "kafka": {"enable.auto.commit": true}}', "kafka.enable.auto.commit is managed"),
        ('{"brokers": "not a broker"}', "is not host:port"),
        ('{"brokers": "B",', "not valid JSON"),
    ],
)
def test_bad_init_config_fails_with_a_clear_error_and_connects_nowhere(
    host: Path, library: Path, fake_broker: _Listener, config: str, message: str
) -> None:
    config = config.replace('"B"', f'"127.0.0.1:{fake_broker.port}"')
    run = run_host(host, library, "--config", config, "--expect-init-failure", "--open", "replay")
    assert_ok(run)
    init = run.one("init")
    assert init["rc"] == 1 and init["state"] is True
    assert message in init["error"], init["error"]
    assert init["error"].startswith(("invalid init_config", "init_config is not valid JSON"))
    assert any(log["sev"] == 3 and message in log["msg"] for log in run.logs)
    time.sleep(0.3)
    assert fake_broker.connections == 0


def test_init_validates_only_and_never_connects(host: Path, library: Path, fake_broker: _Listener) -> None:
    config = json.dumps({"brokers": f"127.0.0.1:{fake_broker.port}", "topic": "t"})
    run = run_host(host, library, "--config", config, "--init-only", "--cycles", "2", "--reload")
    assert_ok(run)
    assert [i["rc"] for i in run.of("init")] == [0, 0, 0]
    time.sleep(0.3)
    assert fake_broker.connections == 0


def test_open_reports_unreachable_brokers(host: Path, library: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = json.dumps({"brokers": f"127.0.0.1:{port}", "open_timeout_ms": 500})
    for params in ("replay", "live"):
        run = run_host(host, library, "--config", config, "--open", params)
        assert run.returncode == 6, run.explain()
        assert "cannot reach the Kafka brokers" in run.one("open")["error"]


def test_bad_open_params_fail_with_the_accepted_forms(host: Path, library: Path) -> None:
    run = run_host(host, library, "--config", '{"brokers": "127.0.0.1:9"}', "--open", "rewind:yesterday")
    assert run.returncode == 6
    error = run.one("open")["error"]
    assert "unknown mode 'rewind'" in error and "replay:-<N><s|m|h|d>" in error


def test_cli_builds_with_another_plugin_id_and_describes_it(host: Path, tmp_path: Path) -> None:
    output = tmp_path / "custom" / "libgitlabkafka.so"
    cli = [str(Path(sys.executable).parent / "falco-gitlab"), "plugin"]
    if not Path(cli[0]).exists():
        cli = [sys.executable, "-m", "falco_gitlab", "plugin"]
    built = subprocess.run([*cli, "build", "--output", str(output), "--plugin-id", "4242"],
                           capture_output=True, text=True, check=True, timeout=300)
    assert built.stdout.strip() == str(output.resolve())
    run = run_host(host, output, "--metadata-only")
    assert_ok(run)
    assert run.one("meta")["id"] == 4242
    info = subprocess.run([*cli, "info", "--library", str(output), "--json"], capture_output=True, text=True,
                          check=True, timeout=60)
    data = json.loads(info.stdout)
    assert data["id"] == 4242 and data["name"] == "gitlabkafka" and data["fields"] == plugin_fields()
    text = subprocess.run([*cli, "info"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "load_plugins: [gitlabkafka]" in text and "--disable-source syscall" in text


def test_venv_override_from_the_environment(host: Path, library: Path, tmp_path: Path) -> None:
    config = '{"brokers": "127.0.0.1:9"}'
    env = {**os.environ, "FALCO_GITLAB_VENV": str(tmp_path / "no-such-venv")}
    run = run_host(host, library, "--config", config, "--init-only", "--cycles", "2", env=env)
    assert run.returncode == 3, run.explain()
    errors = [i["error"] for i in run.of("init")]
    assert len(errors) == 2 and all("no-such-venv does not exist" in e for e in errors)
    # no venv, the packages from an explicit path instead
    site = next(Path(sys.prefix, "lib").glob("python3.*/site-packages"))
    env = {**os.environ, "FALCO_GITLAB_VENV": "none", "FALCO_GITLAB_PYTHONPATH": str(site)}
    run = run_host(host, library, "--config", config, "--init-only", env=env)
    assert_ok(run)
    assert run.one("init")["rc"] == 0


def test_extraction_from_memory_serves_every_field_and_absent_values(
    host: Path, library: Path, tmp_path: Path, seeds: list[tuple[str, EnrichedRecord, bytes]]
) -> None:
    """Events built by the host itself (no Kafka): every field of every seed, plus garbage events."""
    values = [value for _, _, value in seeds] + [b"\x93garbage", encode_enriched(
        EnrichedRecord(version=1, ts=1, fields={"event_type": "only_this", "asn": 64500, "ip_private": True},
                       raw=b"not json"))]
    baseline = write_baseline(tmp_path / "records.bin", values)
    for mode in ([], ["--multi"]):
        run = run_host(host, library, "--config", '{"brokers": "127.0.0.1:9"}', "--baseline", str(baseline),
                       *field_args(ALL_FIELDS), *mode)
        assert_ok(run)
        events = run.of("event")
        assert len(events) == len(values)
        for event, (_, record, _) in zip(events, seeds, strict=False):
            assert_values(event, record, ALL_FIELDS)
        garbage, partial = events[-2], events[-1]
        assert all(v is None for v in garbage["values"].values())
        assert garbage["info"].startswith("<invalid gitlab event")
        assert partial["values"]["gitlab.event_type"] == "only_this"
        assert partial["values"]["gitlab.asn"] == 64500
        assert partial["values"]["gitlab.ip_private"] is True
        assert partial["values"]["gitlab.author_name"] is None
        assert partial["values"]["gitlab.value[id]"] is None  # raw is not JSON: absent, no failure


# --- against the broker -----------------------------------------------------------------------------



@pytest.mark.kafka
def test_bounded_replay_returns_every_record_then_eof(
    host: Path, library: Path, plugin_bootstrap: str, seed_topic: str,
    seeds: list[tuple[str, EnrichedRecord, bytes]],
) -> None:
    config = plugin_config(plugin_bootstrap, seed_topic, log_level="debug")
    run = run_host(host, library, "--config", config, "--open", "replay", "--progress",
                   *field_args(ALL_FIELDS), timeout=120)
    assert_ok(run)
    end = run.one("end")
    assert end["how"] == "eof" and end["events"] == len(seeds)
    assert end["max_idle_ms"] < 500  # poll_timeout_ms is 30: tens of ms (margin for a loaded machine)
    events = run.events()
    assert len(events) == len(seeds)
    for event, (name, record, value) in zip(events, seeds, strict=True):
        assert_values(event, record, ALL_FIELDS)
        raw = json.loads(record.raw)
        assert event["ts"] == parse_created_at(raw["created_at"]), name
        assert event["payload_len"] == len(value) and event["len"] == 38 + len(value)
    assert [e["evtnum"] for e in events] == list(range(1, len(seeds) + 1))
    git = next(e for e, (n, _, _) in zip(events, seeds, strict=True) if n == "repository_git_opeation")
    protocol = git["values"]["gitlab.value[details.custom_message.protocol]"]
    assert protocol is not None
    assert git["values"]["gitlab.git_protocol"] == protocol
    assert run.of("progress")[-1]["pct"] == 10000
    metrics = run.one("metrics")
    assert metrics["values"]["events_delivered"] == len(seeds)
    assert metrics["values"]["records_dropped_malformed"] == 0
    assert metrics["types"]["consumer_lag"] == "non_monotonic"
    assert metrics["types"]["events_delivered"] == "monotonic"
    # every event was decoded once: by next_batch, whose record extraction reused
    assert any("decoded 0 events and reused 23 records" in log["msg"] for log in run.logs), run.logs


@pytest.mark.kafka
def test_two_init_cycles_then_dlclose_and_reload(
    host: Path, library: Path, plugin_bootstrap: str, seed_topic: str,
    seeds: list[tuple[str, EnrichedRecord, bytes]],
) -> None:
    fields = ["gitlab.event_type", "gitlab.author_name", "gitlab.value[details.custom_message.protocol]"]
    run = run_host(host, library, "--config", plugin_config(plugin_bootstrap, seed_topic, batch_size=7),
                   "--open", "replay", "--cycles", "2", "--reload", *field_args(fields), timeout=180)
    assert_ok(run)
    assert [m["load"] for m in run.of("meta")] == [0, 1]
    assert [(e["cycle"], e["how"], e["events"]) for e in run.of("end")] == [
        (0, "eof", 23), (1, "eof", 23), (2, "eof", 23)]
    for cycle in range(3):
        events = run.events(cycle=cycle)
        assert [e["evtnum"] for e in events] == list(range(1, 24))  # a new inspector numbers from 1
        for event, (_, record, _) in zip(events, seeds, strict=True):
            assert_values(event, record, fields)
    assert max(e["max_batch"] for e in run.of("end")) == 7


@pytest.mark.kafka
def test_malformed_and_oversized_records_are_dropped_and_counted(
    host: Path, library: Path, plugin_bootstrap: str, topic_factory: Callable[..., str],
    seeds: list[tuple[str, EnrichedRecord, bytes]],
) -> None:
    topic = topic_factory(1, "bad")
    good = [value for _, _, value in seeds[:3]]
    big = encode_enriched(EnrichedRecord(version=1, ts=5, fields={"event_type": "big"}, raw=b"x" * 5000))
    future = encode_enriched(EnrichedRecord(version=99, ts=5, fields={}, raw=b"{}"))
    values: list[bytes | None] = [good[0], b"\x00not msgpack", good[1], big, future, None, good[2]]
    produce(plugin_bootstrap, topic, values)
    run = run_host(host, library, "--config", plugin_config(plugin_bootstrap, topic, max_event_size=4096),
                   "--open", "replay", *field_args(["gitlab.event_type", "gitlab.event_id"]))
    assert_ok(run)
    end = run.one("end")
    assert end["how"] == "eof" and end["error"] is None
    assert [e["values"]["gitlab.event_type"] for e in run.events()] == [
        seeds[i][1].fields["event_type"] for i in range(3)]
    metrics = run.one("metrics")["values"]
    assert metrics["records_dropped_malformed"] == 3  # garbage, version 99, tombstone
    assert metrics["records_dropped_oversized"] == 1
    assert metrics["events_delivered"] == 3
    warnings = [log["msg"] for log in run.logs if log["sev"] == 4]
    assert any("dropped record" in w and "max_event_size" in w for w in warnings), warnings
    assert any("dropped record" in w and "not an enriched record" in w for w in warnings), warnings


@pytest.mark.kafka
def test_replay_from_a_time_and_multi_partition_eof_in_two_threads(
    host: Path, library: Path, plugin_bootstrap: str, topic_factory: Callable[..., str],
    seeds: list[tuple[str, EnrichedRecord, bytes]],
) -> None:
    topic = topic_factory(3, "time")
    base_ms = 1_750_000_000_000
    values = [value for _, _, value in seeds]
    produce(plugin_bootstrap, topic, values, transactional=False,
            timestamps_ms=[base_ms + 1000 * i for i in range(len(values))])
    fields = ["gitlab.event_type", "gitlab.created_at"]
    config = plugin_config(plugin_bootstrap, topic, batch_size=5)
    # two sources of the same plugin in one process, in two threads (like two Falco inspectors)
    run = run_host(host, library, "--config", config, "--open", "replay", "--threads", "2",
                   *field_args(fields))
    assert_ok(run)
    expected = sorted(r.fields["created_at"] for _, r, _ in seeds)
    for thread in (0, 1):
        got = sorted(e["values"]["gitlab.created_at"] for e in run.events(thread=thread))
        assert got == expected
    assert {(e["thread"], e["how"]) for e in run.of("end")} == {(0, "eof"), (1, "eof")}
    # from the 11th record's time on
    run = run_host(host, library, "--config", config, "--open", f"replay:@{base_ms + 10_000}",
                   *field_args(fields))
    assert_ok(run)
    got = sorted(e["values"]["gitlab.created_at"] for e in run.events())
    assert got == sorted(r.fields["created_at"] for _, r, _ in seeds[10:])
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((base_ms + 20_000) / 1000)) + "Z"
    run = run_host(host, library, "--config", config, "--open", f"replay:{iso}", *field_args(fields))
    assert_ok(run)
    assert len(run.events()) == len(seeds) - 20


@pytest.mark.kafka
def test_replay_of_an_empty_or_missing_topic(
    host: Path, library: Path, plugin_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory(2, "empty")
    run = run_host(host, library, "--config", plugin_config(plugin_bootstrap, topic), "--open", "replay")
    assert_ok(run)
    assert run.one("end")["how"] == "eof" and run.one("end")["events"] == 0
    missing = unique("missing")
    run = run_host(host, library, "--config", plugin_config(plugin_bootstrap, missing, open_timeout_ms=3000),
                   "--open", "replay")
    assert run.returncode == 6
    assert f"topic {missing} is not available" in run.one("open")["error"]


@pytest.mark.kafka
def test_live_mode_commits_delivered_events_and_resumes_after_them(
    host: Path, library: Path, plugin_bootstrap: str, topic_factory: Callable[..., str],
    seeds: list[tuple[str, EnrichedRecord, bytes]],
) -> None:
    topic = topic_factory(1, "live")
    produce(plugin_bootstrap, topic, [value for _, _, value in seeds])
    group = unique("group")
    config = plugin_config(plugin_bootstrap, topic, group_id=group, batch_size=5, commit_interval_ms=0)
    fields = ["gitlab.event_type", "gitlab.event_id"]
    order = [r.fields["event_type"] for _, r, _ in seeds]

    first = run_host(host, library, "--config", config, "--open", "live:earliest", "--max-events", "10",
                     "--timeout-ms", "60000", *field_args(fields))
    assert_ok(first)
    assert first.one("end")["how"] == "max_events"
    assert [e["values"]["gitlab.event_type"] for e in first.events()] == order[:10]
    metrics = first.one("metrics")["values"]
    assert metrics["commits"] >= 1
    assert 13 <= metrics["consumer_lag"] <= 14  # offsets behind the end (+1: the transaction marker)

    second = run_host(host, library, "--config", config, "--open", "live:earliest", "--max-events", "13",
                      "--timeout-ms", "60000", *field_args(fields))
    assert_ok(second)
    assert [e["values"]["gitlab.event_type"] for e in second.events()] == order[10:]

    # nothing left for the group: live mode waits (TIMEOUT), never EOF
    third = run_host(host, library, "--config", config, "--open", "live", "--timeout-ms", "4000",
                     *field_args(fields))
    assert_ok(third)
    end = third.one("end")
    assert end["how"] == "deadline" and end["events"] == 0 and end["timeouts"] > 0
    assert end["max_idle_ms"] < 500
    assert third.one("metrics")["values"]["consumer_lag"] <= 1
