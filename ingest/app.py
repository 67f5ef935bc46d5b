"""The HTTP service: the webhook endpoint, health, readiness and metrics.

``create_service(config)`` builds a self-contained service (no globals): ``handle`` answers requests,
``running()`` is its startup/cleanup context (opens the spool, starts the Kafka side and, on the way
out, flushes what it can and closes everything). ``serve`` runs it on aiohttp's server, on a TCP (or
TLS) socket, until SIGTERM/SIGINT.

Why aiohttp's low-level ``web.Server`` and not a ``web.Application``: the service has one POST endpoint
(any path: GitLab posts to whatever URL the destination names) and three GET pages, so a router earns
nothing, while the application's per-request work (route resolution, match info, middleware chain)
were 11-19 % of a minimal handler's CPU per request on the bench (``bench/README.md``, "Fourth round").

Routing, as a router with ``POST /{path:.*}`` and ``GET /healthz``, ``/readyz``, ``/metrics`` would do it:
POST on any path is the webhook; GET and HEAD serve the three pages; anything else is 405 (every path
takes POST), naming the allowed methods.

Answers (one line of text each, plus ``X-Request-Id``):

=====  ==========================================================================================
200    every event acknowledged by Kafka (or dropped as a duplicate)
202    accepted into the local spool (Kafka slow or unavailable); published when Kafka is back
400    malformed body (not JSON, not UTF-8, an array element that is not an object, empty array)
401    missing or wrong ``X-Gitlab-Event-Streaming-Token``
403    the source address is not in the destination's ``allow_networks``
408    the body did not arrive within ``server.body_timeout_s``
413    the body is larger than ``server.max_body_bytes``
503    Kafka did not acknowledge in time and the spool is full (or cannot be written)
=====  ==========================================================================================

Bodies of 400/408/413 answers to authenticated senders go to the dead-letter topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from falco_gitlab.config import ConfigError, read_secret
from falco_gitlab.contract import (
    HDR_DESTINATION,
    HDR_DLQ_REASON,
    HDR_DLQ_STAGE,
    HDR_EVENT_TYPE,
    HDR_EVENT_UID,
    HDR_RECEIVED_AT,
    HDR_REQUEST_ID,
)
from ingest.auth import TOKEN_HEADER, Authenticator, client_address, network_allowed
from ingest.body import BodyError, split_body
from ingest.config import (
    Destination,
    IngestConfig,
    Network,
    TlsSettings,
    parse_network,
    producer_max_request_size,
    resolve_destinations,
    resolve_tls,
    validate,
)
from ingest.dedup import DedupWindow
from ingest.delivery import Delivery, Outcome
from ingest.metrics import IngestMetrics, Registry, observe_row
from ingest.publisher import KafkaPublisher
from ingest.records import OutRecord
from ingest.spool import Spool, SpoolError, SpoolFull, acquire_slot

log = logging.getLogger("ingest")
access_log = logging.getLogger("ingest.access")

EVENT_TYPE_HEADER: Final = "X-Gitlab-Audit-Event-Type"
REQUEST_ID_HEADER: Final = "X-Request-Id"
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
SNAPSHOT_INTERVAL_S: Final = 2.0
SNAPSHOT_MAX_AGE_S: Final = 10.0
# Accepted requests (200/202) are logged one line each at DEBUG only; at INFO a summary of the traffic
# is logged this often instead (refusals and errors keep one line each at INFO / ERROR).
TRAFFIC_LOG_INTERVAL_S: Final = 60.0
# Allocations between two young-generation collections while serving (CPython's default: 700); see tune_gc.
GC_GEN0_THRESHOLD: Final = 50_000
# Header names whose values are never logged, even in debug mode (admins can add custom headers).
_SECRET_HINTS: Final = ("token", "authorization", "secret", "password", "cookie", "key", "signature")


@dataclass(eq=False)
class IngestState:
    config: IngestConfig
    destinations: list[Destination]
    auth: Authenticator
    trusted_proxies: tuple[Network, ...]
    metrics: IngestMetrics
    dedup: DedupWindow | None
    worker_index: int = 0
    share_metrics: bool = False
    delivery: Delivery | None = None
    slot: str = ""
    stopping: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # Request ids: 64 random bits per process, then a counter (32 hex digits, unique without a system
    # call per request; they name records, not secrets).
    request_id_prefix: str = field(default_factory=lambda: os.urandom(8).hex())
    request_counter: Iterator[int] = field(default_factory=itertools.count)
    # Requests answered per status (from the requests metric) at the last traffic summary, and events
    # accepted since then.
    traffic_reported: dict[str, float] = field(default_factory=dict)
    traffic_events: int = 0
    # Per destination name: what its accepted requests use (resolved once, not per request).
    routes: dict[str, _Route] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Route:
    """One destination's record header and the metric cells every accepted request of it adds to."""

    header: tuple[str, bytes]  # gitlab-destination
    received: list[float]  # events_received_total{destination}
    answered: list[float]  # requests_total{destination, status="200"}
    duration: list[float]  # request_duration_seconds{status="200"}: counts per bucket, +Inf, sum
    buckets: tuple[float, ...]

    @classmethod
    def of(cls, metrics: IngestMetrics, destination: str) -> _Route:
        return cls(
            header=(HDR_DESTINATION, destination.encode()),
            received=metrics.events_received.cell(destination),
            answered=metrics.requests.cell(destination, "200"),
            duration=metrics.request_duration.row("200"),
            buckets=metrics.request_duration.buckets,
        )


