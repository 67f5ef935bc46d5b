"""The Falco plugin's live mode under SIGKILL (issue #9): every event reaches the host at least once, and
none after the group's committed offset is ever skipped.

The plugin is driven by the project's C host (``tests/host/plugin_host.c``, built with the helpers of
``tests/plugin_support.py``), which calls the plugin API the way Falco does and prints every event it
receives (flushed line by line, so a SIGKILL loses no printed line). While enriched records are being
produced (transactionally, like enrich), the host is SIGKILLed several times and reopened in live mode
with the same consumer group. Checked, per run and partition, against the committed offsets read before
each reopen and the topic's record offsets:

* the run starts exactly at the committed offset and then delivers every record in order, without a
  gap (nothing after the committed offset is skipped);
* the offset committed by a killed run never exceeds what it delivered (at least once);
* the union of all runs is every event.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from enrich.flatten import flatten
from falco_gitlab.model import encode_enriched
from tests.plugin_support import (
    create_topic,
    delete_topics,
    plugin_config,
    produce,
    unique,
)
from tests.reliability_support import numbered_events, plugin_build, publish

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

RECEIVED_AT = 1_717_000_000_000_000_000


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return plugin_build(tmp_path_factory)


@dataclass
class HostProcess:
    """The C host in live mode, its stdout read line by line as it comes."""

    argv: list[str]
    stderr_path: Path
    events: list[str] = field(default_factory=list)  # gitlab.event_id of each event, in order
    lines: list[dict[str, Any]] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    reader: threading.Thread | None = None

    def start(self) -> None:
        with self.stderr_path.open("ab") as stderr:
            self.process = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=stderr, cwd="/")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = json.loads(raw)
            if line.get("kind") == "event":
                self.events.append(line["values"]["gitlab.event_id"])
            else:
                self.lines.append(line)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        assert self.reader is not None
        self.reader.join(10)

    def wait_for(self, count: int, within: float) -> None:
        deadline = time.monotonic() + within
        while len(self.events) < count:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"host exited {self.process.returncode}: {self.lines}\n"
                                     f"{self.stderr_path.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"host delivered {len(self.events)} of {count} events in {within} s: "
                                     f"{self.stderr_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.02)


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets (-1 when none), read without joining the group."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
    finally:
        consumer.close()
    return {tp.partition: (tp.offset if tp.offset >= 0 else -1) for tp in found}


def topic_layout(bootstrap: str, topic: str) -> dict[str, tuple[int, int]]:
    """event id -> (partition, offset) of every committed record of ``topic``."""
    from confluent_kafka import Consumer, TopicPartition

    from falco_gitlab.model import decode_enriched

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("layout"),
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        partitions = sorted(metadata.partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        layout: dict[str, tuple[int, int]] = {}
        done: set[int] = set()
        deadline = time.monotonic() + 60
        while len(done) < len(partitions) and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=0.5):
                if message.error() is not None:
                    done.add(message.partition())
                    continue
                event_id = str(decode_enriched(message.value()).fields["event_id"])
                layout[event_id] = (message.partition(), message.offset())
        return layout
    finally:
        consumer.close()


@pytest.fixture
def live_topic(kafka_bootstrap: str) -> Iterator[str]:
    name = unique("reliability-live")
    create_topic(kafka_bootstrap, name, 3)
    yield name
    delete_topics(kafka_bootstrap, [name])


def test_live_mode_host_sigkilled_and_reopened_delivers_everything_without_skipping(
    plugin: tuple[Path, Path], kafka_bootstrap: str, live_topic: str, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    library, host = plugin
    events = numbered_events(1200)
    values = [encode_enriched(flatten(e.body, destination="gitlab-prod", header_event_type=e.event_type,
                                      received_at_ns=RECEIVED_AT)) for e in events]
    group = unique("group")
    config = plugin_config(
        kafka_bootstrap, live_topic, group_id=group, batch_size=25, commit_interval_ms=200,
        initial_offset="earliest",
        # A killed host's membership ends after 6 s (librdkafka's default is 45 s).
        kafka={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
    )
    argv = [str(host), "--lib", str(library), "--config", config, "--open", "live", "--field",
            "gitlab.event_id", "--timeout-ms", "300000"]

    # Enrich-like producer: transactions of 100 records, while the host runs and is killed.
    produced = threading.Event()
    failure: list[BaseException] = []

    def producer() -> None:
        try:
            for start in range(0, len(values), 100):
                produce(kafka_bootstrap, live_topic, values[start : start + 100])
                time.sleep(0.3)
        except BaseException as exc:
            failure.append(exc)
        finally:
            produced.set()

    feeder = threading.Thread(target=producer, daemon=True)
    feeder.start()
    runs: list[HostProcess] = []
    committed_before: list[dict[int, int]] = []
    # Events delivered by the run before its SIGKILL, and whether to wait first until the run has
    # committed something (a kill between two commits) or not (a kill right after a hand-over).
    kills_after = [(150, False), (300, True), (40, False)]
    started = time.monotonic()
    all_ids = {e.event_id for e in events}
    try:
        for run, plan in enumerate([*kills_after, None]):
            committed_before.append(committed_offsets(kafka_bootstrap, group, live_topic, 3))
            host_run = HostProcess(argv, tmp_path / f"host-{run}.stderr")
            runs.append(host_run)
            host_run.start()
            if plan is not None:
                count, after_a_commit = plan
                host_run.wait_for(count, within=90)
                deadline = time.monotonic() + 15
                while after_a_commit and time.monotonic() < deadline:
                    now = committed_offsets(kafka_bootstrap, group, live_topic, 3)
                    if sum(now.values()) > sum(committed_before[run].values()):
                        break
                    time.sleep(0.05)
                host_run.kill()
                continue
            # The last run: until everything was delivered at least once (by any run) and the group's
            # committed offsets reached the end of every partition (it caught up and committed).
            produced.wait(120)
            ends: dict[int, int] = {}
            for partition, offset in topic_layout(kafka_bootstrap, live_topic).values():
                ends[partition] = max(ends.get(partition, 0), offset + 1)  # after the last record
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                delivered = {i for r in runs for i in r.events}
                now = committed_offsets(kafka_bootstrap, group, live_topic, 3)
                if delivered >= all_ids and all(now[p] >= ends[p] for p in ends):
                    break
                time.sleep(0.2)
            assert time.monotonic() < deadline, f"the last run did not catch up: committed {now}, end {ends}"
            host_run.kill()
        feeder.join(30)
        assert not failure, failure
        committed_after = committed_offsets(kafka_bootstrap, group, live_topic, 3)
    finally:
        for r in runs:
            if r.process is not None and r.process.poll() is None:
                r.process.kill()
                r.process.wait(10)

    layout = topic_layout(kafka_bootstrap, live_topic)
    assert set(layout) == all_ids, "the topic does not hold exactly the produced events"
    data_offsets: dict[int, list[int]] = defaultdict(list)
    for partition, offset in layout.values():
        data_offsets[partition].append(offset)
    for offsets in data_offsets.values():
        offsets.sort()

    delivered_counts = Counter(i for r in runs for i in r.events)
    missing = all_ids - set(delivered_counts)
    assert not missing, f"{len(missing)} events never reached the host, e.g. {sorted(missing)[:5]}"
    assert set(delivered_counts) <= all_ids

    commits = [*committed_before[1:], committed_after]
    for run, host_run in enumerate(runs):
        per_partition: dict[int, list[int]] = defaultdict(list)
        for event_id in host_run.events:
            partition, offset = layout[event_id]
            per_partition[partition].append(offset)
        for partition in range(3):
            got = per_partition.get(partition, [])
            start = max(committed_before[run][partition], 0)
            if got:
                # Starts at the committed offset and skips nothing after it: every record, in order.
                expected = [o for o in data_offsets[partition] if start <= o <= got[-1]]
                assert got == expected, (
                    f"run {run}, partition {partition}: committed {start}, delivered {got[:10]}..., "
                    f"expected {expected[:10]}...")
            # What this run left committed never passes what it delivered.
            after = commits[run][partition]
            limit = got[-1] + 1 if got else start
            assert after <= limit or (not got and after == committed_before[run][partition]), (
                f"run {run}, partition {partition}: committed {after} but delivered up to {limit}")

    redelivered = sum(n - 1 for n in delivered_counts.values())
    data = {
        "events": len(all_ids), "runs": len(runs), "sigkills": len(kills_after),
        "delivered_per_run": [len(r.events) for r in runs], "delivered_distinct": len(delivered_counts),
        "missing": len(missing), "redelivered_after_kill": redelivered,
        "committed_before_each_run": committed_before, "committed_at_end": committed_after,
        "seconds": round(time.monotonic() - started, 1),
    }
    publish(request.config, "faults", "plugin_host_sigkilled", data,
            f"plugin_host_sigkilled: events={len(all_ids)} delivered(distinct)={len(delivered_counts)} "
            f"missing={len(missing)} redelivered={redelivered} runs={data['delivered_per_run']} "
            f"sigkills={len(kills_after)} ({data['seconds']} s)")
