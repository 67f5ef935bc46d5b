"""enrich against a real Kafka broker: exact output, dead letters, transactions, group sharing, SIGKILL.

The broker comes from the ``kafka_bootstrap`` fixture of tests/conftest.py when it exists, else from
KAFKA_BOOTSTRAP_SERVERS; without either these tests are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaTimeoutError
from aiokafka.partitioner import DefaultPartitioner

from enrich.config import EnrichConfig, KafkaSettings, MetricsSettings, ProcessingSettings
from enrich.geo import GeoIP
from enrich.worker import Worker, enrich_transform
from falco_gitlab.model import ENRICHED_SCHEMA_VERSION, decode_enriched
from tests.enrich_support import (
    CITY_TEST_DB,
    consume_all,
    create_topics,
    delete_topics,
    produce,
    seed_payloads,
    unique,
)
from tests.test_fields import SEED_EXPECTED

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parent.parent
Headers = list[tuple[str, bytes]]


@pytest.fixture(scope="session")
def enrich_bootstrap(request: pytest.FixtureRequest) -> str:
    try:
        return str(request.getfixturevalue("kafka_bootstrap"))
    except pytest.FixtureLookupError:
        pass
    address = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if not address:
        pytest.skip("no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS (or provide the kafka_bootstrap fixture)")
    return address


@dataclass
class Topics:
    raw: str
    out: str
    dlq: str


@pytest.fixture
async def make_topics(enrich_bootstrap: str) -> AsyncIterator[Callable[[int], Awaitable[Topics]]]:
    created: list[str] = []

    async def make(partitions: int = 1) -> Topics:
        topics = Topics(unique("raw"), unique("enriched"), unique("dlq"))
        await create_topics(enrich_bootstrap, [topics.raw], partitions)
        await create_topics(enrich_bootstrap, [topics.out, topics.dlq], 1)
        created.extend([topics.raw, topics.out, topics.dlq])
        return topics

    yield make
    await delete_topics(enrich_bootstrap, created)


def worker_config(bootstrap: str, topics: Topics, group: str, *, batch_size: int = 100) -> EnrichConfig:
    return EnrichConfig(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, input_topic=topics.raw, output_topic=topics.out,
                            dlq_topic=topics.dlq, group_id=group, session_timeout_ms=6000,
                            heartbeat_interval_ms=1000, transaction_timeout_ms=4000,
                            rebalance_timeout_ms=20000),
        processing=ProcessingSettings(batch_size=batch_size, poll_timeout_ms=100, retry_backoff_ms=50),
        metrics=MetricsSettings(log_interval_s=3600),
    )


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def raw_headers(index: int, event_type: str | None = None, *, uid: str | None = None) -> Headers:
    headers: Headers = [("gitlab-destination", b"gitlab-main")]
    if event_type is not None:
        headers.append(("gitlab-event-type", event_type.encode()))
    headers += [("gitlab-received-at", b"%d" % (1_707_000_000_000_000_000 + index)),
                ("gitlab-request-id", f"req-{index}".encode()),
                ("gitlab-event-uid", (uid or f"req-{index}.0").encode())]
    return headers


def numbered_event(number: int) -> bytes:
    return json.dumps({"id": number, "author_id": number % 7, "event_type": "user_created",
                       "ip_address": "81.2.69.142", "created_at": "2024-02-10T04:09:24.597Z",
                       "details": {"custom_message": f"event {number}"}}).encode()


def enriched_ids(records: list[Any]) -> list[str]:
    return [str(decode_enriched(r.value).fields["event_id"]) for r in records]


# --- exact output --------------------------------------------------------------------------------------

# Three payloads get addresses the MaxMind test database knows; their expected fields differ from
# SEED_EXPECTED (test_fields.py) only in the address and geo fields written out here.
GEO_REWRITES: dict[str, tuple[bytes, bytes, dict[str, object]]] = {
    "add_gpg_key": (b"198.41.0.4", b"81.2.69.142", {
        "ip_address": "81.2.69.142", "client_ip": "81.2.69.142", "ip_private": False,
        "city": "London", "country": "United Kingdom", "countryisocode": "GB", "continent": "Europe",
        "region": "England", "regionisocode": "GB-ENG"}),
    "user_impersonation": (b"198.41.0.4", b"89.160.20.112", {
        "ip_address": "89.160.20.112", "client_ip": "89.160.20.112", "ip_private": False,
        "city": "Linköping", "country": "Sweden", "countryisocode": "SE", "continent": "Europe",
        "region": "Östergötland County", "regionisocode": "SE-E"}),
    "login_failed_with_otp_authentication": (b"198.41.0.40", b"2001:218::1, 10.0.0.1", {
        "ip_address": "2001:218::1, 10.0.0.1", "client_ip": "2001:218::1", "ip_private": False,
        "country": "Japan", "countryisocode": "JP", "continent": "Asia"}),
}


async def test_seed_payloads_are_enriched_exactly(enrich_bootstrap: str,
                                                  make_topics: Callable[[int], Awaitable[Topics]]) -> None:
    topics = await make_topics(3)
    inputs = []
    expected: dict[bytes, tuple[bytes, Headers, int, dict[str, object]]] = {}
    for index, (name, raw) in enumerate(sorted(seed_payloads().items())):
        ts, fields = SEED_EXPECTED[name]
        fields = dict(fields)
        if name in GEO_REWRITES:
            old, new, changes = GEO_REWRITES[name]
            raw = raw.replace(old, new)
            fields.update(changes)
        key = b"seed-%d" % index
        headers = raw_headers(index, json.loads(raw)["event_type"])
        inputs.append((key, raw, headers))
        expected[key] = (raw, headers, ts, fields)
    await produce(enrich_bootstrap, topics.raw, inputs)

    geo = GeoIP(str(CITY_TEST_DB))
    worker = Worker(worker_config(enrich_bootstrap, topics, unique("group")), enrich_transform(geo.lookup),
                    transactional_id=unique("txn"))
    async with running(worker):
        records = await consume_all(enrich_bootstrap, topics.out, len(inputs), timeout=60, settle=2)
    assert len(records) == 23
    assert sorted(r.key for r in records) == sorted(expected)
    for record in records:
        raw, headers, ts, fields = expected[record.key]
        assert list(record.headers) == headers  # every input header carried over, in order
        enriched = decode_enriched(record.value)
        assert enriched.version == ENRICHED_SCHEMA_VERSION
        assert enriched.raw == raw
        assert enriched.ts == ts
        assert enriched.fields == fields, record.key
    assert await consume_all(enrich_bootstrap, topics.dlq, 1, timeout=1) == []
    c = worker.counters
    assert (c.records_in, c.enriched, c.dlq, c.duplicates) == (23, 23, 0, 0)


# --- dead letters --------------------------------------------------------------------------------------


async def test_undecodable_records_go_to_the_dlq(enrich_bootstrap: str,
                                                 make_topics: Callable[[int], Awaitable[Topics]]) -> None:
    topics = await make_topics(1)
    seeds = seed_payloads()
    good_a, good_b = seeds["add_gpg_key"], seeds["user_impersonation"]
    inputs: list[tuple[bytes | None, bytes | None, Headers]] = [
        (b"a", good_a, raw_headers(0, "add_gpg_key")),
        (b"b", b"this is not json", raw_headers(1, "user_created")),
        (b"c", b"[1, 2, 3]", raw_headers(2, "user_created")),
        (b"d", b'{"id": 5}', raw_headers(3)),  # no event type anywhere
        (b"e", None, raw_headers(4, "user_created")),  # a tombstone
        (b"f", b'{"id": {"x": 1}, "event_type": "user_created"}', raw_headers(5, "user_created")),
        (None, b"\xff\xfe\x00binary", [("custom", b"\x00\x01")]),
        (b"h", good_b, raw_headers(7, "user_impersonation")),
    ]
    await produce(enrich_bootstrap, topics.raw, inputs)
    worker = Worker(worker_config(enrich_bootstrap, topics, unique("group")), enrich_transform(None),
                    transactional_id=unique("txn"))
    async with running(worker):
        dead = await consume_all(enrich_bootstrap, topics.dlq, 6, timeout=60, settle=1)
        good = await consume_all(enrich_bootstrap, topics.out, 2, timeout=30, settle=1)
    assert [r.key for r in good] == [b"a", b"h"]
    assert [decode_enriched(r.value).raw for r in good] == [good_a, good_b]

    reasons = {
        1: "not JSON: JSON is malformed: invalid character (byte 4)",
        2: "invalid audit event: Expected `object`, got `array`",
        3: "no event_type in the body and no X-Gitlab-Audit-Event-Type header",
        4: "record has no value",
        5: "invalid audit event: Expected `int | str | null`, got `object` - at `$.id`",
        6: "not JSON: JSON is malformed: invalid character (byte 0)",
    }
    assert len(dead) == 6
    for record, offset in zip(dead, sorted(reasons), strict=True):
        key, value, headers = inputs[offset]
        assert record.key == key
        assert record.value == value  # the original bytes, untouched
        source = f"{topics.raw}/0/{offset}".encode()
        assert list(record.headers) == [*headers, ("dlq-reason", reasons[offset].encode()),
                                        ("dlq-stage", b"enrich"), ("dlq-source", source)]
    c = worker.counters
    assert (c.records_in, c.enriched, c.dlq) == (8, 2, 6)


async def test_duplicate_event_uids_are_dropped(enrich_bootstrap: str,
                                                make_topics: Callable[[int], Awaitable[Topics]]) -> None:
    topics = await make_topics(1)
    inputs = [(b"k", numbered_event(n), raw_headers(n, uid=f"uid-{n % 5}")) for n in range(10)]
    inputs.append((b"k", numbered_event(99), raw_headers(99, uid="uid-99")))
    inputs.append((b"k", numbered_event(98), [("gitlab-destination", b"x")]))  # no uid: never a duplicate
    inputs.append((b"k", numbered_event(97), [("gitlab-destination", b"x")]))
    await produce(enrich_bootstrap, topics.raw, inputs[:6])
    await produce(enrich_bootstrap, topics.raw, inputs[6:])
    config = worker_config(enrich_bootstrap, topics, unique("group"), batch_size=3)  # across batches too
    worker = Worker(config, enrich_transform(None), transactional_id=unique("txn"))
    async with running(worker):
        records = await consume_all(enrich_bootstrap, topics.out, 8, timeout=60, settle=2)
    assert enriched_ids(records) == ["0", "1", "2", "3", "4", "99", "98", "97"]
    assert worker.counters.duplicates == 5
    assert worker.counters.records_in == 13


@pytest.mark.parametrize("limit", ["broker", "producer"])
async def test_a_record_too_large_for_the_enriched_topic_goes_to_the_dlq(
        enrich_bootstrap: str, make_topics: Callable[[int], Awaitable[Topics]], limit: str) -> None:
    """broker: the enriched topic's max.message.bytes rejects it (found by replaying the batch one record
    per transaction); producer: max_request_size rejects it before sending."""
    topics = Topics(unique("raw"), unique("enriched"), unique("dlq"))
    await create_topics(enrich_bootstrap, [topics.raw, topics.dlq])
    await create_topics(enrich_bootstrap, [topics.out],
                        config={"max.message.bytes": "4000"} if limit == "broker" else None)
    big = json.dumps({"id": 7, "event_type": "user_created",
                      "details": {"custom_message": "x" * 3000}}).encode()
    inputs = [(b"k", big if n == 7 else numbered_event(n), raw_headers(n)) for n in range(20)]
    await produce(enrich_bootstrap, topics.raw, inputs)
    config = worker_config(enrich_bootstrap, topics, unique("group"), batch_size=10)
    if limit == "producer":
        config.kafka.max_request_size = 5000
    worker = Worker(config, enrich_transform(None), transactional_id=unique("txn"))
    try:
        async with running(worker):
            good = await consume_all(enrich_bootstrap, topics.out, 19, timeout=60, settle=2)
            dead = await consume_all(enrich_bootstrap, topics.dlq, 1, timeout=30, settle=1)
    finally:
        await delete_topics(enrich_bootstrap, [topics.raw, topics.out, topics.dlq])
    assert enriched_ids(good) == [str(n) for n in range(20) if n != 7]
    assert len(dead) == 1
    assert dead[0].value == big
    reason = dict(dead[0].headers)["dlq-reason"].decode()
    if limit == "broker":
        assert reason.startswith("the broker rejected the record: MessageSizeTooLargeError"), reason
        assert worker.counters.aborted >= 2  # the batch, then the record alone
    else:
        assert reason.startswith("enriched record too large for the producer: "), reason
        assert worker.counters.aborted == 0
    assert dict(dead[0].headers)["dlq-source"] == f"{topics.raw}/0/7".encode()


async def test_enriched_records_keep_the_default_partitioning(enrich_bootstrap: str) -> None:
    """The worker fills one producer batch per output partition itself: every key must land on the
    partition aiokafka's default partitioner picks (in order per key), including when a batch fills up
    mid-transaction; records without a key take the producer's own path."""
    topics = Topics(unique("raw"), unique("enriched"), unique("dlq"))
    await create_topics(enrich_bootstrap, [topics.raw, topics.dlq])
    await create_topics(enrich_bootstrap, [topics.out], 3)
    keys = [b"id:%d" % (n % 9) if n % 10 else None for n in range(120)]
    await produce(enrich_bootstrap, topics.raw,
                  [(key, numbered_event(n), raw_headers(n)) for n, key in enumerate(keys)])
    config = worker_config(enrich_bootstrap, topics, unique("group"), batch_size=50)
    config.kafka.max_batch_size = 2000  # a few records per producer batch
    worker = Worker(config, enrich_transform(None), transactional_id=unique("txn"))
    try:
        async with running(worker):
            records = await consume_all(enrich_bootstrap, topics.out, 120, timeout=60, settle=2)
    finally:
        await delete_topics(enrich_bootstrap, [topics.raw, topics.out, topics.dlq])
    assert sorted(int(n) for n in enriched_ids(records)) == list(range(120))
    default = DefaultPartitioner()
    by_key: dict[bytes, list[int]] = {}
    for record in records:
        if record.key is not None:
            assert record.partition == default(record.key, [0, 1, 2], [0, 1, 2]), record.key
            by_key.setdefault(record.key, []).append(int(enriched_ids([record])[0]))
    assert len(by_key) == 9
    for ids in by_key.values():
        assert ids == sorted(ids)  # one key's events in order
    assert sum(record.key is None for record in records) == 12
    assert worker.counters.enriched == 120 and worker.counters.aborted == 0


