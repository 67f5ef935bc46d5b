"""Check validation and compilation of a (macro-free, list-expanded) condition AST into closures.

Semantics follow Falco (libsinsp) for the field types the gitlab source has:

- a comparison on an absent field is false (``!=`` too); ``not`` of it is true; ``exists`` tests presence;
- strings: ``= != < <= > >=`` (byte-wise, like strcmp), ``contains icontains startswith endswith glob
  iglob in intersects exists``; ``icontains``/``iglob`` fold ASCII letters only, like strcasestr/fnmatch;
- uint64: ``= != < <= > >= in intersects exists``; the literal must be a decimal integer;
- bool: ``= != in intersects exists``; the literal must be ``true`` or ``false``;
- ``intersects`` on these single-valued fields is the same as ``in``;
- ``glob`` is POSIX fnmatch without flags: ``*`` and ``?`` match any character including ``/``,
  ``[...]`` / ``[!...]`` / ``[^...]`` are bracket expressions, a backslash escapes the next character.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

from falco_gitlab.fields import FieldType
from replay.errors import ConditionError, Position, UnsupportedConstruct
from replay.fieldspec import Event, FieldSpec, lookup
from replay.parser import And, Check, Const, ListValue, MacroRef, Node, Not, Or, Value

Predicate = Callable[[Event], bool]

_NUMERIC_OPS: Final = frozenset({"=", "!=", "<", "<=", ">", ">=", "in", "intersects", "exists"})
_BOOL_OPS: Final = frozenset({"=", "!=", "in", "intersects", "exists"})
_STRING_OPS: Final = frozenset({"=", "!=", "<", "<=", ">", ">=", "contains", "icontains", "startswith",
                                "endswith", "glob", "iglob", "in", "intersects", "exists"})
_ALLOWED: Final = {FieldType.STRING: _STRING_OPS, FieldType.UINT64: _NUMERIC_OPS, FieldType.BOOL: _BOOL_OPS}
_KIND: Final = {FieldType.STRING: "string", FieldType.UINT64: "numeric", FieldType.BOOL: "bool"}

_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_UINT64_MAX: Final = 2**64 - 1


def ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


class CheckError(ConditionError):
    """A check is well-formed but invalid for its field (unknown field, operator/type mismatch...)."""


class UnknownField(CheckError):
    """The condition or output names a field that does not exist (``skip-if-unknown-filter`` applies)."""


def field_spec(name: str, arg: str | None, pos: Position | None, text: str | None,
               *, for_output: bool = False) -> FieldSpec:
    spec = lookup(name)
    if spec is None:
        if name.startswith("evt."):
            raise UnknownField(f"field '{name}' is not supported by the replay evaluator (supported evt.* "
                               "fields: evt.rawtime, evt.num, evt.source, and in outputs evt.time, "
                               "evt.time.iso8601, evt.datetime)", pos, text)
        raise UnknownField(f"unknown field '{name}'", pos, text)
    if spec.takes_arg and arg is None:
        raise CheckError(f"field '{name}' requires an argument, e.g. {name}[details.change]", pos, text)
    if not spec.takes_arg and arg is not None:
        raise CheckError(f"field '{name}' does not take an argument (got '[{arg}]')", pos, text)
    if spec.takes_arg and arg == "":
        raise CheckError(f"field '{name}' needs a non-empty argument", pos, text)
    if not for_output and not spec.in_conditions:
        raise UnsupportedConstruct(spec.output_only, pos, text)
    return spec


def convert_literal(spec: FieldSpec, value: Value, text: str | None) -> Any:
    """The literal as the field's type: str, int (uint64) or bool; raises CheckError if it is not one."""
    if spec.type is FieldType.STRING:
        return value.text
    if spec.type is FieldType.UINT64:
        literal = value.text[1:] if value.text.startswith("+") else value.text
        if not literal.isdigit() or not literal.isascii() or int(literal) > _UINT64_MAX:
            raise CheckError(f"'{value.text}' is not a valid number for uint64 field '{spec.name}'",
                             value.pos, text)
        return int(literal)
    if value.text not in ("true", "false"):
        raise CheckError(f"'{value.text}' is not a valid boolean for field '{spec.name}' "
                         "(use true or false)", value.pos, text)
    return value.text == "true"


def validate_check(check: Check, text: str | None) -> None:
    """Raise CheckError/UnsupportedConstruct if the check cannot be evaluated; silent otherwise."""
    spec = field_spec(check.field.name, check.field.arg, check.field.pos, text)
    if check.op not in _ALLOWED[spec.type]:
        raise CheckError(f"'{check.op}' operator not supported for {_KIND[spec.type]} filters "
                         f"(field '{check.field}' is {spec.type.value})", check.pos, text)
    operand = check.operand
    if isinstance(operand, ListValue):
        for item in operand.items:
            convert_literal(spec, item, text)
    elif isinstance(operand, Value):
        convert_literal(spec, operand, text)


