"""Errors raised by the replay evaluator. Every message names what is wrong and where."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a condition or output string: 0-based index, 1-based line and column."""

    idx: int = 0
    line: int = 1
    col: int = 1

    def __str__(self) -> str:
        return f"line {self.line}, column {self.col}"


class ReplayError(Exception):
    """Base class of every error the replay package raises on purpose."""


class ConditionError(ReplayError):
    """A condition (or output format) cannot be parsed or is not supported.

    ``pos`` is where in the text the problem was found; ``text`` is the whole text, so that callers can
    point at it. The message is self-contained.
    """

    def __init__(self, message: str, pos: Position | None = None, text: str | None = None) -> None:
        self.message = message
        self.pos = pos
        self.text = text
        super().__init__(self._render())

    def _render(self) -> str:
        if self.pos is None:
            return self.message
        return f"{self.message} (at {self.pos})"

    def excerpt(self) -> str:
        """The offending line of the text with a caret under the column, or '' if unknown."""
        if self.pos is None or self.text is None:
            return ""
        lines = self.text.splitlines() or [""]
        index = min(max(self.pos.line - 1, 0), len(lines) - 1)
        line = lines[index]
        return f"    {line}\n    {' ' * max(self.pos.col - 1, 0)}^"


class UnsupportedConstruct(ConditionError):
    """Valid Falco rule language that this evaluator deliberately does not implement."""


class RulesError(ReplayError):
    """A rules file cannot be loaded: the message says which file, item and position."""


class InputError(ReplayError):
    """An input (file, stream or topic) cannot be read."""
