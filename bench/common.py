"""Shared helpers of the benchmarks under ``bench/`` (standard library only at import time).

Import it from a bench script with::

    ROOT = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import common

What is here:

* ``machine_info()`` / ``machine_lines()``: the machine a figure was measured on (nproc, CPU model, RAM,
  load, Python, Kafka and library versions, date), printed above every table.
* ``Processes``: starts child processes in their own session, with a parent-death signal, and stops every
  one of them (SIGTERM, then SIGKILL) on exit, error, Ctrl-C or SIGTERM. ``handle_signals()`` turns
  SIGTERM/SIGHUP into ``KeyboardInterrupt`` so the ``finally`` blocks run.
* ``kafka_broker()``: ``KAFKA_BOOTSTRAP_SERVERS`` or the project's own broker (``LocalKafka``) in a
  temporary directory, stopped and purged at the end; yields ``Broker(bootstrap, pid)``.
* ``create_topics`` / ``delete_topics`` / ``topic_record_count`` / ``read_topic``: confluent-kafka admin
  and consumer helpers.
* ``cpu_seconds(pid)`` and ``CpuMeter``: user+system CPU of a process from ``/proc/<pid>/stat``.
* ``percentiles``, ``summarise``, ``format_table``: figures and the tables the benches print.
* ``seed_payloads()`` and ``Template``: the captured GitLab payloads (``samples/gitlab``), as templates
  whose ``__N__`` placeholders the load generator replaces with a unique sequence number per event.
* The HTTP load generator (``python bench/common.py loadgen SPEC.json``), a separate process driven by a
  JSON spec (``run_loadgen`` starts it and returns its JSON result):
    - ``open``: open loop at a fixed offered rate; request ``i`` is due at ``t0 + i / rate`` and its
      latency is measured from that INTENDED time, so a stalled server cannot hide its queueing
      (no coordinated omission). How late the generator itself sent (``lag``) is reported separately.
    - ``closed``: saturation: ``conns`` keep-alive connections, each sending its next request as soon as
      the previous answer arrived.
  Two HTTP clients: ``raw`` (default; a minimal HTTP/1.1 keep-alive client on asyncio protocols, about
  5x cheaper per request than aiohttp's client, so that on a small machine the generator leaves the CPU
  to the server under test) and ``aiohttp`` (aiohttp's ClientSession, to cross-check). Requests are sent
  the GitLab way: ``POST``, ``Content-Type: application/x-www-form-urlencoded`` with a raw JSON body,
  ``X-Gitlab-Event-Streaming-Token`` and ``X-Gitlab-Audit-Event-Type``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The captured GitLab payloads shipped in the repository (the same files as the original plugin's seed).
SEED_DIR = Path(os.environ.get("FALCO_GITLAB_SEED_DIR", ROOT / "samples" / "gitlab"))
RULES = ROOT / "rules" / "gitlab.yaml"
CITY_DB = ROOT / "tests" / "data" / "geoip" / "GeoLite2-City-Test.mmdb"
PLACEHOLDER = "__N__"
FORM = "application/x-www-form-urlencoded"
TOKEN_HEADER = "X-Gitlab-Event-Streaming-Token"
EVENT_TYPE_HEADER = "X-Gitlab-Audit-Event-Type"
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def kafka_version() -> str:
    try:
        from falco_gitlab.devkafka import kafka_version as pinned

        return pinned()
    except Exception:
        return "?"


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "ram_gib": round(_mem_total_gib(), 1),
        "loadavg": [round(x, 2) for x in load],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "kafka": kafka_version(),
        "aiohttp": _version("aiohttp"),
        "aiokafka": _version("aiokafka"),
        "confluent-kafka": _version("confluent-kafka"),
        "msgspec": _version("msgspec"),
        "uvloop": _version("uvloop"),
    }


def machine_lines(info: dict[str, Any] | None = None) -> list[str]:
    info = info or machine_info()
    return [
        f"machine: {info['nproc']} CPU ({info['cpu']}), {info['ram_gib']} GiB RAM, Linux {info['kernel']}, "
        f"load average {' '.join(str(x) for x in info['loadavg'])} at start",
        f"software: Python {info['python']}, Kafka {info['kafka']} (KRaft, 1 node), "
        f"aiohttp {info['aiohttp']}, "
        f"aiokafka {info['aiokafka']}, confluent-kafka {info['confluent-kafka']}, msgspec {info['msgspec']}, "
        f"uvloop {info['uvloop']}; {info['date']}",
    ]


# --------------------------------------------------------------------------------------------- processes


def handle_signals() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, like Ctrl-C: cleanup runs."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, interrupt)


def _pdeathsig() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


class Processes:
    """Child processes that are all stopped when the ``with`` block ends, however it ends."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], float]] = []
        self._preexec = _pdeathsig()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self, name: str, argv: Sequence[str], *, stop_timeout: float = 15.0, **popen: Any
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session (Ctrl-C of the bench does not hit it before its turn)."""
        proc = subprocess.Popen(list(argv), start_new_session=True, preexec_fn=self._preexec, **popen)
        self.procs.append((name, proc, stop_timeout))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the process group. Returns the exit code."""
        for i, (_, known, default_timeout) in enumerate(self.procs):
            if known is proc:
                del self.procs[i]
                timeout = default_timeout if timeout is None else timeout
                break
        else:
            timeout = 15.0 if timeout is None else timeout
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # and whatever it started in its session
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return proc.returncode

    def stop_all(self) -> None:
        # Latest first: consumers before producers before the servers they talk to.
        while self.procs:
            self.stop(self.procs[-1][1])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str, *, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None, expect: str = ""
) -> str:
    """Poll ``url`` (GET) until it answers 200 (and contains ``expect``); the body."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = response.read().decode("utf-8", "replace")
                if response.status == 200 and expect in body:
                    return str(body)
                last = body
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:g} s (last: {last.strip()[:200]})")


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------- CPU


def cpu_seconds(pid: int | None, *, children: bool = False) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads) from /proc; None if it is gone."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


class CpuMeter:
    """CPU seconds and wall time of a set of named processes between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = dict(pids)
        self._t0 = 0.0
        self._c0: dict[str, float | None] = {}
        self.wall = 0.0
        self.cpu: dict[str, float | None] = {}

    def start(self) -> CpuMeter:
        self._c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._t0 = time.monotonic()
        return self

    def stop(self) -> CpuMeter:
        self.wall = time.monotonic() - self._t0
        for name, pid in self.pids.items():
            before, after = self._c0.get(name), cpu_seconds(pid)
            self.cpu[name] = None if before is None or after is None else after - before
        return self

    def per_event_ms(self, name: str, events: int) -> float | None:
        cpu = self.cpu.get(name)
        return None if cpu is None or events <= 0 else cpu * 1000 / events

    def utilisation(self, name: str) -> float | None:
        cpu = self.cpu.get(name)
        return None if cpu is None or self.wall <= 0 else cpu / self.wall


