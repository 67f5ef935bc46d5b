"""ingest's Kafka producer (librdkafka through confluent-kafka) against a real broker: partitioning,
errors, shutdown with records in flight, and a broker that cannot be reached."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest
from aiokafka.partitioner import DefaultPartitioner

from falco_gitlab.devkafka import LocalKafka
from ingest.config import KafkaSettings
from ingest.publisher import KafkaPublisher, PublishError, is_permanent
from ingest.records import OutRecord
from tests.ingest_support import consume_all

pytestmark = pytest.mark.kafka


def _record(topic: str, key: bytes | None, value: bytes = b'{"id": 1}') -> OutRecord:
    return OutRecord(topic, key, value, [("gitlab-destination", b"prod")])


async def test_records_arrive_with_key_headers_and_the_java_clients_partition(
    kafka_bootstrap: str, topic: Callable[..., str]
) -> None:
    raw = topic(6)
    publisher = KafkaPublisher(KafkaSettings(bootstrap_servers=kafka_bootstrap, linger_ms=1), 1 << 20)
    await publisher.start()
    keys = [f"user:{n}".encode() for n in range(60)]
    try:
        futures = [await publisher.send(_record(raw, key, b'{"n": %d}' % n)) for n, key in enumerate(keys)]
        await asyncio.wait_for(asyncio.gather(*futures), 20)
    finally:
        await publisher.close(5)
    records = await consume_all(kafka_bootstrap, raw, len(keys))
    assert sorted(r.key for r in records if r.key is not None) == sorted(keys)
    assert all(dict(r.headers)["gitlab-destination"] == b"prod" for r in records)
    # The partition of each key is the Java client's (murmur2, the same function aiokafka implements):
    # enrich and any other producer put an actor's events on the same partition.
    java = DefaultPartitioner()
    assert all(r.partition == java(r.key, list(range(6)), list(range(6))) for r in records)


async def test_a_record_larger_than_allowed_is_a_permanent_error(
    kafka_bootstrap: str, topic: Callable[..., str]
) -> None:
    raw = topic(1)
    publisher = KafkaPublisher(KafkaSettings(bootstrap_servers=kafka_bootstrap), 100_000)
    await publisher.start()
    try:
        with pytest.raises(PublishError) as caught:
            future = await publisher.send(_record(raw, b"k", b"x" * 200_000))
            await asyncio.wait_for(future, 20)
        assert is_permanent(caught.value)
        assert not publisher.broken
        # The producer still works for records that fit.
        await asyncio.wait_for(await publisher.send(_record(raw, b"k")), 20)
    finally:
        await publisher.close(5)


async def test_start_fails_with_a_clear_error_when_no_broker_answers() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    publisher = KafkaPublisher(KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"), 1 << 20)
    started = time.monotonic()
    with pytest.raises(PublishError, match=f"Kafka not reachable at 127.0.0.1:{port}"):
        await publisher.start(timeout_s=1.0)
    assert time.monotonic() - started < 10
    assert not publisher.started
    with pytest.raises(PublishError, match="not started"):
        await publisher.send(_record("t", b"k"))


async def test_close_with_the_broker_down_fails_every_pending_record(
    kafka_bootstrap: str, kafka_broker: LocalKafka, topic: Callable[..., str]
) -> None:
    raw = topic(3)
    publisher = KafkaPublisher(KafkaSettings(bootstrap_servers=kafka_bootstrap), 1 << 20)
    await publisher.start()
    await asyncio.wait_for(await publisher.send(_record(raw, b"warm")), 20)
    kafka_broker.stop()
    try:
        futures = [await publisher.send(_record(raw, b"k%d" % n)) for n in range(20)]
        await asyncio.sleep(0.5)
        assert not any(f.done() for f in futures)  # nothing can be acknowledged
        await publisher.close(0.5)
        # No future is left hanging: each failed, so the spool keeps its record for the next start.
        done, pending = await asyncio.wait(futures, timeout=10)
        assert not pending
        assert all(isinstance(f.exception(), PublishError) for f in done)
    finally:
        kafka_broker.start()
