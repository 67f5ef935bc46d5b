"""Benchmark: one enrich worker against a real Kafka broker, next to a pass-through worker.

    .venv/bin/python bench/bench_enrich.py [--events N] [--batch-size N] [--partitions N] [--rounds N]
                                          [--warmup N] [--diagnose] [--compare REV] [--profile PREFIX]
                                          [--json]

Uses the broker at KAFKA_BOOTSTRAP_SERVERS, else starts the project's local broker (falco_gitlab.devkafka)
in a temporary directory and stops it afterwards. It fills a raw topic with N realistic events (the
captured GitLab payloads with varied ids, actors, times and client addresses: a mix of addresses the
City test database knows, public ones it does not, private ones and proxy lists), then runs, each in a
fresh process and its own consumer group on the same raw topic:

* pass-through: the same worker loop (``enrich.worker.Worker``: transactional batches, offsets in the
  transaction, dedup, DLQ routing) with a transform that copies the value: Kafka and loop cost only;
* enrich: the real transform (decode, flatten, GeoIP City + ASN, msgpack encode).

Each run is timed from the first record the worker fetched to the commit of the last; CPU time is the
worker process's user+system time over the same span. The table gives events/s, CPU µs/event and the
ratio enrich/pass-through of events/s.

``--diagnose`` adds two runs that separate the two costs of enriching: "enrich, raw out" does all the
work but writes the raw value; "pass, 2x out" does no work but writes a value as large as an enriched
record (which carries the raw event plus the fields, about twice the raw size).

``--compare REV`` adds a run of enrich as it is in git revision REV (its ``enrich/`` and
``falco_gitlab/``, extracted with ``git archive``) in every round, against the same topic: a before/after
measured under the same load, which a shared machine makes necessary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CITY_DB = ROOT / "tests" / "data" / "geoip" / "GeoLite2-City-Test.mmdb"
_REPO_SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "gitlab"
SEED_DIR = Path(os.environ.get("FALCO_GITLAB_SEED_DIR", _REPO_SAMPLES))

# Addresses the MaxMind City test database knows (IPv4 and IPv6).
KNOWN = ["81.2.69.142", "81.2.69.160", "2.125.160.216", "89.160.20.112", "89.160.20.128", "216.160.83.56",
         "216.160.83.58", "175.16.199.0", "175.16.199.40", "67.43.156.1", "202.196.224.5", "2001:218::1",
         "2a02:cf40::1", "2001:480::1"]


MODES = ("passthrough", "enrich", "enrich-small", "passthrough-2x", "enrich-compare")
LABELS = {"passthrough": "pass-through", "enrich": "enrich", "enrich-small": "enrich, raw out",
          "passthrough-2x": "pass, 2x out", "enrich-compare": "enrich (REV)"}

# --- workload --------------------------------------------------------------------------------------


def address_pool(rng: random.Random) -> list[str]:
    """A realistic client address mix: ~35% known to the City database, ~35% unknown public IPv4/IPv6,
    ~20% private/loopback, ~10% comma-separated proxy lists. Repeats make the cache matter, as in life."""
    pool: list[str] = []
    pool += [rng.choice(KNOWN) for _ in range(350)]
    pool += [f"{rng.choice([23, 34, 52, 64, 99, 104, 151, 185])}.{rng.randrange(256)}.{rng.randrange(256)}."
             f"{rng.randrange(1, 255)}" for _ in range(300)]
    pool += [f"2a00:{rng.randrange(0xffff):x}::{rng.randrange(0xffff):x}" for _ in range(50)]
    pool += [f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(150)]
    pool += ["127.0.0.1"] * 20 + ["192.168.1.10"] * 30
    pool += [f"{rng.choice(KNOWN)}, 10.0.0.{rng.randrange(1, 255)}" for _ in range(100)]
    return pool


def make_events(count: int, seed: int = 7) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    rng = random.Random(seed)
    payloads = [json.loads(path.read_bytes()) for path in sorted(SEED_DIR.glob("*.json"))]
    if not payloads:
        raise SystemExit(f"no seed payloads in {SEED_DIR}")
    pool = address_pool(rng)
    base = 1_707_000_000
    events = []
    for number in range(count):
        event = json.loads(json.dumps(payloads[number % len(payloads)]))
        event["id"] = str(uuid.UUID(int=rng.getrandbits(128))) if number % 5 == 0 else number
        author = rng.randrange(1, 2000) if number % 11 else -1
        event["author_id"] = author
        address = rng.choice(pool)
        event["ip_address"] = address
        event.setdefault("details", {})["ip_address"] = address
        stamp = base + number
        event["created_at"] = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp))
                               + f".{number % 1000:03d}Z")
        request = uuid.UUID(int=rng.getrandbits(128)).hex
        headers = [("gitlab-destination", b"gitlab-main"),
                   ("gitlab-event-type", event["event_type"].encode()),
                   ("gitlab-received-at", b"%d" % (stamp * 1_000_000_000 + 5_000_000)),
                   ("gitlab-request-id", request.encode()),
                   ("gitlab-event-uid", f"{request}.0".encode())]
        events.append((b"id:%d" % author, json.dumps(event, separators=(",", ":")).encode(), headers))
    return events


async def fill(bootstrap: str, topic: str, partitions: int, count: int) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                linger_ms=20, max_batch_size=512 * 1024, compression_type=None)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key, headers=headers)
                   for key, value, headers in make_events(count)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


# --- one worker run (child process) ----------------------------------------------------------------


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    from enrich.config import EnrichConfig, GeoIPSettings, KafkaSettings, MetricsSettings, ProcessingSettings
    from enrich.geo import GeoIP
    from enrich.worker import Worker, enrich_transform, passthrough_transform

    config = EnrichConfig(
        kafka=KafkaSettings(bootstrap_servers=args.bootstrap, input_topic=args.raw, output_topic=args.out,
                            dlq_topic=args.dlq, group_id=args.group, linger_ms=5),
        geoip=GeoIPSettings(city_db=str(CITY_DB), asn_db=args.asn_db),
        processing=ProcessingSettings(batch_size=args.batch_size),
        metrics=MetricsSettings(log_interval_s=3600),
    )
    if args.mode in ("enrich", "enrich-small", "enrich-compare"):
        geo = GeoIP(config.geoip.city_db, config.geoip.asn_db, cache_size=config.geoip.cache_size)
        # As the service does: the GeoIP itself (it also caches per address), where the revision
        # under test takes one; older ones take its lookup function.
        inner = enrich_transform(geo if hasattr(geo, "derived") else geo.lookup)
        if args.mode == "enrich-small":  # all the work, but write the raw value (size effect)
            work = inner

            def inner(value: bytes | None, headers: Any, timestamp_ms: int) -> bytes:
                work(value, headers, timestamp_ms)
                return passthrough_transform(value, headers, timestamp_ms)
    elif args.mode == "passthrough-2x":  # no work, but a value as large as an enriched record
        def inner(value: bytes | None, headers: Any, timestamp_ms: int) -> bytes:
            return (value or b"") * 2
    else:
        inner = passthrough_transform
    started: list[float] = []
    calls = [0]

    def transform(value: bytes | None, headers: Any, timestamp_ms: int) -> bytes:
        if not started:
            started.extend((time.perf_counter(), _cpu()))
        calls[0] += 1
        return inner(value, headers, timestamp_ms)

    worker = Worker(config, transform, transactional_id=f"bench-{args.group}")
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    deadline = time.monotonic() + args.timeout
    # The worker has no completion hook: poll its counters (cheap, every 2 ms).
    while worker.counters.records_in < args.events and time.monotonic() < deadline and not task.done():  # noqa: ASYNC110
        await asyncio.sleep(0.002)
    ended, cpu_end = time.perf_counter(), _cpu()
    stop.set()
    await task
    counters = worker.counters
    return {
        "mode": args.mode, "events": counters.records_in, "enriched": counters.enriched, "dlq": counters.dlq,
        "duplicates": counters.duplicates, "batches": counters.batches, "aborted": counters.aborted,
        "rewound": counters.rewound, "transforms": calls[0],
        "source": sys.modules[Worker.__module__].__file__,
        "seconds": ended - started[0] if started else float("nan"),
        "cpu_seconds": cpu_end - started[1] if started else float("nan"),
    }


# --- orchestration ---------------------------------------------------------------------------------


def child(mode: str, bootstrap: str, raw: str, events: int, batch_size: int, asn_db: str | None,
          profile: str | None, tree: Path | None = None) -> dict[str, Any]:
    token = uuid.uuid4().hex[:8]
    command = [sys.executable]
    if profile:
        command += ["-m", "cProfile", "-o", f"{profile}.{mode}.prof"]
    command += [__file__, "--child", mode, "--bootstrap", bootstrap, "--raw", raw,
                "--out", f"bench-{mode}-{token}", "--dlq", f"bench-dlq-{token}",
                "--group", f"bench-{mode}-{token}",
                "--events", str(events), "--batch-size", str(batch_size)]
    if asn_db:
        command += ["--asn-db", asn_db]
    if mode == "enrich-compare":
        assert tree is not None
        command += ["--tree", str(tree)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{mode} worker failed ({result.returncode}):\n{result.stderr[-4000:]}")
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    if tree is not None and mode == "enrich-compare" and not report["source"].startswith(str(tree)):
        raise SystemExit(f"{mode} worker ran {report['source']}, not the code under {tree}")
    if report["events"] < events:
        raise SystemExit(f"{mode} worker processed only {report['events']} of {events} events")
    return report


def build_asn_db(directory: Path) -> str:
    from tests.enrich_support import build_mmdb

    networks = {"81.2.69.0/24": {"autonomous_system_number": 20712,
                                 "autonomous_system_organization": "Andrews & Arnold Ltd"},
                "89.160.20.0/24": {"autonomous_system_number": 29518,
                                   "autonomous_system_organization": "Bredband2 AB"},
                "216.160.83.0/24": {"autonomous_system_number": 209,
                                    "autonomous_system_organization": "CenturyLink"},
                "2001:218::/32": {"autonomous_system_number": 2914, "autonomous_system_organization": "NTT"}}
    return str(build_mmdb(directory / "bench-asn.mmdb", networks, database_type="GeoLite2-ASN"))


def extract_revision(revision: str, directory: Path) -> Path:
    """``enrich/`` and ``falco_gitlab/`` as they are in ``revision``, under ``directory``."""
    directory.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision, "enrich", "falco_gitlab"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternate the workers this many times; medians (and best runs) reported")
    parser.add_argument("--warmup", type=int, default=1, metavar="N",
                        help="unreported runs of each worker before the rounds (default 1)")
    parser.add_argument("--profile", metavar="PREFIX", help="write cProfile output of each worker run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    # child mode (internal)
    parser.add_argument("--diagnose", action="store_true",
                        help="also run enrich writing the raw value (work without the larger output) and "
                             "pass-through writing a value of enriched size (larger output without work)")
    parser.add_argument("--compare", metavar="REV",
                        help="also run enrich as it is in git revision REV, in every round")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    for name in ("--bootstrap", "--raw", "--out", "--dlq", "--group", "--asn-db", "--tree"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=600, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import logging

        if args.tree:  # the revision compared: its enrich and falco_gitlab packages come first
            sys.path.insert(0, args.tree)

        logging.basicConfig(level=logging.WARNING)
        args.mode = args.child
        print(json.dumps(asyncio.run(run_worker(args))))
        return 0

    broker = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-enrich-"))
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not bootstrap:
        from falco_gitlab.devkafka import LocalKafka

        broker = LocalKafka(tmp / "kafka", die_with_parent=True)
        print("starting a local Kafka broker ...", file=sys.stderr)
        bootstrap = broker.start()
    try:
        raw = f"bench-raw-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        asyncio.run(fill(bootstrap, raw, args.partitions, args.events))
        print(f"filled {raw} ({args.partitions} partitions) with {args.events} events in "
              f"{time.perf_counter() - started:.1f} s on {bootstrap}", file=sys.stderr)
        asn_db = build_asn_db(tmp)
        modes = list(MODES[:4] if args.diagnose else MODES[:2])
        tree = None
        if args.compare:
            tree = extract_revision(args.compare, tmp / "compare")
            modes.append("enrich-compare")
        results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        # A fresh broker serves the first runs much slower (JIT warm-up), which would count against
        # whichever worker runs first: one unreported run of each kind first.
        for _ in range(args.warmup):
            for mode in ("passthrough", "enrich"):
                report = child(mode, bootstrap, raw, args.events, args.batch_size, asn_db, None, tree)
                print(f"  warm-up {mode}: {report['events'] / report['seconds']:.0f} events/s",
                      file=sys.stderr)
        for _ in range(args.rounds):
            for mode in modes:
                report = child(mode, bootstrap, raw, args.events, args.batch_size, asn_db, args.profile,
                               tree)
                results[mode].append(report)
                print(f"  {mode}: {report['events'] / report['seconds']:.0f} events/s", file=sys.stderr)
    finally:
        if broker is not None:
            broker.stop(purge=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results, args)
    if args.json:
        print(json.dumps(results))
    return 0


def print_table(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    def rate(run: dict[str, Any]) -> float:
        return float(run["events"] / run["seconds"])

    def cpu(run: dict[str, Any]) -> float:
        return float(1e6 * run["cpu_seconds"] / run["events"])

    print(f"\none worker, {args.events} events, batch {args.batch_size}, {args.partitions} partitions, "
          f"{args.warmup} warm-up + {args.rounds} round(s): median (best); cpu_count={os.cpu_count()}")
    print(f"{'worker':<16}{'events/s':>17}{'CPU µs/event':>19}{'DLQ':>6}")
    for mode, label in LABELS.items():
        if mode not in results:
            continue
        label = label.replace("REV", str(args.compare))
        runs = results[mode]
        print(f"{label:<16}{statistics.median(map(rate, runs)):>9.0f} ({max(map(rate, runs)):>5.0f})"
              f"{statistics.median(map(cpu, runs)):>12.1f} ({min(map(cpu, runs)):>4.1f})"
              f"{runs[0]['dlq']:>6}")
    enrich_rates, pass_rates = list(map(rate, results["enrich"])), list(map(rate, results["passthrough"]))
    per_round = [e / p for e, p in zip(enrich_rates, pass_rates, strict=True)]
    of_medians = statistics.median(enrich_rates) / statistics.median(pass_rates)
    print(f"ratio enrich / pass-through (events/s): {of_medians:.0%} of the medians, "
          f"{statistics.median(per_round):.0%} median of the rounds, "
          f"{max(enrich_rates) / max(pass_rates):.0%} of the best")
    if "enrich-compare" in results:
        old_rates = list(map(rate, results["enrich-compare"]))
        old_ratio = statistics.median([o / p for o, p in zip(old_rates, pass_rates, strict=True)])
        print(f"ratio enrich ({args.compare}) / pass-through (events/s): "
              f"{statistics.median(old_rates) / statistics.median(pass_rates):.0%} of the medians, "
              f"{old_ratio:.0%} median of the rounds, {max(old_rates) / max(pass_rates):.0%} of the best")


if __name__ == "__main__":
    sys.exit(main())
