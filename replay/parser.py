"""Parser of Falco rule conditions into an AST.

Grammar (the part of Falco's filter language this evaluator supports)::

    or_expr   := and_expr ("or" and_expr)*
    and_expr  := not_expr ("and" not_expr)*
    not_expr  := ("not" blank)* check | "not(" or_expr ")"
    check     := "(" or_expr ")" | field unary_op | field op value | field list_op list | identifier
    field     := field_name ("[" (quoted | bare_arg) "]")?
    unary_op  := "exists"
    op        := "=" | "==" | "!=" | "<" | "<=" | ">" | ">=" | "contains" | "icontains"
               | "startswith" | "endswith" | "glob" | "iglob"
    list_op   := "in" | "intersects"
    list      := "(" (value ("," value)*)? ")"
    value     := quoted | bare_string            (a number after < <= > >=)

Precedence: ``not`` binds tighter than ``and``, which binds tighter than ``or``. An identifier alone is a
macro reference. Inside a list, a bare (unquoted) item naming a list is replaced by that list's items
(done by the rules compiler, not here). Operators Falco has but this evaluator does not implement
(``pmatch``, ``regex``, ``bcontains``, ``bstartswith``), field transformers (``tolower(...)``,
``val(...)``, ...) and list operands without parentheses are rejected with an ``UnsupportedConstruct``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from replay.errors import ConditionError, Position, UnsupportedConstruct
from replay.lexer import LIST_OPS, NUM_OPS, STR_OPS, TRANSFORMERS, UNARY_OPS, VAL_TRANSFORMER, Scanner

UNSUPPORTED_OPS: Final = {
    "pmatch": "'pmatch' (path prefix match) is not supported by the replay evaluator",
    "regex": "'regex' is not supported by the replay evaluator",
    "bcontains": "'bcontains' works on byte buffers only; gitlab.* fields are strings or numbers",
    "bstartswith": "'bstartswith' works on byte buffers only; gitlab.* fields are strings or numbers",
}

MAX_DEPTH: Final = 1000


# --- AST -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldRef:
    """A field reference: ``name`` like ``gitlab.event_type``, ``arg`` for ``gitlab.value[path]``."""

    name: str
    arg: str | None = None
    pos: Position = dataclasses.field(default_factory=Position, compare=False)

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}[{self.arg}]"


@dataclass(frozen=True, slots=True)
class Value:
    """A literal operand. ``quoted`` says whether it was written in quotes (quoted items are never
    taken for list names)."""

    text: str
    quoted: bool = False
    pos: Position = dataclasses.field(default_factory=Position, compare=False)


@dataclass(frozen=True, slots=True)
class ListValue:
    items: tuple[Value, ...]
    pos: Position = dataclasses.field(default_factory=Position, compare=False)


@dataclass(frozen=True, slots=True)
class Check:
    """``field op operand``; ``operand`` is None for ``exists``."""

    field: FieldRef
    op: str
    operand: Value | ListValue | None
    pos: Position = dataclasses.field(default_factory=Position, compare=False)


@dataclass(frozen=True, slots=True)
class MacroRef:
    name: str
    pos: Position = dataclasses.field(default_factory=Position, compare=False)


@dataclass(frozen=True, slots=True)
class Not:
    child: Node
    pos: Position = dataclasses.field(default_factory=Position, compare=False)


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Node, ...]
    pos: Position = dataclasses.field(default_factory=Position, compare=False)


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Node, ...]
    pos: Position = dataclasses.field(default_factory=Position, compare=False)


@dataclass(frozen=True, slots=True)
class Const:
    """A constant truth value (produced by the compiler, e.g. for an exception with no values)."""

    value: bool
    pos: Position = dataclasses.field(default_factory=Position, compare=False)


Node = Check | MacroRef | Not | And | Or | Const


def walk(node: Node) -> Iterator[Node]:
    """Every node of the tree, parents before children."""
    yield node
    if isinstance(node, (And, Or)):
        for child in node.children:
            yield from walk(child)
    elif isinstance(node, Not):
        yield from walk(node.child)


def to_text(node: Node) -> str:
    """Render an AST back to condition text (normalised spacing, explicit parentheses)."""
    if isinstance(node, Check):
        left = str(node.field)
        if node.operand is None:
            return f"{left} {node.op}"
        if isinstance(node.operand, ListValue):
            return f"{left} {node.op} ({', '.join(_quote(v) for v in node.operand.items)})"
        return f"{left} {node.op} {_quote(node.operand)}"
    if isinstance(node, MacroRef):
        return node.name
    if isinstance(node, Not):
        return f"not ({to_text(node.child)})"
    if isinstance(node, Const):
        return "(always_true)" if node.value else "(always_false)"
    joiner = " and " if isinstance(node, And) else " or "
    return "(" + joiner.join(to_text(c) for c in node.children) + ")"


def _quote(value: Value) -> str:
    text = value.text
    if value.quoted or not text or any(c in text for c in " \t\r\n()\"',="):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


# --- parser ----------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = Scanner(text)
        self.depth = 0
        self.last = ""

    def parse(self) -> Node:
        if not self.s.text.strip():
            raise ConditionError("condition is empty", Position(), self.s.text)
        node = self.parse_or()
        self.s.lex_blank()
        if not self.s.at_end():
            raise self.s.error(f"unexpected '{self.s.rest()}' after '{self.last}', expecting 'or', 'and'")
        return node

    def _enter(self) -> None:
        self.depth += 1
        if self.depth >= MAX_DEPTH:
            raise self.s.error(f"condition nesting exceeds the limit of {MAX_DEPTH}")

    def parse_or(self) -> Node:
        self._enter()
        pos = self._skip()
        children = [self.parse_and()]
        self.s.lex_blank()
        while self.s.lex_str("or"):
            self.last = "or"
            children.append(self._after_keyword("or"))
            self.s.lex_blank()
        self.depth -= 1
        return children[0] if len(children) == 1 else Or(tuple(children), pos)

    def parse_and(self) -> Node:
        self._enter()
        pos = self._skip()
        children = [self.parse_not()]
        self.s.lex_blank()
        while self.s.lex_str("and"):
            self.last = "and"
            children.append(self._after_keyword("and"))
            self.s.lex_blank()
        self.depth -= 1
        return children[0] if len(children) == 1 else And(tuple(children), pos)

    def _after_keyword(self, keyword: str) -> Node:
        if self.s.lex_blank():
            return self.parse_and() if keyword == "or" else self.parse_not()
        if self.s.lex_str("("):
            return self.parse_embedded_remainder()
        raise self.s.error(f"expected a blank or '(' after '{keyword}'")

    def _skip(self) -> Position:
        self.s.lex_blank()
        return self.s.pos

    def parse_not(self) -> Node:
        self._enter()
        pos = self._skip()
        negate = False
        while self.s.lex_not():
            negate = not negate
        if self.s.lex_str("not("):
            negate = not negate
            child = self.parse_embedded_remainder()
        else:
            child = self.parse_check()
        self.depth -= 1
        return Not(child, pos) if negate else child

    def parse_embedded_remainder(self) -> Node:
        self._enter()
        self.s.lex_blank()
        child = self.parse_or()
        self.s.lex_blank()
        if not self.s.lex_str(")"):
            raise self.s.error("expected a ')' token" + self._found())
        self.last = ")"
        self.depth -= 1
        return child

    def _found(self) -> str:
        return f", found '{self.s.rest()}'" if not self.s.at_end() else ", found the end of the condition"

    def parse_check(self) -> Node:
        pos = self._skip()
        if self.s.lex_str("("):
            return self.parse_embedded_remainder()
        self._reject_transformer()
        name = self.s.lex_field_name()
        if name is not None:
            ref = self.parse_field_remainder(name, pos)
            return self.parse_condition(ref, pos)
        ident = self.s.lex_identifier()
        if ident is not None:
            self.last = ident
            return MacroRef(ident, pos)
        raise self.s.error("expected a '(' token, a field check, or an identifier" + self._found())

    def _reject_transformer(self) -> None:
        pos = self.s.pos
        for name in (*TRANSFORMERS, VAL_TRANSFORMER):
            if self.s.peek(len(name)) == name:
                raise UnsupportedConstruct(
                    f"field transformer '{name[:-1]}(...)' is not supported by the replay evaluator",
                    pos, self.s.text)

    def parse_field_remainder(self, name: str, pos: Position) -> FieldRef:
        self.last = name
        arg: str | None = None
        if self.s.lex_str("["):
            arg = self.s.lex_quoted_str()
            if arg is None:
                arg = self.s.lex_field_arg_bare()
            if arg is None:
                raise self.s.error("expected a valid field argument: a quoted string or a bare string")
            if not self.s.lex_str("]"):
                raise self.s.error("expected a ']' token")
            self.last = f"{name}[{arg}]"
        return FieldRef(name, arg, pos)

    def parse_condition(self, ref: FieldRef, pos: Position) -> Node:
        self.s.lex_blank()
        op_pos = self.s.pos
        op = self.s.lex_one_of(UNARY_OPS)
        if op is not None:
            self.last = op
            return Check(ref, op, None, pos)
        op = self.s.lex_one_of(NUM_OPS)
        if op is not None:
            self.last = op
            return Check(ref, op, self.parse_num_value(), pos)
        op = self.s.lex_one_of(STR_OPS, need_blank_after_word=True)
        if op is not None:
            self._check_supported(op, op_pos)
            self.last = op
            return Check(ref, "=" if op == "==" else op, self.parse_str_value(), pos)
        op = self.s.lex_one_of(LIST_OPS)
        if op is not None:
            self._check_supported(op, op_pos)
            self.last = op
            return Check(ref, op, self.parse_list_value(op), pos)
        ops = ", ".join(f"'{o}'" for o in (*UNARY_OPS, *NUM_OPS, *STR_OPS, *LIST_OPS))
        raise self.s.error(f"expected a valid check operator after '{ref}': one of {ops}" + self._found())

    def _check_supported(self, op: str, pos: Position) -> None:
        if op in UNSUPPORTED_OPS:
            raise UnsupportedConstruct(f"operator {UNSUPPORTED_OPS[op]}", pos, self.s.text)

    def parse_num_value(self) -> Value:
        self.s.lex_blank()
        pos = self.s.pos
        self._reject_transformer()
        number = self.s.lex_number()
        if number is None:
            raise self.s.error("expected a number value" + self._found())
        self.last = number
        return Value(number, False, pos)

    def parse_str_value(self) -> Value:
        self.s.lex_blank()
        self._reject_transformer()
        value = self._lex_value()
        if value is None:
            raise self.s.error("expected a string value" + self._found())
        return value

    def _lex_value(self) -> Value | None:
        pos = self.s.pos
        quoted = self.s.lex_quoted_str()
        if quoted is not None:
            self.last = quoted
            return Value(quoted, True, pos)
        bare = self.s.lex_bare_str()
        if bare is not None:
            self.last = bare
            return Value(bare, False, pos)
        return None

    def parse_list_value(self, op: str) -> ListValue:
        self.s.lex_blank()
        pos = self.s.pos
        if not self.s.lex_str("("):
            self._reject_transformer()
            raise UnsupportedConstruct(
                f"'{op}' needs a parenthesised list, e.g. {op} (a, b) or {op} (list_name)", pos, self.s.text)
        self.s.lex_blank()
        items: list[Value] = []
        first = self._lex_value()
        if first is not None:
            items.append(first)
            self.s.lex_blank()
            while self.s.lex_str(","):
                self.s.lex_blank()
                item = self._lex_value()
                if item is None:
                    raise self.s.error("expected a string value in the list" + self._found())
                items.append(item)
                self.s.lex_blank()
        if not self.s.lex_str(")"):
            raise self.s.error("expected a ')' token closing the list" + self._found())
        self.last = ")"
        return ListValue(tuple(items), pos)


def parse_condition(text: str) -> Node:
    """Parse one condition; raises ConditionError (or UnsupportedConstruct) with the position."""
    return _Parser(text).parse()