# --------------------------------------------------------------------------------------------- figures


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles (plus min, max, mean) of ``values``; empty dict when there are none."""
    if not values:
        return {}
    ordered = sorted(values)
    n = len(ordered)
    out: dict[str, float] = {}
    for p in points:
        rank = max(1, min(n, int(-(-p * n // 100))))  # ceil(p/100 * n)
        out[f"p{p:g}"] = ordered[rank - 1]
    out["min"] = ordered[0]
    out["max"] = ordered[-1]
    out["mean"] = sum(ordered) / n
    out["n"] = n
    return out


def summarise(values_s: Sequence[float]) -> dict[str, float]:
    """Percentiles of durations given in seconds, in milliseconds."""
    return {k: (v if k == "n" else v * 1000) for k, v in percentiles(values_s).items()}


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, padded so it also reads well in a terminal (numbers right-aligned)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(re.fullmatch(r"[-+]?[\d,.]+%?|-|[\d.]+x", row[i] or "-") for row in cells[1:])
        for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def write_json(path: str | None, data: Any) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------- Kafka


@dataclass
class Broker:
    bootstrap: str
    pid: int | None  # None for an external broker (no CPU figures)
    kind: str  # "env" or "local"


@contextlib.contextmanager
def kafka_broker(workdir: Path, *, heap: str | None = None) -> Iterator[Broker]:
    """``KAFKA_BOOTSTRAP_SERVERS`` as is, else the project's own broker in ``workdir/kafka``."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield Broker(external, None, "env")
        return
    from falco_gitlab.devkafka import LocalKafka

    broker = LocalKafka(workdir / "kafka", die_with_parent=True, heap=heap)
    try:
        bootstrap = broker.start()
        status = broker.status(probe_timeout=None)
        yield Broker(bootstrap, status.pid, "local")
    finally:
        broker.stop(purge=True, timeout=20)