class IngestService:
    """One ingest process's service: its request handler and its startup/cleanup context."""

    def __init__(self, state: IngestState) -> None:
        self.state = state
        # What aiohttp's server (``web.Server``) passes to each connection's protocol handler.
        server = state.config.server
        self.server_options: dict[str, Any] = {
            "keepalive_timeout": server.idle_timeout_s,
            "max_line_size": server.max_line_size,
            "max_field_size": server.max_field_size,
            "max_headers": server.max_headers,
            "auto_decompress": False,
            # After an early answer (401, 408, 413), read and drop what the client still sends for at
            # most this long, then close: enough for a client to see the answer, not a slowloris hold.
            "lingering_time": min(1.0, server.body_timeout_s),
            "access_log": None,  # ingest logs each request itself, without secrets
        }
        self.handle: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]] = partial(_handle, state)

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Start the spool and the Kafka side; on exit stop them, flushing what Kafka takes in time.
        Requests must be served only inside it."""
        return _lifecycle(self.state)


def create_service(
    config: IngestConfig, *, worker_index: int = 0, share_metrics: bool | None = None
) -> IngestService:
    """Build the service for ``config`` (raises ConfigError on an invalid configuration)."""
    validate(config)
    destinations = resolve_destinations(config)
    server = config.server
    dedup = DedupWindow(config.dedup.max_entries, config.dedup.window_s) if config.dedup.enabled else None
    metrics = IngestMetrics()
    return IngestService(IngestState(
        config=config,
        destinations=destinations,
        auth=Authenticator(destinations),
        trusted_proxies=tuple(
            parse_network(text, f"server.trusted_proxies.{i}")
            for i, text in enumerate(server.trusted_proxies)
        ),
        metrics=metrics,
        dedup=dedup,
        worker_index=worker_index,
        share_metrics=server.workers > 1 if share_metrics is None else share_metrics,
        routes={d.name: _Route.of(metrics, d.name) for d in destinations},
    ))


@contextlib.asynccontextmanager
async def _lifecycle(state: IngestState) -> AsyncIterator[None]:
    config = state.config
    base = Path(config.spool.dir)
    lock = await asyncio.to_thread(acquire_slot, base, state.worker_index)
    spool = Spool(
        lock.directory,
        max_bytes=config.spool.max_bytes,
        segment_bytes=config.spool.segment_bytes,
        fsync=config.spool.fsync,
    )
    try:
        await asyncio.to_thread(spool.open)
    except BaseException:
        lock.release()
        raise
    state.slot = lock.name
    publisher = KafkaPublisher(config.kafka, producer_max_request_size(config))
    delivery = Delivery(
        publisher,
        spool,
        state.metrics,
        publish_timeout_s=config.kafka.publish_timeout_s,
        drain_batch=config.spool.drain_batch,
        start_timeout_s=config.kafka.request_timeout_ms / 1000,
        lock=lock,
        adopt_from=base,
    )
    await delivery.start()
    state.delivery = delivery
    log.info(
        "ingest ready",
        extra={
            "slot": lock.name,
            "destinations": [d.name for d in state.destinations],
            "topic": config.kafka.topic,
            "spool_records": spool.pending,
        },
    )
    if state.share_metrics:
        _spawn(state, _share_metrics(state, base / "metrics"))
    _spawn(state, _log_traffic(state))
    try:
        yield
    finally:
        state.stopping = True
        for task in list(state.tasks):
            task.cancel()
        if state.tasks:
            await asyncio.wait(state.tasks)
        await delivery.stop(config.server.shutdown_timeout_s)


def _spawn(state: IngestState, coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.create_task(coro)
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def _share_metrics(state: IngestState, directory: Path) -> None:
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    path = directory / f"{state.slot}.json"
    try:
        while True:
            try:
                await asyncio.to_thread(state.metrics.registry.write_snapshot, path)
            except OSError as exc:
                log.warning("metrics: cannot write snapshot", extra={"error": str(exc)})
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


async def _log_traffic(state: IngestState) -> None:
    """Every TRAFFIC_LOG_INTERVAL_S, one INFO line summing up the requests answered (when there were any)."""
    try:
        while True:
            await asyncio.sleep(TRAFFIC_LOG_INTERVAL_S)
            _flush_traffic(state)
    finally:
        _flush_traffic(state)


def _flush_traffic(state: IngestState) -> None:
    totals: dict[str, float] = {}
    for (_destination, status), count in state.metrics.requests.samples().items():
        totals[status] = totals.get(status, 0.0) + count
    reported = state.traffic_reported
    answered = {status: int(count - reported.get(status, 0.0)) for status, count in sorted(totals.items())
                if count > reported.get(status, 0.0)}
    if not answered:
        return
    state.traffic_reported = totals
    events, state.traffic_events = state.traffic_events, 0
    access_log.info(
        "traffic: %d requests, %d events accepted",
        sum(answered.values()),
        events,
        extra={"statuses": answered, "events": events},
    )


# -- health ------------------------------------------------------------------------------------------------


async def _healthz(state: IngestState, request: web.BaseRequest) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(state: IngestState, request: web.BaseRequest) -> web.Response:
    delivery = state.delivery
    if delivery is None or state.stopping:
        return web.Response(status=503, text="not ready: shutting down\n")
    kafka = "up" if delivery.kafka_up else "down"
    summary = f"kafka={kafka} spool_records={delivery.spool_depth} spool_bytes={delivery.spool_bytes}"
    if delivery.kafka_up or delivery.spool_writable:
        return web.Response(text=f"ready: {summary}\n")
    return web.Response(status=503, text=f"not ready: Kafka unreachable and spool full: {summary}\n")


async def _metrics(state: IngestState, request: web.BaseRequest) -> web.Response:
    registry = state.metrics.registry
    others = []
    if state.share_metrics:
        directory = Path(state.config.spool.dir) / "metrics"
        others = await asyncio.to_thread(Registry.read_snapshots, directory, state.slot, SNAPSHOT_MAX_AGE_S)
    text = registry.render(others)
    return web.Response(body=text.encode("utf-8"), headers={"Content-Type": METRICS_CONTENT_TYPE})


_PAGES: Final[dict[str, Callable[[IngestState, web.BaseRequest], Awaitable[web.Response]]]] = {
    "/healthz": _healthz,
    "/readyz": _readyz,
    "/metrics": _metrics,
}


async def _page(state: IngestState, request: web.BaseRequest) -> web.Response:
    """Anything but a POST: one of the pages, or 405."""
    page = _PAGES.get(request.path)
    if page is not None and request.method in ("GET", "HEAD"):
        return await page(state, request)
    allowed = "GET, HEAD, POST" if page is not None else "POST"
    return web.Response(status=405, text=f"method {request.method} not allowed; allowed: {allowed}\n",
                        headers={"Allow": allowed})


# -- the webhook ------------------------------------------------------------------------------------------


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _safe_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in headers.items()
        if not any(hint in name.lower() for hint in _SECRET_HINTS)
    }


@dataclass(slots=True)
class _Request:
    state: IngestState
    request: web.BaseRequest
    request_id: str
    received_ns: int
    started: float
    destination: Destination | None = None
    route: _Route | None = None
    events: int = 0


def _reply(ctx: _Request, status: int, text: str, *, close: bool = False) -> web.Response:
    # Success texts are ours and one line already; the others may quote what the sender sent.
    line = text if status < 300 else _one_line(text)
    response = web.Response(status=status, text=line + "\n", headers={REQUEST_ID_HEADER: ctx.request_id})
    if close:
        response.force_close()
    name = ctx.destination.name if ctx.destination is not None else "unauthenticated"
    state = ctx.state
    elapsed = time.monotonic() - ctx.started
    route = ctx.route
    if status == 200 and route is not None:
        route.answered[0] += 1
        observe_row(route.duration, route.buckets, elapsed)
    else:
        metrics = state.metrics
        label = _STATUS_LABELS.get(status) or str(status)
        metrics.requests.inc(name, label)
        metrics.request_duration.observe(elapsed, label)
    # Accepted requests are the bulk of the traffic (one per GitLab event): one line each only at DEBUG,
    # a periodic summary at INFO. Refusals and errors are logged one by one.
    level = logging.DEBUG if status < 300 else logging.INFO if status < 500 else logging.ERROR
    if status < 300:
        state.traffic_events += ctx.events
    if not access_log.isEnabledFor(level):
        return response
    access_log.log(
        level,
        "%s %s %d",
        ctx.request.method,
        ctx.request.path,
        status,
        extra={
            "request_id": ctx.request_id,
            "destination": name,
            "status": status,
            "events": ctx.events,
            "ms": round(elapsed * 1000, 1),
            "client": _peer(ctx.request),
            "reason": text if status >= 400 else None,
        },
    )
    return response


_STATUS_LABELS: Final = {code: str(code) for code in (200, 202, 400, 401, 403, 408, 413, 500, 503)}


def _peer(request: web.BaseRequest) -> str | None:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(peer, tuple | list) and peer:
        return str(peer[0])
    return None


class _BodyReader:
    """Reads at most ``limit`` bytes; what arrived so far stays available after a timeout."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False

    @property
    def data(self) -> bytes:
        if len(self.chunks) == 1 and self.size <= self.limit:
            return self.chunks[0]
        return b"".join(self.chunks)[: self.limit]

    def add(self, chunk: bytes) -> None:
        if chunk:
            self.chunks.append(chunk)
            self.size += len(chunk)
            if self.size > self.limit:
                self.too_large = True

    async def read(self, request: web.BaseRequest) -> None:
        stream = request.content
        while True:
            chunk = await stream.readany()
            if not chunk:
                return
            self.add(chunk)
            if self.too_large:
                return


