"""ingest against a real Kafka broker: the issue's "done when" list.

The broker comes from the ``kafka_bootstrap`` fixture of tests/conftest.py; the outage tests stop and
restart it through ``kafka_broker`` (skipped when the broker is external, i.e. KAFKA_BOOTSTRAP_SERVERS
is set). The ingest application runs in-process on aiohttp's test server; requests are sent the way
GitLab sends them: raw JSON labelled ``application/x-www-form-urlencoded``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from falco_gitlab.contract import (
    HDR_DESTINATION,
    HDR_DLQ_REASON,
    HDR_DLQ_STAGE,
    HDR_EVENT_TYPE,
    HDR_EVENT_UID,
    HDR_RECEIVED_AT,
    actor_key,
)
from tests.ingest_support import (
    TOKEN_GROUP,
    TOKEN_PROD,
    TOKEN_PROD_NEXT,
    Record,
    consume_all,
    make_config,
    running_ingest,
    seed_payloads,
    wait_until,
)

pytestmark = pytest.mark.kafka

SEEDS = seed_payloads()


class Topics:
    def __init__(self, raw: str, dlq: str) -> None:
        self.raw = raw
        self.dlq = dlq


@pytest.fixture
def ingest_bootstrap(kafka_bootstrap: str) -> str:
    return kafka_bootstrap


@pytest.fixture
def topics(topic: Callable[..., str]) -> Topics:
    return Topics(raw=topic(3), dlq=topic(1))


@pytest.fixture
def broker(kafka_broker: Any) -> Any:
    """The session's own broker (stopped and restarted, data intact) for the outage tests."""
    return kafka_broker


def _expected_key(raw: bytes) -> bytes | None:
    event = json.loads(raw)
    name = event.get("author_name") or (event.get("details") or {}).get("author_name")
    return actor_key(event.get("author_id"), name)


def _by_uid(records: list[Record]) -> dict[str, Record]:
    result: dict[str, Record] = {}
    for record in records:
        uid = record.header(HDR_EVENT_UID)
        assert uid is not None and uid not in result, f"duplicate or missing event uid {uid}"
        result[uid] = record
    return result