# --- transactions --------------------------------------------------------------------------------------


class FlakyWorker(Worker):
    """Fails the first ``failures`` offset commits, after the batch's records were written."""

    failures = 1

    def _new_producer(self) -> Any:
        producer = super()._new_producer()
        original = producer.send_offsets_to_transaction

        async def flaky(offsets: Any, group_id: str) -> None:
            if self.failures:
                self.failures -= 1
                raise KafkaTimeoutError("injected failure")
            await original(offsets, group_id)

        producer.send_offsets_to_transaction = flaky
        return producer


async def test_an_aborted_batch_is_invisible_to_read_committed_and_retried(
        enrich_bootstrap: str, make_topics: Callable[[int], Awaitable[Topics]]) -> None:
    topics = await make_topics(1)
    await produce(enrich_bootstrap, topics.raw,
                  [(b"k", numbered_event(n), raw_headers(n)) for n in range(30)])
    worker = FlakyWorker(worker_config(enrich_bootstrap, topics, unique("group"), batch_size=10),
                         enrich_transform(None), transactional_id=unique("txn"))
    async with running(worker):
        committed = await consume_all(enrich_bootstrap, topics.out, 30, timeout=60, settle=2)
    assert enriched_ids(committed) == [str(n) for n in range(30)]
    # The aborted attempt did write its records; read_uncommitted shows them, read_committed does not.
    everything = await consume_all(enrich_bootstrap, topics.out, 40, timeout=10,
                                   isolation_level="read_uncommitted")
    assert len(everything) == 40
    assert sorted(enriched_ids(everything)) == sorted([str(n) for n in range(30)] * 1
                                                      + [str(n) for n in range(10)])
    assert worker.counters.aborted == 1
    assert worker.counters.batches == 3