def _admin(bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 10000})


def create_topics(bootstrap: str, topics: dict[str, int], config: dict[str, str] | None = None) -> None:
    """Create ``{name: partitions}`` and wait until every partition has a leader."""
    from confluent_kafka.admin import NewTopic

    admin = _admin(bootstrap)
    new = [
        NewTopic(name, num_partitions=n, replication_factor=-1, config=config or {})
        for name, n in topics.items()
    ]
    for future in admin.create_topics(new, operation_timeout=30).values():
        future.result(timeout=60)
    deadline = time.monotonic() + 30
    for name, partitions in topics.items():
        while True:
            meta = admin.list_topics(name, timeout=10).topics.get(name)
            if (
                meta is not None
                and meta.error is None
                and len(meta.partitions) == partitions
                and all(p.leader >= 0 for p in meta.partitions.values())
            ):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name} has no leaders after 30 s")
            time.sleep(0.05)


def delete_topics(bootstrap: str, topics: Sequence[str]) -> None:
    with contextlib.suppress(Exception):
        for future in _admin(bootstrap).delete_topics(list(topics), operation_timeout=10).values():
            with contextlib.suppress(Exception):
                future.result(timeout=15)


def topic_record_count(bootstrap: str, topic: str) -> int:
    """high - low watermark summed over partitions (exact for a non-transactional topic)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "bench-count", "enable.auto.commit": False}
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        total = 0
        for partition in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


def read_topic(
    bootstrap: str,
    topic: str,
    on_record: Callable[[Any], None],
    *,
    idle_s: float = 2.0,
    limit_s: float = 120.0,
) -> int:
    """Read ``topic`` from the beginning (read_committed) until its end offsets; ``on_record(message)``."""
    import uuid

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-read-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )
    count = 0
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        ends = {}
        for partition in meta.partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            ends[partition] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        # Offsets only grow: done when every partition reached its end (control records included).
        positions = dict.fromkeys(ends, 0)
        deadline = time.monotonic() + limit_s
        quiet_since = time.monotonic()
        while any(positions[p] < ends[p] for p in ends) and time.monotonic() < deadline:
            messages = consumer.consume(10000, timeout=0.5)
            if not messages:
                if time.monotonic() - quiet_since > idle_s:
                    # Transaction markers make the last offsets unreadable as records: ask for positions.
                    for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                        if tp.offset >= 0:
                            positions[tp.partition] = tp.offset
                    if all(positions[p] >= ends[p] for p in ends):
                        break
                    quiet_since = time.monotonic()
                continue
            quiet_since = time.monotonic()
            for message in messages:
                if message.error() is not None:
                    continue
                positions[message.partition()] = message.offset() + 1
                on_record(message)
                count += 1
    finally:
        consumer.close()
    return count


# --------------------------------------------------------------------------------------------- workload


def seed_payloads() -> dict[str, bytes]:
    """File stem -> exact bytes of each captured GitLab payload (sorted by name)."""
    payloads = {path.stem: path.read_bytes() for path in sorted(SEED_DIR.glob("*.json"))}
    if not payloads:
        raise SystemExit(f"no GitLab payloads in {SEED_DIR} (set FALCO_GITLAB_SEED_DIR)")
    return payloads


@dataclass
class Template:
    """A JSON event whose ``__N__`` placeholders become the event's sequence number."""

    body: str
    event_type: str
    name: str = ""

    def render(self, n: int) -> bytes:
        return self.body.replace(PLACEHOLDER, str(n)).encode("utf-8")


