"""Getting records to Kafka without losing any: directly when Kafka answers in time, else via the spool.

The protocol (see docs/ingest.md, "Spool"):

* **Direct path.** A request's records are handed to the idempotent producer in order and the request
  waits for all acknowledgements, at most ``publish_timeout_s``.
* **Fallback.** Records not acknowledged by then (or whose send failed) are appended to the spool
  (fsynced) and the request is answered 202. A send that merely timed out may still be in the
  producer and reach Kafka later: its future is kept, and when it succeeds the spooled copy is marked
  done, so the drainer does not publish it a second time.
* **Backlog mode.** While the spool holds anything (or the producer is not running), new records go
  straight to the spool, behind the older ones, so that order is kept (per actor: one key, one
  partition) and a struggling broker is not hammered with requests that will time out.
* **Drainer.** A background task reads the spool in order and publishes it. A record whose original
  send is still in flight is not sent again: the drainer waits for that send's outcome and re-sends
  only if it failed. Acknowledged records are marked done; fully done segment files are deleted. When
  the spool is empty, requests use the direct path again.
* **Restart.** Spool directories are per process (``<spool.dir>/w<n>``, held with ``flock``). At startup
  and every half minute each process adopts unlocked siblings that still hold records (left by a
  previous run, a crashed worker, or a run with more workers) and drains them.

The residual duplicate: if the process dies after Kafka stored a record but before the done mark was
written, the next run publishes that record again. Both copies carry the same ``gitlab-event-uid``
header, so the consumer can drop the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final

from ingest.metrics import IngestMetrics
from ingest.publisher import DeliveryFuture, KafkaPublisher, PublishError, describe, is_permanent, settle
from ingest.records import OutRecord
from ingest.spool import SlotLock, Spool, SpoolEntry, other_slots, try_lock_slot

log = logging.getLogger(__name__)

ADOPT_INTERVAL_S: Final = 30.0
MAX_BACKOFF_S: Final = 5.0
# A request whose deadline is this close is woken with the ones due (the loop runs timers up to its clock
# resolution early: without it, the deadline timer could be re-armed for the same instant again and again).
_DEADLINE_SLACK_S: Final = 0.001


class Outcome(enum.Enum):
    PUBLISHED = "published"
    SPOOLED = "spooled"


@dataclass(eq=False)
class _SpoolState:
    spool: Spool
    lock: SlotLock | None
    adopted: bool = False
    # Sends whose outcome decides whether a spooled record still has to be published.
    inflight: dict[int, DeliveryFuture] = field(default_factory=dict)
    acked: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spool.directory.name


class Delivery:
    def __init__(
        self,
        publisher: KafkaPublisher,
        spool: Spool,
        metrics: IngestMetrics,
        *,
        publish_timeout_s: float,
        drain_batch: int = 500,
        start_timeout_s: float = 30.0,
        lock: SlotLock | None = None,
        adopt_from: Path | None = None,
    ) -> None:
        self._publisher = publisher
        self._own = _SpoolState(spool, lock)
        self._adopted: list[_SpoolState] = []
        self._metrics = metrics
        self._publish_timeout = publish_timeout_s
        self._drain_batch = drain_batch
        self._start_timeout = start_timeout_s
        self._adopt_from = adopt_from
        self._work = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._acks_scheduled = False
        # Requests waiting for acknowledgements, by deadline (one publish timeout: arrival order), and the
        # one timer for the earliest; a timer per request cost more than the rest of the waiting.
        self._deadlines: deque[tuple[float, _Acks]] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._halted = False
        # The loop deliver() runs on, taken once: on CPython 3.11 every asyncio.get_running_loop() makes a
        # getpid() system call (a fork check), about 0.25 us here, once per request otherwise.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kafka_up = False
        self._last_error: str | None = None
        metrics.spool_depth.set_function(lambda: [((), float(self.spool_depth))])
        metrics.spool_bytes.set_function(lambda: [((), float(self.spool_bytes))])
        metrics.kafka_up.set_function(lambda: [((), 1.0 if self._kafka_up else 0.0)])

    # -- state -------------------------------------------------------------------------------------------

    @property
    def kafka_up(self) -> bool:
        return self._kafka_up

    @property
    def spool_depth(self) -> int:
        return sum(state.spool.pending for state in self._states())

    @property
    def spool_bytes(self) -> int:
        return sum(state.spool.size_bytes for state in self._states())

    @property
    def spool_writable(self) -> bool:
        spool = self._own.spool
        return spool.free_bytes() > 0 and not self._stopping

    def _states(self) -> list[_SpoolState]:
        return [*self._adopted, self._own]

    def _set_kafka(self, up: bool, error: BaseException | None = None) -> None:
        if up != self._kafka_up:
            if up:
                log.info("kafka: acknowledging again")
            else:
                log.warning(
                    "kafka: not acknowledging; spooling", extra={"error": describe(error) if error else ""}
                )
        self._kafka_up = up

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self, connect_timeout_s: float = 3.0) -> None:
        """Try to connect briefly (serving starts either way), then start the drainer."""
        if self._adopt_from is not None:
            await self._adopt()
        try:
            await self._publisher.start(connect_timeout_s)
            self._set_kafka(True)
        except PublishError as exc:
            log.warning(
                "kafka: not reachable at startup; accepting into the spool until it is",
                extra={"error": describe(exc)},
            )
        self._drainer = asyncio.create_task(self._drain_loop(), name="spool-drainer")
        if self.spool_depth:
            log.info(
                "spool: records left by a previous run will be published",
                extra={"records": self.spool_depth},
            )
            self._work.set()

    async def stop(self, timeout_s: float) -> None:
        """Publish what can be published within ``timeout_s``; what cannot stays in the spool."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._stopping = True
        self._work.set()
        while (  # noqa: ASYNC110 (polls several conditions, one of them the clock)
            self.spool_depth
            and self._kafka_up
            and self._drainer is not None
            and not self._drainer.done()
            and loop.time() < deadline
        ):
            await asyncio.sleep(0.05)
        self._halted = True
        if self._drainer is not None:
            self._drainer.cancel()
            await asyncio.wait([self._drainer])
        remaining = max(0.0, deadline - loop.time())
        await self._publisher.close(remaining if self._kafka_up else min(remaining, 1.0))
        await asyncio.sleep(0)  # let delivery callbacks run
        self._flush_acks()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        while self._deadlines:  # nobody should still wait (the server stopped first); if so, not forever
            self._deadlines.popleft()[1].expire()
        for state in self._states():
            await state.spool.close()
            if state.lock is not None:
                state.lock.release()
        left = self.spool_depth
        if left:
            log.warning("spool: records left for the next start", extra={"records": left})

    # -- the request path ----------------------------------------------------------------------------------

    def _must_spool(self) -> bool:
        # Older records waiting (ours or adopted ones) go first: new ones queue behind them.
        publisher = self._publisher
        return (
            self._stopping
            or not publisher.started
            or publisher.broken
            or not self._own.spool.is_idle
            or bool(self._adopted and any(state.spool.pending for state in self._adopted))
        )

    async def deliver(self, records: list[OutRecord]) -> Outcome:
        """Publish ``records`` (all acknowledged: PUBLISHED) or make them durable locally (SPOOLED).

        Raises SpoolFull / SpoolError when neither is possible; nothing is then guaranteed.
        """
        if not records:
            return Outcome.PUBLISHED
        if self._must_spool():
            await self._spool(records, [None] * len(records))
            return Outcome.SPOOLED
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        started = loop.time()
        acks = _Acks(loop, len(records))
        error: BaseException | None = None
        try:
            # Handing over completes at once unless the producer's local queue is full; then the rest
            # waits for room, under the same deadline (a hand-over cancelled before it returns never
            # reaches Kafka). Waiting for the acknowledgements never cancels them: a late one still
            # marks the spooled copy done.
            deadline = started + self._publish_timeout
            try_send, report = self._publisher.try_send, acks.report
            for index, record in enumerate(records):
                if not try_send(record, partial(report, index)):
                    break
                acks.sent += 1
            if acks.sent < len(records):
                async with asyncio.timeout_at(deadline):
                    for index in range(acks.sent, len(records)):
                        await self._publisher.hand_over(records[index], partial(report, index))
                        acks.sent += 1
            if acks.left:
                self._watch(deadline, acks)
                # Inline rather than a coroutine of _Acks: one coroutine level less to resume per request.
                await acks.waiter
        except TimeoutError:
            pass
        except Exception as exc:
            error = exc
        if error is None and acks.all_stored:
            self._metrics.publish_latency.observe(loop.time() - started)
            self._count_published(records, "direct")
            if not self._kafka_up:
                self._set_kafka(True)
            return Outcome.PUBLISHED
        if error is None:
            error = next(
                (e for e in acks.outcomes if isinstance(e, PublishError)),
                TimeoutError(f"no acknowledgement within {self._publish_timeout} s"),
            )
        self._set_kafka(False, error)
        stored = [r for r, outcome in zip(records, acks.outcomes, strict=True) if outcome is None]
        self._count_published(stored, "direct")
        left = [(index, r) for index, r in enumerate(records) if acks.outcomes[index] is not None]
        await self._spool([r for _, r in left], [acks.late_future(index) for index, _ in left])
        return Outcome.SPOOLED

    def _watch(self, deadline: float, acks: _Acks) -> None:
        """Wake ``acks``' request at ``deadline`` if its acknowledgements have not all come by then."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].waiter.done():  # answered: forget them as they come first
            deadlines.popleft()
        deadlines.append((deadline, acks))
        if self._deadline_timer is None:
            self._deadline_timer = asyncio.get_running_loop().call_at(deadline, self._expire_due)

    def _expire_due(self) -> None:
        self._deadline_timer = None
        deadlines = self._deadlines
        loop = asyncio.get_running_loop()
        due = loop.time() + _DEADLINE_SLACK_S
        while deadlines and (deadlines[0][0] <= due or deadlines[0][1].waiter.done()):
            deadlines.popleft()[1].expire()
        if deadlines:
            self._deadline_timer = loop.call_at(deadlines[0][0], self._expire_due)

    def _count_published(self, records: list[OutRecord], path: str) -> None:
        if not records:
            return
        topic = records[0].topic
        if len(records) == 1 or all(record.topic == topic for record in records):
            self._metrics.events_published.inc(topic, path, amount=len(records))
            return
        for record in records:
            self._metrics.events_published.inc(record.topic, path)

    async def _spool(self, records: list[OutRecord], futures: list[DeliveryFuture | None]) -> None:
        state = self._own

        def track(seqs: list[int]) -> None:
            # Before the write: the drainer must never see these records without their sends.
            for seq, record, future in zip(seqs, records, futures, strict=True):
                if future is not None:
                    self._track(state, seq, record.topic, future, "late")

        try:
            seqs = await state.spool.append(records, assigned=track)
        except BaseException:
            for future in futures:
                if future is not None:
                    for seq, tracked in list(state.inflight.items()):
                        if tracked is future:
                            del state.inflight[seq]
            raise
        for record in records:
            self._metrics.events_spooled.inc(record.topic)
        if state.acked:
            self._schedule_acks()
        self._work.set()
        del seqs

    # -- acknowledgements -----------------------------------------------------------------------------------

    def _track(self, state: _SpoolState, seq: int, topic: str, future: DeliveryFuture, path: str) -> None:
        state.inflight[seq] = future
        future.add_done_callback(partial(self._delivered, state, seq, topic, path))

    def _delivered(self, state: _SpoolState, seq: int, topic: str, path: str, future: DeliveryFuture) -> None:
        if not _succeeded(future):
            _consume(future)
            return
        self._metrics.events_published.inc(topic, path)
        state.acked.append(seq)
        self._schedule_acks()

    def _schedule_acks(self) -> None:
        if not self._acks_scheduled:
            self._acks_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._acks_scheduled = False
        for state in self._states():
            if state.acked:
                frontier = state.spool.durable_next
                ready = [seq for seq in state.acked if seq < frontier]
                # Acknowledged before their spool write finished: recorded once it has.
                state.acked = [seq for seq in state.acked if seq >= frontier]
                for seq in ready:
                    state.inflight.pop(seq, None)
                state.spool.mark_done(ready)
                self._set_kafka(True)

    # -- the drainer --------------------------------------------------------------------------------------

    async def _drain_loop(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.1
        last_adopt = loop.time()
        while not self._halted:
            if self._adopt_from is not None and loop.time() - last_adopt >= ADOPT_INTERVAL_S:
                last_adopt = loop.time()
                await self._adopt()
            await self._release_drained()
            if not any(state.spool.pending for state in self._states()):
                self._work.clear()
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # coincides with the event being set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ADOPT_INTERVAL_S):
                        await self._work.wait()
                continue
            if not await self._ensure_producer():
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            ok = True
            for state in self._states():
                if state.spool.pending and not await self._drain_once(state):
                    ok = False
                    break
            if ok:
                backoff = 0.1
            else:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _ensure_producer(self) -> bool:
        if self._publisher.broken:
            log.warning("kafka: the producer failed; starting a new one")
            await self._publisher.discard()
        if self._publisher.started:
            return True
        try:
            await self._publisher.start(self._start_timeout)
        except PublishError as exc:
            self._set_kafka(False, exc)
            return False
        return True

    async def _drain_once(self, state: _SpoolState) -> bool:
        """Publish the next batch of ``state``'s spool; False when Kafka failed (read again later)."""
        entries = await state.spool.read_pending(self._drain_batch)
        sent: list[tuple[SpoolEntry, DeliveryFuture]] = []
        failed: BaseException | None = None
        for entry in entries:
            prior = state.inflight.get(entry.seq)
            if prior is not None:
                if not prior.done():
                    # Sent before and still with the producer: its outcome decides (no second copy).
                    await asyncio.wait([prior])
                if _succeeded(prior):
                    state.acked.append(entry.seq)  # acknowledged: no second copy
                    continue
                state.inflight.pop(entry.seq, None)
                error = _error(prior)
                if error is not None and is_permanent(error):
                    self._reject(state, entry, error)
                    continue
            if state.spool.is_done(entry.seq):
                # Acknowledged while this batch was being worked on (an earlier send completed).
                continue
            try:
                future = await self._publisher.send(entry.record)
            except PublishError as exc:
                if is_permanent(exc):
                    self._reject(state, entry, exc)
                    continue
                failed = exc
                break
            self._track(state, entry.seq, entry.record.topic, future, "spool")
            sent.append((entry, future))
        if sent:
            await asyncio.wait([future for _, future in sent])
            for entry, future in sent:
                error = _error(future)
                if error is None:
                    continue
                state.inflight.pop(entry.seq, None)
                if is_permanent(error):
                    self._reject(state, entry, error)
                elif failed is None:
                    failed = error
        self._flush_acks()
        if failed is not None:
            self._set_kafka(False, failed)
            state.spool.rewind()
            return False
        return True

    def _reject(self, state: _SpoolState, entry: SpoolEntry, error: BaseException) -> None:
        self._metrics.spool_rejected.inc()
        try:
            state.spool.quarantine(entry, describe(error))
        except OSError as exc:
            log.error("spool: cannot keep a rejected record", extra={"error": str(exc), "seq": entry.seq})
            state.spool.mark_done([entry.seq])

    # -- adoption -----------------------------------------------------------------------------------------

    async def _adopt(self) -> None:
        base = self._adopt_from
        if base is None:
            return
        held = {state.name for state in self._states()}
        for name in other_slots(base, self._own.name):
            if name in held:
                continue
            lock = try_lock_slot(base, name)
            if lock is None:
                continue
            own = self._own.spool
            spool = Spool(
                lock.directory, max_bytes=own.max_bytes, segment_bytes=own.segment_bytes, fsync=own.fsync
            )
            try:
                await asyncio.to_thread(spool.open)
            except OSError as exc:
                log.error("spool: cannot open a sibling spool", extra={"slot": name, "error": str(exc)})
                lock.release()
                continue
            if not spool.pending:
                await spool.close()
                lock.release()
                continue
            log.info(
                "spool: adopting records left by another process",
                extra={"slot": name, "records": spool.pending, "bytes": spool.size_bytes},
            )
            self._adopted.append(_SpoolState(spool, lock, adopted=True))
            self._work.set()

    async def _release_drained(self) -> None:
        for state in list(self._adopted):
            if not state.spool.pending and not state.inflight:
                self._adopted.remove(state)
                await state.spool.close()
                if state.lock is not None:
                    state.lock.release()
                log.info("spool: adopted spool drained", extra={"slot": state.name})