async def test_offsets_are_committed_with_the_output(enrich_bootstrap: str,
                                                     make_topics: Callable[[int], Awaitable[Topics]]) -> None:
    """A second worker generation of the same group resumes exactly where the first one stopped."""
    topics = await make_topics(2)
    group = unique("group")
    first = [(b"k%d" % (n % 4), numbered_event(n), raw_headers(n)) for n in range(50)]
    await produce(enrich_bootstrap, topics.raw, first)
    config = worker_config(enrich_bootstrap, topics, group, batch_size=7)
    async with running(Worker(config, enrich_transform(None), transactional_id=unique("txn"))):
        await consume_all(enrich_bootstrap, topics.out, 50, timeout=60)
    await produce(enrich_bootstrap, topics.raw,
                  [(b"k%d" % (n % 4), numbered_event(n), raw_headers(n)) for n in range(50, 80)])
    second = Worker(config, enrich_transform(None), transactional_id=unique("txn"))
    async with running(second):
        records = await consume_all(enrich_bootstrap, topics.out, 80, timeout=60, settle=2)
    assert sorted(int(i) for i in enriched_ids(records)) == list(range(80))
    assert second.counters.records_in == 30


# --- consumer group ------------------------------------------------------------------------------------


async def _count(consumer: AIOKafkaConsumer, seen: list[Any], target: int, within: float) -> None:
    deadline = time.monotonic() + within
    while len(seen) < target and time.monotonic() < deadline:
        for records in (await consumer.getmany(timeout_ms=200)).values():
            seen.extend(records)
    assert len(seen) >= target, f"only {len(seen)} of {target} enriched records after {within} s"