def event_templates(*, marker: str | None = None, names: Sequence[str] | None = None) -> list[Template]:
    """The seed payloads as templates: a unique integer ``id`` per event (``__N__``), and, with
    ``marker``, the author name (top level and ``details``) ``<marker>__N__`` so that an alert can be
    traced back to the request that caused it. Everything else stays as GitLab sent it."""
    out = []
    for name, raw in seed_payloads().items():
        if names is not None and name not in names:
            continue
        event = json.loads(raw)
        event["id"] = 0  # placeholder below; an integer, as GitLab sends it
        if marker is not None:
            event["author_name"] = f"{marker}{PLACEHOLDER}"
            if isinstance(event.get("details"), dict):
                event["details"]["author_name"] = f"{marker}{PLACEHOLDER}"
        text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        text = text.replace('"id":0', f'"id":{PLACEHOLDER}', 1)
        out.append(Template(text, str(event.get("event_type") or ""), name))
    return out


# --------------------------------------------------------------------------------------------- load generator


@dataclass
class LoadSpec:
    host: str
    port: int
    templates: list[Template]
    mode: str = "closed"  # "open" (fixed rate) or "closed" (saturation)
    rate: float = 1000.0  # open: requests per second
    duration: float = 10.0
    conns: int = 64  # closed: connections; open: connections opened before the start
    max_conns: int = 512  # open: upper bound of connections when answers are slow
    batch: int = 1  # events per request: 1 = one JSON object, >1 = a JSON array of that many
    start_n: int = 1  # sequence number of the first event
    token: str = ""
    path: str = "/"
    client: str = "raw"  # "raw" or "aiohttp"
    record_each: bool = False  # return (n, intended, sent, done, status) of every request
    drain_s: float = 15.0  # after the last send, wait this long for answers
    timeout_s: float = 10.0  # per request


def spec_to_json(spec: LoadSpec) -> dict[str, Any]:
    data = dict(spec.__dict__)
    data["templates"] = [t.__dict__ for t in spec.templates]
    return data


def run_loadgen(spec: LoadSpec, workdir: Path, procs: Processes | None = None) -> dict[str, Any]:
    """Run the load generator in its own process; its JSON result (plus ``cpu_s`` of the generator)."""
    spec_path = Path(tempfile.mkstemp(prefix="loadgen-", suffix=".json", dir=workdir)[1])
    spec_path.write_text(json.dumps(spec_to_json(spec)))
    argv = [sys.executable, str(Path(__file__).resolve()), "loadgen", str(spec_path)]
    out_path = spec_path.with_suffix(".out")
    err_path = spec_path.with_suffix(".err")
    with out_path.open("wb") as out, err_path.open("wb") as err:
        if procs is not None:
            proc = procs.start("loadgen", argv, stdout=out, stderr=err, stop_timeout=5)
        else:
            proc = subprocess.Popen(argv, stdout=out, stderr=err)
        try:
            code = proc.wait(spec.duration + spec.drain_s + 60)
        finally:
            if procs is not None:
                procs.stop(proc, 5)
    if code != 0:
        raise RuntimeError(f"load generator failed ({code}):\n{tail(err_path)}")
    result: dict[str, Any] = json.loads(out_path.read_text())
    for path in (spec_path, out_path, err_path):
        path.unlink(missing_ok=True)
    return result


def _event_loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


