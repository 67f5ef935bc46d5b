"""The one catalogue of ``gitlab.*`` fields: names, types, descriptions and how each is computed.

enrich computes every field with ``compute_fields`` and stores the values in the enriched record; the
Falco plugin serves them (its ``get_fields`` JSON is generated from this catalogue at build time); the
replay evaluator and the docs read the same list. A field whose value the event does not carry is left
out of the result, so Falco sees it as absent (``exists`` works, outputs show ``<NA>``).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import msgspec

from falco_gitlab.model import AuditEvent, FieldValue, GeoInfo

PREFIX: Final = "gitlab."


class FieldType(StrEnum):
    STRING = "string"
    UINT64 = "uint64"
    BOOL = "bool"


@dataclass(slots=True)
class FieldContext:
    """Everything a field may be computed from, for one event."""

    event: AuditEvent
    destination: str | None = None
    header_event_type: str | None = None
    geo: GeoInfo | None = None
    errors: list[str] = field(default_factory=list)
    client_ip: str | None = None

    def __post_init__(self) -> None:
        self.client_ip = first_address(effective_ip_address(self.event))


Compute = Callable[[FieldContext], FieldValue | None]


@dataclass(frozen=True, slots=True)
class Field:
    name: str  # without the "gitlab." prefix
    type: FieldType
    description: str
    source: str  # how the value is derived, in words, for the docs
    compute: Compute | None  # None for argument fields, resolved at extraction time
    legacy: bool = False  # one of the 25 fields of the original plugin
    arg: str | None = None  # argument syntax for fields that take one, e.g. "path"

    @property
    def qualified(self) -> str:
        return PREFIX + self.name


# --- rendering helpers -----------------------------------------------------------------------------

_json_encoder: Final = msgspec.json.Encoder()


def render(value: Any) -> str | None:
    """Render a JSON value as the string Falco sees: objects as compact JSON, bools as true/false."""
    if value is None or value is msgspec.UNSET:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _json_encoder.encode(value).decode("utf-8")


def _prefer(top: Any, detail: Any) -> str | None:
    return render(top) if top is not None else render(detail)


def effective_ip_address(event: AuditEvent) -> str | None:
    """``details.ip_address`` first, then the top level; empty means absent."""
    for candidate in (event.details.ip_address, event.ip_address):
        if candidate is not None and candidate.strip():
            return candidate.strip()
    return None


def first_address(ip_address: str | None) -> str | None:
    """The first entry of a comma-separated list (GitLab behind proxies), the one geolocated."""
    if ip_address is None:
        return None
    first = ip_address.split(",", 1)[0].strip()
    return first or None


@functools.lru_cache(maxsize=65_536)  # parsing an address costs more than all other fields together
def is_private_address(address: str | None) -> bool | None:
    if address is None:
        return None
    try:
        return ipaddress.ip_address(address).is_private
    except ValueError:
        return None


def _operation(event: AuditEvent) -> tuple[str, Any] | None:
    details = event.details
    for op_type, value in (("add", details.add), ("change", details.change), ("remove", details.remove)):
        if value is not None:
            return op_type, value
    return None


def _git_operation_part(event: AuditEvent, key: str) -> str | None:
    message = event.details.custom_message
    if isinstance(message, dict):
        return render(message.get(key))
    return None


_AUTHOR_KINDS: Final = {-1: "unauthenticated", -2: "deploy_token", -3: "deploy_key", -4: "indexer"}


def _author_kind(event: AuditEvent) -> str | None:
    author_id = event.author_id
    if isinstance(author_id, str) and author_id.lstrip("-").isdigit():
        author_id = int(author_id)
    if not isinstance(author_id, int):
        return None
    return _AUTHOR_KINDS.get(author_id, "user" if author_id > 0 else "system")


def _geo(attribute: str) -> Compute:
    def compute(ctx: FieldContext) -> FieldValue | None:
        value: FieldValue | None = getattr(ctx.geo, attribute) if ctx.geo is not None else None
        return value

    return compute


def _errors(ctx: FieldContext) -> str | None:
    return "; ".join(ctx.errors) if ctx.errors else None


# --- the catalogue ---------------------------------------------------------------------------------

S, U, B = FieldType.STRING, FieldType.UINT64, FieldType.BOOL

CATALOGUE: Final[tuple[Field, ...]] = (
    # The 25 fields of the original single-process plugin, same names and meaning.
    Field("event_id", S, "ID of the audit event", "id as a decimal string (number, numeric string or UUID)",
          lambda c: render(c.event.id), legacy=True),
    Field("event_type", S, "GitLab audit event type, e.g. user_impersonation",
          "event_type, else the X-Gitlab-Audit-Event-Type header",
          lambda c: c.event.event_type or c.header_event_type, legacy=True),
    Field("author_id", S, "ID of the author (-1 unauthenticated, -2 deploy token, -3 deploy key, -4 indexer)",
          "author_id as a decimal string", lambda c: render(c.event.author_id), legacy=True),
    Field("author_name", S, "Name of the author (for failed logins: the attempted user name)",
          "author_name, else details.author_name",
          lambda c: _prefer(c.event.author_name, c.event.details.author_name), legacy=True),
    Field("author_email", S, "E-mail address of the author, when GitLab sends it",
          "author_email, else details.author_email",
          lambda c: _prefer(c.event.author_email, c.event.details.author_email), legacy=True),
    Field("author_class", S, "Class of the author, e.g. User or Gitlab::Audit::UnauthenticatedAuthor",
          "author_class, else details.author_class",
          lambda c: _prefer(c.event.author_class, c.event.details.author_class), legacy=True),
    Field("custom_message", S, "GitLab's custom message for the event (objects as compact JSON)",
          "details.custom_message; an object is rendered as compact JSON",
          lambda c: render(c.event.details.custom_message), legacy=True),
    Field("city", S, "City of the client address (English name)", "City database lookup of client_ip",
          _geo("city"), legacy=True),
    Field("country", S, "Country of the client address (English name)", "City database lookup of client_ip",
          _geo("country"), legacy=True),
    Field("countryisocode", S, "ISO 3166-1 alpha-2 country code of the client address",
          "City database lookup of client_ip", _geo("country_iso"), legacy=True),
    Field("continent", S, "Continent of the client address (English name)",
          "City database lookup of client_ip", _geo("continent"), legacy=True),
    Field("entity_id", S, "ID of the entity the event belongs to", "entity_id as a decimal string",
          lambda c: render(c.event.entity_id), legacy=True),
    Field("entity_type", S, "Type of the entity, e.g. User, Project, Group", "entity_type",
          lambda c: render(c.event.entity_type), legacy=True),
    Field("entity_path", S, "Full path of the entity, e.g. group/project",
          "entity_path, else details.entity_path",
          lambda c: _prefer(c.event.entity_path, c.event.details.entity_path), legacy=True),
    Field("failed_login", S, "Kind of failed login (STANDARD, OTP, WEBAUTHN, ...)", "details.failed_login",
          lambda c: render(c.event.details.failed_login), legacy=True),
    Field("created_at", S, "Time GitLab created the event (ISO-8601 UTC)", "created_at as sent",
          lambda c: c.event.created_at, legacy=True),
    Field("ip_address", S, "IP address of the client as GitLab reports it (may be a comma list)",
          "details.ip_address, else ip_address; empty is absent", lambda c: effective_ip_address(c.event),
          legacy=True),
    Field("op_type", S, "Kind of operation: add, change or remove",
          "which of details.add / details.change / details.remove is set",
          lambda c: op[0] if (op := _operation(c.event)) else None, legacy=True),
    Field("op_item", S, "What was added, changed or removed", "the value of details.add/change/remove",
          lambda c: render(op[1]) if (op := _operation(c.event)) else None, legacy=True),
    Field("op_changed_from", S, "Previous value of a change (bools as true/false)", "details.from",
          lambda c: render(c.event.details.from_), legacy=True),
    Field("op_changed_to", S, "New value of a change (bools as true/false)", "details.to",
          lambda c: render(c.event.details.to), legacy=True),
    Field("target_id", S, "ID of the target object", "target_id, else details.target_id",
          lambda c: _prefer(c.event.target_id, c.event.details.target_id), legacy=True),
    Field("target_type", S, "Type of the target object", "target_type, else details.target_type",
          lambda c: _prefer(c.event.target_type, c.event.details.target_type), legacy=True),
    Field("target_details", S, "Details of the target object (usually its name)",
          "target_details, else details.target_details",
          lambda c: _prefer(c.event.target_details, c.event.details.target_details), legacy=True),
    Field("pluginerrormessage", S, "Problems met while processing the event, if any",
          "messages from enrich (e.g. an unparseable created_at or address)", _errors, legacy=True),
    # New fields.
    Field("destination", S, "Name of the streaming destination (GitLab instance or group) that sent it",
          "the ingest destination whose token authenticated the request", lambda c: c.destination),
    Field("event_name", S, "details.event_name, GitLab's internal name for the event", "details.event_name",
          lambda c: render(c.event.details.event_name)),
    Field("author_kind", S,
          "Kind of author: user, unauthenticated, deploy_token, deploy_key, indexer, system",
          "derived from author_id", lambda c: _author_kind(c.event)),
    Field("git_protocol", S, "Protocol of a repository git operation: ssh, http or web",
          "details.custom_message.protocol when custom_message is an object",
          lambda c: _git_operation_part(c.event, "protocol")),
    Field("git_action", S, "Action of a repository git operation: git-upload-pack (read) or git-receive-pack",
          "details.custom_message.action when custom_message is an object",
          lambda c: _git_operation_part(c.event, "action")),
    Field("op_as", S, "Role or level granted, e.g. Developer (details.as)", "details.as",
          lambda c: render(c.event.details.as_)),
    Field("op_with", S, "Method used, e.g. the authentication provider (details.with)", "details.with",
          lambda c: render(c.event.details.with_)),
    Field("client_ip", S, "The client address that is geolocated: first entry of ip_address",
          "first entry of the comma list in ip_address", lambda c: c.client_ip),
    Field("ip_private", B, "Whether the client address is private, loopback or link-local",
          "ipaddress.is_private of client_ip", lambda c: is_private_address(c.client_ip)),
    Field("region", S, "Region / subdivision of the client address (English name)",
          "City database lookup of client_ip (most significant subdivision)", _geo("region")),
    Field("regionisocode", S, "ISO 3166-2 code of the region of the client address",
          "City database lookup of client_ip", _geo("region_iso")),
    Field("asn", U, "Autonomous system number of the client address (needs an ASN database)",
          "ASN database lookup of client_ip", _geo("asn")),
    Field("as_org", S, "Organisation owning the autonomous system (needs an ASN database)",
          "ASN database lookup of client_ip", _geo("as_org")),
    Field("value", S, "Any attribute of the raw event by dotted path, e.g. gitlab.value[details.change]",
          "JSON path lookup in the original event; objects as compact JSON, list items by index", None,
          arg="path"),
)

BY_NAME: Final[dict[str, Field]] = {f.name: f for f in CATALOGUE}
BY_QUALIFIED_NAME: Final[dict[str, Field]] = {f.qualified: f for f in CATALOGUE}
LEGACY_FIELDS: Final[tuple[str, ...]] = tuple(f.name for f in CATALOGUE if f.legacy)
_COMPUTED: Final = tuple((f.name, f.compute) for f in CATALOGUE if f.compute is not None)


def compute_fields(ctx: FieldContext) -> dict[str, FieldValue]:
    """Every field value the event carries; absent ones are left out."""
    values: dict[str, FieldValue] = {}
    for name, compute in _COMPUTED:
        value = compute(ctx)
        if value is not None:
            values[name] = value
    return values


def lookup_path(document: Any, path: str) -> str | None:
    """Resolve ``a.b.0.c`` in a decoded JSON document and render it like any other field."""
    node = document
    for part in path.split("."):
        if isinstance(node, dict):
            if part not in node:
                return None
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit():
            index = int(part)
            if not -len(node) <= index < len(node):
                return None
            node = node[index]
        else:
            return None
    return render(node)


def plugin_fields() -> list[dict[str, Any]]:
    """The field list in the shape of the Falco plugin API's ``get_fields`` JSON."""
    out: list[dict[str, Any]] = []
    for f in CATALOGUE:
        entry: dict[str, Any] = {"type": f.type.value, "name": f.qualified, "desc": f.description}
        if f.arg is not None:
            entry["arg"] = {"isRequired": True, "isKey": True}
        out.append(entry)
    return out
