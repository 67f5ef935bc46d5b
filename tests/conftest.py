"""Shared fixtures: a real Kafka broker for the test session, never a mock (DESIGN.md section 5).

``kafka_bootstrap`` (session)  the broker's "host:port", found in this order:
    1. ``KAFKA_BOOTSTRAP_SERVERS`` from the environment (an external broker, used as is);
    2. the project's own broker (``falco_gitlab.devkafka.LocalKafka``), started for the session in
       ``<project>/.kafka/test-<pid>`` and stopped and purged at the end;
    3. testcontainers' ``KafkaContainer`` when a Docker engine is reachable;
    else the requesting tests fail with the reasons.
``kafka_backend`` (session)    ``KafkaBackend(bootstrap, kind, broker)``, kind: env, local, testcontainers.
``kafka_broker`` (function)    the session's ``LocalKafka``, for tests that kill, pause or restart it
    (skipped when the broker is external); after the test it is running and resumed again.
``topic`` (function)           factory ``topic(partitions=1, *, name=None, config=None) -> str`` creating a
    uniquely named topic with an admin client, waiting for its leaders; deleted after the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from falco_gitlab.devkafka import (
    DevKafkaError,
    LocalKafka,
    PrerequisiteMissing,
    cleanup_stale,
    default_data_dir,
)


@dataclass(frozen=True)
class KafkaBackend:
    bootstrap: str
    kind: str  # "env", "local" or "testcontainers"
    broker: LocalKafka | None = None


@pytest.fixture(scope="session")
def kafka_backend() -> Iterator[KafkaBackend]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield KafkaBackend(external, "env")
        return

    reasons: list[str] = []
    parent = default_data_dir()
    cleanup_stale(parent)  # brokers of killed earlier sessions
    broker = LocalKafka(parent / f"test-{os.getpid()}", die_with_parent=True)
    try:
        bootstrap = broker.start()
    except PrerequisiteMissing as exc:
        reasons.append(f"the project's own broker: {exc}")
    except DevKafkaError as exc:
        broker.stop(purge=True)
        pytest.fail(f"the project's own Kafka broker did not start: {exc}", pytrace=False)
    else:
        try:
            yield KafkaBackend(bootstrap, "local", broker)
        finally:
            broker.stop(purge=True)
        return

    container = _start_container(reasons)
    if container is not None:
        try:
            yield KafkaBackend(container.get_bootstrap_server(), "testcontainers")
        finally:
            container.stop()
        return

    pytest.fail(
        "no Kafka broker for the tests: set KAFKA_BOOTSTRAP_SERVERS=host:port, or install Java 17+ and "
        "Maven for the project's own broker, or run a Docker engine for testcontainers.\n  "
        + "\n  ".join(reasons),
        pytrace=False,
    )


def _start_container(reasons: list[str]) -> Any | None:
    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:
        reasons.append(f"testcontainers: no Docker engine reachable ({type(exc).__name__}: {exc})")
        return None
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:
        from testcontainers.kafka import KafkaContainer
    image = os.environ.get("FALCO_GITLAB_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.0")
    container = (
        KafkaContainer(image)
        .with_kraft()
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true")
    )
    container.start()
    return container


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_backend: KafkaBackend) -> str:
    return kafka_backend.bootstrap


@pytest.fixture
def kafka_broker(kafka_backend: KafkaBackend) -> Iterator[LocalKafka]:
    broker = kafka_backend.broker
    if broker is None:
        pytest.skip(
            f"needs the project's own broker to stop or restart; this session uses {kafka_backend.kind}"
        )
    yield broker
    status = broker.status(probe_timeout=None)
    if status.state == "paused":
        broker.resume()
    broker.start()  # no-op when running; otherwise back on the same address with the same data


@pytest.fixture
def topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap, "socket.timeout.ms": 10000})
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-")[:80]
    created: list[str] = []

    def make(partitions: int = 1, *, name: str | None = None, config: dict[str, str] | None = None) -> str:
        topic_name = name or f"test-{stem}-{uuid.uuid4().hex[:8]}"
        new = NewTopic(topic_name, num_partitions=partitions, replication_factor=-1, config=config or {})
        admin.create_topics([new], operation_timeout=30)[topic_name].result(timeout=60)
        created.append(topic_name)
        deadline = time.monotonic() + 30
        while True:  # the admin answer can precede the partitions' leaders
            meta = admin.list_topics(topic_name, timeout=10).topics.get(topic_name)
            if (
                meta is not None
                and meta.error is None
                and len(meta.partitions) == partitions
                and all(p.leader >= 0 for p in meta.partitions.values())
            ):
                return topic_name
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic_name} has no leaders after 30 s: {meta}")
            time.sleep(0.05)

    yield make
    if created:
        for future in admin.delete_topics(created, operation_timeout=10).values():
            with contextlib.suppress(Exception):  # best effort: the broker may be down after a fault test
                future.result(timeout=15)
