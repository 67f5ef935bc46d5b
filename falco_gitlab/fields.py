"""The one catalogue of ``gitlab.*`` fields: names, types, descriptions and how each is computed.

enrich computes every field with ``compute_fields`` (or ``compute_event_fields``: one function generated
from the catalogue when this module is imported) and stores the values in the enriched record; the
Falco plugin serves them (its ``get_fields`` JSON is generated from this catalogue at build time); the
replay evaluator and the docs read the same list. A field whose value the event does not carry is left
out of the result, so Falco sees it as absent (``exists`` works, outputs show ``<NA>``).
"""

from __future__ import annotations

import ast
import builtins
import functools
import ipaddress
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import msgspec

from falco_gitlab.contract import plain_int
from falco_gitlab.model import AuditEvent, Details, FieldValue, GeoInfo

PREFIX: Final = "gitlab."


class FieldType(StrEnum):
    STRING = "string"
    UINT64 = "uint64"
    BOOL = "bool"


@dataclass(slots=True)
class FieldContext:
    """Everything a field may be computed from, for one event.

    ``ip_address`` (the effective address attribute) and ``client_ip`` (its first entry, the one
    geolocated) are derived from the event when the context is made.
    """

    event: AuditEvent
    destination: str | None = None
    header_event_type: str | None = None
    geo: GeoInfo | None = None
    errors: list[str] = field(default_factory=list)
    ip_address: str | None = field(init=False)
    client_ip: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.ip_address = effective_ip_address(self.event)
        self.client_ip = first_address(self.ip_address)


Compute = Callable[[FieldContext], FieldValue | None]


@dataclass(frozen=True, slots=True)
class Field:
    """One catalogue field. ``how`` says how its value is computed (see "how a field is computed"
    below); ``compute`` (derived from it) computes this one field for a :class:`FieldContext`."""

    name: str  # without the "gitlab." prefix
    type: FieldType
    description: str
    source: str  # how the value is derived, in words, for the docs
    how: How | None  # None for argument fields, resolved at extraction time
    legacy: bool = False  # one of the 25 fields of the original plugin
    arg: str | None = None  # argument syntax for fields that take one, e.g. "path"
    compute: Compute | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        compute = None if self.how is None else _compile_compute(self.name, self.how)
        object.__setattr__(self, "compute", compute)

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


def effective_ip_address(event: AuditEvent) -> str | None:
    """``details.ip_address`` first, then the top level; empty means absent."""
    return preferred_address(event.details.ip_address, event.ip_address)


def preferred_address(detail: str | None, top: str | None) -> str | None:
    """``detail`` (an event's ``details.ip_address``) stripped, else ``top`` stripped; blank is absent."""
    if detail is not None:
        detail = detail.strip()
        if detail:
            return detail
    if top is not None:
        top = top.strip()
        if top:
            return top
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


_AUTHOR_KINDS: Final = {-1: "unauthenticated", -2: "deploy_token", -3: "deploy_key", -4: "indexer"}


def _author_kind(event: AuditEvent) -> str | None:
    author_id = event.author_id
    if isinstance(author_id, str):
        author_id = plain_int(author_id)
    if not isinstance(author_id, int):
        return None
    return _AUTHOR_KINDS.get(author_id, "user" if author_id > 0 else "system")


def _event_type(event: AuditEvent, header_event_type: str | None) -> str | None:
    return event.event_type or header_event_type


def _errors(errors: list[str]) -> str | None:
    return "; ".join(errors) if errors else None


# --- how a field is computed -----------------------------------------------------------------------
#
# Each field says how its value is computed with one of the small descriptions below (or, for
# anything else, a function of the FieldContext). From them, one Python function that computes every
# field of an event inline is generated when this module is imported (``compute_event_fields``), and
# one function per field (``Field.compute``). Both run the same generated statements, so they cannot
# disagree. Generated code uses these local names: ``event``, ``details`` (``event.details``), the
# inputs below, ``geo`` (the GeoInfo, or one with every attribute None) and ``v`` (the value; None
# means absent).

