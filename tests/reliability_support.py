"""Helpers for the fault-injection, hostile-input and fuzz suites (issue #9).

* ``numbered_events``: a workload of uniquely numbered GitLab events derived from the captured seed
  payloads (``id`` = a run-specific integer, everything else as GitLab sent it);
* ``IngestProcess`` / ``EnrichProcess``: ``falco-gitlab ingest -c FILE`` and ``falco-gitlab enrich -c FILE``
  as real subprocesses, so that SIGKILL is a real SIGKILL;
* ``Sender``: posts the workload the way GitLab does (one POST per event, at most once, 8 s timeout) and
  remembers which events were acknowledged with a 2xx;
* ``read_topic``: everything a ``read_committed`` reader sees from the beginning up to the end offsets;
* ``Accounting`` and ``publish``: the exact accounting (sent / acked / delivered / lost / duplicated),
  written to ``build/reliability/report.json`` and shown in the pytest terminal summary, so the counts
  surface in the CI log without ``-s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.ingest_support import FORM, SEED_DIR, TOKEN_GROUP, TOKEN_HEADER, TOKEN_PROD, seed_payloads

ROOT = Path(__file__).resolve().parent.parent
REPORT_DIR = Path(os.environ.get("FALCO_GITLAB_RELIABILITY_REPORT_DIR", ROOT / "build" / "reliability"))
REPORT_FILE = REPORT_DIR / "report.json"
PYTHON = sys.executable


# --- the workload ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    event_id: str  # what enrich renders as gitlab.event_id
    event_type: str
    body: bytes


def numbered_events(count: int, *, base: int | None = None, actors: int = 32) -> list[Event]:
    """``count`` events with unique integer ids ``base + n``, cycling through the seed payloads.

    Users (``author_id`` > 0) are spread over ``actors`` ids, so that the actor keys spread over the
    partitions; non-users (keyed by the attempted name) keep theirs."""
    seeds = [json.loads(raw) for raw in seed_payloads().values()]
    assert seeds, f"no seed payloads in {SEED_DIR}"
    if base is None:
        base = (time.time_ns() // 1000) * 1000  # run-specific: ids of two runs never meet
    events = []
    for n in range(count):
        payload = dict(seeds[n % len(seeds)])
        payload["id"] = base + n
        if isinstance(payload.get("author_id"), int) and payload["author_id"] > 0:
            payload["author_id"] = 1000 + n % actors
        events.append(Event(str(base + n), str(payload["event_type"]), json.dumps(payload).encode()))
    return events


# --- processes -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string for what we write
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def write_toml(path: Path, sections: dict[str, dict[str, Any]], tail: str = "") -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines) + tail)
    return path


class _Process:
    """A ``falco-gitlab <command> -c FILE`` subprocess whose output goes to a log file (appended to across
    restarts, so one file tells the whole story of a test)."""

    command: str = ""

    def __init__(self, config_file: Path, log_file: Path, extra_args: Sequence[str] = ()) -> None:
        self.config_file = config_file
        self.log_file = log_file
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.starts = 0

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        with self.log_file.open("ab") as log:
            log.write(f"\n==== start #{self.starts + 1} at {time.time():.3f}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [PYTHON, "-m", "falco_gitlab", self.command, "-c", str(self.config_file), *self.extra_args],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
            )
        self.starts += 1

    def _env(self) -> dict[str, str]:
        prefix = f"FALCO_GITLAB_{self.command.upper()}_"
        # Nothing from the caller's environment may reconfigure the process under test.
        return {k: v for k, v in os.environ.items() if not k.startswith(prefix)}

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed."""
        assert self.process is not None and self.alive(), f"{self.command} is not running: {self.log_tail()}"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.kills += 1

    def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; SIGKILL after ``timeout``. The exit status (negative: killed)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)

    def log_of_this_run(self) -> str:
        """The log since the last start."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return text[text.rfind("\n==== start #") :]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class IngestProcess(_Process):
    command = "ingest"

    def __init__(self, directory: Path, *, bootstrap: str, topic: str, dlq_topic: str,
                 spool_dir: Path | None = None, publish_timeout_s: float = 1.0, **server: Any) -> None:
        self.port = free_port()
        self.spool_dir = spool_dir or directory / "spool"
        settings = {"host": "127.0.0.1", "port": self.port, "shutdown_timeout_s": 5.0, **server}
        config = write_toml(directory / "ingest.toml", {
            "server": settings,
            "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "dlq_topic": dlq_topic,
                      "publish_timeout_s": publish_timeout_s, "request_timeout_ms": 10_000, "linger_ms": 2},
            "spool": {"dir": str(self.spool_dir), "segment_bytes": 1 << 20},
            "logging": {"level": "info"},
        }, tail=(
            '[[destinations]]\nname = "gitlab-prod"\ntokens = [' + json.dumps(TOKEN_PROD) + "]\n\n"
            '[[destinations]]\nname = "acme-group"\ntokens = [' + json.dumps(TOKEN_GROUP) + "]\n"
        ))
        super().__init__(config, directory / "ingest.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_healthy(self, within: float = 60.0) -> None:
        import aiohttp

        deadline = time.monotonic() + within
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not self.alive():
                    code = self.process.returncode if self.process else None
                    raise AssertionError(f"ingest exited with {code}:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    probe = session.get(self.url + "/healthz", timeout=aiohttp.ClientTimeout(total=2))
                    async with probe as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise AssertionError(f"ingest not healthy within {within} s:\n{self.log_tail()}")

    async def restart(self) -> None:
        self.start()
        await self.wait_healthy()


class EnrichProcess(_Process):
    command = "enrich"

    def assignments(self) -> list[str]:
        """The partition assignments this run of the worker logged, in order ("none" when empty)."""
        marker = "assigned partitions: "
        return [line.split(marker, 1)[1].strip() for line in self.log_of_this_run().splitlines()
                if marker in line]

    def __init__(self, directory: Path, index: int, *, bootstrap: str, input_topic: str, output_topic: str,
                 dlq_topic: str, group_id: str, batch_size: int = 50) -> None:
        config = write_toml(directory / f"enrich-{index}.toml", {
            "kafka": {
                "bootstrap_servers": bootstrap, "input_topic": input_topic, "output_topic": output_topic,
                "dlq_topic": dlq_topic, "group_id": group_id, "worker_index": index,
                # Short timeouts (as in tests/test_enrich_kafka.py) so that a killed worker's partitions
                # move on within seconds: transaction <= session - heartbeat.
                "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "transaction_timeout_ms": 4000,
                "rebalance_timeout_ms": 20000, "request_timeout_ms": 15000,
            },
            "processing": {"batch_size": batch_size, "poll_timeout_ms": 100, "retry_backoff_ms": 50,
                           "shutdown_timeout_s": 20.0},
            "metrics": {"log_interval_s": 1.0},
            "log": {"level": "info"},
        })
        super().__init__(config, directory / f"enrich-{index}.log")


# --- the sender ------------------------------------------------------------------------------------------


@dataclass
class Sender:
    """Posts events like GitLab: one POST each, never retried, given up after 8 s.

    ``outcomes`` maps each event id to the HTTP status or the name of the client error. ``rate`` bounds
    the requests started per second, so that a fixed workload spans the faults injected meanwhile;
    ``hurry()`` lifts it once they are over.
    """

    url: str
    token: str = TOKEN_PROD
    concurrency: int = 4
    rate: float = 150.0
    timeout_s: float = 8.0
    outcomes: dict[str, int | str] = field(default_factory=dict)
    started: int = 0
    slow: list[tuple[str, float]] = field(default_factory=list)  # answers that took more than 8 s

    async def send(self, events: Sequence[Event]) -> None:
        import aiohttp

        queue: asyncio.Queue[Event] = asyncio.Queue()
        for event in events:
            queue.put_nowait(event)
        next_start = time.monotonic()
        lock = asyncio.Lock()

        async def pace() -> None:
            nonlocal next_start
            async with lock:
                now = time.monotonic()
                wait = next_start - now
                next_start = max(now, next_start) + (1.0 / self.rate if self.rate > 0 else 0.0)
            if wait > 0:
                await asyncio.sleep(wait)

        # A fresh connection per request, like Sidekiq jobs: a killed ingest never leaves a stale pooled
        # connection behind that would turn the next request into a spurious error.
        connector = aiohttp.TCPConnector(force_close=True, limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def worker() -> None:
                while True:
                    try:
                        event = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    await pace()
                    self.started += 1
                    headers = {"Content-Type": FORM, TOKEN_HEADER: self.token,
                               "X-Gitlab-Audit-Event-Type": event.event_type}
                    began = time.monotonic()
                    try:
                        async with session.post(self.url + "/", data=event.body, headers=headers) as response:
                            await response.read()
                            self.outcomes[event.event_id] = response.status
                    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                        self.outcomes[event.event_id] = type(exc).__name__
                    took = time.monotonic() - began
                    if took > 8.0:
                        self.slow.append((event.event_id, took))

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def hurry(self) -> None:
        """Send the rest of the workload as fast as the concurrency allows (the faults are over)."""
        self.rate = 0.0

    @property
    def sent(self) -> list[str]:
        """The events a request was started for."""
        return list(self.outcomes)

    @property
    def acked(self) -> set[str]:
        return {i for i, o in self.outcomes.items() if isinstance(o, int) and 200 <= o < 300}

    def by_outcome(self) -> dict[str, int]:
        return dict(sorted(Counter(str(o) for o in self.outcomes.values()).items()))


# --- Kafka ------------------------------------------------------------------------------------------------


async def read_topic(bootstrap: str, topic: str, *, within: float = 60.0) -> list[Any]:
    """Every record a read_committed reader sees from the beginning up to the end offsets (the last
    stable offsets: an open transaction of a killed worker is waited for, up to ``within``)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed",
                                enable_auto_commit=False, group_id=None, request_timeout_ms=15000)
    await consumer.start()
    try:
        deadline = time.monotonic() + within
        partitions = await partitions_of(bootstrap, topic)
        assert partitions, f"topic {topic} has no partitions"
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[Any] = []
        while True:
            positions = {tp: await consumer.position(tp) for tp in tps}
            if all(positions[tp] >= end[tp] for tp in tps):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"read of {topic} stuck at {positions}, end offsets {end}")
            for batch in (await consumer.getmany(*tps, timeout_ms=500)).values():
                records.extend(r for r in batch if r.offset < end[TopicPartition(r.topic, r.partition)])
        return records
    finally:
        await consumer.stop()


