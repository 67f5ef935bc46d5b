"""Test helpers for ingest: seed payloads, configurations, an in-process server, Kafka helpers."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import RawTestServer, TestClient

from falco_gitlab.contract import HDR_REQUEST_ID, header_value
from ingest.app import IngestService, create_service
from ingest.config import (
    DedupSettings,
    DestinationSettings,
    IngestConfig,
    KafkaSettings,
    ServerSettings,
    SpoolSettings,
)

_REPO_SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "gitlab"
SEED_DIR = Path(os.environ.get("FALCO_GITLAB_SEED_DIR", _REPO_SAMPLES))

TOKEN_PROD = "prodToken0123456789ab"  # 21 characters, base58-like
TOKEN_PROD_NEXT = "prodNext+/0123456789AB=="  # 24 characters, base64 alphabet (rotation)
TOKEN_GROUP = "groupToken9876543210x"
TOKEN_HEADER = "X-Gitlab-Event-Streaming-Token"
FORM = "application/x-www-form-urlencoded"
# A closed port: every connection is refused at once (Kafka "down").
UNREACHABLE = "127.0.0.1:9"


def seed_payloads() -> dict[str, bytes]:
    """File stem -> exact bytes of every captured GitLab payload (sorted by name)."""
    return {path.stem: path.read_bytes() for path in sorted(SEED_DIR.glob("*.json"))}


def make_config(
    spool_dir: Path,
    *,
    bootstrap: str = UNREACHABLE,
    topic: str = "gitlab.audit.raw",
    dlq_topic: str = "gitlab.audit.dlq",
    publish_timeout_s: float = 2.5,
    max_body_bytes: int = 1_048_576,
    spool_max_bytes: int = 64 * 1024 * 1024,
    body_timeout_s: float = 5.0,
    allow_networks: list[str] | None = None,
    trusted_proxies: list[str] | None = None,
    shutdown_timeout_s: float = 2.0,
    dedup: bool = True,
    debug_json: bool = False,
) -> IngestConfig:
    return IngestConfig(
        server=ServerSettings(
            host="127.0.0.1",
            port=0,
            max_body_bytes=max_body_bytes,
            body_timeout_s=body_timeout_s,
            trusted_proxies=trusted_proxies or [],
            shutdown_timeout_s=shutdown_timeout_s,
            debug_json=debug_json,
        ),
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap,
            topic=topic,
            dlq_topic=dlq_topic,
            publish_timeout_s=publish_timeout_s,
            request_timeout_ms=10_000,
            linger_ms=1,
        ),
        spool=SpoolSettings(dir=str(spool_dir), max_bytes=spool_max_bytes, segment_bytes=256 * 1024),
        dedup=DedupSettings(enabled=dedup),
        destinations=[
            DestinationSettings(
                name="gitlab-prod", tokens=[TOKEN_PROD, TOKEN_PROD_NEXT], allow_networks=allow_networks or []
            ),
            DestinationSettings(name="acme-group", tokens=[TOKEN_GROUP]),
        ],
    )


@dataclass
class Ingest:
    client: TestClient[Any, Any]
    config: IngestConfig
    service: IngestService

    @property
    def state(self) -> Any:
        return self.service.state

    async def post(
        self,
        body: bytes,
        *,
        token: str | None = TOKEN_PROD,
        event_type: str | None = None,
        path: str = "/",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str, str]:
        """POST like GitLab does (raw JSON labelled form-urlencoded); (status, text, request id)."""
        sent = {"Content-Type": FORM}
        if token is not None:
            sent[TOKEN_HEADER] = token
        if event_type is not None:
            sent["X-Gitlab-Audit-Event-Type"] = event_type
        sent.update(headers or {})
        async with self.client.post(path, data=body, headers=sent) as response:
            return response.status, await response.text(), response.headers.get("X-Request-Id", "")


@asynccontextmanager
async def running_ingest(config: IngestConfig) -> AsyncIterator[Ingest]:
    """The ingest service served in-process on a free port (on aiohttp's server, as ``serve`` does);
    stopped gracefully on exit: the server first, then the service's cleanup."""
    service = create_service(config)
    async with service.running():
        server = RawTestServer(service.handle, host="127.0.0.1")
        await server.start_server(**service.server_options)  # (the constructor ignores these)
        client: TestClient[Any, Any] = TestClient(server)
        await client.start_server()
        try:
            yield Ingest(client, config, service)
        finally:
            await client.close()


# --- Kafka helpers ---------------------------------------------------------------------------------------


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)

    @property
    def request_id(self) -> str | None:
        return self.header(HDR_REQUEST_ID)


async def consume_all(
    bootstrap: str, topic: str, expected: int, *, within: float = 30.0, settle: float = 1.0
) -> list[Record]:
    """Read ``topic`` from the beginning until ``expected`` records arrived (then ``settle`` more
    seconds, to catch extra ones) or ``within`` seconds; records ordered by partition and offset."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        isolation_level="read_committed",
    )
    await consumer.start()
    records: list[Record] = []
    try:
        deadline = time.monotonic() + within
        settle_until: float | None = None
        while True:
            now = time.monotonic()
            if settle_until is None and len(records) >= expected:
                settle_until = now + settle
            if now >= deadline or (settle_until is not None and now >= settle_until):
                break
            batch = await consumer.getmany(timeout_ms=200)
            for messages in batch.values():
                for m in messages:
                    records.append(
                        Record(m.topic, m.partition, m.offset, m.key, m.value, list(m.headers or []))
                    )
    finally:
        await consumer.stop()
    records.sort(key=lambda r: (r.partition, r.offset))
    return records


async def wait_until(predicate: Any, within: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())