async def _handle(state: IngestState, request: web.BaseRequest) -> web.Response:
    if request.method != "POST":
        return await _page(state, request)
    request_id = f"{state.request_id_prefix}{next(state.request_counter):016x}"
    ctx = _Request(state, request, request_id, time.time_ns(), time.monotonic())
    # The usual request (authenticated, body complete with the head) is handled by plain functions around
    # one await, for the acknowledgements: every coroutine level would be resumed once more per request.
    try:
        refusal = _admit(ctx)
        if refusal is not None:
            return refusal
        body = _body_at_hand(ctx)
        if body is None or len(body) > state.config.server.max_body_bytes:
            answer = await _read_body(ctx, body or b"")
            if isinstance(answer, web.Response):
                return answer
            body = answer
        try:
            batch = _batch(ctx, body)
        except BodyError as exc:
            if body.strip():
                await _dead_letter(ctx, body, str(exc), "malformed")
            return _reply(ctx, 400, f"malformed body: {exc}")
        assert state.delivery is not None
        try:
            outcome = await state.delivery.deliver(batch.records)
        except (SpoolFull, SpoolError) as exc:
            return _not_accepted(ctx, batch, exc)
        return _accepted(ctx, batch, outcome)
    except Exception:
        log.exception("unexpected error while handling a request", extra={"request_id": ctx.request_id})
        return _reply(ctx, 500, "internal error; see the ingest log for this request id", close=True)