async def _owned_by_both(a: Worker, b: Worker, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        owned_a, owned_b = a.assigned_partitions, b.assigned_partitions
        if owned_a and owned_b and len(owned_a | owned_b) == 4 and not owned_a & owned_b:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the two workers did not share the partitions")


async def test_two_workers_share_partitions_across_rebalances(
        enrich_bootstrap: str, make_topics: Callable[[int], Awaitable[Topics]]) -> None:
    topics = await make_topics(4)
    group = unique("group")
    config = worker_config(enrich_bootstrap, topics, group, batch_size=20)

    def batch(start: int, stop: int) -> list[tuple[bytes | None, bytes | None, Headers]]:
        return [(b"actor-%d" % (n % 16), numbered_event(n), raw_headers(n)) for n in range(start, stop)]

    reader = AIOKafkaConsumer(topics.out, bootstrap_servers=enrich_bootstrap, auto_offset_reset="earliest",
                              isolation_level="read_committed", enable_auto_commit=False)
    await reader.start()
    seen: list[Any] = []
    try:
        a = Worker(config, enrich_transform(None), transactional_id=unique("txn-a"))
        b = Worker(config, enrich_transform(None), transactional_id=unique("txn-b"))
        async with running(a):
            await produce(enrich_bootstrap, topics.raw, batch(0, 300))
            await _count(reader, seen, 100, 60)
            async with running(b):  # b joins: rebalance while a is busy
                await _owned_by_both(a, b)
                await produce(enrich_bootstrap, topics.raw, batch(300, 600))
                await _count(reader, seen, 600, 60)
                b_before = b.counters.records_in
                assert b_before > 0 and a.counters.records_in > 0
                await produce(enrich_bootstrap, topics.raw, batch(600, 700))
                await _count(reader, seen, 650, 60)
            # b left the group gracefully: a takes every partition again
            await produce(enrich_bootstrap, topics.raw, batch(700, 800))
            await _count(reader, seen, 800, 60)
        await asyncio.sleep(2)  # anything extra would arrive now
        for records in (await reader.getmany(timeout_ms=500)).values():
            seen.extend(records)
    finally:
        await reader.stop()
    ids = [int(i) for i in enriched_ids(seen)]
    assert len(ids) == 800
    assert sorted(ids) == list(range(800))
    assert a.counters.records_in + b.counters.records_in == 800
    assert a.counters.duplicates == b.counters.duplicates == 0


# --- crashes -------------------------------------------------------------------------------------------


def _spawn(bootstrap: str, topics: Topics, group: str, index: int, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FALCO_GITLAB_ENRICH_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "FALCO_GITLAB_ENRICH_KAFKA__INPUT_TOPIC": topics.raw,
        "FALCO_GITLAB_ENRICH_KAFKA__OUTPUT_TOPIC": topics.out,
        "FALCO_GITLAB_ENRICH_KAFKA__DLQ_TOPIC": topics.dlq,
        "FALCO_GITLAB_ENRICH_KAFKA__GROUP_ID": group,
        "FALCO_GITLAB_ENRICH_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "FALCO_GITLAB_ENRICH_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "FALCO_GITLAB_ENRICH_KAFKA__TRANSACTION_TIMEOUT_MS": "4000",
        "FALCO_GITLAB_ENRICH_KAFKA__REBALANCE_TIMEOUT_MS": "20000",
        "FALCO_GITLAB_ENRICH_PROCESSING__BATCH_SIZE": "25",
        "FALCO_GITLAB_ENRICH_PROCESSING__POLL_TIMEOUT_MS": "100",
        "FALCO_GITLAB_ENRICH_GEOIP__CITY_DB": str(CITY_TEST_DB),
        "FALCO_GITLAB_ENRICH_METRICS__LOG_INTERVAL_S": "5",
    }
    with log_path.open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "enrich", "--worker-index", str(index)], env=env,
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
async def test_sigkill_mid_stream_neither_loses_nor_duplicates(
        enrich_bootstrap: str, make_topics: Callable[[int], Awaitable[Topics]], tmp_path: Path) -> None:
    total = 6000
    topics = await make_topics(4)
    group = unique("group")
    await produce(enrich_bootstrap, topics.raw,
                  [(b"actor-%d" % (n % 32), numbered_event(n), raw_headers(n)) for n in range(total)])
    logs = [tmp_path / "worker-0.log", tmp_path / "worker-1.log"]
    workers = [_spawn(enrich_bootstrap, topics, group, i, logs[i]) for i in range(2)]
    reader = AIOKafkaConsumer(topics.out, bootstrap_servers=enrich_bootstrap, auto_offset_reset="earliest",
                              isolation_level="read_committed", enable_auto_commit=False,
                              group_id=None)
    await reader.start()
    seen: list[Any] = []
    kills = 0
    try:
        # Kill a worker (alternately the first and the second) each time another sixth of the events has
        # been committed, and restart it with the same index, i.e. the same transactional id.
        for step in range(1, 5):
            await _count(reader, seen, total * step // 6, 90)
            victim = kills % 2
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait(10)
            kills += 1
            workers[victim] = _spawn(enrich_bootstrap, topics, group, victim, logs[victim])
        await _count(reader, seen, total, 120)
        await asyncio.sleep(3)
        for records in (await reader.getmany(timeout_ms=1000)).values():
            seen.extend(records)
        # A graceful stop commits and exits 0.
        for process in workers:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(40) for process in workers]
    finally:
        await reader.stop()
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    ids = [int(i) for i in enriched_ids(seen)]
    duplicates = len(ids) - len(set(ids))
    missing = set(range(total)) - set(ids)
    assert kills == 4
    assert not missing and not duplicates, (
        f"{len(missing)} missing, {duplicates} duplicated; logs: {[p.read_text()[-3000:] for p in logs]}")
    assert len(ids) == total
    assert codes == [0, 0], [p.read_text()[-3000:] for p in logs]
    text = logs[0].read_text()
    assert "geoip: city=" in text
    assert "enrich worker stopped" in text
    assert await consume_all(enrich_bootstrap, topics.dlq, 1, timeout=1) == []


