"""The fields a condition or output may use, and how each is read from an enriched record.

``gitlab.*`` fields come from the shared catalogue (``falco_gitlab.fields``); values are read from the
record's ``fields`` dict, and the argument field ``gitlab.value[path]`` is resolved with ``lookup_path``
on the decoded raw event, exactly as the plugin does. A small, explicit set of ``evt.*`` fields is
supported too (see ``EVT_FIELDS``); any other field is an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from falco_gitlab.fields import BY_QUALIFIED_NAME, FieldType, lookup_path, render
from falco_gitlab.model import EnrichedRecord, FieldValue

SOURCE: Final = "gitlab"

_json_decoder: Final = msgspec.json.Decoder()
_UNDECODED: Final = object()


class Event:
    """One event as the evaluator sees it: an enriched record plus its sequence number.

    The raw JSON is decoded only when an argument field needs it, once per event.
    """

    __slots__ = ("_doc", "_values", "fields", "num", "raw", "ts")

    def __init__(self, record: EnrichedRecord, num: int = 0) -> None:
        self.fields: dict[str, FieldValue] = record.fields
        self.raw: bytes = record.raw
        self.ts: int = record.ts
        self.num = num
        self._doc: Any = _UNDECODED
        self._values: dict[str, str | None] | None = None

    def value(self, path: str) -> str | None:
        """``gitlab.value[path]``: the raw event's attribute at ``path``, rendered, or None."""
        values = self._values
        if values is None:
            values = self._values = {}
        elif path in values:
            return values[path]
        doc = self._doc
        if doc is _UNDECODED:
            try:
                doc = _json_decoder.decode(self.raw)
            except (msgspec.DecodeError, TypeError):
                doc = None
            self._doc = doc
        result = lookup_path(doc, path) if doc is not None else None
        values[path] = result
        return result


Getter = Callable[[Event], Any]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """What the evaluator knows about one field."""

    name: str  # qualified, e.g. gitlab.event_type
    type: FieldType
    takes_arg: bool  # an argument is required (gitlab.value[...]); others accept none
    make_getter: Callable[[str | None], Getter]
    in_conditions: bool = True  # False: outputs only (with the reason in ``output_only``)
    output_only: str = ""
    # How the value appears in JSON output_fields and in the text output, when not the plain value.
    to_json: Callable[[Event, Any], Any] | None = None
    to_text: Callable[[Event, Any], str] | None = None


def _string_getter(name: str) -> Getter:
    def get(event: Event) -> str | None:
        value = event.fields.get(name)
        if value is None or value.__class__ is str:
            return value
        return render(value)

    return get


def _uint64_getter(name: str) -> Getter:
    def get(event: Event) -> int | None:
        value = event.fields.get(name)
        if value is None or value.__class__ is int:
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        return None

    return get


def _bool_getter(name: str) -> Getter:
    def get(event: Event) -> bool | None:
        value = event.fields.get(name)
        if value is None or value.__class__ is bool:
            return value
        if value in ("true", "false"):
            return value == "true"
        return None

    return get


_GETTERS: Final = {FieldType.STRING: _string_getter, FieldType.UINT64: _uint64_getter,
                   FieldType.BOOL: _bool_getter}


def _catalogue_spec(qualified: str) -> FieldSpec:
    entry = BY_QUALIFIED_NAME[qualified]
    if entry.arg is not None:
        def make(arg: str | None) -> Getter:
            path = arg or ""
            return lambda event: event.value(path)

        return FieldSpec(qualified, entry.type, True, make)
    getter = _GETTERS[entry.type](entry.name)
    return FieldSpec(qualified, entry.type, False, lambda _arg: getter)


def _local_offset() -> int:
    # Like libsinsp, the local zone's offset *now* is applied to every timestamp.
    return time.localtime().tm_gmtoff


def local_clock(ts: int) -> str:
    """``evt.time`` as Falco renders it: local wall-clock time with nanoseconds, HH:MM:SS.nnnnnnnnn."""
    seconds, nanos = divmod(ts, 1_000_000_000)
    day_seconds = (seconds + _local_offset()) % 86400
    return f"{day_seconds // 3600:02d}:{day_seconds % 3600 // 60:02d}:{day_seconds % 60:02d}.{nanos:09d}"


def local_datetime(ts: int) -> str:
    """``evt.datetime``: local date and time with nanoseconds, YYYY-MM-DD HH:MM:SS.nnnnnnnnn."""
    seconds = ts // 1_000_000_000 + _local_offset()
    return time.strftime("%Y-%m-%d ", time.gmtime(seconds - seconds % 86400)) + local_clock(ts)


def iso8601(ts: int) -> str:
    """``evt.time.iso8601``: UTC, YYYY-MM-DDTHH:MM:SS.nnnnnnnnn+0000."""
    seconds, nanos = divmod(ts, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}+0000"


def _time_field(name: str, render_text: Callable[[int], str]) -> FieldSpec:
    return FieldSpec(name, FieldType.UINT64, False, lambda _arg: lambda event: event.ts,
                     in_conditions=False, output_only=f"{name} is supported in outputs only; compare "
                     "evt.rawtime (ns since the epoch) in conditions",
                     to_text=lambda _event, value: render_text(value))


EVT_FIELDS: Final[dict[str, FieldSpec]] = {
    spec.name: spec
    for spec in (
        _time_field("evt.time", local_clock),
        _time_field("evt.time.iso8601", iso8601),
        _time_field("evt.datetime", local_datetime),
        FieldSpec("evt.rawtime", FieldType.UINT64, False, lambda _arg: lambda event: event.ts),
        FieldSpec("evt.num", FieldType.UINT64, False, lambda _arg: lambda event: event.num),
        FieldSpec("evt.source", FieldType.STRING, False, lambda _arg: lambda _event: SOURCE),
    )
}

FIELDS: Final[dict[str, FieldSpec]] = {
    **{name: _catalogue_spec(name) for name in BY_QUALIFIED_NAME},
    **EVT_FIELDS,
}

# Longest names first: output formats take the longest known field name at each '%'.
NAMES_LONGEST_FIRST: Final = tuple(sorted(FIELDS, key=len, reverse=True))


def lookup(name: str) -> FieldSpec | None:
    return FIELDS.get(name)
