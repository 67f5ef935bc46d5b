"""Dead-letter records written by enrich.

A dead-letter record keeps the original record's key, value (the exact bytes) and headers, and adds:

* ``dlq-reason``: why the record could not be enriched (UTF-8, at most ``MAX_REASON`` characters);
* ``dlq-stage``: ``enrich``;
* ``dlq-source``: ``<topic>/<partition>/<offset>`` of the original record.

It is written inside the same transaction as the consumed offsets, so it appears exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from falco_gitlab.contract import HDR_DLQ_REASON, HDR_DLQ_SOURCE, HDR_DLQ_STAGE, Headers

STAGE: Final = b"enrich"
MAX_REASON: Final = 1000
_DLQ_HEADERS: Final = frozenset((HDR_DLQ_REASON, HDR_DLQ_STAGE, HDR_DLQ_SOURCE))


def truncate_reason(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"


def dlq_headers(headers: Sequence[tuple[str, bytes]], reason: str, topic: str, partition: int,
                offset: int) -> Headers:
    """The original headers (minus any earlier dead-letter headers) plus reason, stage and source."""
    out: Headers = [(key, value) for key, value in headers if key not in _DLQ_HEADERS]
    out.append((HDR_DLQ_REASON, truncate_reason(reason).encode("utf-8")))
    out.append((HDR_DLQ_STAGE, STAGE))
    out.append((HDR_DLQ_SOURCE, f"{topic}/{partition}/{offset}".encode()))
    return out
