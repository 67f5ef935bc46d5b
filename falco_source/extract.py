"""Field extraction: decode an event's enriched record once, serve every catalogue field from it.

``Extractor.load`` decodes an event payload (cached by event: number, address and length), and
``Extractor.table`` flattens its fields into the form the C side caches, so that Falco's one-field-per-
call extraction does not re-enter Python for every field: one blob of NUL-terminated strings with the
field id of each, and the uint64/bool values with theirs. A field in neither is absent (Falco: `<NA>`,
``exists`` false). The argument field ``gitlab.value[path]`` is resolved on demand from the raw GitLab
JSON, decoded once per event. The table is built with a per-key-order plan (records of one event type
share their key order), which keeps the per-event Python work to a few C-level operations.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from operator import itemgetter
from typing import Any, Final

import msgspec

from falco_gitlab.fields import CATALOGUE, FieldType, lookup_path, render
from falco_gitlab.model import EnrichedRecord, decode_enriched

KIND_STRING: Final = 0
KIND_UINT64: Final = 1
KIND_BOOL: Final = 2
_KINDS: Final = {FieldType.STRING: KIND_STRING, FieldType.UINT64: KIND_UINT64, FieldType.BOOL: KIND_BOOL}
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
if array("Q").itemsize != 8:  # pragma: no cover - every supported platform
    raise ImportError("array('Q') is not 64-bit here")
_UNSET: Final = object()
_json_decode: Final = msgspec.json.decode


def _as_uint64(value: Any) -> int | None:
    if type(value) is int:
        return value if 0 <= value <= _U64_MAX else None
    if type(value) is str and value.isdigit():
        number = int(value)
        return number if number <= _U64_MAX else None
    return None


def _as_bool(value: Any) -> bool | None:
    if type(value) is bool:
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if type(value) is str and value in ("true", "false"):
        return value == "true"
    return None


class _Plan:
    """How to read the catalogue fields out of a record whose ``fields`` has a given key order."""

    __slots__ = ("numbers", "pick_strings", "string_count", "string_slots")

    def __init__(self, keys: tuple[str, ...], index: dict[str, tuple[int, int]]) -> None:
        positions: list[int] = []
        slots: list[int] = []
        numbers: list[tuple[int, int, int]] = []
        for position, name in enumerate(keys):
            spec = index.get(name)
            if spec is None:
                continue
            slot, kind = spec
            if kind == KIND_STRING:
                positions.append(position)
                slots.append(slot)
            else:
                numbers.append((position, slot, kind))
        self.string_slots = bytes(slots)
        self.string_count = len(slots)
        self.numbers = tuple(numbers)
        if len(positions) > 1:
            self.pick_strings: Callable[[tuple[Any, ...]], tuple[Any, ...]] = itemgetter(*positions)
        elif positions:
            only = positions[0]
            self.pick_strings = lambda values: (values[only],)
        else:
            self.pick_strings = lambda values: ()


# (blob, string slots, numeric slots, numbers as little-endian uint64): see Extractor.table
Table = tuple[bytes, bytes, bytes, bytes]
_EMPTY_TABLE: Final[Table] = (b"", b"", b"", b"")


class Extractor:
    """Per plugin handle: the last decoded event and the values of its fields."""

    def __init__(self) -> None:
        self.nfields = len(CATALOGUE)
        if self.nfields > 255:
            raise ValueError("field slots are bytes: at most 255 catalogue fields")
        self._index: dict[str, tuple[int, int]] = {
            f.name: (i, _KINDS[f.type]) for i, f in enumerate(CATALOGUE) if f.arg is None
        }
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self.key: Any = None  # identifies the loaded event: (evtnum, data address, length)
        self.record: EnrichedRecord | None = None
        self.error: str | None = None
        self._document: Any = _UNSET
        self._args: dict[str, bytes | None] = {}
        self.decoded = 0  # events decoded here
        self.reused = 0  # events whose record next_batch had decoded already

    def load(self, key: Any, data: Any, decoded: EnrichedRecord | None = None) -> EnrichedRecord | None:
        """Decode the event's record (or take ``decoded``), unless it is the one already loaded."""
        if key != self.key:
            self.key = key
            self._document = _UNSET
            self._args.clear()
            if decoded is not None:
                self.record = decoded
                self.error = None
                self.reused += 1
                return decoded
            self.decoded += 1
            try:
                self.record = decode_enriched(data)
                self.error = None
            except (msgspec.MsgspecError, ValueError) as exc:
                self.record = None
                self.error = str(exc)
        return self.record

    def table(self) -> Table:
        """The loaded record's field values in the flat form the C side caches.

        ``blob`` holds the string values, each NUL-terminated, in the order of ``string slots`` (one
        byte per value: its field id); ``numeric slots`` and ``numbers`` (uint64, little endian) give
        the uint64 and bool values. A field in neither list is absent.
        """
        record = self.record
        if record is None:
            return _EMPTY_TABLE
        fields = record.fields
        keys = tuple(fields)
        plan = self._plans.get(keys)
        if plan is None:
            if len(self._plans) >= 4096:
                self._plans.clear()
            plan = self._plans[keys] = _Plan(keys, self._index)
        values = tuple(fields.values())
        try:
            text = "\0".join(plan.pick_strings(values))
        except TypeError:  # a string field holding a number or a bool: render it
            return self._table_slow(record)
        blob = text.encode("utf-8", "replace") + b"\0"
        if blob.count(0) != plan.string_count:  # a value with an embedded NUL (or no string at all)
            return self._table_slow(record) if plan.string_count else self._numbers_only(plan, values)
        if not plan.numbers:
            return blob, plan.string_slots, b"", b""
        numeric_slots, numbers = self._numbers(plan.numbers, values)
        return blob, plan.string_slots, numeric_slots, numbers

    @staticmethod
    def _numbers(specs: tuple[tuple[int, int, int], ...], values: tuple[Any, ...]) -> tuple[bytes, bytes]:
        slots = bytearray()
        numbers = array("Q")
        for position, slot, kind in specs:
            value = values[position]
            number = _as_uint64(value) if kind == KIND_UINT64 else _as_bool(value)
            if number is not None:
                slots.append(slot)
                numbers.append(int(number))
        return bytes(slots), numbers.tobytes()

    def _numbers_only(self, plan: _Plan, values: tuple[Any, ...]) -> Table:
        numeric_slots, numbers = self._numbers(plan.numbers, values)
        return b"", b"", numeric_slots, numbers

    def _table_slow(self, record: EnrichedRecord) -> Table:
        strings: list[bytes] = []
        string_slots = bytearray()
        specs: list[tuple[int, int, int]] = []
        values: list[Any] = []
        for name, value in record.fields.items():
            spec = self._index.get(name)
            if spec is None:
                continue
            slot, kind = spec
            if kind == KIND_STRING:
                text = value if type(value) is str else render(value)
                if text is None:
                    continue
                strings.append(text.replace("\0", "").encode("utf-8", "replace"))
                string_slots.append(slot)
            else:
                specs.append((len(values), slot, kind))
                values.append(value)
        numeric_slots, numbers = self._numbers(tuple(specs), tuple(values))
        blob = b"\0".join(strings) + b"\0" if strings else b""
        return blob, bytes(string_slots), numeric_slots, numbers

    def values(self) -> dict[str, str | int | bool]:
        """The loaded record's fields as the C side will serve them (for tests and tools)."""
        blob, string_slots, numeric_slots, numbers = self.table()
        out: dict[str, str | int | bool] = {}
        texts = blob.split(b"\0")
        for text, slot in zip(texts, string_slots, strict=False):
            out[CATALOGUE[slot].name] = text.decode("utf-8")
        decoded = array("Q")
        decoded.frombytes(numbers)
        for slot, number in zip(numeric_slots, decoded, strict=True):
            spec = CATALOGUE[slot]
            out[spec.name] = bool(number) if spec.type == FieldType.BOOL else number
        return out

    def value_at(self, path: str) -> bytes | None:
        """``gitlab.value[path]`` of the loaded record, NUL-terminated, or None when absent."""
        if path in self._args:
            return self._args[path]
        result: bytes | None = None
        if self.record is not None:
            if self._document is _UNSET:
                try:
                    self._document = _json_decode(self.record.raw)
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                    # Raw bytes that are not usable JSON (enrich only vets the fields it reads): every
                    # path is absent, which is what a rule should see, not an internal error.
                    self._document = None
            if self._document is not None:
                text = lookup_path(self._document, path)
                if text is not None:
                    result = text.encode("utf-8", "replace") + b"\0"
        self._args[path] = result
        return result

    def describe(self) -> str:
        """One line for event_to_string / evt.plugininfo."""
        record = self.record
        if record is None:
            return f"<invalid gitlab event: {self.error}>"
        f = record.fields
        parts = [str(f.get("event_type", "?"))]
        for key, label in (("author_name", "by"), ("ip_address", "from"), ("entity_path", "on"),
                           ("target_details", "target")):
            if key in f:
                parts.append(f"{label} {f[key]}")
        return " ".join(parts)