def _admit(ctx: _Request) -> web.Response | None:
    """Authenticate the request (and check its source address): None when it may go on, else the refusal."""
    state, request = ctx.state, ctx.request
    destination = state.auth.authenticate(request.headers.get(TOKEN_HEADER))
    if destination is None:
        return _reply(ctx, 401, f"missing or invalid {TOKEN_HEADER}", close=True)
    ctx.destination = destination
    ctx.route = state.routes[destination.name]
    if destination.networks:
        client = client_address(
            _peer(request),
            request.headers.get("X-Forwarded-For"),
            state.trusted_proxies,
        )
        if not network_allowed(client, destination.networks):
            return _reply(
                ctx, 403, f"source address {client} is not allowed for this destination", close=True
            )
    return None


def _body_at_hand(ctx: _Request) -> bytes | None:
    """The body when it came whole with the head (the usual case: no timer needed), else None.

    Its size is checked by the caller: a body over the limit that is here already costs nothing more to
    take, and _read_body then refuses it with what arrived."""
    stream = ctx.request.content
    if stream.is_eof():
        try:
            return stream.read_nowait(-1)
        except (RequestPayloadError, ConnectionError):
            return None  # _read_body meets the same error and answers it
    return None


async def _read_body(ctx: _Request, head: bytes) -> bytes | web.Response:
    """The body (``head``: what was read of it already), within ``server.body_timeout_s`` and
    ``server.max_body_bytes``, or the refusal."""
    config, request = ctx.state.config, ctx.request
    limit = config.server.max_body_bytes
    declared = request.content_length
    reader = _BodyReader(limit)
    reader.add(head)
    if declared is not None and declared > limit:
        # Do not wait for megabytes we will refuse: keep what is already here, for the dead letter.
        reader.too_large = True
        with contextlib.suppress(TimeoutError, RequestPayloadError, ConnectionError):
            async with asyncio.timeout(min(1.0, config.server.body_timeout_s)):
                await reader.read(request)
    elif not reader.too_large:
        try:
            async with asyncio.timeout(config.server.body_timeout_s):
                await reader.read(request)
        except TimeoutError:
            text = f"request body not complete within {config.server.body_timeout_s:g} s"
            if reader.size:
                await _dead_letter(ctx, reader.data, f"{text}; {reader.size} bytes received", "timeout")
            return _reply(ctx, 408, text, close=True)
        except (RequestPayloadError, ConnectionError) as exc:
            text = f"request body incomplete: {exc}"
            if reader.size:
                await _dead_letter(ctx, reader.data, text, "incomplete")
            return _reply(ctx, 400, text, close=True)
    if reader.too_large:
        size = f"Content-Length {declared}" if declared is not None else f"more than {limit} bytes"
        kept = reader.data[: config.kafka.dlq_max_bytes]
        text = f"body too large: {size}, limit {limit} bytes"
        await _dead_letter(ctx, kept, f"{text}; the first {len(kept)} bytes are kept", "too_large")
        return _reply(ctx, 413, text, close=True)
    return reader.data


