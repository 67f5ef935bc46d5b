"""Wire formats: the GitLab audit event as GitLab sends it, and the enriched record enrich writes.

The audit event model accepts every type variant GitLab is known to send (ids as numbers or strings,
``custom_message`` as text or object, ``from``/``to`` of any JSON type) and ignores keys it does not
know; the original bytes always travel beside the decoded view so nothing is lost.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

# Scalars GitLab renders into text attributes. Accepting all of them keeps an oddly typed attribute
# from sending a whole event to the dead-letter topic.
Scalar = str | int | float | bool | None
Id = int | str | None


# gc=False: decoded events cannot form reference cycles, and untracked structs make decoding cheaper
# and leave the garbage collector fewer objects to traverse (one event and its details per record).
class Details(msgspec.Struct, kw_only=True, gc=False):
    author_name: Scalar = None
    author_email: Scalar = None
    author_class: Scalar = None
    event_name: Scalar = None
    custom_message: Any = None
    ip_address: str | None = None
    entity_path: Scalar = None
    target_id: Id = None
    target_type: Scalar = None
    target_details: Scalar = None
    failed_login: Scalar = None
    add: Scalar = None
    change: Scalar = None
    remove: Scalar = None
    from_: Any = msgspec.field(name="from", default=msgspec.UNSET)
    to: Any = msgspec.UNSET
    as_: Scalar = msgspec.field(name="as", default=None)
    with_: Scalar = msgspec.field(name="with", default=None)


class AuditEvent(msgspec.Struct, kw_only=True, gc=False):
    id: Id = None
    author_id: Id = None
    entity_id: Id = None
    entity_type: Scalar = None
    entity_path: Scalar = None
    author_name: Scalar = None
    author_email: Scalar = None
    author_class: Scalar = None
    ip_address: str | None = None
    target_id: Id = None
    target_type: Scalar = None
    target_details: Scalar = None
    created_at: str | None = None
    event_type: str | None = None
    details: Details = msgspec.field(default_factory=Details)


_event_decoder: Final = msgspec.json.Decoder(AuditEvent)


def decode_event(raw: bytes) -> AuditEvent:
    """Decode one GitLab audit event; raises msgspec.DecodeError/ValidationError on bad input."""
    return _event_decoder.decode(raw)


class GeoInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the geolocation databases say about one address. Unknown parts stay None."""

    city: str | None = None
    country: str | None = None
    country_iso: str | None = None
    continent: str | None = None
    region: str | None = None
    region_iso: str | None = None
    asn: int | None = None
    as_org: str | None = None


FieldValue = str | int | bool

ENRICHED_SCHEMA_VERSION: Final = 1


class EnrichedRecord(msgspec.Struct, array_like=True):
    """The value of a record on the enriched topic, encoded with msgpack.

    ``fields`` maps catalogue field names (without the ``gitlab.`` prefix) to ready-to-serve values;
    a field the event does not carry is simply missing. ``raw`` is the event exactly as GitLab sent it,
    for argument fields that look up any attribute by path. ``ts`` is the event time in ns since the
    epoch (GitLab's ``created_at``, else the time ingest received it).
    """

    version: int
    ts: int
    fields: dict[str, FieldValue]
    raw: bytes


_record_encoder: Final = msgspec.msgpack.Encoder()
_record_decoder: Final = msgspec.msgpack.Decoder(EnrichedRecord)


def encode_enriched(record: EnrichedRecord) -> bytes:
    return _record_encoder.encode(record)


class UnsupportedRecordVersion(ValueError):
    pass


def decode_enriched(data: bytes) -> EnrichedRecord:
    """Decode an enriched record; raises msgspec errors or UnsupportedRecordVersion."""
    record = _record_decoder.decode(data)
    if record.version > ENRICHED_SCHEMA_VERSION:
        raise UnsupportedRecordVersion(
            f"enriched record version {record.version} is newer than this reader "
            f"(supports up to {ENRICHED_SCHEMA_VERSION}); upgrade the reader"
        )
    return record