# Values a Call may take as arguments (besides the event and its details), as FieldContext has them.
INPUTS: Final = ("destination", "header_event_type", "ip_address", "client_ip", "errors")
_ARGUMENTS: Final = frozenset(("event", "details", *INPUTS))
_EVENT_ATTRIBUTES: Final = frozenset(AuditEvent.__struct_fields__)
_DETAILS_ATTRIBUTES: Final = frozenset(Details.__struct_fields__)
_GEO_ATTRIBUTES: Final = frozenset(GeoInfo.__struct_fields__)
# Attributes typed Id (a number or a string): rendered testing for a number first.
_ID_ATTRIBUTES: Final = frozenset(f.name for f in msgspec.structs.fields(AuditEvent)
                                  if set(typing.get_args(f.type)) == {int, str, type(None)})


def _check(name: str, allowed: frozenset[str], what: str) -> None:
    if name not in allowed:
        raise ValueError(f"{name!r} is not {what} (one of {sorted(allowed)})")


class _Generator:
    """Source text of generated functions, the objects it refers to, and shared computations."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"render": render, "_NO_GEO": _NO_GEO, "FieldContext": FieldContext,
                                          "UNSET": msgspec.UNSET}
        self.shared: dict[Any, tuple[str, list[str]]] = {}  # key -> (local name prefix, its statements)

    def ref(self, obj: object) -> str:
        """A global name in the generated module bound to ``obj``."""
        for name, value in self.namespace.items():
            if value is obj:
                return name
        label = getattr(obj, "__name__", "")
        name = f"{label if label.isidentifier() else '_ref'}_{len(self.namespace)}"
        self.namespace[name] = obj
        return name

    def bind(self, name: str, obj: object) -> None:
        """Make ``obj`` a global of the generated module under its own ``name`` (inline expressions)."""
        if self.namespace.setdefault(name, obj) is not obj:
            raise ValueError(f"generated code already has a global {name!r}")

    def share(self, key: Any, make: Callable[[str], list[str]]) -> str:
        """Statements computed once per event however many fields use them; returns their prefix."""
        if key not in self.shared:
            prefix = f"_s{len(self.shared)}"
            self.shared[key] = (prefix, make(prefix))
        return self.shared[key][0]


class Spec:
    """A declarative description of a field's computation (base class)."""

    __slots__ = ()

    def statements(self, gen: _Generator) -> tuple[list[str], bool]:  # pragma: no cover - abstract
        """Python statements that set ``v`` to the value (None: absent), and whether ``v`` is still to
        be rendered (a JSON value; else it is a FieldValue already)."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Attr(Spec):
    """The event's attribute ``name`` rendered; with ``details``, ``details.<name>`` when that is null."""

    name: str
    details: bool = False

    def __post_init__(self) -> None:
        _check(self.name, _EVENT_ATTRIBUTES, "an AuditEvent attribute")
        if self.details:
            _check(self.name, _DETAILS_ATTRIBUTES, "a Details attribute")

    def statements(self, gen: _Generator) -> tuple[list[str], bool]:
        lines = [f"v = event.{self.name}"]
        if self.details:
            lines += ["if v is None:", f"    v = details.{self.name}"]
        return lines, True


@dataclass(frozen=True, slots=True)
class Detail(Spec):
    """``details.<name>`` rendered."""

    name: str

    def __post_init__(self) -> None:
        _check(self.name, _DETAILS_ATTRIBUTES, "a Details attribute")

    def statements(self, gen: _Generator) -> tuple[list[str], bool]:
        if _unset_by_default(Details, self.name):
            # UNSET (the key is missing) renders as absent, like None; saying so here spares a call.
            return [f"v = details.{self.name}", "if v is UNSET:", "    v = None"], True
        return [f"v = details.{self.name}"], True


def _unset_by_default(model: type[msgspec.Struct], name: str) -> bool:
    fields, defaults = model.__struct_fields__, model.__struct_defaults__
    index = fields.index(name) - (len(fields) - len(defaults))
    return index >= 0 and defaults[index] is msgspec.UNSET


