"""Turn a request body into events, keeping each event's exact bytes.

GitLab labels the body ``application/x-www-form-urlencoded`` but sends raw JSON: the body is never
form-decoded. One JSON object is one event (its record value is the body exactly as received); a JSON
array is several events, each element's own bytes becoming one record (``msgspec.Raw`` keeps them
verbatim). Only what routing and de-duplication need is decoded (a small probe per event); everything
else passes through untouched, whatever its type.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import msgspec

from falco_gitlab.contract import actor_key

_WHITESPACE: Final = b" \t\r\n"


class BodyError(ValueError):
    """The body is not one or more JSON objects; the message is the one-line reason for the sender."""


class _Probe(msgspec.Struct):
    id: Any = None
    author_id: Any = None
    author_name: Any = None
    event_type: Any = None
    created_at: Any = None
    # Only looked into when the top level has no author name: kept raw (validated, not built).
    details: msgspec.Raw = msgspec.Raw()


class _DetailsProbe(msgspec.Struct):
    author_name: Any = None


_probe_decoder: Final = msgspec.json.Decoder(_Probe)
_details_decoder: Final = msgspec.json.Decoder(_DetailsProbe)
_array_decoder: Final = msgspec.json.Decoder(list[msgspec.Raw])
_any_decoder: Final = msgspec.json.Decoder()


class Event(msgspec.Struct, frozen=True, gc=False):
    """One event of a body. (A Struct: built per event, ten times faster than a frozen dataclass.)"""

    raw: bytes
    event_id: str | None
    event_type: str | None
    created_at: str | None
    key: bytes | None

    def dedup_key(self, destination: str) -> bytes:
        """What identifies one GitLab event for duplicate detection (fixed-size digest).

        GitLab says to de-duplicate on ``id``; since ``id`` is not always unique on its own (Unix
        seconds, placeholder values), the event type and creation time are part of the key. Without an
        ``id`` the content hash of the event decides.
        """
        # One update of the concatenation: the same digest as feeding the parts one by one.
        if self.event_id is not None:
            text = "\0".join((destination, self.event_type or "", self.event_id, self.created_at or ""))
            data = text.encode("utf-8", "surrogateescape")
        else:
            data = destination.encode("utf-8") + b"\1" + self.raw.strip(_WHITESPACE)
        return hashlib.blake2b(data, digest_size=16).digest()


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str | int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _probe(raw: bytes, where: str) -> Event:
    try:
        probe = _probe_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BodyError(f"{where} is not valid JSON: {exc}") from None
    except msgspec.ValidationError:
        # Not an object after all (cannot happen after the first-byte check, but stay exact).
        raise BodyError(f"{where} is not a JSON object") from None
    name = probe.author_name if isinstance(probe.author_name, str) and probe.author_name else None
    if name is None and probe.details:
        try:
            nested = _details_decoder.decode(probe.details).author_name
        except msgspec.ValidationError:  # details is not an object
            nested = None
        if isinstance(nested, str):
            name = nested
    author_id = probe.author_id if isinstance(probe.author_id, int | str) else None
    if isinstance(author_id, bool):
        author_id = None
    event_type = probe.event_type if isinstance(probe.event_type, str) and probe.event_type else None
    created_at = probe.created_at if isinstance(probe.created_at, str) else None
    return Event(
        raw=raw,
        event_id=_text(probe.id),
        event_type=event_type,
        created_at=created_at,
        key=actor_key(author_id, name),
    )


def split_body(body: bytes) -> list[Event]:
    """The events of a request body; raises BodyError with a one-line reason."""
    try:
        return _split_body(body)
    except RecursionError:
        # msgspec refuses JSON nested deeper than the interpreter's recursion limit (RecursionError, not
        # DecodeError): a malformed body like any other, never a 500.
        raise BodyError("body is not valid JSON: nested too deeply") from None


def _split_body(body: bytes) -> list[Event]:
    stripped = body.lstrip(_WHITESPACE)
    if not stripped:
        raise BodyError("empty body: expected a JSON object or array")
    if not body.isascii():  # ASCII (the usual case, checked in C without a copy) is valid UTF-8
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BodyError(f"body is not valid UTF-8 (byte {exc.start})") from None
    first = stripped[:1]
    if first == b"{":
        return [_probe(body, "body")]
    if first == b"[":
        try:
            elements = _array_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise BodyError(f"body is not valid JSON: {exc}") from None
        if not elements:
            raise BodyError("empty JSON array: no events")
        events: list[Event] = []
        for index, element in enumerate(elements):
            raw = bytes(element)
            if raw[:1] != b"{":
                kind = _kind(_any_decoder.decode(raw))
                raise BodyError(f"array element {index} is {kind}, not a JSON object")
            events.append(_probe(raw, f"array element {index}"))
        return events
    try:
        value = _any_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise BodyError(f"body is not valid JSON: {exc}") from None
    raise BodyError(f"body is {_kind(value)}, not a JSON object or array")