@dataclass(slots=True)
class _Batch:
    """A request's events as records to publish."""

    records: list[OutRecord]
    reserved: list[bytes]  # de-duplication keys held for these records
    duplicates: int


def _batch(ctx: _Request, body: bytes) -> _Batch:
    """Split the body into records (with their headers), dropping duplicates; raises BodyError."""
    state, request = ctx.state, ctx.request
    destination, route = ctx.destination, ctx.route
    assert destination is not None and route is not None
    if state.config.server.debug_json:
        log.info(
            "received",
            extra={
                "request_id": ctx.request_id,
                "destination": destination.name,
                "headers": _safe_headers(request.headers),
                "body": body.decode("utf-8", "replace"),
            },
        )
    events = split_body(body)
    ctx.events = len(events)
    route.received[0] += len(events)

    header_type = request.headers.get(EVENT_TYPE_HEADER) or None
    # One object as the whole body (an array's element is a copy of its bytes, never the body itself).
    single = len(events) == 1 and events[0].raw is body
    received = (HDR_RECEIVED_AT, b"%d" % ctx.received_ns)
    request_id = ctx.request_id.encode()
    request_header = (HDR_REQUEST_ID, request_id)
    destination_header = route.header
    topic = state.config.kafka.topic
    dedup = state.dedup
    records: list[OutRecord] = []
    reserved: list[bytes] = []
    duplicates = 0
    for index, event in enumerate(events):
        if dedup is not None:
            key = event.dedup_key(destination.name)
            if not dedup.reserve(key):
                duplicates += 1
                continue
            reserved.append(key)
        # The header names the type of a single event; in a batch only each element can say its own.
        event_type = (header_type or event.event_type) if single else event.event_type
        uid = (HDR_EVENT_UID, b"%s.%d" % (request_id, index))
        headers: list[tuple[str, bytes]] = (
            [destination_header, (HDR_EVENT_TYPE, event_type.encode("utf-8", "replace")), received,
             request_header, uid]
            if event_type
            else [destination_header, received, request_header, uid]
        )
        records.append(OutRecord(topic, event.key, event.raw, headers))
    if duplicates:
        state.metrics.duplicates.inc(destination.name, amount=duplicates)
    return _Batch(records, reserved, duplicates)