@dataclass(frozen=True, slots=True)
class DetailKey(Spec):
    """``details.<name>[key]`` rendered, when ``details.<name>`` is an object."""

    name: str
    key: str

    def __post_init__(self) -> None:
        _check(self.name, _DETAILS_ATTRIBUTES, "a Details attribute")

    def statements(self, gen: _Generator) -> tuple[list[str], bool]:
        # The object is looked at once per event however many of its keys are fields.
        prefix = gen.share(("detail-object", self.name), lambda prefix: [
            f"{prefix} = details.{self.name}",
            f"if not isinstance({prefix}, dict):",
            f"    {prefix} = None"])
        return [f"v = {prefix}.get({self.key!r}) if {prefix} is not None else None"], True


@dataclass(frozen=True, slots=True)
class FirstDetail(Spec):
    """Of the ``details`` attributes ``names``, the first that is not null: its name (``part="name"``)
    or its rendered value (``part="value"``)."""

    names: tuple[str, ...]
    part: str

    def __post_init__(self) -> None:
        for name in self.names:
            _check(name, _DETAILS_ATTRIBUTES, "a Details attribute")
        _check(self.part, frozenset(("name", "value")), "a part")

    def statements(self, gen: _Generator) -> tuple[list[str], bool]:
        def make(prefix: str) -> list[str]:
            lines = []
            for i, name in enumerate(self.names):
                lines += [f"{'if' if i == 0 else 'elif'} details.{name} is not None:",
                          f"    {prefix}_name, {prefix}_value = {name!r}, details.{name}"]
            return [*lines, "else:", f"    {prefix}_name = {prefix}_value = None"]

        prefix = gen.share(("first-detail", self.names), make)
        if self.part == "name":
            return [f"v = {prefix}_name"], False
        return [f"v = {prefix}_value"], True


@dataclass(frozen=True, slots=True)
class Input(Spec):
    """One of ``INPUTS`` as is (they are strings already)."""

    name: str

    def __post_init__(self) -> None:
        _check(self.name, frozenset(INPUTS) - {"errors"}, "a string input")

    def statements(self, gen: _Generator) -> tuple[list[str], bool]:
        return [f"v = {self.name}"], False


@dataclass(frozen=True, slots=True)
class Geo(Spec):
    """Attribute ``name`` of the event's GeoInfo (absent without one)."""

    name: str

    def __post_init__(self) -> None:
        _check(self.name, _GEO_ATTRIBUTES, "a GeoInfo attribute")

    def statements(self, gen: _Generator) -> tuple[list[str], bool]:
        return [f"v = geo.{self.name}"], False


@dataclass(frozen=True, slots=True)
class Call(Spec):
    """``function(*arguments)``: a function of the event, its details and/or ``INPUTS`` (by name).

    ``inline``, if given, is a Python expression of the same arguments (and of names global in the
    function's module) that gives the same value; the generated code evaluates it instead of making a
    call, which costs more than the work of a small function. ``function`` stays the definition (the
    tests compare the two).
    """

    function: Callable[..., FieldValue | None]
    arguments: tuple[str, ...]
    inline: str | None = None

    def __post_init__(self) -> None:
        for name in self.arguments:
            _check(name, _ARGUMENTS, "a Call argument")
        if self.inline is not None:
            module = getattr(self.function, "__globals__", {})
            unknown = sorted(name for name in _names(self.inline) if name not in self.arguments
                             and name not in module and not hasattr(builtins, name))
            if unknown:
                raise ValueError(f"inline expression {self.inline!r} uses unknown names {unknown}")

    def statements(self, gen: _Generator) -> tuple[list[str], bool]:
        if self.inline is None:
            return [f"v = {gen.ref(self.function)}({', '.join(self.arguments)})"], False
        module = getattr(self.function, "__globals__", {})
        for name in _names(self.inline):
            if name not in self.arguments and name in module:
                gen.bind(name, module[name])
        return [f"v = {self.inline}"], False


def _names(expression: str) -> set[str]:
    """The variable names an expression reads (not attribute names)."""
    tree = ast.parse(expression, mode="eval")
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


# A field's computation: a description above, or any function of the FieldContext (called as is).
How = Spec | Compute

_NO_GEO: Final = GeoInfo()
# compute_event_fields(event, <these>, geo, errors, ctx=None)
_PARAMETERS: Final = ("event", "destination", "header_event_type", "ip_address", "client_ip", "geo", "errors")
_MODULE: Final = "<falco_gitlab.fields generated>"


