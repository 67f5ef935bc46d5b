"""Kafka wire contract shared by every stage: topic names, header names, record keys."""

from __future__ import annotations

from typing import Final

TOPIC_RAW: Final = "gitlab.audit.raw"
TOPIC_ENRICHED: Final = "gitlab.audit.enriched"
TOPIC_DLQ: Final = "gitlab.audit.dlq"

# Record headers (values are ASCII bytes). Ingest sets the first four on every raw record; enrich
# carries them onto the enriched record so provenance survives the whole pipeline.
HDR_DESTINATION: Final = "gitlab-destination"
HDR_EVENT_TYPE: Final = "gitlab-event-type"
HDR_RECEIVED_AT: Final = "gitlab-received-at"  # Unix time in nanoseconds, decimal
HDR_REQUEST_ID: Final = "gitlab-request-id"
# Unique per accepted event ("<request id>.<index in the request>"): lets enrich drop the second copy
# when ingest had to re-publish from its spool an event whose first send did reach Kafka after all.
HDR_EVENT_UID: Final = "gitlab-event-uid"

# Dead-letter records keep the original bytes as value and say why and where they failed.
HDR_DLQ_REASON: Final = "dlq-reason"
HDR_DLQ_STAGE: Final = "dlq-stage"  # "ingest" or "enrich"
HDR_DLQ_SOURCE: Final = "dlq-source"  # "topic/partition/offset" for records that came from Kafka

Headers = list[tuple[str, bytes]]


def header_value(headers: Headers | None, name: str) -> str | None:
    """The first header called ``name``, decoded, or None."""
    for key, value in headers or ():
        if key == name:
            return value.decode("utf-8", "replace") if value is not None else None
    return None


def plain_int(text: str) -> int | None:
    """The integer ``text`` spells in ASCII digits with at most one leading minus, else None.

    ``str.isdigit`` alone also accepts "²" and "--5", which ``int()`` refuses: a sender's odd value must
    never become an exception."""
    digits = text[1:] if text[:1] == "-" else text
    return int(text) if digits.isascii() and digits.isdigit() else None


def actor_key(author_id: int | str | None, attempted_name: str | None) -> bytes | None:
    """Partition key that keeps one actor's events in order on one partition.

    Non-users (author_id < 0: unauthenticated, deploy token, deploy key, indexer) all share a few ids,
    so for them the attempted user name tells actors apart (a password-spraying burst against one
    account stays ordered).
    """
    numeric: int | None = None
    if isinstance(author_id, int):
        numeric = author_id
    elif isinstance(author_id, str):
        numeric = plain_int(author_id)
    if numeric is not None and numeric >= 0:
        return b"id:%d" % numeric
    if attempted_name:
        return b"name:" + attempted_name.encode("utf-8")
    if numeric is not None:
        return b"id:%d" % numeric
    return None
