"""Test helpers for enrich: seed payloads, a tiny MaxMind DB writer, Kafka helpers.

The MaxMind DB writer implements the published format (https://maxmind.github.io/MaxMind-DB/) just far
enough for tests: an IPv6 search tree (IPv4 networks mapped under ::/96), 24-bit records, and a data
section of maps, arrays, strings and unsigned integers, no pointers. It lets tests build an ASN database
and City databases whose content differs from MaxMind's test databases (to see a reload take effect).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_REPO_SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "gitlab"
SEED_DIR = Path(os.environ.get("FALCO_GITLAB_SEED_DIR", _REPO_SAMPLES))
DATA_DIR = Path(__file__).resolve().parent / "data"
GEOIP_DIR = DATA_DIR / "geoip"
CITY_TEST_DB = GEOIP_DIR / "GeoLite2-City-Test.mmdb"
GEOIP2_CITY_TEST_DB = GEOIP_DIR / "GeoIP2-City-Test.mmdb"


def seed_payloads() -> dict[str, bytes]:
    """File stem -> exact bytes of every captured GitLab payload (sorted by name)."""
    return {path.stem: path.read_bytes() for path in sorted(SEED_DIR.glob("*.json"))}


# --- MaxMind DB writer -----------------------------------------------------------------------------

_METADATA_MARKER = b"\xab\xcd\xefMaxMind.com"


def _control(type_number: int, size: int) -> bytes:
    if size < 29:
        head, extra = size, b""
    elif size < 29 + 256:
        head, extra = 29, bytes([size - 29])
    elif size < 285 + 65536:
        head, extra = 30, struct.pack(">H", size - 285)
    else:
        head, extra = 31, struct.pack(">I", size - 65821)[1:]
    if type_number <= 7:
        return bytes([(type_number << 5) | head]) + extra
    return bytes([head, type_number - 7]) + extra


class UInt:
    """An unsigned integer of an explicit MaxMind DB type (libmaxminddb checks metadata types)."""

    TYPES = {16: 5, 32: 6, 64: 9, 128: 10}

    def __init__(self, value: int, bits: int) -> None:
        self.value, self.type_number = value, self.TYPES[bits]


def encode_value(value: Any) -> bytes:
    """MaxMind DB data-section encoding of one value."""
    if isinstance(value, UInt):
        raw = value.value.to_bytes((value.value.bit_length() + 7) // 8, "big") if value.value else b""
        return _control(value.type_number, len(raw)) + raw
    if isinstance(value, bool):
        return _control(14, int(value))
    if isinstance(value, str):
        raw = value.encode("utf-8")
        return _control(2, len(raw)) + raw
    if isinstance(value, bytes):
        return _control(4, len(value)) + value
    if isinstance(value, float):
        return _control(3, 8) + struct.pack(">d", value)
    if isinstance(value, int):
        if value < 0:
            raw = struct.pack(">i", value)
            return _control(8, 4) + raw
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
        type_number = 5 if value < 1 << 16 else 6 if value < 1 << 32 else 9 if value < 1 << 64 else 10
        return _control(type_number, len(raw)) + raw
    if isinstance(value, Mapping):
        out = _control(7, len(value))
        for key, item in value.items():
            out += encode_value(str(key)) + encode_value(item)
        return out
    if isinstance(value, list | tuple):
        out = _control(11, len(value))
        for item in value:
            out += encode_value(item)
        return out
    raise TypeError(f"cannot encode {type(value).__name__} in a MaxMind DB")


def _bits(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[int]:
    """The path of a network in an IPv6 tree (an IPv4 network lives under ::/96)."""
    value = int(network.network_address)
    length = network.prefixlen + (96 if network.version == 4 else 0)
    return [(value >> (127 - i)) & 1 for i in range(length)]


def build_mmdb(
    path: str | os.PathLike[str],
    networks: Mapping[str, Mapping[str, Any]],
    *,
    database_type: str,
    languages: Iterable[str] = ("en",),
    build_epoch: int | None = None,
) -> Path:
    """Write a MaxMind DB mapping each network ("1.2.3.0/24", "2001:db8::/32") to a record.

    Networks must not overlap (a more specific network inside another one is not supported).
    """
    data = bytearray()
    data_offsets: list[int] = []
    # Trie of dicts: node = [left, right], a child is None, a node (list) or ("data", index).
    root: list[Any] = [None, None]
    for index, (network_text, record) in enumerate(networks.items()):
        data_offsets.append(len(data))
        data += encode_value(dict(record))
        bits = _bits(ipaddress.ip_network(network_text, strict=False))
        node = root
        for depth, bit in enumerate(bits):
            if depth == len(bits) - 1:
                node[bit] = ("data", index)
                break
            child = node[bit]
            if not isinstance(child, list):
                child = node[bit] = [None, None]
            node = child
    # Number the nodes breadth first.
    order: list[list[Any]] = []
    queue = [root]
    while queue:
        node = queue.pop(0)
        order.append(node)
        queue.extend(child for child in node if isinstance(child, list))
    ids = {id(node): number for number, node in enumerate(order)}
    node_count = len(order)

    def record_value(child: Any) -> int:
        if child is None:
            return node_count
        if isinstance(child, list):
            return ids[id(child)]
        return node_count + 16 + data_offsets[child[1]]

    tree = bytearray()
    for node in order:
        for child in node:
            value = record_value(child)
            if value >= 1 << 24:
                raise ValueError("database too large for 24-bit records")
            tree += value.to_bytes(3, "big")
    metadata = {
        "binary_format_major_version": UInt(2, 16),
        "binary_format_minor_version": UInt(0, 16),
        "build_epoch": UInt(build_epoch if build_epoch is not None else int(time.time()), 64),
        "database_type": database_type,
        "description": {"en": f"falco-gitlab test {database_type} database"},
        "ip_version": UInt(6, 16),
        "languages": list(languages),
        "node_count": UInt(node_count, 32),
        "record_size": UInt(24, 16),
    }
    target = Path(path)
    target.write_bytes(bytes(tree) + bytes(16) + bytes(data) + _METADATA_MARKER + encode_value(metadata))
    return target


def city_record(city: str | None, country: str, iso: str, continent: str, continent_code: str,
                subdivisions: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "continent": {"code": continent_code, "names": {"en": continent}},
        "country": {"iso_code": iso, "names": {"en": country}},
    }
    if city is not None:
        record["city"] = {"names": {"en": city}}
    if subdivisions:
        record["subdivisions"] = [{"iso_code": code, "names": {"en": name}} for name, code in subdivisions]
    return record


def replace_file(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Replace ``target`` the way geoipupdate does: write a temporary file, then rename it over."""
    temporary = Path(f"{target}.{uuid.uuid4().hex}.tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


# --- Kafka helpers ---------------------------------------------------------------------------------


def unique(name: str) -> str:
    return f"test-enrich-{name}-{uuid.uuid4().hex[:10]}"


async def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 1,
                        config: dict[str, str] | None = None) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=config or {})
                                   for name in names])
    finally:
        await admin.close()


async def delete_topics(bootstrap: str, names: Iterable[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(names))
    except Exception:
        pass
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str,
                  records: Iterable[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]],
                  partition: int | None = None) -> int:
    """Send (key, value, headers) records with acks=all; returns the count."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                linger_ms=5)
    await producer.start()
    count = 0
    try:
        futures = []
        for key, value, headers in records:
            futures.append(await producer.send(topic, value, key=key, headers=headers, partition=partition))
            count += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return count


async def consume_all(bootstrap: str, topic: str, expected: int, *, timeout: float = 60.0,  # noqa: ASYNC109
                      settle: float = 0.0, isolation_level: str = "read_committed") -> list[Any]:
    """Read ``topic`` from the beginning until ``expected`` records arrived (then ``settle`` seconds more
    to catch extras) or ``timeout``; returns the ConsumerRecords."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, isolation_level=isolation_level, group_id=None)
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp_records in batch.values():
                records.extend(tp_records)
            if len(records) >= expected:
                if settle_until is None:
                    settle_until = time.monotonic() + settle
                if time.monotonic() >= settle_until:
                    break
    finally:
        await consumer.stop()
    return records


def load_json(raw: bytes) -> Any:
    return json.loads(raw)
