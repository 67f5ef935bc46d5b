"""Lexical layer of the Falco condition language.

Falco's condition grammar is context-sensitive at the lexical level (the same characters are a bare
string after ``=``, an identifier where a check is expected, a field name when they contain a dot), so
instead of producing a token stream up front this module offers a ``Scanner``: a cursor over the text
with one ``lex_*`` method per token class, each consuming the token and returning it or returning
``None`` and leaving the cursor where it was. The parser drives it.

Token classes follow Falco's (libsinsp) filter grammar:

- blanks: space, tab, backspace, CR, LF;
- identifier (macro name): ``[a-zA-Z]+[a-zA-Z0-9_]*``;
- field name: two or more identifier-like parts joined by dots, e.g. ``gitlab.event_type``;
- field argument: ``[`` then a quoted string or a bare argument ``[^][\"'\\s]+`` then ``]``;
- number: ``[+-]?[0-9]+(\\.[0-9]*)?([eE][+-][0-9]+)?`` or hex ``0x...`` (numeric operators only);
- bare string: ``[^()\"'\\s=,]+``;
- quoted string: ``"..."`` or ``'...'``; the escapes ``\\b \\f \\n \\r \\t \\\\ \\/ \\<space>`` and the
  quote of the same kind are understood, anything else is an error (as in Falco).
"""

from __future__ import annotations

import re
from typing import Final

from replay.errors import ConditionError, Position

BLANKS: Final = " \t\b\r\n"

RGX_NOT_BLANK: Final = re.compile(r"not[ \t\b\r\n\f\v]+")
RGX_IDENTIFIER: Final = re.compile(r"[a-zA-Z]+[a-zA-Z0-9_]*")
RGX_FIELD_NAME: Final = re.compile(r"[a-zA-Z]+[a-zA-Z0-9_]*(?:\.[a-zA-Z]+[a-zA-Z0-9_]*)+")
RGX_FIELD_ARG_BARE: Final = re.compile(r"[^\[\]\"'\s]+")
RGX_HEX_NUM: Final = re.compile(r"0[xX][0-9a-zA-Z]+")
RGX_NUMBER: Final = re.compile(r"[+\-]?[0-9]+\.?[0-9]*(?:[eE][+\-][0-9]+)?")
RGX_BARE_STR: Final = re.compile(r"[^()\"'\s=,]+")

# Operators, in the order Falco tries them (longest first where one is a prefix of another).
UNARY_OPS: Final = ("exists",)
NUM_OPS: Final = ("<=", "<", ">=", ">")
# Word operators must be followed by a blank; the symbol ones need not be.
STR_OPS: Final = ("==", "=", "!=", "glob", "iglob", "contains", "icontains", "bcontains", "startswith",
                  "bstartswith", "endswith", "regex")
LIST_OPS: Final = ("intersects", "in", "pmatch")
# Field transformers of recent Falco versions: recognised so that they can be rejected clearly.
TRANSFORMERS: Final = ("tolower(", "toupper(", "b64(", "basename(", "len(")
VAL_TRANSFORMER: Final = "val("

_ESCAPES: Final = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", " ": "\\", "\\": "\\", "/": "/"}


class Scanner:
    """A cursor over a condition with position tracking and one method per token class."""

    __slots__ = ("_col", "_idx", "_line", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._idx = 0
        self._line = 1
        self._col = 1

    # --- position ---------------------------------------------------------------------------------

    @property
    def pos(self) -> Position:
        return Position(self._idx, self._line, self._col)

    def reset(self, pos: Position) -> None:
        self._idx, self._line, self._col = pos.idx, pos.line, pos.col

    def at_end(self) -> bool:
        return self._idx >= len(self.text)

    def peek(self, n: int = 1) -> str:
        return self.text[self._idx:self._idx + n]

    def rest(self, limit: int = 30) -> str:
        """What follows the cursor, shortened, for error messages."""
        tail = self.text[self._idx:].split("\n", 1)[0]
        return tail if len(tail) <= limit else tail[:limit] + "..."

    def _advance(self, token: str) -> None:
        for char in token:
            self._idx += 1
            if char in "\r\n":
                self._line += 1
                self._col = 1
            else:
                self._col += 1

    def error(self, message: str, pos: Position | None = None) -> ConditionError:
        return ConditionError(message, pos or self.pos, self.text)

    # --- token classes ----------------------------------------------------------------------------

    def lex_blank(self) -> bool:
        start = self._idx
        while self._idx < len(self.text) and self.text[self._idx] in BLANKS:
            self._advance(self.text[self._idx])
        return self._idx != start

    def lex_str(self, literal: str) -> bool:
        if self.text.startswith(literal, self._idx):
            self._advance(literal)
            return True
        return False

    def lex_regex(self, pattern: re.Pattern[str]) -> str | None:
        match = pattern.match(self.text, self._idx)
        if match is None:
            return None
        token = match.group(0)
        self._advance(token)
        return token

    def lex_identifier(self) -> str | None:
        return self.lex_regex(RGX_IDENTIFIER)

    def lex_field_name(self) -> str | None:
        return self.lex_regex(RGX_FIELD_NAME)

    def lex_not(self) -> bool:
        return self.lex_regex(RGX_NOT_BLANK) is not None

    def lex_number(self) -> str | None:
        return self.lex_regex(RGX_HEX_NUM) or self.lex_regex(RGX_NUMBER)

    def lex_bare_str(self) -> str | None:
        return self.lex_regex(RGX_BARE_STR)

    def lex_field_arg_bare(self) -> str | None:
        return self.lex_regex(RGX_FIELD_ARG_BARE)

    def lex_quoted_str(self) -> str | None:
        """A '...' or "..." string, unescaped; None if the cursor is not on a complete one."""
        if self._idx >= len(self.text) or self.text[self._idx] not in "'\"":
            return None
        delimiter = self.text[self._idx]
        start = self.pos
        i = self._idx + 1
        prev = ""
        while i < len(self.text):
            char = self.text[i]
            if char == delimiter and prev != "\\":
                raw = self.text[self._idx:i + 1]
                value = self._unescape(raw, start)
                self._advance(raw)
                return value
            # Like Falco: a quote right after a backslash never ends the string (even after two).
            prev = char
            i += 1
        return None

    def _unescape(self, raw: str, pos: Position) -> str:
        delimiter = raw[0]
        out: list[str] = []
        escaped = False
        for char in raw[1:-1]:
            if not escaped:
                if char == "\\":
                    escaped = True
                else:
                    out.append(char)
                continue
            escaped = False
            if char in _ESCAPES:
                out.append(_ESCAPES[char])
            elif char in "\"'":
                if char != delimiter:
                    raise self.error(f"invalid \\{char} escape in {delimiter}-quoted string", pos)
                out.append(char)
            else:
                raise self.error(f"unsupported string escape sequence: \\{char}", pos)
        return "".join(out)

    def lex_one_of(self, options: tuple[str, ...], need_blank_after_word: bool = False) -> str | None:
        """The first of ``options`` the text continues with (word operators need a blank after)."""
        for option in options:
            if not self.text.startswith(option, self._idx):
                continue
            end = self._idx + len(option)
            if need_blank_after_word and option[-1].isalpha() and (
                    end >= len(self.text) or self.text[end] not in BLANKS):
                continue
            self._advance(option)
            return option
        return None