def _statements(gen: _Generator, how: How) -> tuple[list[str], bool]:
    if isinstance(how, Spec):
        return how.statements(gen)
    # Anything else is a function of the FieldContext (made on first use when called without one).
    return ["if ctx is None:",
            "    ctx = FieldContext(event, destination, header_event_type, "
            "None if geo is _NO_GEO else geo, errors)",
            f"v = {gen.ref(how)}(ctx)"], False


# ``render(v)`` without a call for str (most values) and int (not bool: ``type`` is exact).
_RENDER: Final = "str(v) if type(v) is int else render(v)"


def _store(name: str, rendered: bool, number_first: bool = False) -> list[str]:
    """Statements that put ``v`` into ``out`` unless it is absent."""
    if not rendered:
        return ["if v is not None:", f"    out[{name!r}] = v"]
    if number_first:  # ids: GitLab sends numbers, sometimes strings (UUIDs)
        return ["if v is not None:",
                "    if type(v) is int:",
                f"        out[{name!r}] = str(v)",
                "    elif type(v) is str:",
                f"        out[{name!r}] = v",
                "    else:",
                "        v = render(v)",
                "        if v is not None:",
                f"            out[{name!r}] = v"]
    # Absent first: about half of the fields of an event are, and that test is the cheapest; then
    # text, then numbers (ids), then the rest through render.
    return ["if v is not None:",
            "    if type(v) is str:",
            f"        out[{name!r}] = v",
            "    elif type(v) is int:",
            f"        out[{name!r}] = str(v)",
            "    else:",
            "        v = render(v)",
            "        if v is not None:",
            f"            out[{name!r}] = v"]


def _exec(gen: _Generator, source: str, name: str) -> Any:
    namespace = dict(gen.namespace)
    # The source is built here from the catalogue's own descriptions (names checked against the models).
    exec(compile(source, _MODULE, "exec"), namespace)  # noqa: S102
    return namespace[name]


def _compile_compute(name: str, how: How) -> Compute:
    """``Field.compute``: the field's generated statements, run on a FieldContext."""
    gen = _Generator()
    body, rendered = _statements(gen, how)
    if rendered:
        body += ["if v is not None and type(v) is not str:", f"    v = {_RENDER}"]
    shared = [line for _, lines in gen.shared.values() for line in lines]
    lines = [
        "def compute(ctx):",
        "    event = ctx.event",
        "    details = event.details",
        *(f"    {p} = ctx.{p}" for p in INPUTS),
        "    geo = ctx.geo",
        "    if geo is None:",
        "        geo = _NO_GEO",
        *("    " + line for line in shared + body),
        "    return v",
    ]
    compute: Compute = _exec(gen, "\n".join(lines) + "\n", "compute")
    compute.__qualname__ = compute.__name__ = f"compute_{name}"
    return compute


def _compile_all(fields: tuple[Field, ...]) -> tuple[Callable[..., dict[str, FieldValue]], str]:
    """One function computing every field inline, in catalogue order (shared statements just before
    the first field that needs them)."""
    gen = _Generator()
    lines = [f"def compute_event_fields({', '.join(_PARAMETERS)}, ctx=None):",
             "    details = event.details",
             "    out = {}"]
    emitted: set[str] = set()
    in_geo = False  # inside an "if geo is not None:" block
    for f in fields:
        if f.how is None:
            continue
        body, rendered = _statements(gen, f.how)
        # Consecutive GeoInfo fields share one test: most addresses have no GeoInfo (private, unknown),
        # and then none of them is looked at.
        geo = isinstance(f.how, Geo)
        if geo and not in_geo:
            lines.append("    if geo is not None:")
        in_geo = geo
        indent = "        " if geo else "    "
        for prefix, shared in gen.shared.values():
            if prefix not in emitted:
                emitted.add(prefix)
                lines += ["    " + line for line in shared]
        ids = isinstance(f.how, Attr) and f.how.name in _ID_ATTRIBUTES
        lines += [indent + line for line in body + _store(f.name, rendered, ids)]
    lines.append("    return out")
    source = "\n".join(lines) + "\n"
    return _exec(gen, source, "compute_event_fields"), source



