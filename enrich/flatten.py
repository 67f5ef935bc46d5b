"""Turn one raw GitLab audit event into an enriched record (pure: no I/O, no Kafka)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Final

import msgspec

from falco_gitlab.fields import compute_event_fields, effective_ip_address, first_address
from falco_gitlab.model import ENRICHED_SCHEMA_VERSION, EnrichedRecord, FieldValue, GeoInfo, decode_event

GeoLookup = Callable[[str], GeoInfo | None]


class MalformedEvent(ValueError):
    """The record cannot become a Falco event; the message is the dead-letter reason."""


def parse_created_at(text: str) -> int:
    """ISO-8601 (GitLab: UTC with milliseconds and a Z) to ns since the epoch."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("created_at has no time zone")
    ns = int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1_000
    # Falco timestamps are unsigned 64-bit ns; a date outside that range is not a real GitLab time.
    if not 0 <= ns < _MAX_TS_NS:
        raise ValueError("created_at is outside the range of a Falco timestamp")
    return ns


_MAX_TS_NS: Final = 2**63


def flatten(
    raw: bytes,
    *,
    destination: str | None,
    header_event_type: str | None,
    received_at_ns: int,
    geo: GeoLookup | None = None,
) -> EnrichedRecord:
    """Decode, compute every catalogue field and geolocate; raises MalformedEvent with the reason."""
    ts, fields = enrich_event(raw, destination, header_event_type, received_at_ns, geo)
    return EnrichedRecord(ENRICHED_SCHEMA_VERSION, ts, fields, raw)


_encoder: Final = msgspec.msgpack.Encoder()
_encode_array: Final = _encoder.encode


def flatten_encoded(
    raw: bytes,
    destination: str | None,
    header_event_type: str | None,
    received_at_ns: int,
    geo: GeoLookup | None = None,
) -> bytes:
    """``encode_enriched(flatten(...))`` without the intermediate record (the same bytes: an
    array-like struct is encoded as the array of its fields)."""
    ts, fields = enrich_event(raw, destination, header_event_type, received_at_ns, geo)
    return _encode_array((ENRICHED_SCHEMA_VERSION, ts, fields, raw))


def enrich_event(
    raw: bytes,
    destination: str | None,
    header_event_type: str | None,
    received_at_ns: int,
    geo: GeoLookup | None = None,
) -> tuple[int, dict[str, FieldValue]]:
    """The event time and the fields of one raw event (see ``flatten``)."""
    try:
        event = decode_event(raw)
    except msgspec.ValidationError as exc:
        raise MalformedEvent(f"invalid audit event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MalformedEvent(f"not JSON: {exc}") from None
    except UnicodeDecodeError:
        raise MalformedEvent("not JSON: a string is not valid UTF-8") from None
    except RecursionError:
        raise MalformedEvent("not JSON: nested too deeply") from None
    if not (event.event_type or header_event_type):
        raise MalformedEvent("no event_type in the body and no X-Gitlab-Audit-Event-Type header")

    # What a FieldContext would hold, without making one (compute_event_fields takes the parts).
    ip_address = effective_ip_address(event)
    client_ip = first_address(ip_address)
    errors: list[str] = []
    ts = received_at_ns
    created_at = event.created_at
    if created_at:
        try:
            ts = parse_created_at(created_at)
        except (ValueError, OverflowError):
            errors.append(f"unparseable created_at {created_at!r}; using receive time")
    info = None
    if geo is not None and client_ip is not None:
        try:
            info = geo(client_ip)
        except ValueError:
            errors.append(f"cannot geolocate {client_ip!r}: not an IP address")
    fields = compute_event_fields(event, destination, header_event_type, ip_address, client_ip, info, errors)
    return ts, fields
