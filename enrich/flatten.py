"""Turn one raw GitLab audit event into an enriched record (pure: no I/O, no Kafka)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import msgspec

from falco_gitlab.fields import FieldContext, compute_fields
from falco_gitlab.model import ENRICHED_SCHEMA_VERSION, EnrichedRecord, GeoInfo, decode_event

GeoLookup = Callable[[str], GeoInfo | None]


class MalformedEvent(ValueError):
    """The record cannot become a Falco event; the message is the dead-letter reason."""


def parse_created_at(text: str) -> int:
    """ISO-8601 (GitLab: UTC with milliseconds and a Z) to ns since the epoch."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("created_at has no time zone")
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1_000


def flatten(
    raw: bytes,
    *,
    destination: str | None,
    header_event_type: str | None,
    received_at_ns: int,
    geo: GeoLookup | None = None,
) -> EnrichedRecord:
    """Decode, compute every catalogue field and geolocate; raises MalformedEvent with the reason."""
    try:
        event = decode_event(raw)
    except msgspec.ValidationError as exc:
        raise MalformedEvent(f"invalid audit event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MalformedEvent(f"not JSON: {exc}") from None
    if not (event.event_type or header_event_type):
        raise MalformedEvent("no event_type in the body and no X-Gitlab-Audit-Event-Type header")

    ctx = FieldContext(event, destination=destination, header_event_type=header_event_type)
    ts = received_at_ns
    if event.created_at:
        try:
            ts = parse_created_at(event.created_at)
        except ValueError:
            ctx.errors.append(f"unparseable created_at {event.created_at!r}; using receive time")
    if geo is not None and ctx.client_ip is not None:
        try:
            ctx.geo = geo(ctx.client_ip)
        except ValueError:
            ctx.errors.append(f"cannot geolocate {ctx.client_ip!r}: not an IP address")
    return EnrichedRecord(version=ENRICHED_SCHEMA_VERSION, ts=ts, fields=compute_fields(ctx), raw=raw)