@pytest.mark.slow
async def test_a_stalled_worker_does_not_commit_after_its_partitions_moved(
        enrich_bootstrap: str, make_topics: Callable[[int], Awaitable[Topics]], tmp_path: Path) -> None:
    """SIGSTOP one worker past its session timeout (a zombie), let the other take over, then SIGCONT."""
    total = 4000
    topics = await make_topics(4)
    group = unique("group")
    await produce(enrich_bootstrap, topics.raw,
                  [(b"actor-%d" % (n % 32), numbered_event(n), raw_headers(n)) for n in range(total)])
    logs = [tmp_path / "worker-0.log", tmp_path / "worker-1.log"]
    workers = [_spawn(enrich_bootstrap, topics, group, i, logs[i]) for i in range(2)]
    reader = AIOKafkaConsumer(topics.out, bootstrap_servers=enrich_bootstrap, auto_offset_reset="earliest",
                              isolation_level="read_committed", enable_auto_commit=False, group_id=None)
    await reader.start()
    seen: list[Any] = []
    try:
        await _count(reader, seen, total // 5, 90)
        workers[0].send_signal(signal.SIGSTOP)
        # Longer than the session timeout (6 s) and than the transaction timeout (4 s) plus the broker's
        # check interval for timed-out transactions (10 s by default).
        await asyncio.sleep(16)
        workers[0].send_signal(signal.SIGCONT)
        await _count(reader, seen, total, 120)
        await asyncio.sleep(3)
        for records in (await reader.getmany(timeout_ms=1000)).values():
            seen.extend(records)
        for process in workers:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(40) for process in workers]
    finally:
        await reader.stop()
        for process in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
                process.wait()
    ids = [int(i) for i in enriched_ids(seen)]
    duplicates = len(ids) - len(set(ids))
    missing = set(range(total)) - set(ids)
    assert not missing and not duplicates, (
        f"{len(missing)} missing, {duplicates} duplicated; logs: {[p.read_text()[-3000:] for p in logs]}")
    assert codes == [0, 0], [p.read_text()[-3000:] for p in logs]
