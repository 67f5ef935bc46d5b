"""Fault injection end to end (issue #9): GitLab-like sender -> ingest -> raw topic -> enrich -> enriched.

Each scenario sends a fixed workload of uniquely numbered events (ids ``base + n``), the way GitLab does
(one POST per event, never retried, given up after 8 s), while a fault is injected; ingest and enrich
run as real subprocesses (``falco-gitlab ingest -c``, ``falco-gitlab enrich -c``) so SIGKILL is real,
and the broker is the session's own (``kafka_broker``: stopped, paused and restarted on the same
address with its data). At the end the enriched topic is read with ``read_committed`` from the
beginning up to its end offsets and every event id counted:

    sent, acked (answered 2xx), delivered (acked and in the enriched topic), lost (acked, absent: must
    be 0), duplicated (enriched records beyond the first per id: must be 0)

The counts go to ``build/reliability/report.json`` and the pytest terminal summary. Like an
orchestrator, the harness restarts an enrich worker that exits on its own, so the accounting stays
exact; the scenario then fails all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from falco_gitlab.contract import HDR_EVENT_UID, header_value
from tests.reliability_support import (
    Accounting,
    EnrichProcess,
    Event,
    IngestProcess,
    Sender,
    end_offsets,
    enriched_event_ids,
    numbered_events,
    publish_accounting,
    read_topic,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@dataclass
class Pipeline:
    bootstrap: str
    directory: Path
    raw: str
    enriched: str
    dlq: str
    group: str
    ingest: IngestProcess
    workers: dict[int, EnrichProcess] = field(default_factory=dict)
    wanted: set[int] = field(default_factory=set)  # workers that should be running
    unexpected_exits: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def fault(self, text: str) -> None:
        self.faults.append(f"t+{time.monotonic() - self.started:.1f}s {text}")

    def worker(self, index: int) -> EnrichProcess:
        if index not in self.workers:
            self.workers[index] = EnrichProcess(
                self.directory, index, bootstrap=self.bootstrap, input_topic=self.raw,
                output_topic=self.enriched, dlq_topic=self.dlq, group_id=self.group, batch_size=50)
        return self.workers[index]

    def start_worker(self, index: int) -> None:
        self.worker(index).start()
        self.wanted.add(index)

    def kill_worker(self, index: int) -> None:
        self.wanted.discard(index)
        self.worker(index).kill()

    def stop_worker(self, index: int) -> int:
        self.wanted.discard(index)
        return self.worker(index).terminate()

    async def supervise(self) -> None:
        """Restart an enrich worker that exited on its own (as Kubernetes would), and say so (the
        scenario then fails, after its accounting)."""
        while True:
            await asyncio.sleep(0.5)
            for index in sorted(self.wanted):
                worker = self.workers[index]
                if not worker.alive():
                    code = worker.process.returncode if worker.process else None
                    self.unexpected_exits.append(f"enrich-{index} exited {code}")
                    self.fault(f"enrich-{index} exited on its own ({code}); restarted")
                    worker.start()

    async def enriched_end(self) -> int:
        return sum((await end_offsets(self.bootstrap, self.enriched)).values())

    def logs(self) -> str:
        parts = [f"--- ingest.log\n{self.ingest.log_tail(3000)}"]
        parts += [f"--- enrich-{i}.log\n{w.log_tail(3000)}" for i, w in sorted(self.workers.items())]
        return "\n".join(parts)


@pytest.fixture
async def pipeline(
    kafka_bootstrap: str, topic: Callable[..., str], tmp_path: Path
) -> AsyncIterator[Pipeline]:
    raw, enriched, dlq = topic(4), topic(2), topic(1)
    ingest = IngestProcess(tmp_path, bootstrap=kafka_bootstrap, topic=raw, dlq_topic=dlq)
    group = f"reliability-{uuid.uuid4().hex[:8]}"
    pipe = Pipeline(kafka_bootstrap, tmp_path, raw, enriched, dlq, group, ingest)
    supervisor: asyncio.Task[None] | None = None
    try:
        ingest.start()
        await ingest.wait_healthy()
        pipe.start_worker(0)
        supervisor = asyncio.create_task(pipe.supervise())
        pipe.started = time.monotonic()
        yield pipe
    finally:
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        for worker in pipe.workers.values():
            if worker.alive():
                worker.process.kill()  # type: ignore[union-attr]
                worker.process.wait(10)  # type: ignore[union-attr]
        if ingest.alive():
            ingest.process.kill()  # type: ignore[union-attr]
            ingest.process.wait(10)  # type: ignore[union-attr]


async def when(predicate: Callable[[], bool], within: float = 120.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def spool_bytes_on_disk(ingest: IngestProcess) -> int:
    return sum(p.stat().st_size for p in ingest.spool_dir.glob("w*/seg-*.spool"))


async def finish(pipe: Pipeline, scenario: str, events: list[Event], sender: Sender,
                 config: pytest.Config, **extra: Any) -> Accounting:
    """Wait until every acked event is enriched (or 120 s), settle, stop everything gracefully, read the
    enriched topic once more, account, publish, and assert nothing was lost or duplicated."""
    acked = sender.acked

    async def complete() -> bool:
        present = set(enriched_event_ids(await read_topic(pipe.bootstrap, pipe.enriched)))
        return acked <= present

    deadline = time.monotonic() + 120
    while not await complete() and time.monotonic() < deadline:  # noqa: ASYNC110 (polls Kafka)
        await asyncio.sleep(2.0)
    await asyncio.sleep(3.0)  # late duplicates, if any, have time to show up
    ingest_code = pipe.ingest.terminate()
    codes = {i: pipe.stop_worker(i) for i, w in sorted(pipe.workers.items()) if w.alive()}
    records = await read_topic(pipe.bootstrap, pipe.enriched)
    dead = await read_topic(pipe.bootstrap, pipe.dlq)
    raw = await read_topic(pipe.bootstrap, pipe.raw)
    uids = Counter(header_value(list(r.headers), HDR_EVENT_UID) for r in raw)
    accounting = Accounting.compute(
        scenario, sender.sent, acked, enriched_event_ids(records),
        outcomes=sender.by_outcome(), faults=pipe.faults, seconds=time.monotonic() - pipe.started,
        extra={
            "raw_records": len(raw),
            "raw_uid_duplicates": sum(n - 1 for n in uids.values()),  # dropped by enrich's uid window
            "dlq_records": len(dead),
            "worker_restarts_unexpected": pipe.unexpected_exits,
            "answers_over_8s": len(sender.slow),
            "exit_codes": {"ingest": ingest_code, **{f"enrich-{i}": c for i, c in codes.items()}},
            **extra,
        },
    )
    publish_accounting(config, accounting)
    assert accounting.lost == 0, f"{accounting.line()}\nlost e.g. {accounting.lost_ids}\n{pipe.logs()}"
    assert accounting.duplicated == 0, (
        f"{accounting.line()}\nduplicated e.g. {accounting.duplicated_ids}\n{pipe.logs()}")
    assert not dead, f"valid events dead-lettered: {[dict(r.headers) for r in dead[:3]]}"
    # A worker that died on its own was restarted (so the counts above are still exact), but it is a
    # failure: nothing in these scenarios may crash a worker.
    assert not pipe.unexpected_exits, f"{pipe.unexpected_exits}\n{pipe.logs()}"
    assert ingest_code == 0, pipe.ingest.log_tail()
    assert all(code == 0 for code in codes.values()), (codes, pipe.logs())
    leftover = spool_bytes_on_disk(pipe.ingest)
    assert leftover == 0, f"{leftover} spool bytes left after a clean shutdown with Kafka up"
    return accounting


async def sending(sender: Sender, events: list[Event]) -> asyncio.Task[None]:
    return asyncio.create_task(sender.send(events))


async def wind_down(pipe: Pipeline, sender: Sender, task: asyncio.Task[None], tail_s: float = 2.0) -> None:
    """Paced traffic for ``tail_s`` more seconds after the last fault, then the rest of the fixed
    workload at full speed (so the run does not last longer than the faults need)."""
    await asyncio.sleep(tail_s)
    pipe.fault(f"faults over after {sender.started} events; the rest at full speed")
    sender.hurry()
    await task


# --- the broker is stopped mid-load -------------------------------------------------------------------


async def test_broker_stopped_mid_load_and_restarted(
    pipeline: Pipeline, kafka_broker: Any, request: pytest.FixtureRequest
) -> None:
    events = numbered_events(1500)
    sender = Sender(pipeline.ingest.url, rate=100)
    task = await sending(sender, events)
    await when(lambda: sender.started >= 250)
    pipeline.fault("broker stop (SIGTERM, controlled shutdown)")
    await asyncio.to_thread(kafka_broker.stop)
    stopped_at = time.monotonic()
    await asyncio.sleep(5.0)
    pipeline.fault(f"broker start (down {time.monotonic() - stopped_at:.1f} s)")
    await asyncio.to_thread(kafka_broker.start)
    pipeline.fault(f"broker answering (down {time.monotonic() - stopped_at:.1f} s)")
    await wind_down(pipeline, sender, task)
    outcomes = sender.by_outcome()
    assert outcomes.get("202", 0) > 0, f"the outage did not make ingest spool anything: {outcomes}"
    await finish(pipeline, "broker_stopped", events, sender, request.config)


# --- an ingest worker is SIGKILLed mid-load ------------------------------------------------------------


async def test_ingest_sigkilled_mid_load_and_restarted_with_its_spool(
    pipeline: Pipeline, kafka_broker: Any, request: pytest.FixtureRequest
) -> None:
    events = numbered_events(1500)
    sender = Sender(pipeline.ingest.url, rate=100)
    ingest = pipeline.ingest
    task = await sending(sender, events)
    # 1. Plain crash under load (Kafka up): requests in flight fail, the rest resumes after the restart.
    await when(lambda: sender.started >= 150)
    ingest.kill()
    pipeline.fault("ingest SIGKILL (Kafka up)")
    await asyncio.sleep(1.0)
    await ingest.restart()
    pipeline.fault("ingest restarted")
    # 2. Crash with a full spool: the broker hangs (SIGSTOP), requests are spooled (202), then SIGKILL.
    await when(lambda: sender.started >= 350)
    await asyncio.to_thread(kafka_broker.pause)
    pipeline.fault("broker paused (SIGSTOP)")
    try:
        spooled_before = sender.by_outcome().get("202", 0)
        await when(lambda: sender.by_outcome().get("202", 0) >= spooled_before + 60, within=30)
        spool_bytes = spool_bytes_on_disk(ingest)
        ingest.kill()
        pipeline.fault(f"ingest SIGKILL with {spool_bytes} spool bytes on disk")
    finally:
        await asyncio.to_thread(kafka_broker.resume)
        pipeline.fault("broker resumed")
    assert spool_bytes > 0, "nothing was spooled before the kill"
    await ingest.restart()
    pipeline.fault("ingest restarted on the same spool directory")
    # 3. Crash while the restarted ingest drains what the previous one left.
    await asyncio.sleep(0.3)
    ingest.kill()
    pipeline.fault("ingest SIGKILL while draining the adopted spool")
    await asyncio.sleep(0.5)
    await ingest.restart()
    pipeline.fault("ingest restarted")
    await wind_down(pipeline, sender, task)
    await finish(pipeline, "ingest_sigkilled", events, sender, request.config, ingest_kills=ingest.kills)


# --- enrich workers are SIGKILLed mid-stream; a second worker joins and leaves ------------------------------


def records_in(worker: EnrichProcess) -> int:
    """The worker's latest records_in counter (periodic counters line, or its final one)."""
    found = re.findall(r"records_in=(\d+)", worker.log_of_this_run())
    return int(found[-1]) if found else 0