# --- the catalogue ---------------------------------------------------------------------------------

S, U, B = FieldType.STRING, FieldType.UINT64, FieldType.BOOL
_OPERATIONS: Final = ("add", "change", "remove")

CATALOGUE: Final[tuple[Field, ...]] = (
    # The 25 fields of the original single-process plugin, same names and meaning.
    Field("event_id", S, "ID of the audit event", "id as a decimal string (number, numeric string or UUID)",
          Attr("id"), legacy=True),
    Field("event_type", S, "GitLab audit event type, e.g. user_impersonation",
          "event_type, else the X-Gitlab-Audit-Event-Type header",
          Call(_event_type, ("event", "header_event_type"), "event.event_type or header_event_type"),
          legacy=True),
    Field("author_id", S, "ID of the author (-1 unauthenticated, -2 deploy token, -3 deploy key, -4 indexer)",
          "author_id as a decimal string", Attr("author_id"), legacy=True),
    Field("author_name", S, "Name of the author (for failed logins: the attempted user name)",
          "author_name, else details.author_name",
          Attr("author_name", details=True), legacy=True),
    Field("author_email", S, "E-mail address of the author, when GitLab sends it",
          "author_email, else details.author_email",
          Attr("author_email", details=True), legacy=True),
    Field("author_class", S, "Class of the author, e.g. User or Gitlab::Audit::UnauthenticatedAuthor",
          "author_class, else details.author_class",
          Attr("author_class", details=True), legacy=True),
    Field("custom_message", S, "GitLab's custom message for the event (objects as compact JSON)",
          "details.custom_message; an object is rendered as compact JSON",
          Detail("custom_message"), legacy=True),
    Field("city", S, "City of the client address (English name)", "City database lookup of client_ip",
          Geo("city"), legacy=True),
    Field("country", S, "Country of the client address (English name)", "City database lookup of client_ip",
          Geo("country"), legacy=True),
    Field("countryisocode", S, "ISO 3166-1 alpha-2 country code of the client address",
          "City database lookup of client_ip", Geo("country_iso"), legacy=True),
    Field("continent", S, "Continent of the client address (English name)",
          "City database lookup of client_ip", Geo("continent"), legacy=True),
    Field("entity_id", S, "ID of the entity the event belongs to", "entity_id as a decimal string",
          Attr("entity_id"), legacy=True),
    Field("entity_type", S, "Type of the entity, e.g. User, Project, Group", "entity_type",
          Attr("entity_type"), legacy=True),
    Field("entity_path", S, "Full path of the entity, e.g. group/project",
          "entity_path, else details.entity_path",
          Attr("entity_path", details=True), legacy=True),
    Field("failed_login", S, "Kind of failed login (STANDARD, OTP, WEBAUTHN, ...)", "details.failed_login",
          Detail("failed_login"), legacy=True),
    Field("created_at", S, "Time GitLab created the event (ISO-8601 UTC)", "created_at as sent",
          Attr("created_at"), legacy=True),
    Field("ip_address", S, "IP address of the client as GitLab reports it (may be a comma list)",
          "details.ip_address, else ip_address; empty is absent", Input("ip_address"),
          legacy=True),
    Field("op_type", S, "Kind of operation: add, change or remove",
          "which of details.add / details.change / details.remove is set",
          FirstDetail(_OPERATIONS, "name"), legacy=True),
    Field("op_item", S, "What was added, changed or removed", "the value of details.add/change/remove",
          FirstDetail(_OPERATIONS, "value"), legacy=True),
    Field("op_changed_from", S, "Previous value of a change (bools as true/false)", "details.from",
          Detail("from_"), legacy=True),
    Field("op_changed_to", S, "New value of a change (bools as true/false)", "details.to",
          Detail("to"), legacy=True),
    Field("target_id", S, "ID of the target object", "target_id, else details.target_id",
          Attr("target_id", details=True), legacy=True),
    Field("target_type", S, "Type of the target object", "target_type, else details.target_type",
          Attr("target_type", details=True), legacy=True),
    Field("target_details", S, "Details of the target object (usually its name)",
          "target_details, else details.target_details",
          Attr("target_details", details=True), legacy=True),
    Field("pluginerrormessage", S, "Problems met while processing the event, if any",
          "messages from enrich (e.g. an unparseable created_at or address)",
          Call(_errors, ("errors",), "'; '.join(errors) if errors else None"), legacy=True),
    # New fields.
    Field("destination", S, "Name of the streaming destination (GitLab instance or group) that sent it",
          "the ingest destination whose token authenticated the request", Input("destination")),
    Field("event_name", S, "details.event_name, GitLab's internal name for the event", "details.event_name",
          Detail("event_name")),
    Field("author_kind", S,
          "Kind of author: user, unauthenticated, deploy_token, deploy_key, indexer, system",
          "derived from author_id",
          # a user (the usual case) without a call
          Call(_author_kind, ("event",),
               "'user' if type(event.author_id) is int and event.author_id > 0 else _author_kind(event)")),
    Field("git_protocol", S, "Protocol of a repository git operation: ssh, http or web",
          "details.custom_message.protocol when custom_message is an object",
          DetailKey("custom_message", "protocol")),
    Field("git_action", S, "Action of a repository git operation: git-upload-pack (read) or git-receive-pack",
          "details.custom_message.action when custom_message is an object",
          DetailKey("custom_message", "action")),
    Field("op_as", S, "Role or level granted, e.g. Developer (details.as)", "details.as",
          Detail("as_")),
    Field("op_with", S, "Method used, e.g. the authentication provider (details.with)", "details.with",
          Detail("with_")),
    Field("client_ip", S, "The client address that is geolocated: first entry of ip_address",
          "first entry of the comma list in ip_address", Input("client_ip")),
    Field("ip_private", B, "Whether the client address is private, loopback or link-local",
          "ipaddress.is_private of client_ip", Call(is_private_address, ("client_ip",))),
    Field("region", S, "Region / subdivision of the client address (English name)",
          "City database lookup of client_ip (most significant subdivision)", Geo("region")),
    Field("regionisocode", S, "ISO 3166-2 code of the region of the client address",
          "City database lookup of client_ip", Geo("region_iso")),
    Field("asn", U, "Autonomous system number of the client address (needs an ASN database)",
          "ASN database lookup of client_ip", Geo("asn")),
    Field("as_org", S, "Organisation owning the autonomous system (needs an ASN database)",
          "ASN database lookup of client_ip", Geo("as_org")),
    Field("value", S, "Any attribute of the raw event by dotted path, e.g. gitlab.value[details.change]",
          "JSON path lookup in the original event; objects as compact JSON, list items by index", None,
          arg="path"),
)