async def partitions_of(bootstrap: str, topic: str, within: float = 30.0) -> list[int]:
    """The partition ids of ``topic`` (waiting for its metadata to appear)."""
    from confluent_kafka.admin import AdminClient

    def fetch() -> list[int]:
        admin = AdminClient({"bootstrap.servers": bootstrap})
        deadline = time.monotonic() + within
        while True:
            meta = admin.list_topics(topic, timeout=10).topics.get(topic)
            if meta is not None and meta.error is None and meta.partitions:
                return sorted(meta.partitions)
            if time.monotonic() > deadline:
                raise AssertionError(f"no metadata for topic {topic}: {meta}")
            time.sleep(0.2)

    return await asyncio.to_thread(fetch)


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The end offsets (high watermarks, every record counted) of ``topic``'s partitions."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        partitions = await partitions_of(bootstrap, topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        offsets = await consumer.end_offsets(tps) if tps else {}
        return {tp.partition: offset for tp, offset in offsets.items()}
    finally:
        await consumer.stop()


def enriched_event_ids(records: Iterable[Any]) -> list[str]:
    from falco_gitlab.model import decode_enriched

    return [str(decode_enriched(r.value).fields.get("event_id")) for r in records]


# --- accounting and the report -------------------------------------------------------------------------


@dataclass
class Accounting:
    scenario: str
    sent: int
    acked: int
    delivered: int  # acknowledged events present in the enriched topic (at least once)
    lost: int  # acknowledged events absent from the enriched topic
    duplicated: int  # enriched records beyond the first of an event id
    delivered_unacked: int = 0  # events not acknowledged (client error) that arrived anyway: allowed
    outcomes: dict[str, int] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    lost_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)

    @classmethod
    def compute(cls, scenario: str, sent: Iterable[str], acked: set[str], delivered_ids: Sequence[str],
                **kwargs: Any) -> Accounting:
        sent_set = set(sent)
        counts = Counter(i for i in delivered_ids if i in sent_set)
        foreign = [i for i in delivered_ids if i not in sent_set]
        assert not foreign, f"records of unknown events in the enriched topic: {foreign[:5]}"
        present = set(counts)
        lost = sorted(acked - present)
        dups = sorted(i for i, n in counts.items() if n > 1)
        return cls(
            scenario=scenario, sent=len(sent_set), acked=len(acked), delivered=len(acked & present),
            lost=len(lost), duplicated=sum(n - 1 for n in counts.values()),
            delivered_unacked=len(present - acked), lost_ids=lost[:20], duplicated_ids=dups[:20], **kwargs,
        )

    def line(self) -> str:
        return (f"{self.scenario}: sent={self.sent} acked={self.acked} delivered={self.delivered} "
                f"lost={self.lost} duplicated={self.duplicated} delivered_unacked={self.delivered_unacked} "
                f"outcomes={self.outcomes} faults={self.faults} ({self.seconds:.1f} s)")