async def test_enrich_sigkilled_mid_stream_and_a_second_worker_joins_and_leaves(
    pipeline: Pipeline, request: pytest.FixtureRequest
) -> None:
    events = numbered_events(3000)
    sender = Sender(pipeline.ingest.url, rate=75)
    task = await sending(sender, events)

    async def progressing(since: int, by: int = 60) -> int:
        """Wait until the enriched topic grew by ``by`` since ``since``: the worker is mid-stream."""
        deadline = time.monotonic() + 90
        while (end := await pipeline.enriched_end()) < since + by:
            if time.monotonic() > deadline:
                raise AssertionError(f"enrich made no progress:\n{pipeline.logs()}")
            await asyncio.sleep(0.2)
        return end

    mark = 0
    for kill in range(1, 4):
        mark = await progressing(mark)
        pipeline.kill_worker(0)
        pipeline.fault(f"enrich-0 SIGKILL #{kill} (enriched end offset {mark})")
        await asyncio.sleep(0.5)
        pipeline.start_worker(0)
    mark = await progressing(mark)
    pipeline.start_worker(1)
    pipeline.fault("enrich-1 starts")
    second = pipeline.worker(1)
    await when(lambda: any(a != "none" for a in second.assignments()), within=90)
    pipeline.fault(f"enrich-1 joined the group (rebalance): assigned {second.assignments()[-1].count('/')} "
                   "partitions")
    # enrich-1 takes its share of the stream (its counters are logged every second).
    await when(lambda: records_in(second) >= 50, within=60)
    before = len(pipeline.worker(0).assignments())
    code = pipeline.stop_worker(1)
    second_records = records_in(second)
    pipeline.fault(f"enrich-1 left the group (SIGTERM, exit {code}) after {second_records} records")
    assert code == 0, second.log_tail()
    assert second_records > 0, f"enrich-1 took no part in the stream:\n{second.log_tail()}"
    await when(lambda: len(pipeline.worker(0).assignments()) > before, within=60)
    pipeline.fault("enrich-0 took all partitions back (rebalance)")
    await wind_down(pipeline, sender, task)
    await finish(pipeline, "enrich_sigkilled_and_rebalanced", events, sender, request.config,
                 enrich_kills=pipeline.worker(0).kills, enrich_1_records=second_records)