def _not_accepted(ctx: _Request, batch: _Batch, exc: Exception) -> web.Response:
    state = ctx.state
    if state.dedup is not None:
        for key in batch.reserved:
            state.dedup.release(key)
    state.metrics.spool_full.inc()
    log.error(
        "kafka did not acknowledge in time and the spool cannot take the events",
        extra={"request_id": ctx.request_id, "error": str(exc), "events": len(batch.records)},
    )
    return _reply(ctx, 503, "Kafka unavailable and local spool full: events not accepted")


def _accepted(ctx: _Request, batch: _Batch, outcome: Outcome) -> web.Response:
    count, duplicates = len(batch.records), batch.duplicates
    noun = "event" if count == 1 else "events"
    dropped = f", {duplicates} duplicate{'s' if duplicates != 1 else ''} dropped" if duplicates else ""
    if outcome is Outcome.SPOOLED:
        return _reply(ctx, 202, f"accepted {count} {noun} into the spool{dropped}")
    return _reply(ctx, 200, f"accepted {count} {noun}{dropped}")


async def _dead_letter(ctx: _Request, value: bytes, reason: str, cause: str) -> None:
    """Send what an authenticated sender sent (or its first bytes) to the dead-letter topic."""
    state = ctx.state
    assert ctx.destination is not None and state.delivery is not None
    headers: list[tuple[str, bytes]] = [
        (HDR_DLQ_REASON, _one_line(reason).encode("utf-8", "replace")),
        (HDR_DLQ_STAGE, b"ingest"),
        (HDR_DESTINATION, ctx.destination.name.encode()),
        (HDR_REQUEST_ID, ctx.request_id.encode()),
        (HDR_RECEIVED_AT, str(ctx.received_ns).encode()),
    ]
    event_type = ctx.request.headers.get(EVENT_TYPE_HEADER)
    if event_type:
        headers.append((HDR_EVENT_TYPE, event_type.encode("utf-8", "replace")))
    record = OutRecord(state.config.kafka.dlq_topic, ctx.destination.name.encode(), value, headers)
    state.metrics.dead_letters.inc(ctx.destination.name, cause)
    try:
        await state.delivery.deliver([record])
    except (SpoolFull, SpoolError) as exc:
        state.metrics.spool_full.inc()
        log.error(
            "cannot keep a dead letter: Kafka unavailable and spool full",
            extra={"request_id": ctx.request_id, "error": str(exc), "reason": reason},
        )


