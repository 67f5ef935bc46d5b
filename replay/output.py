"""Rule output formats and Falco's alert formats (JSON and plain text).

An output format is text with ``%field`` tokens (``%gitlab.author_name``, ``%gitlab.value[details.to]``,
optionally with a width, ``%20gitlab.entity_path``, which pads or truncates to that many characters).
At each ``%`` the longest known field name is taken, as Falco does, and an argument in brackets follows
for fields that take one. A leading ``*`` is dropped. Absent values print as ``<NA>``.

Falco's JSON alert (``json_output: true``) is an object with keys in this (sorted) order:
``hostname, output, output_fields, priority, rule, source, tags, time``. ``output`` is
``"<evt.time> : <Priority> <formatted rule output>"``, i.e. ``"04:09:24.597000000: Warning ..."`` with the
event time as local wall-clock time; ``time`` is the event time in UTC, ISO-8601 with nanoseconds;
``output_fields`` maps each field token of the output (with its argument, without width) to its value
(strings, numbers, booleans; ``null`` when absent) plus ``evt.time`` (ns since the epoch); ``tags`` is
the sorted tag list. The plain-text alert is the ``output`` string.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Final

from replay.compiler import UnknownField, field_spec
from replay.errors import ConditionError, Position
from replay.fieldspec import NAMES_LONGEST_FIRST, Event, FieldSpec, Getter, iso8601, local_clock

NA: Final = "<NA>"

PRIORITIES: Final = ("Emergency", "Alert", "Critical", "Error", "Warning", "Notice", "Informational", "Debug")


def parse_priority(text: str) -> str | None:
    """Falco's case-insensitive priority names (``info`` for Informational) to the canonical name."""
    lowered = text.strip().lower()
    if lowered == "info":
        return "Informational"
    for name in PRIORITIES:
        if name.lower() == lowered:
            return name
    return None


def priority_rank(name: str) -> int:
    """0 for Emergency (most severe) ... 7 for Debug."""
    return PRIORITIES.index(name)


@dataclass(frozen=True, slots=True)
class FieldToken:
    key: str  # as written, with the argument: gitlab.value[details.to]
    spec: FieldSpec
    get: Getter
    width: int = 0


Token = str | FieldToken


class OutputFormat:
    """A parsed output format; ``render`` produces the text, ``fields`` the JSON output_fields."""

    __slots__ = ("field_tokens", "text", "tokens")

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: tuple[Token, ...] = tuple(_tokenise(text))
        self.field_tokens: tuple[FieldToken, ...] = tuple(t for t in self.tokens if isinstance(t, FieldToken))

    def render(self, event: Event) -> str:
        parts: list[str] = []
        for token in self.tokens:
            if isinstance(token, str):
                parts.append(token)
                continue
            value = token.get(event)
            if value is None:
                rendered = NA
            elif token.spec.to_text is not None:
                rendered = token.spec.to_text(event, value)
            else:
                rendered = _text(value)
            if token.width:
                rendered = rendered[:token.width].ljust(token.width)
            parts.append(rendered)
        return "".join(parts)

    def fields(self, event: Event) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for token in self.field_tokens:
            value = token.get(event)
            if value is not None and token.spec.to_json is not None:
                value = token.spec.to_json(event, value)
            out[token.key] = value
        return out


def _text(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def _tokenise(fmt: str) -> list[Token]:
    if fmt == "":
        raise ConditionError("empty output format")
    text = fmt[1:] if fmt.startswith("*") else fmt
    tokens: list[Token] = []
    literal_start = 0
    i = 0
    n = len(text)
    while i < n:
        if text[i] != "%":
            i += 1
            continue
        if literal_start != i:
            tokens.append(text[literal_start:i])
        start = i
        if i == n - 1:
            raise ConditionError("invalid output format: it cannot end with a '%'", _pos(text, start), text)
        j = i + 1
        while j < n and text[j].isdigit():
            j += 1
        width = int(text[i + 1:j]) if j > i + 1 else 0
        if j >= n:
            raise ConditionError("invalid output format: it cannot end with a number", _pos(text, start),
                                 text)
        name = next((candidate for candidate in NAMES_LONGEST_FIRST if text.startswith(candidate, j)), None)
        if name is None:
            word = text[j:].split(None, 1)[0] if text[j:].strip() else text[j:]
            raise UnknownField(f"invalid formatting token %{word}: unknown field", _pos(text, start), text)
        end = j + len(name)
        arg: str | None = None
        if end < n and text[end] == "[":
            close = text.find("]", end + 1)
            if close < 0:
                raise ConditionError(f"invalid formatting token %{name}[: missing ']'", _pos(text, start),
                                     text)
            arg = text[end + 1:close]
            end = close + 1
        spec = field_spec(name, arg, _pos(text, start), text, for_output=True)
        key = name if arg is None else f"{name}[{arg}]"
        tokens.append(FieldToken(key, spec, spec.make_getter(arg), width))
        i = literal_start = end
    if literal_start < n:
        tokens.append(text[literal_start:])
    return tokens


def _pos(text: str, idx: int) -> Position:
    line = text.count("\n", 0, idx) + 1
    col = idx - (text.rfind("\n", 0, idx) + 1) + 1
    return Position(idx, line, col)


def iso_time(ts: int) -> str:
    """Falco's JSON ``time``: UTC, ISO-8601, nanoseconds, ``Z``."""
    seconds, nanos = divmod(ts, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def output_prefix(ts: int, priority: str, *, iso_8601: bool = False) -> str:
    """What Falco puts before every rule output: ``HH:MM:SS.nnnnnnnnn: Priority`` (local time), or with
    ``time_format_iso_8601: true`` ``YYYY-MM-DDTHH:MM:SS.nnnnnnnnn+0000: Priority``."""
    return f"{iso8601(ts) if iso_8601 else local_clock(ts)}: {priority}"


def default_hostname() -> str:
    """The hostname Falco reports: ``FALCO_HOSTNAME`` if set, else the machine's host name."""
    return os.environ.get("FALCO_HOSTNAME") or socket.gethostname()