def glob_to_regex(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """Translate a POSIX fnmatch pattern (no flags) to an anchored regular expression."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "\\":
            if i < n:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                out.append(re.escape("\\"))
        elif char == "[":
            j = i
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                if pattern[j] == "[" and j + 1 < n and pattern[j + 1] in ":.=":
                    raise UnsupportedConstruct(
                        f"glob pattern '{pattern}': character classes like [[:alpha:]] are not supported")
                j += 1
            if j >= n:
                out.append(re.escape("["))  # no closing bracket: a literal '['
                continue
            body = pattern[i:j]
            i = j + 1
            negate = body[:1] in ("!", "^")
            if negate:
                body = body[1:]
            escaped = "".join("\\" + c if c in "\\^[]" else c for c in body)
            out.append(f"[{'^' if negate else ''}{escaped}]")
        else:
            out.append(re.escape(char))
    flags = re.DOTALL | (re.IGNORECASE | re.ASCII if ignore_case else 0)
    return re.compile("(?:" + "".join(out) + r")\Z", flags)


def compile_node(node: Node) -> Predicate:
    """Compile a validated AST (no macro references left) into one predicate."""
    if isinstance(node, Check):
        return _compile_check(node)
    if isinstance(node, And):
        return _fold(node.children, conjunction=True)
    if isinstance(node, Or):
        return _fold(node.children, conjunction=False)
    if isinstance(node, Not):
        child = compile_node(node.child)
        return lambda event: not child(event)
    if isinstance(node, Const):
        constant = node.value
        return lambda _event: constant
    if isinstance(node, MacroRef):  # pragma: no cover - the rules compiler inlines every macro first
        raise ConditionError(f"macro '{node.name}' was not expanded", node.pos)
    raise TypeError(f"not a condition node: {node!r}")  # pragma: no cover


def _fold(children: tuple[Node, ...], *, conjunction: bool) -> Predicate:
    predicates = [compile_node(child) for child in children]
    result = predicates[-1]
    for predicate in reversed(predicates[:-1]):
        result = _and(predicate, result) if conjunction else _or(predicate, result)
    return result


def _and(left: Predicate, right: Predicate) -> Predicate:
    return lambda event: left(event) and right(event)


def _or(left: Predicate, right: Predicate) -> Predicate:
    return lambda event: left(event) or right(event)


def _compile_check(check: Check) -> Predicate:
    spec = field_spec(check.field.name, check.field.arg, check.field.pos, None)
    get = spec.make_getter(check.field.arg)
    op = check.op
    if op == "exists":
        return lambda event: get(event) is not None
    operand = check.operand
    if isinstance(operand, ListValue):
        members = frozenset(convert_literal(spec, item, None) for item in operand.items)
        if spec.type is FieldType.UINT64:
            # bool is an int subclass: keep True from matching 1.
            return lambda event: (value := get(event)) is not None and value.__class__ is int \
                and value in members
        return lambda event: get(event) in members
    if not isinstance(operand, Value):  # pragma: no cover - the parser guarantees an operand
        raise ConditionError(f"'{op}' needs an operand", check.pos)
    literal = convert_literal(spec, operand, None)
    if op == "=":
        return lambda event: (value := get(event)) is not None and value == literal
    if op == "!=":
        return lambda event: (value := get(event)) is not None and value != literal
    if op in ("<", "<=", ">", ">="):
        if spec.type is FieldType.STRING:
            # strcmp on UTF-8 bytes orders like Python's comparison of code points.
            literal = operand.text
        return _ordering(get, op, literal)
    if op == "contains":
        return lambda event: (value := get(event)) is not None and literal in value
    if op == "icontains":
        needle = ascii_lower(literal)
        return lambda event: (value := get(event)) is not None and needle in ascii_lower(value)
    if op == "startswith":
        return lambda event: (value := get(event)) is not None and value.startswith(literal)
    if op == "endswith":
        return lambda event: (value := get(event)) is not None and value.endswith(literal)
    if op in ("glob", "iglob"):
        matcher = glob_to_regex(literal, ignore_case=op == "iglob").match
        return lambda event: (value := get(event)) is not None and matcher(value) is not None
    raise UnsupportedConstruct(f"operator '{op}' is not supported", check.pos)  # pragma: no cover


def _ordering(get: Callable[[Event], Any], op: str, literal: Any) -> Predicate:
    if op == "<":
        return lambda event: (value := get(event)) is not None and value < literal
    if op == "<=":
        return lambda event: (value := get(event)) is not None and value <= literal
    if op == ">":
        return lambda event: (value := get(event)) is not None and value > literal
    return lambda event: (value := get(event)) is not None and value >= literal