# -- serving ---------------------------------------------------------------------------------------------


def tune_gc() -> None:
    """Set the cyclic garbage collector up for serving; call once start-up is done.

    Nothing on the request path relies on the collector (requests free their objects by reference
    counting), but with CPython's default gen-0 threshold (700 allocations) it ran every few requests
    and, with hundreds of requests in flight, each run walked and promoted their live objects: 13 % of
    the event loop thread's samples at saturation (py-spy --native; bench/README.md, "Fifth round").
    A higher threshold lets the short-lived objects die before a collection sees them; cycles are still
    collected, only in larger, rarer runs.
    """
    # What start-up built lives as long as the process: out of every later collection.
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def build_ssl_context(settings: TlsSettings) -> ssl.SSLContext | None:
    files = resolve_tls(settings)
    if files is None:
        return None
    cert, key = files
    password = read_secret(None, settings.key_password_file, "server.tls.key_password_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=password)
    except FileNotFoundError:
        missing = next((path for path in (cert, key) if not Path(path).is_file()), cert)
        raise ConfigError(f"config error (server.tls): {missing} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"config error (server.tls): cannot load {cert} / {key}: {exc}") from None
    return context


async def serve(config: IngestConfig, *, worker_index: int = 0, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully."""
    server = config.server
    ssl_context = build_ssl_context(server.tls)
    service = create_service(config, worker_index=worker_index)
    async with service.running():
        await _serve_http(service, ssl_context, worker_index, stop or asyncio.Event())
    log.info("stopped")


async def _serve_http(
    service: IngestService, ssl_context: ssl.SSLContext | None, worker_index: int, stop: asyncio.Event
) -> None:
    server = service.state.config.server
    runner = web.ServerRunner(
        web.Server(service.handle, **service.server_options),
        handle_signals=False,
        shutdown_timeout=server.shutdown_timeout_s,
    )
    await runner.setup()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(
            runner,
            server.host,
            server.port,
            ssl_context=ssl_context,
            reuse_port=server.reuse_port or server.workers > 1,
            backlog=1024,
        )
        await site.start()
        tune_gc()
        log.info(
            "listening",
            extra={
                "address": f"{server.host}:{server.port}",
                "tls": ssl_context is not None,
                "worker": worker_index,
                "event_loop": type(loop).__module__.split(".")[0],
            },
        )
        await stop.wait()
        log.info("shutting down: no new connections; finishing requests and flushing to Kafka")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
        # Stops accepting, answers the requests in flight (up to shutdown_timeout_s), then returns to
        # serve(), whose running() context flushes to Kafka.
        await runner.cleanup()