BY_NAME: Final[dict[str, Field]] = {f.name: f for f in CATALOGUE}
BY_QUALIFIED_NAME: Final[dict[str, Field]] = {f.qualified: f for f in CATALOGUE}
LEGACY_FIELDS: Final[tuple[str, ...]] = tuple(f.name for f in CATALOGUE if f.legacy)
# Every field of an event computed inline by one generated function (see "how a field is computed"):
# compute_event_fields(event, destination, header_event_type, ip_address, client_ip, geo, errors) ->
# {name: value} in catalogue order, absent fields left out. ``ip_address`` and ``client_ip`` must be
# ``effective_ip_address(event)`` and ``first_address(ip_address)``; ``errors`` the problems so far.
compute_event_fields, GENERATED_SOURCE = _compile_all(CATALOGUE)


def compute_fields(ctx: FieldContext) -> dict[str, FieldValue]:
    """Every field value the event carries; absent ones are left out."""
    return compute_event_fields(ctx.event, ctx.destination, ctx.header_event_type, ctx.ip_address,
                                ctx.client_ip, ctx.geo, ctx.errors, ctx)


def lookup_path(document: Any, path: str) -> str | None:
    """Resolve ``a.b.0.c`` in a decoded JSON document and render it like any other field."""
    node = document
    for part in path.split("."):
        if isinstance(node, dict):
            if part not in node:
                return None
            node = node[part]
        elif isinstance(node, list) and (index := plain_int(part)) is not None:
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
