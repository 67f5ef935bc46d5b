"""Helpers for the plugin tests and benchmark: build the library, compile and run the C host, Kafka I/O.

The host (tests/host/plugin_host.c) prints one JSON object per line on stdout and the plugin's log
messages as JSON lines on stderr; ``HostRun`` parses both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST_SOURCE = ROOT / "tests" / "host" / "plugin_host.c"
_REPO_SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "gitlab"
SEED_DIR = Path(os.environ.get("FALCO_GITLAB_SEED_DIR", _REPO_SAMPLES))
# A fixed receive time, so that expected values never depend on the clock.
RECEIVED_AT_NS = 1_700_000_000_000_000_000


def build_library(directory: Path, plugin_id: int = 999) -> Path:
    from falco_source.build import build_plugin

    return build_plugin(directory / "libgitlabkafka.so", plugin_id=plugin_id, tmpdir=directory).path


def compile_host(directory: Path) -> Path:
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc/cc) to build the test host")
    output = directory / "plugin_host"
    subprocess.run(
        [compiler, "-O2", "-g", "-Wall", "-Wextra", "-std=gnu11", "-I", str(ROOT / "falco_source"),
         "-o", str(output), str(HOST_SOURCE), "-ldl", "-lpthread"],
        check=True, capture_output=True, text=True,
    )
    return output


@dataclass
class HostRun:
    returncode: int
    lines: list[dict[str, Any]]
    logs: list[dict[str, Any]]
    stderr: str
    argv: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("kind") == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of(kind)
        assert len(found) == 1, f"expected one {kind!r} line, got {len(found)}: {self.explain()}"
        return found[0]

    def events(self, cycle: int | None = None, thread: int | None = None) -> list[dict[str, Any]]:
        return [e for e in self.of("event")
                if (cycle is None or e["cycle"] == cycle) and (thread is None or e["thread"] == thread)]

    def explain(self) -> str:
        tail = "\n".join(self.stderr.splitlines()[-30:])
        other = [line for line in self.lines if line.get("kind") not in ("event", "meta")]
        return f"rc={self.returncode} argv={self.argv}\nnon-event lines: {other}\nstderr tail:\n{tail}"


def run_host(host: Path, library: Path, *args: str, timeout: float = 120.0,
             env: dict[str, str] | None = None) -> HostRun:
    argv = [str(host), "--lib", str(library), *args]
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, env=env, cwd="/")
    lines = [json.loads(line) for line in proc.stdout.decode("utf-8", "replace").splitlines() if line.strip()]
    stderr = proc.stderr.decode("utf-8", "replace")
    logs = []
    for line in stderr.splitlines():
        if line.startswith('{"kind":"log"'):
            logs.append(json.loads(line))
    return HostRun(proc.returncode, lines, logs, stderr, argv)


def field_args(names: Iterable[str]) -> list[str]:
    args: list[str] = []
    for name in names:
        args += ["--field", name]
    return args


# --- records ----------------------------------------------------------------------------------------

def seed_payloads() -> list[tuple[str, bytes]]:
    return [(path.stem, path.read_bytes()) for path in sorted(SEED_DIR.glob("*.json"))]


def seed_records() -> list[tuple[str, Any, bytes]]:
    """(name, EnrichedRecord, encoded value) for every seed payload, in file-name order."""
    from enrich.flatten import flatten
    from falco_gitlab.model import encode_enriched

    out = []
    for name, raw in seed_payloads():
        record = flatten(raw, destination="test-instance", header_event_type=None,
                         received_at_ns=RECEIVED_AT_NS)
        out.append((name, record, encode_enriched(record)))
    return out


def expected_value(record: Any, qualified_name: str) -> Any:
    """What the host prints for a catalogue field of ``record`` (None when absent)."""
    from falco_gitlab.fields import BY_QUALIFIED_NAME, FieldType, lookup_path, render

    if "[" in qualified_name:
        name, _, arg = qualified_name.partition("[")
        assert name == "gitlab.value", name
        return lookup_path(json.loads(record.raw), arg.rstrip("]"))
    spec = BY_QUALIFIED_NAME[qualified_name]
    value = record.fields.get(spec.name)
    if value is None:
        return None
    if spec.type == FieldType.STRING:
        return value if isinstance(value, str) else render(value)
    if spec.type == FieldType.BOOL:
        return bool(value)
    return int(value)


def write_baseline(path: Path, values: Sequence[bytes]) -> Path:
    with path.open("wb") as handle:
        for value in values:
            handle.write(struct.pack("<I", len(value)))
            handle.write(value)
    return path


# --- Kafka (confluent-kafka, synchronous) --------------------------------------------------------------

def unique(prefix: str) -> str:
    return f"test-plugin-{prefix}-{uuid.uuid4().hex[:10]}"


def create_topic(bootstrap: str, topic: str, partitions: int = 1, timeout: float = 30.0) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    futures[topic].result(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metadata = admin.list_topics(topic, timeout=5)
        info = metadata.topics.get(topic)
        if info is not None and info.error is None and len(info.partitions) == partitions:
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {topic} not ready")


def delete_topics(bootstrap: str, topics: Sequence[str]) -> None:
    if not topics:
        return
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(list(topics)).values():
        with contextlib.suppress(Exception):  # best-effort clean-up
            future.result(timeout=30)


def produce(
    bootstrap: str,
    topic: str,
    values: Sequence[bytes | None],
    *,
    transactional: bool = True,
    partition: int | None = None,
    timestamps_ms: Sequence[int] | None = None,
) -> None:
    """Produce ``values`` in order (in one transaction by default, like enrich does)."""
    from confluent_kafka import Producer

    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap, "linger.ms": 5, "message.max.bytes": 8 * 1024 * 1024,
    }
    if transactional:
        config["transactional.id"] = f"plugin-test-{uuid.uuid4().hex[:8]}"
    producer = Producer(config)
    if transactional:
        producer.init_transactions(30)
        producer.begin_transaction()
    for index, value in enumerate(values):
        kwargs: dict[str, Any] = {"value": value, "key": str(index).encode()}
        if partition is not None:
            kwargs["partition"] = partition
        if timestamps_ms is not None:
            kwargs["timestamp"] = timestamps_ms[index]
        producer.produce(topic, **kwargs)
    if transactional:
        producer.commit_transaction(30)
    else:
        remaining = producer.flush(30)
        assert remaining == 0, f"{remaining} records not delivered"


def plugin_config(bootstrap: str, topic: str, **extra: Any) -> str:
    config = {"brokers": bootstrap, "topic": topic, "open_timeout_ms": 15000, **extra}
    return json.dumps(config)