class _RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: write a request, parse status + Content-Length body."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self._need = -1
        self._status = 0
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self._need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            self._status = int(head[9:12])
            match = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            self._close_after = b"\r\nconnection: close" in head
            self._need = end + 4 + (int(match.group(1)) if match else 0)
        if len(self.buffer) >= self._need:
            del self.buffer[: self._need]
            self._need = -1
            if self._close_after:
                self.closed = True
                if self.transport is not None:
                    self.transport.close()
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(self._status)

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class _Client:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.templates = spec.templates
        self.parts = [t.body.encode("utf-8").split(PLACEHOLDER.encode()) for t in spec.templates]
        self.head = (
            f"POST {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\nContent-Type: {FORM}\r\n"
            f"User-Agent: GitLab/17.0.0\r\n{TOKEN_HEADER}: {spec.token}\r\n"
        ).encode()
        self.session: Any = None

    def body(self, r: int) -> tuple[bytes, str | None]:
        """The body of request ``r`` (0, 1, ...) and its event type header. Request ``r`` carries the
        events numbered ``start_n + r * batch`` onwards (``batch`` of them in a JSON array)."""
        spec = self.spec
        if spec.batch <= 1:
            n = spec.start_n + r
            index = n % len(self.parts)
            return str(n).encode().join(self.parts[index]), self.templates[index].event_type
        first = spec.start_n + r * spec.batch
        events = [
            str(first + k).encode().join(self.parts[(first + k) % len(self.parts)]) for k in range(spec.batch)
        ]
        return b"[" + b",".join(events) + b"]", None

    def raw_request(self, r: int) -> bytes:
        body, event_type = self.body(r)
        head = self.head
        if event_type:
            head += f"{EVENT_TYPE_HEADER}: {event_type}\r\n".encode()
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body

    async def connect(self) -> Any:
        if self.spec.client == "aiohttp":
            return None
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_RawConnection, self.spec.host, self.spec.port)
        return protocol

    async def send(self, conn: Any, r: int) -> tuple[int, Any]:
        """Send request ``r`` on ``conn``; (status, the connection to use next)."""
        if self.spec.client == "aiohttp":
            body, event_type = self.body(r)
            headers = {"Content-Type": FORM, TOKEN_HEADER: self.spec.token}
            if event_type:
                headers[EVENT_TYPE_HEADER] = event_type
            async with self.session.post(self.url, data=body, headers=headers) as response:
                await response.read()
                return response.status, None
        if conn is None or conn.closed:
            conn = await self.connect()
        status = await conn.request(self.raw_request(r))
        return status, conn

    async def __aenter__(self) -> _Client:
        if self.spec.client == "aiohttp":
            import aiohttp

            self.url = f"http://{self.spec.host}:{self.spec.port}{self.spec.path}"
            connector = aiohttp.TCPConnector(limit=max(self.spec.conns, self.spec.max_conns))
            self.session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.spec.timeout_s)
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()


@dataclass
class _Results:
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    each: list[tuple[int, float, float, float, int]] = field(default_factory=list)
    first_sent: float = 0.0
    max_request: int = -1
    last_done: float = 0.0
    sent: int = 0

    def record(self, n: int, intended: float, sent: float, done: float, status: int, keep: bool) -> None:
        """Request ``n`` (its index) was answered ``status``."""
        self.latencies.append(done - intended)
        self.lags.append(sent - intended)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.last_done = max(self.last_done, done)
        if keep:
            self.each.append((n, intended, sent, done, status))

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


async def _closed_loop(client: _Client, spec: LoadSpec, res: _Results) -> float:
    conns = [await client.connect() for _ in range(spec.conns)]
    counter = iter(range(1 << 62))
    t0 = time.monotonic()
    stop_at = t0 + spec.duration
    res.first_sent = t0

    async def worker(conn: Any) -> None:
        while time.monotonic() < stop_at:
            n = next(counter)
            res.max_request = max(res.max_request, n)
            start = time.monotonic()
            res.sent += 1
            try:
                async with asyncio.timeout(spec.timeout_s):
                    status, conn = await client.send(conn, n)
            except (OSError, TimeoutError, ConnectionError) as exc:
                res.error(exc)
                conn = None
                continue
            except Exception as exc:
                res.error(exc)
                conn = None
                continue
            res.record(n, start, start, time.monotonic(), status, spec.record_each)

    await asyncio.gather(*(worker(c) for c in conns))
    return t0


async def _open_loop(client: _Client, spec: LoadSpec, res: _Results) -> float:
    idle: deque[Any] = deque([await client.connect() for _ in range(spec.conns)])
    opened = len(idle)
    backlog: deque[tuple[int, float]] = deque()
    pending: set[asyncio.Task[None]] = set()
    total = int(spec.rate * spec.duration)
    interval = 1.0 / spec.rate

    async def run_one(conn: Any, n: int, intended: float) -> None:
        while True:
            sent = time.monotonic()
            res.sent += 1
            res.max_request = max(res.max_request, n)
            try:
                async with asyncio.timeout(spec.timeout_s):
                    status, conn = await client.send(conn, n)
                res.record(n, intended, sent, time.monotonic(), status, spec.record_each)
            except Exception as exc:
                res.error(exc)
                conn = None
            if not backlog:
                break
            n, intended = backlog.popleft()
        idle.append(conn)

    def dispatch(n: int, intended: float) -> None:
        nonlocal opened
        if idle:
            conn = idle.popleft()
        elif opened < spec.max_conns:
            opened += 1
            conn = None  # connects inside send()
        else:
            backlog.append((n, intended))
            return
        task = asyncio.create_task(run_one(conn, n, intended))
        pending.add(task)
        task.add_done_callback(pending.discard)

    t0 = time.monotonic() + 0.05
    res.first_sent = t0
    i = 0
    while i < total:
        now = time.monotonic()
        due = t0 + i * interval
        if due > now:
            # asyncio timers fire up to ~1 ms late; the lateness is in `lag` and in the latency.
            await asyncio.sleep(due - now)
            continue
        while i < total and t0 + i * interval <= now:
            dispatch(i, t0 + i * interval)
            i += 1
    deadline = time.monotonic() + spec.drain_s
    while (pending or backlog) and time.monotonic() < deadline:  # noqa: ASYNC110 (two conditions and a clock)
        await asyncio.sleep(0.01)
    for task in list(pending):
        task.cancel()
    res.errors["unanswered"] = res.errors.get("unanswered", 0) + len(backlog) + len(pending)
    return t0


