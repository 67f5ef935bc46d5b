"""The unit that travels from a request to Kafka, directly or through the spool."""

from __future__ import annotations

import msgspec


class OutRecord(msgspec.Struct, array_like=True, frozen=True):
    """One Kafka record to produce: value is always the exact bytes to publish."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    @property
    def size(self) -> int:
        return len(self.value) + len(self.key or b"") + sum(len(k) + len(v) for k, v in self.headers)
