"""Through the real broker: exact bytes, keys and headers; transactions; the `kafka` CLI; crash recovery."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from falco_gitlab.devkafka import LocalKafka, probe

pytestmark = pytest.mark.kafka

Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


async def consume_all(
    bootstrap: str, topic: str, *, isolation_level: str = "read_uncommitted", timeout_ms: int = 30000
) -> list[Record]:
    """Every record of partition 0 from the beginning up to the end offset seen at start (the LSO when
    reading committed), without a consumer group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation_level
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        records: list[Record] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=timeout_ms)
            if not batch:
                raise AssertionError(
                    f"no records within {timeout_ms} ms; position {await consumer.position(tp)}"
                )
            for message in batch[tp]:
                records.append((message.key, message.value, list(message.headers)))
        return records
    finally:
        await consumer.stop()


async def test_roundtrip_exact_bytes_key_headers(kafka_bootstrap: str, topic: Callable[..., str]) -> None:
    name = topic(1)
    sent: list[Record] = [
        (b"key-1", bytes(range(256)), [("h1", b"\x00\xff"), ("h1", b"again"), ("ünïcode", "é".encode())]),
        (None, b'{"event_name":"user_created"}', []),
        (b"\x00binary\xffkey", b"", [("empty", b"")]),
        (b"tombstone", None, [("reason", b"deleted")]),
        (b"big", b"x" * 200_000, []),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=1_048_576)
    await producer.start()
    try:
        for key, value, headers in sent:
            await producer.send_and_wait(name, value, key=key, headers=headers, partition=0)
    finally:
        await producer.stop()

    assert await consume_all(kafka_bootstrap, name) == sent


async def test_transaction_committed_visible_aborted_not(
    kafka_bootstrap: str, topic: Callable[..., str]
) -> None:
    name = topic(1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"tx-{name}")
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(name, b"committed-1", key=b"a", partition=0)
        await producer.begin_transaction()
        await producer.send(name, b"aborted", key=b"b", partition=0)
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(name, b"committed-2", key=b"c", partition=0)
    finally:
        await producer.stop()

    committed = await consume_all(kafka_bootstrap, name, isolation_level="read_committed")
    assert [(k, v) for k, v, _ in committed] == [(b"a", b"committed-1"), (b"c", b"committed-2")]
    # The aborted record is in the log all the same: proof that read_committed filtered it.
    everything = await consume_all(kafka_bootstrap, name, isolation_level="read_uncommitted")
    assert [v for _, v, _ in everything] == [b"committed-1", b"aborted", b"committed-2"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "falco_gitlab", "kafka", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_status_and_env_when_not_running(tmp_path: Path) -> None:
    status = _cli("status", "--data-dir", str(tmp_path))
    assert status.returncode == 3, status
    assert "stopped" in status.stdout
    env = _cli("env", "--data-dir", str(tmp_path))
    assert env.returncode == 3 and env.stdout == ""


def test_cli_status_and_env_of_running_broker(kafka_broker: LocalKafka) -> None:
    status = _cli("status", "--data-dir", str(kafka_broker.data_dir))
    assert status.returncode == 0, status
    assert f"bootstrap: {kafka_broker.bootstrap}" in status.stdout
    assert "answering: yes" in status.stdout
    env = _cli("env", "--data-dir", str(kafka_broker.data_dir))
    assert env.returncode == 0
    assert env.stdout.strip() == f"KAFKA_BOOTSTRAP_SERVERS={kafka_broker.bootstrap}"


async def test_broker_crash_and_restart_keeps_address_and_data(
    kafka_broker: LocalKafka, topic: Callable[..., str]
) -> None:
    bootstrap = kafka_broker.bootstrap
    assert bootstrap is not None
    name = topic(1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(name, b"survives", key=b"k", partition=0)
    finally:
        await producer.stop()

    kafka_broker.kill()
    host, port = bootstrap.rsplit(":", 1)
    assert not kafka_broker.is_running()
    assert probe(host, int(port), timeout=1.0) is None

    assert kafka_broker.start() == bootstrap
    assert await consume_all(bootstrap, name) == [(b"k", b"survives", [])]