async def _loadgen(spec: LoadSpec) -> dict[str, Any]:
    res = _Results()
    cpu0 = time.process_time()
    async with _Client(spec) as client:
        if spec.mode == "open":
            t0 = await _open_loop(client, spec, res)
        else:
            t0 = await _closed_loop(client, spec, res)
    completed = sum(res.statuses.values())
    ok = res.statuses.get(200, 0) + res.statuses.get(202, 0)
    span = (res.last_done - t0) if completed else 0.0
    return {
        "mode": spec.mode,
        "client": spec.client,
        "offered_rate": spec.rate if spec.mode == "open" else None,
        "conns": spec.conns,
        "batch": spec.batch,
        "t0": t0,
        "span_s": span,
        "sent": res.sent,
        "completed": completed,
        "ok_requests": ok,
        "ok_events": ok * max(1, spec.batch),
        "statuses": {str(k): v for k, v in sorted(res.statuses.items())},
        "errors": res.errors,
        "req_per_s": completed / span if span > 0 else 0.0,
        "latency_ms": summarise(res.latencies),
        "lag_ms": summarise(res.lags),
        "cpu_s": time.process_time() - cpu0,
        "start_n": spec.start_n,
        # The first event number not used: where the next phase should start.
        "next_n": spec.start_n + (res.max_request + 1) * max(1, spec.batch),
        # With record_each: (request index, intended, sent, answered, status); the request's first event
        # is start_n + index * batch.
        "each": res.each if spec.record_each else None,
    }


def loadgen_main(spec_path: str) -> int:
    data = json.loads(Path(spec_path).read_text())
    data["templates"] = [Template(**t) for t in data["templates"]]
    spec = LoadSpec(**data)
    loop = _event_loop_factory()()
    try:
        result = loop.run_until_complete(_loadgen(spec))
    finally:
        loop.close()
    sys.stdout.write(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------- misc


def make_workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def remove_workdir(path: Path, keep: bool) -> None:
    if keep:
        print(f"(work directory kept: {path})", file=sys.stderr)
    else:
        shutil.rmtree(path, ignore_errors=True)


def run_bench(prefix: str, keep: bool, work: Callable[[Path, Broker, Processes], bool]) -> int:
    """Run ``work(workdir, broker, procs)`` (True: a check failed) in a fresh work directory, with a broker
    and a process group that are stopped however it ends. Exit status 0, 1 (a check failed) or 130
    (interrupted); the work directory is kept when ``keep`` or when a check failed."""
    workdir = make_workdir(prefix)
    failed = True
    try:
        with kafka_broker(workdir) as broker, Processes() as procs:
            failed = work(workdir, broker, procs)
    except KeyboardInterrupt:
        print("interrupted; everything this bench started has been stopped", file=sys.stderr)
        failed = False  # nothing to look at: remove the work directory unless --keep
        return 130
    finally:
        remove_workdir(workdir, keep or failed)
    return 1 if failed else 0


def gen_token(length: int = 22) -> str:
    import secrets

    alphabet = (
        "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # base58, as GitLab's legacy tokens
    )
    return "".join(secrets.choice(alphabet) for _ in range(length))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "loadgen":
        sys.exit(loadgen_main(sys.argv[2]))
    print(
        "usage: python bench/common.py loadgen SPEC.json  (the benches start it themselves)", file=sys.stderr
    )
    sys.exit(2)