async def test_seed_payloads_come_out_byte_for_byte(
    ingest_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    config = make_config(tmp_path, bootstrap=ingest_bootstrap, topic=topics.raw, dlq_topic=topics.dlq)
    sent: dict[str, tuple[str, bytes]] = {}  # request id -> (seed name, bytes)
    before = time.time_ns()
    async with running_ingest(config) as ingest:
        for index, (name, raw) in enumerate(SEEDS.items()):
            event_type = json.loads(raw)["event_type"]
            token = TOKEN_PROD if index % 2 else TOKEN_PROD_NEXT  # both tokens of a rotation work
            status, text, request_id = await ingest.post(raw, event_type=event_type, token=token)
            assert (status, text) == (200, "accepted 1 event\n"), name
            sent[request_id] = (name, raw)
    after = time.time_ns()
    records = await consume_all(ingest_bootstrap, topics.raw, len(SEEDS))
    assert len(records) == len(SEEDS) == 23
    for uid, record in _by_uid(records).items():
        request_id, index = uid.split(".")
        name, raw = sent[request_id]
        assert index == "0"
        assert record.value == raw, name  # the exact bytes, trailing newline included
        assert record.key == _expected_key(raw), name
        assert record.header(HDR_DESTINATION) == "gitlab-prod"
        assert record.header(HDR_EVENT_TYPE) == json.loads(raw)["event_type"]
        assert before <= int(record.header(HDR_RECEIVED_AT) or 0) <= after
    # One actor, one partition.
    partitions: dict[bytes | None, set[int]] = {}
    for record in records:
        partitions.setdefault(record.key, set()).add(record.partition)
    assert all(len(p) == 1 for p in partitions.values())
    assert await consume_all(ingest_bootstrap, topics.dlq, 0, within=1, settle=0) == []


async def test_ampersands_and_arrays(ingest_bootstrap: str, topics: Topics, tmp_path: Path) -> None:
    config = make_config(tmp_path, bootstrap=ingest_bootstrap, topic=topics.raw, dlq_topic=topics.dlq)
    tricky = (
        b'{"id":"42","author_id":5,"event_type":"ci_variable_updated","details":{"custom_message":'
        b'"a=1&b=2&c=%26&token=x+y","change":"value","from":"k=v&x","to":"&&=="},"created_at":'
        b'"2024-01-01T00:00:00.000Z"}'
    )
    elements = [SEEDS["add_gpg_key"], b'{ "id" : 7 , "author_id" : -1 , "author_name" : "eve" }', tricky]
    batch = b"[\n  " + b",\n  ".join(elements) + b"\n]"
    async with running_ingest(config) as ingest:
        status, _, tricky_id = await ingest.post(tricky, token=TOKEN_GROUP)
        assert status == 200
        status, text, batch_id = await ingest.post(batch, event_type="add_gpg_key")
        # Duplicates are per destination: the same event from another destination is not one.
        assert (status, text) == (200, "accepted 3 events\n")
        status, text, _ = await ingest.post(b"[" + tricky + b"]")
        assert (status, text) == (200, "accepted 0 events, 1 duplicate dropped\n")
    records = _by_uid(await consume_all(ingest_bootstrap, topics.raw, 4))
    assert set(records) == {f"{tricky_id}.0", f"{batch_id}.0", f"{batch_id}.1", f"{batch_id}.2"}
    assert records[f"{tricky_id}.0"].value == tricky == records[f"{batch_id}.2"].value
    assert records[f"{tricky_id}.0"].header(HDR_DESTINATION) == "acme-group"
    assert records[f"{batch_id}.2"].header(HDR_DESTINATION) == "gitlab-prod"
    assert records[f"{batch_id}.2"].header(HDR_EVENT_TYPE) == "ci_variable_updated"
    assert records[f"{batch_id}.0"].value == SEEDS["add_gpg_key"]
    assert records[f"{batch_id}.1"].value == elements[1]
    assert records[f"{batch_id}.1"].key == b"name:eve"
    # In a batch the header cannot say which element it describes: each element's own type counts.
    assert records[f"{batch_id}.1"].header(HDR_EVENT_TYPE) is None
    assert records[f"{batch_id}.0"].header(HDR_EVENT_TYPE) == "add_gpg_key"


async def test_refused_requests_publish_nothing_to_the_raw_topic(
    ingest_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    config = make_config(
        tmp_path, bootstrap=ingest_bootstrap, topic=topics.raw, dlq_topic=topics.dlq, max_body_bytes=8192
    )
    config.destinations[1].allow_networks = ["192.0.2.0/24"]  # acme-group: not from 127.0.0.1
    raw = SEEDS["user_impersonation"]
    bad = {
        "not JSON": b'{"id": 1, "event_type": "x", ',
        "form body": b"id=1&event_type=user_impersonation",
        "non-object element": b'[{"id": 1}, [2]]',
        "empty array": b"[]",
        "too large": b'{"id": 1, "pad": "' + b"z" * 9000 + b'"}',
    }
    async with running_ingest(config) as ingest:
        assert (await ingest.post(raw, token=None))[0] == 401
        assert (await ingest.post(raw, token=TOKEN_PROD[::-1]))[0] == 401
        assert (await ingest.post(raw, token=TOKEN_GROUP))[0] == 403
        request_ids = {}
        for what, body in bad.items():
            status, text, request_ids[what] = await ingest.post(body)
            assert status == (413 if what == "too large" else 400), what
            assert text.count("\n") == 1
        status, _, good_id = await ingest.post(raw)  # proves the raw topic is being written
        assert status == 200
    raw_records = await consume_all(ingest_bootstrap, topics.raw, 1)
    assert [r.request_id for r in raw_records] == [good_id]
    dead = {r.request_id: r for r in await consume_all(ingest_bootstrap, topics.dlq, len(bad))}
    assert set(dead) == set(request_ids.values())
    for what, body in bad.items():
        record = dead[request_ids[what]]
        assert record.value == body[:8192]
        assert record.header(HDR_DLQ_STAGE) == "ingest"
        assert record.header(HDR_DESTINATION) == "gitlab-prod"
        assert record.header(HDR_DLQ_REASON)
    assert "limit 8192 bytes" in (dead[request_ids["too large"]].header(HDR_DLQ_REASON) or "")


async def _post_events(ingest: Any, bodies: list[bytes], deadline_s: float) -> list[int]:
    statuses = []
    for body in bodies:
        started = time.monotonic()
        status, _, _ = await ingest.post(body)
        assert time.monotonic() - started < deadline_s, "GitLab would have given up"
        statuses.append(status)
    return statuses


def _events(prefix: str, count: int, per_request: int = 1) -> tuple[list[bytes], list[bytes]]:
    """(request bodies, the event bytes they hold): single objects and arrays, several actors."""
    events = [
        b'{"id":"%s-%d","author_id":%d,"event_type":"user_impersonation","created_at":"2024-06-27T01:48:04.%03dZ"}'
        % (prefix.encode(), i, i % 4, i % 1000)
        for i in range(count)
    ]
    bodies = []
    for start in range(0, count, per_request):
        chunk = events[start : start + per_request]
        bodies.append(chunk[0] if len(chunk) == 1 else b"[" + b",".join(chunk) + b"]")
    return bodies, events


def _assert_exactly_once(records: list[Record], events: list[bytes]) -> None:
    values = Counter(r.value for r in records)
    missing = [e for e in events if values[e] == 0]
    twice = [v for v, n in values.items() if n > 1]
    assert not missing, f"{len(missing)} events lost, e.g. {missing[:2]}"
    assert not twice, f"{len(twice)} events published more than once, e.g. {twice[:2]}"
    assert len(records) == len(events)
    # Per actor, the order of acceptance is kept (one key -> one partition, in order).
    order = {e: i for i, e in enumerate(events)}
    by_key: dict[bytes | None, list[int]] = {}
    for record in records:  # consume_all sorts by partition, then offset
        by_key.setdefault(record.key, []).append(order[record.value])
    assert all(seq == sorted(seq) for seq in by_key.values())


def _segment_files(spool_dir: Path) -> list[Path]:
    return list(spool_dir.glob("w*/seg-*.spool"))


async def _stop_broker(broker: Any) -> None:
    await asyncio.to_thread(broker.stop)


async def _start_broker(broker: Any) -> None:
    await asyncio.to_thread(broker.start)


@pytest.mark.slow
async def test_broker_outage_requests_still_accepted_and_every_event_arrives_once(
    ingest_bootstrap: str, topics: Topics, tmp_path: Path, broker: Any
) -> None:
    config = make_config(
        tmp_path, bootstrap=ingest_bootstrap, topic=topics.raw, dlq_topic=topics.dlq, publish_timeout_s=1.0
    )
    before, before_events = _events("before", 4)
    during, during_events = _events("during", 30, per_request=3)
    after, after_events = _events("after", 4)
    async with running_ingest(config) as ingest:
        assert await _post_events(ingest, before, deadline_s=2) == [200] * len(before)
        await _stop_broker(broker)
        try:
            statuses = await _post_events(ingest, during, deadline_s=4)
            assert set(statuses) == {202}  # spooled, durably, and answered well within 8 s
            metrics = await (await ingest.client.get("/metrics")).text()
            assert "falco_gitlab_ingest_kafka_up 0" in metrics
            assert ingest.state.delivery.spool_depth == len(during_events)
            ready = await ingest.client.get("/readyz")
            assert ready.status == 200  # the spool is writable
        finally:
            await _start_broker(broker)
        assert await wait_until(lambda: ingest.state.delivery.spool_depth == 0, within=60)
        statuses = await _post_events(ingest, after, deadline_s=4)
        assert set(statuses) <= {200, 202}
        assert await wait_until(lambda: ingest.state.delivery.spool_depth == 0, within=30)
        metrics = await (await ingest.client.get("/metrics")).text()
        assert "falco_gitlab_ingest_kafka_up 1" in metrics
    expected = before_events + during_events + after_events
    records = await consume_all(ingest_bootstrap, topics.raw, len(expected), within=60, settle=2)
    _assert_exactly_once(records, expected)
    assert not _segment_files(tmp_path)  # drained segments are deleted


@pytest.mark.slow
async def test_spool_is_drained_after_an_ingest_restart(
    ingest_bootstrap: str, topics: Topics, tmp_path: Path, broker: Any
) -> None:
    config = make_config(
        tmp_path, bootstrap=ingest_bootstrap, topic=topics.raw, dlq_topic=topics.dlq, publish_timeout_s=1.0
    )
    bodies, events = _events("restart", 12, per_request=2)
    async with running_ingest(config) as first:
        assert (await first.post(bodies[0]))[0] == 200
        await _stop_broker(broker)
        try:
            assert set(await _post_events(first, bodies[1:], deadline_s=4)) == {202}
        except BaseException:
            await _start_broker(broker)
            raise
    # The first ingest stopped while Kafka was down; a new one starts, still without Kafka.
    try:
        async with running_ingest(config) as second:
            assert second.state.delivery.spool_depth == len(events) - 2
            await _start_broker(broker)
            assert await wait_until(lambda: second.state.delivery.spool_depth == 0, within=60)
    finally:
        await _start_broker(broker)
    records = await consume_all(ingest_bootstrap, topics.raw, len(events), within=60, settle=2)
    _assert_exactly_once(records, events)


async def test_metrics_and_readiness_with_kafka_up(
    ingest_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    config = make_config(tmp_path, bootstrap=ingest_bootstrap, topic=topics.raw, dlq_topic=topics.dlq)
    async with running_ingest(config) as ingest:
        assert (await ingest.post(SEEDS["add_gpg_key"]))[0] == 200
        ready = await ingest.client.get("/readyz")
        assert ready.status == 200 and "kafka=up" in await ready.text()
        text = await (await ingest.client.get("/metrics")).text()
    assert 'falco_gitlab_ingest_requests_total{destination="gitlab-prod",status="200"} 1' in text
    assert f'falco_gitlab_ingest_events_published_total{{topic="{topics.raw}",path="direct"}} 1' in text
    assert "falco_gitlab_ingest_publish_latency_seconds_count 1" in text


@pytest.mark.slow
async def test_a_hung_broker_is_ridden_out_without_duplicates(
    ingest_bootstrap: str, topics: Topics, tmp_path: Path, broker: Any
) -> None:
    """SIGSTOP: connections stay open and nothing answers. Sends that timed out in the request path
    complete when the broker resumes; their spooled copies must not be published again."""
    config = make_config(
        tmp_path, bootstrap=ingest_bootstrap, topic=topics.raw, dlq_topic=topics.dlq, publish_timeout_s=1.0
    )
    bodies, events = _events("hung", 24, per_request=4)
    async with running_ingest(config) as ingest:
        assert (await ingest.post(bodies[0]))[0] == 200
        await asyncio.to_thread(broker.pause)
        try:
            assert set(await _post_events(ingest, bodies[1:], deadline_s=4)) == {202}
        finally:
            await asyncio.to_thread(broker.resume)
        assert await wait_until(lambda: ingest.state.delivery.spool_depth == 0, within=60)
        metrics = await (await ingest.client.get("/metrics")).text()
    records = await consume_all(ingest_bootstrap, topics.raw, len(events), within=60, settle=2)
    _assert_exactly_once(records, events)
    late = [line for line in metrics.splitlines() if 'path="late"' in line]
    assert late, "the first spooled request's sends were expected to complete late"
