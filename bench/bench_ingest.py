"""Benchmark: one ingest worker process (``falco-gitlab ingest``, acks=all) next to a minimal aiohttp app.

    .venv/bin/python bench/bench_ingest.py                  # about 4.5 minutes
    .venv/bin/python bench/bench_ingest.py --quick          # about 2.5 minutes
    .venv/bin/python bench/bench_ingest.py --compare HEAD   # also the ingest/ of a git ref (before/after)

Starts what it needs: a Kafka broker (KAFKA_BOOTSTRAP_SERVERS, else the project's own broker in a
temporary directory), a fresh raw topic (6 partitions) and dead-letter topic, ONE ingest worker process
with a generated configuration (ingest's defaults) and token, and, each in its own process, the
BASELINE: a minimal aiohttp application on the same kind of socket and event loop that reads the body
and answers 200 without publishing anything; the BARE server (unless --no-bare): the same handler on
aiohttp's low-level server (web.Server, no application or router), the stack ingest itself is served
on; and the FLOOR (unless --no-floor): the baseline application producing each body as one record with
ingest's producer settings (acks=all) and answering once Kafka acknowledged it, nothing else. Each
publishing server first gets --warmup s of saturation load, so that the broker's JIT is warm.

The load generator is a separate process (``bench/common.py``) sending the 23 captured GitLab payloads
in turn, each with a unique ``id``, the GitLab way (raw JSON labelled form-urlencoded, token and event
type headers). Against each server in turn, per round:

* fixed rate: an open-loop generator offering ``--rate`` requests/s for ``--duration`` s; latency from
  each request's INTENDED send time to its answer (no coordinated omission);
* saturation: ``--conns`` keep-alive connections sending back to back for ``--sat-duration`` s (256:
  with 64, a server waiting ~5 ms for Kafka's acknowledgements was latency-bound, the floor at 70 % of
  a core, i.e. not saturated);
* arrays: as saturation, with bodies that are JSON arrays of ``--array`` events (GitLab's batched
  delivery path), so events/s differs from requests/s.

Each figure is the best of ``--rounds`` rounds (other tenants of the machine only ever slow a run
down). CPU ms/event is the server process's user+system time (/proc/<pid>/stat, all threads) over the
phase divided by the events it accepted; broker CPU likewise. Afterwards the raw topic is read back: it
must hold exactly the events ingest answered 200/202 for (count, distinct gitlab-event-uid, distinct
event id), so the figures are for real, delivered work. Exit status 1 if not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "bench"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402

PHASES = ("fixed", "saturation", "arrays")

# --------------------------------------------------------------------------------------------- baseline


def _serve_minimal(
    host: str, port: int, receive: Any, setup: Any = None, teardown: Any = None, *, bare: bool = False
) -> int:
    """Serve ``receive`` for every POST (and /healthz) with aiohttp's application and router (``bare``:
    for every request, on aiohttp's low-level server), on the event loop `falco-gitlab ingest` uses by
    default (uvloop when installed), until SIGTERM/SIGINT."""
    import asyncio
    import signal

    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def serve() -> None:
        if setup is not None:
            await setup()
        runner: web.BaseRunner
        if bare:
            runner = web.ServerRunner(web.Server(receive, access_log=None), handle_signals=False)
        else:
            app = web.Application(client_max_size=1_048_577)
            app.router.add_get("/healthz", healthz)
            app.router.add_post("/{path:.*}", receive)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, host, port, backlog=1024).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        await runner.cleanup()
        if teardown is not None:
            await teardown()

    from ingest.cli import run_async

    run_async(serve(), os.environ.get("BENCH_EVENT_LOOP", "auto"))
    return 0


def baseline_main(host: str, port: int) -> int:
    """The baseline server: reads the body, answers 200, publishes nothing."""
    from aiohttp import web

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok\n")

    return _serve_minimal(host, port, receive)


def bare_main(host: str, port: int) -> int:
    """The BARE baseline: the baseline's handler on aiohttp's low-level server (``web.Server``: no
    application, router or middleware chain), the serving stack ingest itself runs on."""
    from aiohttp import web

    async def receive(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(text="ok\n")

    return _serve_minimal(host, port, receive, bare=True)


def floor_main(host: str, port: int, bootstrap: str, topic: str) -> int:
    """The Kafka FLOOR: the baseline plus the least that publishing can cost. Each body is produced as
    one record with ingest's producer settings (librdkafka, acks=all, idempotent, linger 2 ms, reports
    served on the loop by a 1 ms timer while records are in flight) and answered 200 once Kafka
    acknowledged it. No authentication, parsing, de-duplication, headers, spool or metrics: what ingest
    costs above this is its own work."""
    import asyncio

    from aiohttp import web
    from confluent_kafka import KafkaError, Producer

    producer = Producer({
        "bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 2,
        "partitioner": "murmur2_random",
    })
    producer.list_topics(topic, 10)
    timer: asyncio.TimerHandle | None = None
    busy = False

    def poll() -> None:
        nonlocal busy, timer
        producer.poll(0)
        busy = len(producer) > 0
        timer = asyncio.get_running_loop().call_later(0.001 if busy else 0.05, poll)

    def report(future: asyncio.Future[None], error: KafkaError | None, _message: Any) -> None:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(RuntimeError(error.str()))

    async def receive(request: web.Request) -> web.Response:
        nonlocal busy, timer
        body = await request.read()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        producer.produce(topic, body, on_delivery=partial(report, future))
        if not busy:  # serve reports every millisecond from now on
            busy = True
            if timer is not None:
                timer.cancel()
            timer = loop.call_later(0.001, poll)
        await future
        return web.Response(text="ok\n")

    async def start_polling() -> None:
        poll()

    async def flush() -> None:
        await asyncio.to_thread(producer.flush, 10)

    return _serve_minimal(host, port, receive, start_polling, flush)


# --------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str  # "baseline", "bare", "floor", "ingest", "ingest@<ref>"
    label: str
    port: int
    kind: str = "ingest"  # "baseline" | "bare" | "floor" | "ingest"
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    topic: str | None = None  # ingest, floor: the topic it publishes to
    accepted: int = 0  # ingest, floor: events answered 200/202 (what the topic must hold)
    best: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def is_ingest(self) -> bool:
        return self.kind == "ingest"

    @property
    def publishes(self) -> bool:
        return self.kind not in ("baseline", "bare")


def write_ingest_config(
    path: Path, port: int, bootstrap: str, topic: str, dlq: str, spool: Path, level: str
) -> None:
    path.write_text(
        "# generated by bench/bench_ingest.py; everything else is ingest's default\n"
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[kafka]\nbootstrap_servers = "{bootstrap}"\ntopic = "{topic}"\ndlq_topic = "{dlq}"\n\n'
        f'[spool]\ndir = "{spool}"\n\n'
        f'[logging]\nlevel = "{level}"\n'
    )


def extract_ref(ref: str, dest: Path) -> Path:
    """``ingest/`` as it is at git ``ref``, in ``dest`` (run with cwd and PYTHONPATH there)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "ingest"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise SystemExit(f"--compare {ref}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def start_ingest(
    procs: common.Processes,
    server: Server,
    workdir: Path,
    bootstrap: str,
    token: str,
    args: argparse.Namespace,
    *,
    partitions: int,
    source: Path | None = None,
) -> None:
    assert server.topic is not None
    dlq = server.topic.replace("-raw-", "-dlq-")
    common.create_topics(bootstrap, {server.topic: partitions, dlq: 1})
    tag = server.name.replace("@", "-").replace("/", "-")
    config = workdir / f"{tag}.toml"
    write_ingest_config(
        config, server.port, bootstrap, server.topic, dlq, workdir / f"spool-{tag}", args.log_level
    )
    env = {**os.environ, "FALCO_GITLAB_INGEST_TOKEN": token}
    if source is not None:  # the other ingest/ first on the path; falco_gitlab etc. from this tree
        env["PYTHONPATH"] = os.pathsep.join([str(source), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    server.log = workdir / f"{tag}.log"
    server.proc = procs.start(
        server.name,
        [sys.executable, "-m", "falco_gitlab", "ingest", "--config", str(config)],
        env=env,
        cwd=str(source or ROOT),
        stdout=server.log.open("ab"),
        stderr=subprocess.STDOUT,
        stop_timeout=30,
    )


# --------------------------------------------------------------------------------------------- phases


def phase_spec(
    args: argparse.Namespace, phase: str, port: int, token: str, start_n: int, *, ingest: bool = True
) -> common.LoadSpec:
    spec = common.LoadSpec(
        host="127.0.0.1",
        port=port,
        templates=common.event_templates(),
        token=token,
        start_n=start_n,
        client=args.client,
    )
    if phase == "warmup":
        # Ingest at saturation: the broker's JIT compiles its produce path only under load (its CPU per
        # record falls about fourfold over the first ~20 s), and a production broker is warm.
        spec.mode, spec.conns, spec.duration = "closed", args.conns, args.warmup
        if not ingest:  # the baseline talks to no broker: a moment for its imports and connections
            spec.duration = min(args.warmup, 2.0)
    elif phase == "fixed":
        spec.mode, spec.rate, spec.duration, spec.conns = "open", args.rate, args.duration, 16
    elif phase == "saturation":
        spec.mode, spec.conns, spec.duration = "closed", args.conns, args.sat_duration
    elif phase == "arrays":
        spec.mode, spec.conns, spec.duration, spec.batch = (
            "closed",
            max(1, args.conns // 2),
            args.arr_duration,
            args.array,
        )
    return spec


def run_phase(
    args: argparse.Namespace,
    procs: common.Processes,
    workdir: Path,
    phase: str,
    server: Server,
    token: str,
    start_n: int,
    broker_pid: int | None,
    rnd: int,
) -> dict[str, Any]:
    spec = phase_spec(args, phase, server.port, token, start_n, ingest=server.publishes)
    pid = server.proc.pid if server.proc else None
    meter = common.CpuMeter({"server": pid, "broker": broker_pid if server.publishes else None}).start()
    profiler = None
    if args.py_spy and phase == "saturation" and pid:
        out = Path(f"{args.py_spy}-{server.name}-round{rnd}.txt")
        profiler = procs.start(
            "py-spy",
            [
                os.environ.get("PY_SPY") or shutil.which("py-spy") or "py-spy",
                "record",
                "-p",
                str(pid),
                "-r",
                "200",
                "--format",
                "raw",
                "-o",
                str(out),
                "-d",
                str(int(spec.duration) + 1),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(workdir / "py-spy.log").open("ab"),
        )
    result = common.run_loadgen(spec, workdir, procs)
    meter.stop()
    if profiler is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            profiler.wait(15)
        procs.stop(profiler, 5)
    events = result["ok_events"]
    result.update(
        phase=phase,
        server=server.name,
        round=rnd,
        wall_s=meter.wall,
        server_cpu_s=meter.cpu.get("server"),
        broker_cpu_s=meter.cpu.get("broker"),
        server_cpu_ms_per_event=meter.per_event_ms("server", events),
        broker_cpu_ms_per_event=meter.per_event_ms("broker", events),
        server_util=meter.utilisation("server"),
        client_util=(result["cpu_s"] / meter.wall) if meter.wall else None,
        events_per_s=result["req_per_s"] * spec.batch,
    )
    return result


def progress_line(rnd: int, name: str, phase: str, r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    errors = {k: v for k, v in r["errors"].items() if v}
    return (
        f"  round {rnd} {name:14} {phase:10} {r['req_per_s']:7.0f} req/s {r['events_per_s']:7.0f} ev/s "
        f"p50 {lat.get('p50', 0):6.2f} p99 {lat.get('p99', 0):7.2f} ms "
        f"CPU {common.fmt(r['server_cpu_ms_per_event'], 3)} ms/ev "
        f"(server {common.fmt_ratio(r['server_util'])}, client {common.fmt_ratio(r['client_util'])}) "
        f"{r['statuses']}{' errors ' + str(errors) if errors else ''}"
    )


def better(phase: str, a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The better of two runs: more events/s at saturation, lower p50 at a fixed rate."""
    if a is None:
        return b
    if phase == "fixed":
        return a if a["latency_ms"].get("p50", 1e9) <= b["latency_ms"].get("p50", 1e9) else b
    return a if a["events_per_s"] >= b["events_per_s"] else b


# --------------------------------------------------------------------------------------------- report


def report(servers: list[Server], args: argparse.Namespace) -> str:
    headers = [
        "stage",
        "load",
        "req/s",
        "events/s",
        "p50 ms",
        "p99 ms",
        "server CPU",
        "CPU ms/event",
        "broker CPU ms/event",
        "throughput vs baseline",
        "CPU/event vs baseline",
        "throughput vs bare",
    ]
    labels = {
        "fixed": f"{args.rate:g} req/s offered",
        "saturation": f"saturation, {args.conns} conns",
        "arrays": f"saturation, arrays of {args.array}, {max(1, args.conns // 2)} conns",
    }
    baseline = next((s for s in servers if s.name == "baseline"), None)
    bare_server = next((s for s in servers if s.name == "bare"), None)
    rows = []
    for phase in PHASES:
        base = baseline.best.get(phase) if baseline else None
        bare = bare_server.best.get(phase) if bare_server else None
        for server in servers:
            r = server.best.get(phase)
            if r is None:
                continue
            lat = r["latency_ms"]
            tput = cpu = bare_tput = None
            if server.publishes and bare is not None and phase != "fixed" and bare["events_per_s"]:
                bare_tput = r["events_per_s"] / bare["events_per_s"]
            if server.publishes and base is not None:
                if phase != "fixed" and base["events_per_s"]:
                    tput = r["events_per_s"] / base["events_per_s"]
                if base["server_cpu_ms_per_event"] and r["server_cpu_ms_per_event"]:
                    cpu = base["server_cpu_ms_per_event"] / r["server_cpu_ms_per_event"]
            rows.append(
                [
                    server.label,
                    labels[phase],
                    common.fmt(r["req_per_s"], 0),
                    common.fmt(r["events_per_s"], 0),
                    common.fmt(lat.get("p50"), 2),
                    common.fmt(lat.get("p99"), 2),
                    common.fmt_ratio(r["server_util"]),
                    common.fmt(r["server_cpu_ms_per_event"], 3),
                    common.fmt(r["broker_cpu_ms_per_event"], 3) if server.publishes else "-",
                    common.fmt_ratio(tput) if server.publishes else "-",
                    common.fmt_ratio(cpu) if server.publishes else "-",
                    common.fmt_ratio(bare_tput) if server.publishes else "-",
                ]
            )
    return common.format_table(headers, rows)


def details(servers: list[Server]) -> list[str]:
    lines = []
    for server in servers:
        for phase, r in server.best.items():
            lat, lag = r["latency_ms"], r["lag_ms"]
            extra = ""
            if phase == "fixed":
                lags = f"{common.fmt(lag.get('p50'), 2)}/{common.fmt(lag.get('p99'), 2)}"
                extra = f", generator lag p50/p99 {lags} ms"
            errors = {k: v for k, v in r["errors"].items() if v}
            lines.append(
                f"  {server.name:14} {phase:10} round {r['round']}: answers {r['statuses']}"
                f"{' errors ' + str(errors) if errors else ''}, p90 {common.fmt(lat.get('p90'), 2)} "
                f"p99.9 {common.fmt(lat.get('p99.9'), 2)} max {common.fmt(lat.get('max'), 2)} ms{extra}, "
                f"client CPU {common.fmt_ratio(r['client_util'])}"
            )
    return lines


# --------------------------------------------------------------------------------------------- verify


def accepted_records(server: Server, result: dict[str, Any]) -> int:
    """Records the server's topic must hold for this phase: ingest publishes every event of a request,
    the floor the request's body as one record, the baseline nothing."""
    if server.is_ingest:
        return int(result["ok_events"])
    if server.publishes:
        return int(result["ok_requests"])
    return 0


def verify_topic(bootstrap: str, server: Server) -> tuple[bool, str]:
    import msgspec

    class Probe(msgspec.Struct):
        id: Any = None

    assert server.topic is not None
    decoder = msgspec.json.Decoder(Probe)
    uids: set[bytes] = set()
    ids: set[Any] = set()

    def on_record(message: Any) -> None:
        for key, value in message.headers() or ():
            if key == "gitlab-event-uid":
                uids.add(value)
        ids.add(decoder.decode(message.value()).id)

    if not server.is_ingest:  # the floor: one record per request, as sent (objects or arrays)
        count = common.read_topic(bootstrap, server.topic, lambda message: None)
        by_offsets = common.topic_record_count(bootstrap, server.topic)
        ok = count == server.accepted == by_offsets
        return ok, (
            f"{server.name}: topic holds {count} records ({by_offsets} by offsets); {server.accepted} "
            f"requests were answered 200 -> {'OK' if ok else 'MISMATCH'}"
        )
    count = common.read_topic(bootstrap, server.topic, on_record)
    by_offsets = common.topic_record_count(bootstrap, server.topic)
    ok = count == server.accepted == len(uids) == len(ids) == by_offsets
    text = (
        f"{server.name}: raw topic holds {count} records ({by_offsets} by offsets), {len(uids)} distinct "
        f"event uids, {len(ids)} distinct event ids; {server.accepted} events were answered 200/202 -> "
        f"{'OK' if ok else 'MISMATCH'}"
    )
    return ok, text


# --------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="offered requests/s of the fixed-rate phase"
    )
    parser.add_argument("--duration", type=float, help="seconds of the fixed-rate phase (10; --quick 5)")
    parser.add_argument("--sat-duration", type=float, help="seconds of the saturation phase (8; --quick 5)")
    parser.add_argument("--arr-duration", type=float, help="seconds of the arrays phase (5; --quick 3)")
    parser.add_argument(
        "--conns",
        type=int,
        default=256,
        help="connections at saturation (enough that a server waiting for Kafka is still CPU-bound)",
    )
    parser.add_argument(
        "--array", type=int, default=10, help="events per request in the arrays phase (0: skip)"
    )
    parser.add_argument("--rounds", type=int, help="rounds; each figure is the best of them (2; --quick 1)")
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds of saturation load on each server before measuring, so that the broker's JIT is "
        "warm (60; --quick 20)",
    )
    parser.add_argument("--partitions", type=int, default=6, help="partitions of the raw topic")
    parser.add_argument(
        "--client", choices=["raw", "aiohttp"], default="raw", help="load generator HTTP client"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="ingest's logging.level (default info)",
    )
    parser.add_argument(
        "--compare",
        metavar="GIT_REF",
        help="also measure ingest/ as it is at this git ref (e.g. HEAD: before your changes)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline server")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the Kafka floor server (baseline + produce, acks=all)"
    )
    parser.add_argument(
        "--no-bare", action="store_true", help="skip the bare server (the baseline on aiohttp's web.Server)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="one round of shorter phases (about two and a half minutes)"
    )
    parser.add_argument(
        "--py-spy",
        metavar="PREFIX",
        help="profile every server at saturation with py-spy (raw stacks, PREFIX-<server>-round<n>.txt)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--child-baseline", nargs=2, metavar=("HOST", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-bare", nargs=2, metavar=("HOST", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-floor", nargs=4, metavar=("HOST", "PORT", "BOOTSTRAP", "TOPIC"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_baseline:
        return baseline_main(args.child_baseline[0], int(args.child_baseline[1]))
    if args.child_bare:
        return bare_main(args.child_bare[0], int(args.child_bare[1]))
    if args.child_floor:
        host, port, bootstrap, topic = args.child_floor
        return floor_main(host, int(port), bootstrap, topic)
    # --quick: one round of shorter phases, unless an option says otherwise.
    quick = {"rounds": 1, "duration": 5.0, "sat_duration": 5.0, "arr_duration": 3.0, "warmup": 20.0}
    full = {"rounds": 2, "duration": 10.0, "sat_duration": 8.0, "arr_duration": 5.0, "warmup": 60.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    phases = [p for p in PHASES if p != "arrays" or args.array > 1]

    common.handle_signals()
    info = common.machine_info()
    return common.run_bench(
        "bench-ingest-",
        args.keep,
        lambda workdir, broker, procs: run(args, info, phases, workdir, broker, procs),
    )


def run(
    args: argparse.Namespace,
    info: dict[str, Any],
    phases: list[str],
    workdir: Path,
    broker: common.Broker,
    procs: common.Processes,
) -> bool:
    """Every server, every phase, the report and the checks; True when a check failed."""
    suffix = os.urandom(4).hex()
    token = common.gen_token()
    servers: list[Server] = []
    if not args.no_baseline:
        servers.append(
            Server("baseline", "baseline (200, no Kafka)", common.free_port(), kind="baseline")
        )
    if not args.no_bare:
        servers.append(
            Server("bare", "bare (baseline on web.Server)", common.free_port(), kind="bare")
        )
    if not args.no_floor:
        servers.append(
            Server(
                "floor",
                "floor (baseline + produce, acks=all)",
                common.free_port(),
                kind="floor",
                topic=f"bench-ingest-floor-{suffix}",
            )
        )
    servers.append(
        Server("ingest", "ingest (acks=all)", common.free_port(), topic=f"bench-ingest-raw-{suffix}")
    )
    if args.compare:
        servers.append(
            Server(
                f"ingest@{args.compare}",
                f"ingest @{args.compare} (acks=all)",
                common.free_port(),
                topic=f"bench-ingest-raw-{suffix}-ref",
            )
        )
    for server in servers:
        if server.kind in ("baseline", "bare", "floor"):
            child = [f"--child-{server.kind}", "127.0.0.1", str(server.port)]
            if server.kind == "floor":
                assert server.topic is not None
                common.create_topics(broker.bootstrap, {server.topic: args.partitions})
                child = ["--child-floor", "127.0.0.1", str(server.port), broker.bootstrap,
                         server.topic]
            server.log = workdir / f"{server.kind}.log"
            server.proc = procs.start(
                server.kind,
                [sys.executable, str(Path(__file__).resolve()), *child],
                stdout=server.log.open("ab"),
                stderr=subprocess.STDOUT,
            )
        else:
            source = extract_ref(args.compare, workdir / "ref") if "@" in server.name else None
            start_ingest(
                procs,
                server,
                workdir,
                broker.bootstrap,
                token,
                args,
                partitions=args.partitions,
                source=source,
            )
    for server in servers:
        assert server.proc is not None and server.log is not None
        path, expect = ("/readyz", "kafka=up") if server.is_ingest else ("/healthz", "")
        try:
            common.wait_http(f"http://127.0.0.1:{server.port}{path}", proc=server.proc, expect=expect)
        except (TimeoutError, RuntimeError) as exc:
            raise SystemExit(
                f"{server.name} did not start: {exc}\n{common.tail(server.log)}"
            ) from None

    print("\n".join(common.machine_lines(info)), flush=True)
    print(
        f"bench_ingest: broker {broker.kind} {broker.bootstrap}, raw topic {args.partitions} "
        f"partitions, {args.rounds} round(s), load generator client {args.client}, "
        f"ingest logging.level {args.log_level}",
        flush=True,
    )
    next_n = 1
    runs: list[dict[str, Any]] = []
    for server in servers:  # warm-up: imports, connections, producer metadata, the broker's JIT
        if args.warmup <= 0:
            continue
        r = run_phase(args, procs, workdir, "warmup", server, token, next_n, broker.pid, 0)
        next_n = r["next_n"]
        server.accepted += accepted_records(server, r)
        print(progress_line(0, server.name, "warmup", r), flush=True)
    for rnd in range(1, args.rounds + 1):
        for phase in phases:
            for server in servers:
                r = run_phase(args, procs, workdir, phase, server, token, next_n, broker.pid, rnd)
                next_n = r["next_n"]
                server.accepted += accepted_records(server, r)
                runs.append(r)
                server.best[phase] = better(phase, server.best.get(phase), r)
                print(progress_line(rnd, server.name, phase, r), flush=True)
    checks = []
    for server in servers:
        if server.publishes and server.proc is not None:
            code = procs.stop(server.proc, 40)  # graceful: flushes what it holds
            if code != 0:
                print(
                    f"warning: {server.name} exited with {code}:\n{common.tail(server.log, 10)}"
                    if server.log
                    else "",
                    file=sys.stderr,
                )
            checks.append(verify_topic(broker.bootstrap, server))
    print()
    print(f"## ingest: one worker process, acks=all (best of {args.rounds} round(s))")
    print()
    print(report(servers, args))
    print()
    print("\n".join(details(servers)))
    for _, text in checks:
        print(text)
    common.write_json(
        args.json,
        {
            "bench": "ingest",
            "machine": info,
            "args": vars(args),
            "best": {s.name: s.best for s in servers},
            "runs": runs,
            "checks": [t for _, t in checks],
        },
    )
    if broker.kind == "env":
        topics = [s.topic for s in servers if s.topic]
        common.delete_topics(broker.bootstrap, topics + [t.replace("-raw-", "-dlq-") for t in topics])
    return not all(ok for ok, _ in checks)


if __name__ == "__main__":
    sys.exit(main())
