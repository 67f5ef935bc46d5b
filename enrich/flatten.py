"""Turn one raw GitLab audit event into an enriched record (pure: no I/O, no Kafka)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import msgspec

from falco_gitlab.fields import compute_event_fields, first_address, preferred_address
from falco_gitlab.model import ENRICHED_SCHEMA_VERSION, AuditEvent, EnrichedRecord, FieldValue, GeoInfo

GeoLookup = Callable[[str], GeoInfo | None]


class MalformedEvent(ValueError):
    """The record cannot become a Falco event; the message is the dead-letter reason."""


def parse_created_at(text: str) -> int:
    """ISO-8601 (GitLab: UTC with milliseconds and a Z) to ns since the epoch."""
    moment = _fromisoformat(text)
    try:
        delta = moment - _EPOCH
    except TypeError:  # naive: no time zone
        raise ValueError("created_at has no time zone") from None
    # Whole seconds since the epoch in integers: what int(moment.timestamp()) gives, without its float
    # detour (which costs more than the parse), wherever the two are sure to agree.
    seconds = delta.days * 86_400 + delta.seconds
    if 0 <= seconds < _EXACT_SECONDS:
        return seconds * 1_000_000_000 + moment.microsecond * 1_000
    ns = int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1_000
    # Falco timestamps are unsigned 64-bit ns; a date outside that range is not a real GitLab time.
    if not 0 <= ns < _MAX_TS_NS:
        raise ValueError("created_at is outside the range of a Falco timestamp")
    return ns


_fromisoformat: Final = datetime.fromisoformat
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TS_NS: Final = 2**63
# Below 2**33 s (year 2242) a float of seconds with microseconds still truncates to the exact whole
# second, so the integer result equals the timestamp() one; such times are also inside _MAX_TS_NS.
_EXACT_SECONDS: Final = 2**33


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
# falco_gitlab.model.decode_event without its wrapper call.
_decode_event: Final = msgspec.json.Decoder(AuditEvent).decode


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
    created_ns, fields = event_fields(raw, destination, header_event_type, geo)
    return (received_at_ns if created_ns is None else created_ns), fields


class AddressCache(Protocol):
    """Where ``event_fields`` keeps what it derived from client addresses (``GeoIP`` is one)."""

    derived: dict[Any, Any]  # address text -> Located; must be emptied when the lookups change
    derived_hits: int

    @property
    def cache_size(self) -> int: ...  # most entries in ``derived``


class LocalAddresses:
    """An ``AddressCache`` for lookups that never change (none at all, for instance)."""

    __slots__ = ("cache_size", "derived", "derived_hits")

    def __init__(self, cache_size: int = 65_536) -> None:
        self.derived: dict[Any, Any] = {}
        self.derived_hits = 0
        self.cache_size = cache_size


def event_fields(
    raw: bytes,
    destination: str | None,
    header_event_type: str | None,
    geo: GeoLookup | None = None,
    addresses: AddressCache | None = None,
) -> tuple[int | None, dict[str, FieldValue]]:
    """``created_at`` in ns (None when the event has none that parses: the receive time is used
    then) and the fields of one raw event; for callers that work out the receive time only when it is
    needed.

    ``addresses``, if given, caches what is derived from the client address (see ``locate``) by the
    address text, at most ``addresses.cache_size`` entries; its owner must empty it whenever ``geo``
    may answer differently (``GeoIP.derived`` is emptied on every database reload).
    """
    try:
        event = _decode_event(raw)
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
    detail = event.details.ip_address
    if addresses is None:
        ip_address, client_ip, info, problem = locate(detail, event.ip_address, geo)
    else:
        # Keyed by the address text that decides the result: details.ip_address, else (null) the
        # top-level one. A blank text decides nothing (a blank details value defers to the top-level
        # one): never cached.
        text = event.ip_address if detail is None else detail
        entries = addresses.derived
        located = entries.get(text)
        if located is None:
            located = locate(detail, event.ip_address, geo)
            if text is None or text.strip():
                if len(entries) >= addresses.cache_size:
                    entries.clear()
                entries[text] = located
        else:
            addresses.derived_hits += 1
        ip_address, client_ip, info, problem = located
    errors: list[str] = []
    created_ns = None
    created_at = event.created_at
    if created_at:
        try:
            created_ns = parse_created_at(created_at)
        except (ValueError, OverflowError):
            errors.append(f"unparseable created_at {created_at!r}; using receive time")
    if problem is not None:
        errors.append(problem)
    fields = compute_event_fields(event, destination, header_event_type, ip_address, client_ip, info, errors)
    return created_ns, fields


# (ip_address, client_ip, GeoInfo, problem to report in pluginerrormessage)
Located = tuple[str | None, str | None, GeoInfo | None, str | None]


def locate(detail: str | None, top: str | None, geo: GeoLookup | None) -> Located:
    """The address attributes of an event (``details.ip_address``, the top-level ``ip_address``):
    ``effective_ip_address``, ``first_address`` of it and what ``geo`` says about that."""
    ip_address = preferred_address(detail, top)
    client_ip = first_address(ip_address)
    info = problem = None
    if geo is not None and client_ip is not None:
        try:
            info = geo(client_ip)
        except ValueError:
            problem = f"cannot geolocate {client_ip!r}: not an IP address"
    return ip_address, client_ip, info, problem