class _Summary:
    """Registered on first use: shows every result in pytest's terminal summary (seen in CI logs)."""

    name = "falco-gitlab-reliability-summary"

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.lines:
            terminalreporter.section("reliability accounting (build/reliability/report.json)")
            for line in self.lines:
                terminalreporter.write_line(line)


def publish(config: pytest.Config, section: str, name: str, data: dict[str, Any], line: str) -> None:
    """Merge ``data`` under ``section.name`` into the JSON report and queue ``line`` for the summary.

    The report describes one pytest session: the first result of a session replaces the file."""
    plugin = config.pluginmanager.get_plugin(_Summary.name)
    first = plugin is None
    if plugin is None:
        plugin = _Summary()
        config.pluginmanager.register(plugin, _Summary.name)
    plugin.lines.append(f"[{section}] {line}")
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    if not first:
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(REPORT_FILE.read_text())
    report.setdefault(section, {})[name] = {**data, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime())}
    tmp = REPORT_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    tmp.replace(REPORT_FILE)


def publish_accounting(config: pytest.Config, accounting: Accounting) -> None:
    publish(config, "faults", accounting.scenario, asdict(accounting), accounting.line())


# --- the plugin ----------------------------------------------------------------------------------------

_PLUGIN_BUILD: dict[str, tuple[Path, Path]] = {}


def plugin_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(library, C host), built once per session whichever module asks first (tests/plugin_support.py)."""
    if "build" not in _PLUGIN_BUILD:
        from tests.plugin_support import build_library, compile_host

        directory = tmp_path_factory.mktemp("reliability-plugin")
        _PLUGIN_BUILD["build"] = (build_library(directory), compile_host(directory))
    return _PLUGIN_BUILD["build"]
