"""Benchmark: webhook request -> Falco-format alert, through the whole pipeline on one machine.

    .venv/bin/python bench/bench_e2e.py             # about 1.5 minutes
    .venv/bin/python bench/bench_e2e.py --quick     # about 1 minute

Starts what it needs: a Kafka broker (KAFKA_BOOTSTRAP_SERVERS, else the project's own broker in a
temporary directory), fresh raw (6 partitions), enriched (6 partitions) and dead-letter topics, and one
process of each stage:

    load generator --HTTP--> falco-gitlab ingest --raw--> falco-gitlab enrich --enriched-->
        falco-gitlab replay --follow --rules rules/gitlab.yaml --rule-matching all  --stdout--> this bench

Enrich geolocates with the MaxMind City test database in tests/data/geoip. The rule evaluation is
``falco-gitlab replay`` (the project's Falco rules evaluator, reading the enriched topic like the
plugin does, read_committed) rather than Falco itself, so no Falco binary is needed.

Workload: the captured GitLab payloads that raise at least one alert of rules/gitlab.yaml, sent in
turn at a fixed rate (``--rate`` events/s for ``--duration`` s, one event per request, open loop), each
with a unique ``id`` and a unique author name ``<marker><n>`` that the alert's ``gitlab.author_name``
output field carries back. An event's latency is the time from its request's INTENDED send time (the
open-loop schedule; so a stall anywhere delays the following events too, no coordinated omission) to
the moment this bench read the first alert line carrying its marker from replay's standard output
(replay flushes every alert line with --follow; the pipe and the reader thread are included in the
figure). All clocks are CLOCK_MONOTONIC of one machine.

Baseline (same run, same replay process): the same events, enriched beforehand in the producer
process, produced straight to the enriched topic at the same rate (aiokafka, acks=all, linger 5 ms:
the producer settings of enrich) and timed to their alert the same way. That is the floor of any
pipeline that ends in Kafka and a rule engine: one produce/consume hop, rule evaluation and the pipe;
the difference to the pipeline is what HTTP, ingest, the raw topic and enrich's transactions add.

CPU per stage: user+system CPU seconds of each process (/proc/<pid>/stat) over the measured window
divided by the events sent; the idle CPU of each process (measured for 3 s before the load) is shown
next to it, because at a modest fixed rate polling and heartbeats are part of the cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "bench"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402

FG = [sys.executable, "-m", "falco_gitlab"]


# --------------------------------------------------------------------------------------------- workload


def alerting_templates(marker: str) -> list[common.Template]:
    """The seed payloads (with the marker) that raise an alert carrying the marker, with GeoIP as enrich."""
    from replay.api import alerts_for_payloads
    from replay.inputs import open_geoip

    geo = open_geoip(str(common.CITY_DB)) if common.CITY_DB.is_file() else None
    chosen = []
    for template in common.event_templates(marker=marker):
        alerts = alerts_for_payloads(
            [str(common.RULES)], [template.render(1)], geo=geo, rule_matching="all", destination="bench"
        )
        if any(a["output_fields"].get("gitlab.author_name") == f"{marker}1" for a in alerts):
            chosen.append(template)
    if not chosen:
        raise SystemExit("no seed payload raises an alert that carries its author name")
    return chosen


class AlertReader(threading.Thread):
    """Reads replay's JSON alert lines; the monotonic time the first alert of each marked event arrived."""

    def __init__(self, stream: Any, markers: list[str]) -> None:
        super().__init__(daemon=True, name="alert-reader")
        self.stream = stream
        self.markers = markers  # author name prefixes (one per phase); the rest of the name is the number
        self.first: dict[tuple[str, int], float] = {}
        self.lines = 0
        self.bad = 0

    def run(self) -> None:
        for line in iter(self.stream.readline, b""):
            arrived = time.monotonic()
            self.lines += 1
            try:
                author = json.loads(line)["output_fields"].get("gitlab.author_name") or ""
            except (ValueError, KeyError, TypeError, AttributeError):
                self.bad += 1
                continue
            for marker in self.markers:
                if author.startswith(marker) and author[len(marker) :].isdigit():
                    self.first.setdefault((marker, int(author[len(marker) :])), arrived)
                    break

    def count(self, marker: str, numbers: range) -> int:
        return sum(1 for n in numbers if (marker, n) in self.first)

    def wait_for(self, marker: str, numbers: range, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.count(marker, numbers)
            if got == len(numbers) or not self.is_alive():
                return got
            time.sleep(0.05)
        return self.count(marker, numbers)


# --------------------------------------------------------------------------------------------- baseline


def produce_main(spec_path: str) -> int:
    """Child process of the baseline: enrich the events beforehand, then produce them at a fixed rate."""
    spec = json.loads(Path(spec_path).read_text())
    from aiokafka import AIOKafkaProducer

    from enrich.worker import enrich_transform
    from falco_gitlab.contract import (
        HDR_DESTINATION,
        HDR_EVENT_TYPE,
        HDR_EVENT_UID,
        HDR_RECEIVED_AT,
        HDR_REQUEST_ID,
    )
    from ingest.body import split_body
    from replay.inputs import open_geoip

    templates = [common.Template(**t) for t in spec["templates"]]
    geo = open_geoip(spec["city_db"]) if spec.get("city_db") else None
    transform = enrich_transform(geo)
    records = []
    for index in range(spec["count"]):
        n = spec["start_n"] + index
        template = templates[n % len(templates)]
        raw = template.render(n)
        event = split_body(raw)[0]
        request_id = os.urandom(16).hex().encode()
        headers = [
            (HDR_DESTINATION, b"bench"),
            (HDR_EVENT_TYPE, template.event_type.encode()),
            (HDR_RECEIVED_AT, str(time.time_ns()).encode()),
            (HDR_REQUEST_ID, request_id),
            (HDR_EVENT_UID, request_id + b".0"),
        ]
        records.append((event.key, transform(raw, headers, int(time.time() * 1000)), headers))

    async def run() -> dict[str, Any]:
        producer = AIOKafkaProducer(
            bootstrap_servers=spec["bootstrap"], acks="all", enable_idempotence=True, linger_ms=5
        )
        await producer.start()
        each: list[tuple[int, float, float, float]] = []
        pending = []
        try:
            # Connected, metadata known; then wait for the bench to say go.
            await producer.client._wait_on_metadata(spec["topic"])
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            cpu0 = time.process_time()
            interval = 1.0 / spec["rate"]
            t0 = time.monotonic() + 0.05
            for index, (key, value, headers) in enumerate(records):
                due = t0 + index * interval
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                sent = time.monotonic()
                future = await producer.send(spec["topic"], value, key=key, headers=headers)
                pending.append((index, due, sent, future))
            for index, due, sent, future in pending:
                await future
                each.append((index, due, sent, 0.0))
            cpu = time.process_time() - cpu0
        finally:
            await producer.stop()
        return {"t0": t0, "each": each, "cpu_s": cpu}

    result = asyncio.run(run())
    sys.stdout.write(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------------- phases


@dataclass
class Phase:
    name: str
    marker: str
    start_n: int
    count: int
    each: list[Any] = field(default_factory=list)  # (index, intended, sent, answered, status)
    cpu: dict[str, float | None] = field(default_factory=dict)
    wall: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def numbers(self) -> range:
        return range(self.start_n, self.start_n + self.count)


def latencies(phase: Phase, reader: AlertReader, column: int) -> tuple[list[float], int]:
    """(event latencies in s from column 1 = intended or 2 = actual send, events without an alert)."""
    values, missing = [], 0
    for row in phase.each:
        arrived = reader.first.get((phase.marker, phase.start_n + int(row[0])))
        if arrived is None:
            missing += 1
        else:
            values.append(arrived - row[column])
    missing += phase.count - len(phase.each)
    return values, missing


def run_pipeline_phase(
    args: argparse.Namespace,
    procs: common.Processes,
    workdir: Path,
    phase: Phase,
    port: int,
    token: str,
    templates: list[common.Template],
    reader: AlertReader,
    pids: dict[str, int | None],
) -> None:
    spec = common.LoadSpec(
        host="127.0.0.1",
        port=port,
        templates=templates,
        token=token,
        mode="open",
        rate=args.rate,
        duration=args.duration,
        conns=8,
        start_n=phase.start_n,
        record_each=True,
        client=args.client,
    )
    phase.count = int(args.rate * args.duration)
    meter = common.CpuMeter(pids).start()
    result = common.run_loadgen(spec, workdir, procs)
    reader.wait_for(phase.marker, phase.numbers, args.settle)
    meter.stop()
    phase.each = result["each"] or []
    phase.statuses = result["statuses"]
    phase.cpu = dict(meter.cpu)
    phase.cpu["load generator"] = result["cpu_s"]
    phase.wall = meter.wall


def run_direct_phase(
    args: argparse.Namespace,
    procs: common.Processes,
    workdir: Path,
    phase: Phase,
    bootstrap: str,
    topic: str,
    templates: list[common.Template],
    reader: AlertReader,
    pids: dict[str, int | None],
) -> None:
    """The baseline: a producer process enriches the events first, says ``ready``, and on ``go`` produces
    them to the enriched topic at the fixed rate; measured from ``go`` to the last alert."""
    phase.count = int(args.rate * args.duration)
    spec_path = workdir / "produce.json"
    spec_path.write_text(
        json.dumps(
            {
                "bootstrap": bootstrap,
                "topic": topic,
                "rate": args.rate,
                "count": phase.count,
                "start_n": phase.start_n,
                "templates": [t.__dict__ for t in templates],
                "city_db": str(common.CITY_DB) if common.CITY_DB.is_file() else None,
            }
        )
    )
    err = workdir / "produce.err"
    with err.open("wb") as stderr:
        proc = procs.start(
            "producer",
            [sys.executable, str(Path(__file__).resolve()), "--child-produce", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        assert proc.stdin is not None and proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            procs.stop(proc, 5)
            raise RuntimeError(f"baseline producer failed:\n{common.tail(err)}")
        meter = common.CpuMeter({**pids, "producer": proc.pid}).start()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        output = proc.stdout.read()
        code = proc.wait(30)
        reader.wait_for(phase.marker, phase.numbers, args.settle)
        meter.stop()
        procs.stop(proc, 5)
    if code != 0:
        raise RuntimeError(f"baseline producer failed ({code}):\n{common.tail(err)}")
    result = json.loads(output)
    phase.each = [(i, due, sent, 0.0, 200) for i, due, sent, _ in result["each"]]
    phase.cpu = dict(meter.cpu)
    phase.cpu["producer"] = result["cpu_s"]
    phase.wall = meter.wall


def hop_breakdown(
    bootstrap: str,
    raw: str,
    enriched: str,
    phase: Phase,
    reader: AlertReader,
    wall_minus_mono: float,
) -> list[list[str]]:
    """Where the time goes, per event, from the records' Kafka timestamps (CreateTime, ms, wall clock):
    HTTP answer (ingest: Kafka acknowledged), raw record created -> enriched record created (enrich's
    poll and processing), enriched record created -> alert line read (enrich's transaction commit, replay's
    read_committed fetch, rule evaluation, the pipe)."""
    import msgspec

    from falco_gitlab.model import decode_enriched

    class Probe(msgspec.Struct):
        author_name: Any = None

    decoder = msgspec.json.Decoder(Probe)
    prefix = phase.marker
    raw_ts: dict[int, float] = {}
    enr_ts: dict[int, float] = {}

    def number(author: Any) -> int | None:
        if isinstance(author, str) and author.startswith(prefix) and author[len(prefix) :].isdigit():
            return int(author[len(prefix) :])
        return None

    def on_raw(message: Any) -> None:
        n = number(decoder.decode(message.value()).author_name)
        if n is not None:
            raw_ts[n] = message.timestamp()[1] / 1000 - wall_minus_mono

    def on_enriched(message: Any) -> None:
        n = number(decode_enriched(message.value()).fields.get("author_name"))
        if n is not None:
            enr_ts[n] = message.timestamp()[1] / 1000 - wall_minus_mono

    common.read_topic(bootstrap, raw, on_raw)
    common.read_topic(bootstrap, enriched, on_enriched)
    hops: dict[str, list[float]] = {"answer": [], "raw": [], "enrich": [], "alert": []}
    for row in phase.each:
        n = phase.start_n + int(row[0])
        intended, answered = row[1], row[3]
        alert = reader.first.get((phase.marker, n))
        hops["answer"].append(answered - intended)
        if n in raw_ts:
            hops["raw"].append(raw_ts[n] - intended)
            if n in enr_ts:
                hops["enrich"].append(enr_ts[n] - raw_ts[n])
                if alert is not None:
                    hops["alert"].append(alert - enr_ts[n])
    labels = {
        "answer": "request -> HTTP answer (ingest: Kafka acknowledged, acks=all)",
        "raw": "request -> raw record created (ingest hands it to the producer)",
        "enrich": "raw record created -> enriched record created (enrich poll, decode, GeoIP)",
        "alert": "enriched record created -> alert line read (transaction commit, replay fetch, rules, pipe)",
    }
    rows = []
    for key, values in hops.items():
        s = common.summarise(values)
        rows.append(
            [
                labels[key],
                str(len(values)),
                common.fmt(s.get("p50"), 1),
                common.fmt(s.get("p99"), 1),
                common.fmt(s.get("max"), 1),
            ]
        )
    return rows


# --------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="events (requests) per second")
    parser.add_argument("--duration", type=float, help="seconds of load per phase (20; --quick 10)")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait for the last alerts")
    parser.add_argument("--partitions", type=int, default=6, help="partitions of the raw and enriched topics")
    parser.add_argument(
        "--client", choices=["raw", "aiohttp"], default="raw", help="load generator HTTP client"
    )
    parser.add_argument("--quick", action="store_true", help="10 s phases")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    parser.add_argument("--child-produce", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_produce:
        return produce_main(args.child_produce)
    if args.duration is None:
        args.duration = 10.0 if args.quick else 20.0

    common.handle_signals()
    info = common.machine_info()
    return common.run_bench(
        "bench-e2e-", args.keep, lambda workdir, broker, procs: run(args, info, workdir, broker, procs)
    )


def run(
    args: argparse.Namespace,
    info: dict[str, Any],
    workdir: Path,
    broker: common.Broker,
    procs: common.Processes,
) -> bool:
    suffix = os.urandom(4).hex()
    raw, enriched = f"bench-e2e-raw-{suffix}", f"bench-e2e-enriched-{suffix}"
    dlq, ingest_dlq = f"bench-e2e-dlq-{suffix}", f"bench-e2e-ingest-dlq-{suffix}"
    common.create_topics(
        broker.bootstrap, {raw: args.partitions, enriched: args.partitions, dlq: 1, ingest_dlq: 1}
    )
    wall_minus_mono = time.time() - time.monotonic()
    token = common.gen_token()
    port = common.free_port()
    run_id = suffix[:4]
    markers = {name: f"bench-{run_id}-{name}-" for name in ("warmup", "pipeline", "direct")}
    templates = {name: alerting_templates(marker) for name, marker in markers.items()}

    # --- the stages
    config = workdir / "ingest.toml"
    config.write_text(
        "# generated by bench/bench_e2e.py; everything else is ingest's default\n"
        f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n'
        f'[kafka]\nbootstrap_servers = "{broker.bootstrap}"\ntopic = "{raw}"\ndlq_topic = "{ingest_dlq}"\n\n'
        f'[spool]\ndir = "{workdir / "spool"}"\n'
    )
    logs = {name: workdir / f"{name}.log" for name in ("ingest", "enrich", "replay")}
    ingest = procs.start(
        "ingest",
        [*FG, "ingest", "--config", str(config)],
        env={**os.environ, "FALCO_GITLAB_INGEST_TOKEN": token},
        stdout=logs["ingest"].open("ab"),
        stderr=subprocess.STDOUT,
        stop_timeout=30,
    )
    enrich_argv = [
        *FG,
        "enrich",
        "--bootstrap-servers",
        broker.bootstrap,
        "--input-topic",
        raw,
        "--output-topic",
        enriched,
        "--dlq-topic",
        dlq,
        "--group-id",
        f"bench-e2e-{suffix}",
        "--transactional-id",
        f"bench-e2e-{suffix}",
    ]
    if common.CITY_DB.is_file():
        enrich_argv += ["--city-db", str(common.CITY_DB)]
    enrich = procs.start(
        "enrich", enrich_argv, stdout=logs["enrich"].open("ab"), stderr=subprocess.STDOUT, stop_timeout=40
    )
    replay = procs.start(
        "replay",
        [
            *FG,
            "replay",
            "--rules",
            str(common.RULES),
            "--bootstrap-servers",
            broker.bootstrap,
            "--topic",
            enriched,
            "--follow",
            "--rule-matching",
            "all",
            "--quiet",
            "--hostname",
            "bench",
        ],
        stdout=subprocess.PIPE,
        stderr=logs["replay"].open("ab"),
        stop_timeout=15,
    )
    reader = AlertReader(replay.stdout, list(markers.values()))
    reader.start()
    try:
        common.wait_http(f"http://127.0.0.1:{port}/readyz", proc=ingest, expect="kafka=up")
    except (TimeoutError, RuntimeError) as exc:
        raise SystemExit(f"ingest did not start: {exc}\n{common.tail(logs['ingest'])}") from None
    pids: dict[str, int | None] = {
        "ingest": ingest.pid,
        "enrich": enrich.pid,
        "replay": replay.pid,
        "broker": broker.pid,
    }

    print("\n".join(common.machine_lines(info)), flush=True)
    print(
        f"bench_e2e: broker {broker.kind} {broker.bootstrap}, raw and enriched topics "
        f"{args.partitions} partitions, {args.rate:g} events/s for {args.duration:g} s per phase, "
        f"{len(templates['pipeline'])} payload kinds that alert",
        flush=True,
    )

    # --- warm-up: until alerts come back (consumer group joined, replay at the end of the topic)
    warm = Phase("warmup", markers["warmup"], 1, 0)
    deadline = time.monotonic() + 120
    n = 1
    while time.monotonic() < deadline:
        spec = common.LoadSpec(
            host="127.0.0.1",
            port=port,
            templates=templates["warmup"],
            token=token,
            mode="open",
            rate=20,
            duration=1.0,
            conns=2,
            start_n=n,
        )
        n = common.run_loadgen(spec, workdir, procs)["next_n"]
        if reader.count(warm.marker, range(1, n)):
            break
        for name, proc in (("ingest", ingest), ("enrich", enrich), ("replay", replay)):
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}:\n{common.tail(logs[name])}")
    else:
        raise SystemExit(
            "no alert came back within 120 s of warm-up\n"
            + "\n".join(f"--- {k}\n{common.tail(v, 15)}" for k, v in logs.items())
        )
    spec = common.LoadSpec(
        host="127.0.0.1",
        port=port,
        templates=templates["warmup"],
        token=token,
        mode="open",
        rate=args.rate,
        duration=2.0,
        conns=8,
        start_n=n,
    )
    n2 = common.run_loadgen(spec, workdir, procs)["next_n"]
    reader.wait_for(warm.marker, range(n, n2), 30)
    print(f"  warm-up: {reader.count(warm.marker, range(1, n2))}/{n2 - 1} warm-up events alerted", flush=True)

    # --- idle CPU of each process
    idle = common.CpuMeter(pids).start()
    time.sleep(3.0)
    idle.stop()

    # --- the pipeline, then the baseline
    # Ids (the __N__ numbers) never repeat across phases: ingest would drop a repeated id as a duplicate.
    pipe = Phase("pipeline", markers["pipeline"], n2 + 1000, 0)
    run_pipeline_phase(args, procs, workdir, pipe, port, token, templates["pipeline"], reader, pids)
    print(
        f"  pipeline: {len(pipe.each)} requests {pipe.statuses}, "
        f"{reader.count(pipe.marker, pipe.numbers)} alerted",
        flush=True,
    )
    direct = Phase("direct", markers["direct"], pipe.start_n + pipe.count + 1000, 0)
    run_direct_phase(
        args,
        procs,
        workdir,
        direct,
        broker.bootstrap,
        enriched,
        templates["direct"],
        reader,
        {"replay": replay.pid, "broker": broker.pid},
    )
    print(
        f"  baseline: {len(direct.each)} records produced, "
        f"{reader.count(direct.marker, direct.numbers)} alerted",
        flush=True,
    )

    # --- report
    rows = []
    figures: dict[str, Any] = {}
    base_p50 = None
    for phase, label in (
        (direct, "baseline: produce enriched record -> replay alert"),
        (pipe, "pipeline: HTTP -> ingest -> raw -> enrich -> enriched -> replay alert"),
    ):
        lat, missing = latencies(phase, reader, 1)
        from_send, _ = latencies(phase, reader, 2)
        s, a = common.summarise(lat), common.summarise(from_send)
        figures[phase.name] = {
            "from_intended_ms": s,
            "from_sent_ms": a,
            "missing": missing,
            "events": phase.count,
        }
        ratio = None
        if phase is direct:
            base_p50 = s.get("p50")
        elif base_p50 and s.get("p50"):
            ratio = base_p50 / s["p50"]
        rows.append(
            [
                label,
                common.fmt(phase.count, 0),
                str(missing),
                common.fmt(s.get("p50"), 1),
                common.fmt(s.get("p90"), 1),
                common.fmt(s.get("p99"), 1),
                common.fmt(s.get("max"), 1),
                common.fmt(a.get("p50"), 1),
                common.fmt(a.get("p99"), 1),
                common.fmt_ratio(ratio) if phase is pipe else "-",
            ]
        )
    print()
    print(f"## end to end: {args.rate:g} events/s for {args.duration:g} s, latency to the alert line")
    print()
    print(
        common.format_table(
            [
                "path",
                "events",
                "no alert",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "p50 from send",
                "p99 from send",
                "p50 baseline/pipeline",
            ],
            rows,
        )
    )
    print()
    cpu_rows = []
    stages = [
        ("ingest", "ingest (HTTP, Kafka produce)"),
        ("enrich", "enrich (decode, flatten, GeoIP, transaction)"),
        ("replay", "replay (consume, rules/gitlab.yaml, alert JSON)"),
        ("broker", "Kafka broker"),
        ("load generator", "load generator (HTTP client)"),
    ]
    events = pipe.count
    for key, label in stages:
        cpu = pipe.cpu.get(key)
        idle_util = idle.utilisation(key)
        cpu_rows.append(
            [
                label,
                common.fmt(cpu, 2),
                common.fmt(cpu * 1000 / events if cpu is not None else None, 3),
                common.fmt_ratio(cpu / pipe.wall if cpu is not None and pipe.wall else None),
                common.fmt_ratio(idle_util),
            ]
        )
        figures.setdefault("cpu", {})[key] = {
            "cpu_s": cpu,
            "ms_per_event": cpu * 1000 / events if cpu else None,
            "idle_util": idle_util,
        }
    for key, label in (
        ("replay", "baseline phase: replay"),
        ("broker", "baseline phase: Kafka broker"),
        ("producer", "baseline phase: producer"),
    ):
        cpu = direct.cpu.get(key)
        cpu_rows.append(
            [
                label,
                common.fmt(cpu, 2),
                common.fmt(cpu * 1000 / direct.count if cpu is not None else None, 3),
                common.fmt_ratio(cpu / direct.wall if cpu is not None and direct.wall else None),
                "-",
            ]
        )
    print("Where the pipeline's time goes (Kafka CreateTime stamps have 1 ms resolution):")
    print()
    print(
        common.format_table(
            ["hop", "events", "p50 ms", "p99 ms", "max ms"],
            hop_breakdown(broker.bootstrap, raw, enriched, pipe, reader, wall_minus_mono),
        )
    )
    print()
    print(f"CPU per stage while the pipeline phase ran ({pipe.wall:.1f} s, {events} events):")
    print()
    print(common.format_table(["stage", "CPU s", "CPU ms/event", "CPU (of one core)", "idle CPU"], cpu_rows))
    print()
    print(
        f"replay printed {reader.lines} alert lines ({reader.bad} unreadable); latency = alert line read by "
        'this bench minus the request\'s intended send time ("from send": minus the actual send time)'
    )
    common.write_json(args.json, {"bench": "e2e", "machine": info, "args": vars(args), "figures": figures})
    ok = all(figures[p]["missing"] == 0 for p in ("pipeline", "direct"))
    if not ok:
        print(
            "some events raised no alert within the settle time: see the 'no alert' column", file=sys.stderr
        )
    if broker.kind == "env":
        common.delete_topics(broker.bootstrap, [raw, enriched, dlq, ingest_dlq])
    return not ok


if __name__ == "__main__":
    sys.exit(main())