class _Pending:
    """The outcome of a record handed over whose report has not come yet."""


_PENDING: Final = _Pending()


class _Acks:
    """The acknowledgements of one request's records, with one waiter for all of them (not a future per
    record: the direct path is the hot path)."""

    __slots__ = ("_late", "_loop", "left", "outcomes", "sent", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self._loop = loop
        self.waiter: asyncio.Future[None] = loop.create_future()
        self.left = count  # records without their report yet
        self.sent = 0  # records [0, sent) were handed over
        # Per record: None (stored by Kafka), the PublishError, or _PENDING.
        self.outcomes: list[PublishError | _Pending | None] = [_PENDING] * count
        # Records given up on (spooled) whose report may still come: it then resolves these futures.
        self._late: dict[int, DeliveryFuture] | None = None

    @property
    def all_stored(self) -> bool:
        return self.left == 0 and not any(self.outcomes)

    def report(self, index: int, error: PublishError | None) -> None:
        if self._late is not None:
            future = self._late.pop(index, None)
            if future is not None:
                settle(future, error)
                return
        self.outcomes[index] = error
        self.left -= 1
        if self.left == 0 and not self.waiter.done():
            self.waiter.set_result(None)

    def expire(self) -> None:
        """The deadline: wake the request whatever is still outstanding."""
        if not self.waiter.done():
            self.waiter.set_result(None)

    def late_future(self, index: int) -> DeliveryFuture | None:
        """For a record being spooled: a future resolved by its report if it is still in flight."""
        if index >= self.sent or self.outcomes[index] is not _PENDING:
            return None  # never sent, or failed: the spooled copy must be sent again
        if self._late is None:
            self._late = {}
        future: DeliveryFuture = self._loop.create_future()
        self._late[index] = future
        return future


def _succeeded(future: DeliveryFuture | None) -> bool:
    return future is not None and future.done() and not future.cancelled() and future.exception() is None


def _error(future: DeliveryFuture) -> BaseException | None:
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()


def _consume(future: DeliveryFuture) -> None:
    """Mark a failed future's exception as retrieved (no 'never retrieved' warnings)."""
    if future.done() and not future.cancelled():
        future.exception()
