"""Loading Falco rules files: lists, macros, rules, appends/overrides, exceptions, validation.

``load_rules(paths)`` reads the files in order (a directory stands for its ``*.yaml``/``*.yml`` files,
sorted), applies Falco's loading semantics and compiles every rule of the ``gitlab`` source. Anything
wrong or unsupported raises ``RulesError`` naming the file, the item and the position.

Loading semantics mirrored from Falco:

- items are ``required_engine_version``, ``required_plugin_versions`` (both recorded), ``list``,
  ``macro`` and ``rule``; any other top-level item is ignored with a warning, like Falco;
- a later definition with the same name replaces an earlier one but keeps its position;
- ``append: true`` (legacy) appends list items, macro conditions, and rule conditions/exceptions;
  ``override: {key: append|replace}`` appends or replaces individual keys (rules: condition, output,
  desc, tags, exceptions can be appended; those plus priority, enabled, warn_evttypes and
  skip-if-unknown-filter can be replaced); every key given next to ``override`` must be listed in it;
- a rule item with only ``rule`` and ``enabled`` enables/disables an existing rule (legacy);
- appended conditions are joined with a single space (write ``and ...``/``or ...``);
- exceptions become ``(<condition>) and not (<exception 1>) and not (<exception 2>) ...`` where each
  exception is ``(f1 c1 v1 and f2 c2 v2 ...) or (...)`` over its value tuples, or, when ``fields`` is a
  single field, ``f comp (v1, v2, ...)``; ``comps`` default to ``=`` (tuple form) / ``in`` (single field);
- a list item naming a list defined *earlier* is replaced by that list's items; in conditions, an
  unquoted value naming any list is replaced by its items, wherever the list is defined;
- a macro may use macros defined before it; a rule may use any macro;
- rules default to source ``syscall``; rules of a source other than ``gitlab`` are skipped with a
  warning (they are neither compiled nor evaluated); macros are checked against the gitlab fields only
  where a gitlab rule uses them; disabled rules are still compiled and validated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from replay.compiler import Predicate, UnknownField, compile_node, field_spec, validate_check
from replay.errors import ConditionError, RulesError
from replay.fieldspec import SOURCE
from replay.lexer import Scanner
from replay.output import OutputFormat, parse_priority
from replay.parser import (
    And,
    Check,
    ListValue,
    MacroRef,
    Node,
    Not,
    Or,
    Value,
    parse_condition,
    walk,
)
from replay.yamlload import YMap, load_documents

_RULE_KEYS: Final = frozenset({"rule", "condition", "output", "desc", "priority", "source", "tags", "enabled",
                               "exceptions", "append", "override", "warn_evttypes", "skip-if-unknown-filter",
                               "capture", "capture_duration"})
_MACRO_KEYS: Final = frozenset({"macro", "condition", "append", "override", "source", "desc"})
_LIST_KEYS: Final = frozenset({"list", "items", "append", "override", "desc"})
_EXCEPTION_KEYS: Final = frozenset({"name", "fields", "comps", "values"})
_RULE_APPENDABLE: Final = frozenset({"condition", "output", "desc", "tags", "exceptions"})
_RULE_REPLACEABLE: Final = frozenset({"condition", "output", "desc", "priority", "tags", "exceptions",
                                      "enabled", "warn_evttypes", "skip-if-unknown-filter"})
_FALCO_OPERATORS: Final = frozenset({"exists", "<=", "<", ">=", ">", "==", "=", "!=", "glob", "iglob",
                                     "contains", "icontains", "bcontains", "startswith", "bstartswith",
                                     "endswith", "regex", "intersects", "in", "pmatch"})
_LIST_OPERATORS: Final = ("in", "intersects", "pmatch")
_TRUE: Final = frozenset({"y", "yes", "true", "on"})
_FALSE: Final = frozenset({"n", "no", "false", "off"})


# --- public model ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleException:
    """One entry of a rule's ``exceptions``, after appends."""

    name: str
    fields: str | tuple[str, ...]
    comps: str | tuple[str, ...]
    values: tuple[Any, ...]  # strings, or (nested) tuples of strings


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule of the gitlab source.

    ``condition`` is the condition text as written (after appends), without exceptions; ``ast`` is the
    full condition (macros inlined, lists expanded, exceptions applied) and ``predicate`` its compiled
    form. ``priority`` is Falco's canonical name (``Warning``, ``Informational``...), ``tags`` sorted.
    """

    name: str
    priority: str
    tags: tuple[str, ...]
    enabled: bool
    source: str
    condition: str
    output: str
    desc: str
    exceptions: tuple[RuleException, ...]
    ast: Node
    predicate: Predicate
    output_format: OutputFormat
    file: str
    line: int
    macros_used: frozenset[str] = frozenset()
    lists_used: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SkippedRule:
    name: str
    source: str
    reason: str


@dataclass(slots=True)
class Ruleset:
    """The result of loading rules files. ``rules`` are the gitlab rules in Falco's evaluation order."""

    rules: list[Rule]
    skipped_rules: list[SkippedRule]
    lists: dict[str, tuple[str, ...]]
    macros: dict[str, str]
    warnings: list[str]
    files: list[str]
    required_engine_version: str | None = None
    required_plugin_versions: list[list[dict[str, str]]] = field(default_factory=list)

    @property
    def enabled_rules(self) -> list[Rule]:
        return [rule for rule in self.rules if rule.enabled]

    def rule(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def summary(self) -> str:
        enabled = len(self.enabled_rules)
        return (f"{len(self.rules)} rules ({enabled} enabled, {len(self.rules) - enabled} disabled), "
                f"{len(self.macros)} macros, {len(self.lists)} lists"
                + (f", {len(self.skipped_rules)} rules of other sources skipped"
                   if self.skipped_rules else ""))


# --- collected (not yet compiled) items ------------------------------------------------------------


@dataclass(slots=True)
class _Ctx:
    file: str
    line: int
    kind: str = ""
    name: str = ""

    def where(self) -> str:
        label = f" {self.kind} '{self.name}'" if self.kind else ""
        return f"{self.file}:{self.line}:{label}"

    def error(self, message: str) -> RulesError:
        return RulesError(f"{self.where()} {message}")


@dataclass(slots=True)
class _ListInfo:
    name: str
    items: list[str]
    index: int
    visibility: int
    ctx: _Ctx


@dataclass(slots=True)
class _MacroInfo:
    name: str
    cond: str
    index: int
    visibility: int
    ctx: _Ctx


@dataclass(slots=True)
class _ExceptionInfo:
    name: str
    fields: Any  # str | list[str] | None
    comps: Any  # str | list[str] | None
    values: list[Any]
    ctx: _Ctx


@dataclass(slots=True)
class _RuleInfo:
    name: str
    cond: str
    output: str
    desc: str
    priority: str
    source: str
    tags: set[str]
    enabled: bool
    exceptions: list[_ExceptionInfo]
    skip_if_unknown_filter: bool
    index: int
    visibility: int
    ctx: _Ctx


@dataclass(slots=True)
class _Update:
    """The keys an append or a replace carries (None: not given)."""

    cond: str | None = None
    output: str | None = None
    desc: str | None = None
    tags: set[str] | None = None
    exceptions: list[_ExceptionInfo] | None = None
    priority: str | None = None
    enabled: bool | None = None
    skip_if_unknown_filter: bool | None = None

    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in self.__slots__)


class _Collector:
    def __init__(self) -> None:
        self.index = 0
        self.lists: dict[str, _ListInfo] = {}
        self.macros: dict[str, _MacroInfo] = {}
        self.rules: dict[str, _RuleInfo] = {}
        self.warnings: list[str] = []
        self.engine_version: str | None = None
        self.plugin_versions: list[list[dict[str, str]]] = []

    def _next(self) -> int:
        self.index += 1
        return self.index - 1

    def define_list(self, name: str, items: list[str], ctx: _Ctx) -> None:
        index = self._next()
        prev = self.lists.get(name)
        self.lists[name] = _ListInfo(name, items, prev.index if prev else index, index, ctx)

    def append_list(self, name: str, items: list[str], ctx: _Ctx) -> None:
        prev = self.lists.get(name)
        if prev is None:
            raise ctx.error("list has 'append' but no list by that name already exists")
        prev.items.extend(items)
        prev.visibility = self._next()

    def define_macro(self, name: str, cond: str, ctx: _Ctx) -> None:
        index = self._next()
        prev = self.macros.get(name)
        self.macros[name] = _MacroInfo(name, cond, prev.index if prev else index, index, ctx)

    def append_macro(self, name: str, cond: str, ctx: _Ctx) -> None:
        prev = self.macros.get(name)
        if prev is None:
            raise ctx.error("macro has 'append' but no macro by that name already exists")
        prev.cond = f"{prev.cond} {cond}"
        prev.visibility = self._next()

    def define_rule(self, info: _RuleInfo) -> None:
        index = self._next()
        prev = self.rules.get(info.name)
        if prev is not None and prev.source != info.source:
            raise info.ctx.error(f"rule has been re-defined with a different source ({prev.source} -> "
                                 f"{info.source})")
        if info.source != SOURCE:
            self.warnings.append(f"{info.ctx.where()} unknown source {info.source}, skipping")
        for exception in info.exceptions:
            _validate_exception(exception, info.source, append=False)
        info.index = prev.index if prev else index
        info.visibility = index
        self.rules[info.name] = info

    def _previous_rule(self, name: str, ctx: _Ctx, what: str) -> _RuleInfo:
        prev = self.rules.get(name)
        if prev is None:
            raise ctx.error(f"rule has '{what}' but no rule by that name already exists")
        return prev

    def append_rule(self, name: str, update: _Update, ctx: _Ctx) -> None:
        prev = self._previous_rule(name, ctx, "append")
        if update.empty():
            raise ctx.error("appended rule must have exceptions or condition property")
        if update.cond:
            prev.cond = f"{prev.cond} {update.cond}"
        if update.output:
            prev.output = f"{prev.output} {update.output}"
        if update.desc:
            prev.desc = f"{prev.desc} {update.desc}"
        if update.tags is not None:
            prev.tags |= update.tags
        for exception in update.exceptions or ():
            existing = next((e for e in prev.exceptions if e.name == exception.name), None)
            if existing is None:
                if exception.fields is None:
                    raise exception.ctx.error(
                        "rule exception must have fields property with a list of fields")
                if not exception.values:
                    raise exception.ctx.error(
                        "rule exception must have values property with a list of values")
                _validate_exception(exception, prev.source, append=False)
                prev.exceptions.append(exception)
            else:
                if exception.fields is not None:
                    raise exception.ctx.error("can not append exception fields to existing exception, "
                                              "only values")
                if exception.comps is not None:
                    raise exception.ctx.error("can not append exception comps to existing exception, "
                                              "only values")
                existing.values.extend(exception.values)
        prev.visibility = self._next()

    def replace_rule(self, name: str, update: _Update, ctx: _Ctx) -> None:
        prev = self._previous_rule(name, ctx, "override")
        if update.empty():
            raise ctx.error("the rule must have at least one field that can be replaced")
        if update.cond is not None:
            prev.cond = update.cond
        if update.output is not None:
            prev.output = update.output
        if update.desc is not None:
            prev.desc = update.desc
        if update.tags is not None:
            prev.tags = update.tags
        if update.exceptions is not None:
            for exception in update.exceptions:
                _validate_exception(exception, prev.source, append=False)
            prev.exceptions = update.exceptions
        if update.priority is not None:
            prev.priority = update.priority
        if update.enabled is not None:
            prev.enabled = update.enabled
        if update.skip_if_unknown_filter is not None:
            prev.skip_if_unknown_filter = update.skip_if_unknown_filter
        prev.visibility = self._next()

    def enable_rule(self, name: str, enabled: bool, ctx: _Ctx) -> None:
        prev = self.rules.get(name)
        if prev is None:
            raise ctx.error("rule has 'enabled' key but no rule by that name already exists")
        prev.enabled = enabled


# --- reading ---------------------------------------------------------------------------------------


def _line(node: Any, default: int) -> int:
    return getattr(node, "line", 0) or default


def _scalar(item: YMap, key: str, ctx: _Ctx, *, optional: bool = False) -> str | None:
    if key not in item:
        if optional:
            return None
        raise ctx.error(f"item has no mapping for key '{key}'")
    value = item[key]
    if value is None:
        raise ctx.error(f"mapping for key '{key}' is empty")
    if not isinstance(value, str):
        raise ctx.error(f"value of '{key}' is not a scalar value")
    if value == "":
        raise ctx.error(f"value of '{key}' must be non-empty")
    return str(value)


def _required(item: YMap, key: str, ctx: _Ctx) -> str:
    value = _scalar(item, key, ctx)
    assert value is not None
    return value


def _bool(item: YMap, key: str, ctx: _Ctx) -> bool | None:
    value = _scalar(item, key, ctx, optional=True)
    if value is None:
        return None
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ctx.error(f"value of '{key}' is not a boolean: {value!r}")


def _strings(item: YMap, key: str, ctx: _Ctx) -> list[str]:
    if key not in item:
        raise ctx.error(f"item has no mapping for key '{key}'")
    value = item[key]
    if not isinstance(value, list):
        raise ctx.error(f"value of '{key}' is not a sequence")
    out: list[str] = []
    for entry in value:
        if not isinstance(entry, str):
            raise ctx.error(f"'{key}' contains a value that is not a scalar: {entry!r}")
        out.append(str(entry))
    return out


def _tags(item: YMap, ctx: _Ctx) -> set[str] | None:
    if "tags" not in item:
        return None
    return set(_strings(item, "tags", ctx))


def _check_keys(item: YMap, allowed: frozenset[str], ctx: _Ctx) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise ctx.error(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} "
                        f"(supported: {', '.join(sorted(allowed))})")


def _overrides(item: YMap, appendable: frozenset[str], replaceable: frozenset[str],
               ctx: _Ctx) -> tuple[set[str], set[str]]:
    if "override" not in item:
        return set(), set()
    spec = item["override"]
    if not isinstance(spec, dict):
        raise ctx.error("'override' must be a mapping of keys to 'append' or 'replace'")
    append: set[str] = set()
    replace: set[str] = set()
    for key, operation in spec.items():
        if operation == "append":
            if key not in appendable:
                raise ctx.error(f"key '{key}' cannot be appended to, use 'replace' instead"
                                if key in replaceable else f"key '{key}' cannot be appended to")
            append.add(key)
        elif operation == "replace":
            if key not in replaceable:
                raise ctx.error(f"key '{key}' cannot be replaced")
            replace.add(key)
        else:
            allowed = [op for op, keys in (("append", appendable), ("replace", replaceable)) if key in keys]
            raise ctx.error(f"invalid override operation for key '{key}': '{operation}'. Allowed values are: "
                            + " ".join(allowed))
    return append, replace


def _exception_entry(value: Any, ctx: _Ctx, what: str) -> Any:
    """An exception fields/comps/values entry: a non-empty string or a (nested) list of them."""
    if isinstance(value, list):
        return [_exception_entry(v, ctx, what) for v in value]
    if isinstance(value, str):
        if value == "":
            raise ctx.error(f"{what}: value must be non-empty")
        return str(value)
    raise ctx.error(f"{what}: expected a string or a list, got {value!r}")


def _read_exceptions(item: YMap, ctx: _Ctx, *, append: bool) -> list[_ExceptionInfo] | None:
    if "exceptions" not in item:
        return None
    raw = item["exceptions"]
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ctx.error("rule exceptions must be a sequence")
    out: list[_ExceptionInfo] = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise ctx.error("rule exception must be a mapping")
        name = _required(entry, "name", ctx)  # type: ignore[arg-type]
        ectx = _Ctx(ctx.file, _line(entry, ctx.line), ctx.kind, ctx.name)
        what = f"exception '{name}'"
        _check_keys(entry, _EXCEPTION_KEYS, _Ctx(ectx.file, ectx.line, "exception", name))  # type: ignore[arg-type]
        if any(e.name == name for e in out):
            raise ectx.error(f"{what}: exceptions names in the same object must be unique")
        if "fields" not in entry or entry["fields"] is None:
            if not append:
                raise ectx.error(f"{what}: item has no mapping for key 'fields'")
            fields = None
        else:
            fields = _exception_entry(entry["fields"], ectx, what)
        comps = _exception_entry(entry["comps"], ectx, what) if entry.get("comps") is not None else None
        values: list[Any] = []
        if entry.get("values") is not None:
            if not isinstance(entry["values"], list):
                raise ectx.error(f"{what}: rule exception values must be a sequence")
            values = [_exception_entry(v, ectx, what) for v in entry["values"]]
        out.append(_ExceptionInfo(str(name), fields, comps, values, _Ctx(ectx.file, ectx.line, ctx.kind,
                                                                             ctx.name)))
    return out


def _validate_exception(ex: _ExceptionInfo, source: str, *, append: bool) -> None:
    what = f"exception '{ex.name}'"
    if ex.fields is None:
        raise ex.ctx.error(f"{what}: rule exception item must have fields property with a list of fields")
    if isinstance(ex.fields, list):
        if ex.comps is None:
            ex.comps = ["="] * len(ex.fields)
        if not isinstance(ex.comps, list) or len(ex.comps) != len(ex.fields):
            raise ex.ctx.error(f"{what}: fields and comps lists must have equal length")
        comps = ex.comps
        fields = ex.fields
    else:
        if ex.comps is None:
            ex.comps = "in"
        if isinstance(ex.comps, list):
            raise ex.ctx.error(f"{what}: fields and comps must both be strings")
        if ex.comps not in _LIST_OPERATORS:
            raise ex.ctx.error(f"{what}: when fields is a single value, comps must be one of (in, pmatch, "
                               "intersects)")
        comps = [ex.comps]
        fields = [ex.fields]
    for comp in comps:
        if not isinstance(comp, str) or comp not in _FALCO_OPERATORS:
            raise ex.ctx.error(f"{what}: '{comp}' is not a supported comparison operator")
    if source != SOURCE:
        return
    for name in fields:
        if not isinstance(name, str):
            raise ex.ctx.error(f"{what}: fields must be strings, got {name!r}")
        _exception_field(name, ex.ctx, what)


def _exception_field(text: str, ctx: _Ctx, what: str) -> tuple[str, str | None]:
    scanner = Scanner(text)
    name = scanner.lex_field_name()
    arg: str | None = None
    if name is not None and scanner.lex_str("["):
        arg = scanner.lex_quoted_str() or scanner.lex_field_arg_bare()
        if arg is None or not scanner.lex_str("]"):
            name = None
    if name is None or not scanner.at_end():
        raise ctx.error(f"{what}: '{text}' is not a supported filter field")
    try:
        field_spec(name, arg, None, None)
    except ConditionError as exc:
        raise ctx.error(f"{what}: '{text}' is not a supported filter field ({exc.message})") from None
    return name, arg


class _Reader:
    def __init__(self, collector: _Collector) -> None:
        self.c = collector

    def read_file(self, path: Path) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RulesError(f"{path}: cannot read rules file: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise RulesError(f"{path}: rules file is not UTF-8: {exc}") from None
        self.read_text(text, str(path))

    def read_text(self, text: str, name: str) -> None:
        try:
            documents = load_documents(text)
        except yaml.YAMLError as exc:
            raise RulesError(f"{name}: YAML parse error: {exc}") from None
        for document in documents:
            if document is None:
                continue
            if not isinstance(document, list):
                raise RulesError(f"{name}:{_line(document, 1)}: rules content is not a YAML array of objects")
            for item in document:
                if item is None:
                    continue
                if not isinstance(item, YMap):
                    raise RulesError(f"{name}:{_line(item, _line(document, 1))}: unexpected element type; "
                                     "each element should be a YAML mapping")
                self.read_item(item, name)

    def read_item(self, item: YMap, file: str) -> None:
        ctx = _Ctx(file, item.line)
        if "required_engine_version" in item:
            ctx.kind = "required_engine_version"
            version = _required(item, "required_engine_version", ctx)
            parts = version.split(".")
            if not (version.isdigit() or (len(parts) == 3 and all(p.isdigit() for p in parts))):
                raise ctx.error(f"unable to parse engine version '{version}' as a semver string; expected "
                                "\"x.y.z\"")
            self.c.engine_version = version
        elif "required_plugin_versions" in item:
            self.read_plugin_versions(item, ctx)
        elif "list" in item:
            self.read_list(item, ctx)
        elif "macro" in item:
            self.read_macro(item, ctx)
        elif "rule" in item:
            self.read_rule(item, ctx)
        else:
            self.c.warnings.append(f"{ctx.where()} unknown top level item ignored (keys: "
                                   f"{', '.join(sorted(item))})")

    def read_plugin_versions(self, item: YMap, ctx: _Ctx) -> None:
        ctx.kind = "required_plugin_versions"
        entries = item["required_plugin_versions"]
        if not isinstance(entries, list):
            raise ctx.error("value of required_plugin_versions must be a sequence")
        for entry in entries:
            if not isinstance(entry, dict):
                raise ctx.error("plugin version must be a mapping")
            alternatives = [{"name": _required(entry, "name", ctx),  # type: ignore[arg-type]
                             "version": _required(entry, "version", ctx)}]  # type: ignore[arg-type]
            extra = entry.get("alternatives")
            if extra is not None:
                if not isinstance(extra, list):
                    raise ctx.error("value of plugin version alternatives must be a sequence")
                for alt in extra:
                    if not isinstance(alt, dict):
                        raise ctx.error("plugin version alternative must be a mapping")
                    alternatives.append({"name": _required(alt, "name", ctx),  # type: ignore[arg-type]
                                         "version": _required(alt, "version", ctx)})  # type: ignore[arg-type]
            self.c.plugin_versions.append(alternatives)

    def read_list(self, item: YMap, ctx: _Ctx) -> None:
        ctx.kind = "list"
        name = _required(item, "list", ctx)
        ctx.name = name
        _check_keys(item, _LIST_KEYS, ctx)
        if Scanner(name).lex_bare_str() != name:
            raise ctx.error("invalid list name: it must match [^()\"'[:space:]=,]+")
        items = _strings(item, "items", ctx)
        legacy = _bool(item, "append", ctx) or False
        append, replace = _overrides(item, frozenset({"items"}), frozenset({"items"}), ctx)
        if legacy and (append or replace):
            raise ctx.error("keys 'override' and 'append: true' cannot be used together")
        if legacy:
            self.c.warnings.append(f"{ctx.where()} 'append' is deprecated, use 'override: {{items: append}}'")
        if legacy or "items" in append:
            self.c.append_list(name, items, ctx)
        else:
            self.c.define_list(name, items, ctx)

    def read_macro(self, item: YMap, ctx: _Ctx) -> None:
        ctx.kind = "macro"
        name = _required(item, "macro", ctx)
        ctx.name = name
        _check_keys(item, _MACRO_KEYS, ctx)
        if Scanner(name).lex_identifier() != name:
            raise ctx.error("invalid macro name: it must match [a-zA-Z]+[a-zA-Z0-9_]*")
        cond = _required(item, "condition", ctx)
        legacy = _bool(item, "append", ctx) or False
        append, replace = _overrides(item, frozenset({"condition"}), frozenset({"condition"}), ctx)
        if legacy and (append or replace):
            raise ctx.error("keys 'override' and 'append: true' cannot be used together")
        if legacy or "condition" in append:
            self.c.append_macro(name, cond, ctx)
        else:
            self.c.define_macro(name, cond, ctx)

    def read_rule(self, item: YMap, ctx: _Ctx) -> None:
        ctx.kind = "rule"
        name = _required(item, "rule", ctx)
        ctx.name = name
        _check_keys(item, _RULE_KEYS, ctx)
        legacy = _bool(item, "append", ctx) or False
        append, replace = _overrides(item, _RULE_APPENDABLE, _RULE_REPLACEABLE, ctx)
        if legacy and (append or replace):
            raise ctx.error("keys 'override' and 'append: true' cannot be used together")
        if append or replace:
            given = {key for key in _RULE_REPLACEABLE | _RULE_APPENDABLE if key in item}
            for key in sorted((append | replace) - given):
                raise ctx.error(f"an override for '{key}' was specified but '{key}' is not defined")
            for key in sorted(given - append - replace):
                raise ctx.error(f"unexpected key '{key}': no corresponding entry under 'override' is defined")
            if append:
                self.c.append_rule(name, self._update(item, append, ctx), ctx)
            if replace:
                self.c.replace_rule(name, self._update(item, replace, ctx), ctx)
            return
        if legacy:
            for key in ("output", "desc", "priority", "tags", "enabled", "source"):
                if key in item:
                    raise ctx.error(f"'{key}' cannot be appended with 'append: true' (only condition and "
                                    "exceptions); use 'override'")
            update = _Update(cond=_scalar(item, "condition", ctx, optional=True),
                             exceptions=_read_exceptions(item, ctx, append=True))
            self.c.append_rule(name, update, ctx)
            return
        if not any(key in item for key in ("condition", "output", "desc", "priority")):
            enabled = _bool(item, "enabled", ctx)
            if enabled is None:
                raise ctx.error("item has no mapping for key 'enabled' (a rule item without condition, "
                                "output, desc and priority only enables or disables an existing rule)")
            self.c.warnings.append(f"{ctx.where()} using 'enabled' alone is deprecated, use "
                                   "'override: {enabled: replace}'")
            self.c.enable_rule(name, enabled, ctx)
            return
        cond = _required(item, "condition", ctx)
        output = _required(item, "output", ctx).strip()
        desc = _required(item, "desc", ctx)
        priority_text = _required(item, "priority", ctx)
        priority = parse_priority(priority_text)
        if priority is None:
            raise ctx.error(f"invalid priority '{priority_text}'")
        enabled = _bool(item, "enabled", ctx)
        skip = _bool(item, "skip-if-unknown-filter", ctx)
        _bool(item, "warn_evttypes", ctx)
        info = _RuleInfo(
            name=name, cond=cond, output=output, desc=desc, priority=priority,
            source=_scalar(item, "source", ctx, optional=True) or "syscall",
            tags=_tags(item, ctx) or set(), enabled=True if enabled is None else enabled,
            exceptions=_read_exceptions(item, ctx, append=False) or [],
            skip_if_unknown_filter=bool(skip), index=0, visibility=0, ctx=ctx)
        self.c.define_rule(info)

    def _update(self, item: YMap, keys: set[str], ctx: _Ctx) -> _Update:
        update = _Update()
        if "condition" in keys:
            update.cond = _required(item, "condition", ctx)
        if "output" in keys:
            update.output = _required(item, "output", ctx)
        if "desc" in keys:
            update.desc = _required(item, "desc", ctx)
        if "tags" in keys:
            update.tags = _tags(item, ctx) or set()
        if "exceptions" in keys:
            update.exceptions = _read_exceptions(item, ctx, append=True) or []
        if "priority" in keys:
            text = _required(item, "priority", ctx)
            update.priority = parse_priority(text)
            if update.priority is None:
                raise ctx.error(f"invalid priority '{text}'")
        if "enabled" in keys:
            update.enabled = _bool(item, "enabled", ctx)
        if "skip-if-unknown-filter" in keys:
            update.skip_if_unknown_filter = _bool(item, "skip-if-unknown-filter", ctx)
        if "warn_evttypes" in keys:
            _bool(item, "warn_evttypes", ctx)
        return update


# --- compiling -------------------------------------------------------------------------------------


def _quote_item(item: str) -> str:
    """Falco's quoting of list items and exception values before they are parsed as condition text."""
    if " " in item and item[0] not in "\"'":
        return '"' + item + '"'
    return item


def _item_value(item: str, ctx: _Ctx, what: str) -> Value:
    """A list item / exception value as Falco's parser sees it once inserted into a condition."""
    if item == "":
        raise ctx.error(f"{what}: empty value")
    text = _quote_item(item)
    scanner = Scanner(text)
    quoted = scanner.lex_quoted_str()
    if quoted is not None and scanner.at_end():
        return Value(quoted, True)
    scanner = Scanner(text)
    bare = scanner.lex_bare_str()
    if bare is not None and scanner.at_end():
        return Value(bare, False)
    raise ctx.error(f"{what}: value {item!r} would not be read as a single value by Falco (it contains "
                    "characters such as ( ) , = or quotes); quote it")


class _Compiler:
    def __init__(self, collector: _Collector) -> None:
        self.c = collector
        self.lists: dict[str, tuple[Value, ...]] = {}
        self.list_items: dict[str, tuple[str, ...]] = {}
        self.used_lists: set[str] = set()
        self.used_macros: set[str] = set()
        self.macro_asts: dict[str, Node] = {}
        self.resolved: dict[str, Node] = {}
        self.validated: set[str] = set()
        self.list_closure: dict[str, set[str]] = {}  # list -> the lists its expansion involves
        self.refs: set[str] = set()  # lists expanded by the last parse()
        self.macro_refs: dict[str, frozenset[str]] = {}

    # lists ------------------------------------------------------------------------------------------

    def compile_lists(self) -> None:
        # Items naming a list defined earlier are replaced by that list's (raw) items, as in Falco.
        for info in sorted(self.c.lists.values(), key=lambda i: i.index):
            items: list[str] = []
            self.list_closure[info.name] = {info.name}
            for item in info.items:
                ref = self.c.lists.get(item)
                if ref is not None and ref.index < info.visibility and ref is not info:
                    self.used_lists.add(ref.name)
                    self.list_closure[info.name].add(ref.name)
                    items.extend(ref.items)
                else:
                    items.append(item)
            self.list_items[info.name] = tuple(items)
        for name in self.list_items:
            self.lists[name] = self._condition_values(name)

    def _condition_values(self, name: str) -> tuple[Value, ...]:
        """The values a list contributes to a condition. Falco substitutes list names in the condition
        text one list at a time in definition order, so an (unquoted) item naming a list defined later
        than this one is substituted in turn."""
        info = self.c.lists[name]
        out: list[Value] = []
        for item in self.list_items[name]:
            value = _item_value(item, info.ctx, "list item")
            ref = self.c.lists.get(value.text) if not value.quoted else None
            if ref is not None and ref.index > info.index:
                self.used_lists.add(ref.name)
                self.list_closure[name].add(ref.name)
                out.extend(self._condition_values(ref.name))
            else:
                out.append(value)
        return tuple(out)

    def expand_lists(self, node: Node, ctx: _Ctx, what: str, text: str) -> Node:
        """Replace unquoted values naming a list by the list's items."""
        if isinstance(node, Check):
            operand = node.operand
            if isinstance(operand, ListValue):
                items: list[Value] = []
                changed = False
                for item in operand.items:
                    if not item.quoted and item.text in self.lists:
                        self.used_lists.add(item.text)
                        self.refs |= self.list_closure[item.text]
                        items.extend(self.lists[item.text])
                        changed = True
                    else:
                        items.append(item)
                if changed:
                    return Check(node.field, node.op, ListValue(tuple(items), operand.pos), node.pos)
            elif isinstance(operand, Value) and not operand.quoted and operand.text in self.lists:
                values = self.lists[operand.text]
                self.used_lists.add(operand.text)
                self.refs |= self.list_closure[operand.text]
                if len(values) != 1:
                    raise self._condition_error(
                        ConditionError(f"list '{operand.text}' ({len(values)} items) used as a single value "
                                       f"after '{node.op}'; use 'in ({operand.text})'", operand.pos, text),
                        ctx, what)
                return Check(node.field, node.op, values[0], node.pos)
            return node
        if isinstance(node, MacroRef):
            if node.name in self.lists and node.name not in self.c.macros:
                raise self._condition_error(
                    ConditionError(f"list '{node.name}' used where a condition is expected", node.pos, text),
                    ctx, what)
            return node
        if isinstance(node, Not):
            return Not(self.expand_lists(node.child, ctx, what, text), node.pos)
        if isinstance(node, (And, Or)):
            children = tuple(self.expand_lists(child, ctx, what, text) for child in node.children)
            return type(node)(children, node.pos)
        return node

    @staticmethod
    def _condition_error(exc: ConditionError, ctx: _Ctx, what: str) -> RulesError:
        excerpt = exc.excerpt()
        return RulesError(f"{ctx.where()} {what}: {exc}" + (f"\n{excerpt}" if excerpt else ""))

    def parse(self, text: str, ctx: _Ctx, what: str) -> Node:
        try:
            node = parse_condition(text)
        except ConditionError as exc:
            raise self._condition_error(exc, ctx, what) from None
        self.refs = set()
        return self.expand_lists(node, ctx, what, text)

    # macros -----------------------------------------------------------------------------------------

    def compile_macros(self) -> None:
        for info in sorted(self.c.macros.values(), key=lambda i: i.index):
            self.macro_asts[info.name] = self.parse(info.cond, info.ctx, "condition")
            self.macro_refs[info.name] = frozenset(self.refs)

    def resolve_macro(self, name: str, stack: tuple[str, ...] = ()) -> Node:
        if name in self.resolved:
            return self.resolved[name]
        info = self.c.macros[name]
        if name in stack:
            cycle = " -> ".join((*stack[stack.index(name):], name))
            raise info.ctx.error(f"macros reference each other in a cycle: {cycle}")
        node = self._inline(self.macro_asts[name], info.visibility, info.ctx, "condition", info.cond,
                            (*stack, name))
        self.resolved[name] = node
        return node

    def _inline(self, node: Node, visibility: int | None, ctx: _Ctx, what: str, text: str,
                stack: tuple[str, ...]) -> Node:
        if isinstance(node, MacroRef):
            macro = self.c.macros.get(node.name)
            if macro is None or (visibility is not None and macro.index >= visibility):
                raise self._condition_error(
                    ConditionError(f"undefined macro '{node.name}' used in filter"
                                   + (" (a macro can only use macros defined before it)"
                                      if macro is not None else ""), node.pos, text), ctx, what)
            self.used_macros.add(node.name)
            return self.resolve_macro(node.name, stack)
        if isinstance(node, Not):
            return Not(self._inline(node.child, visibility, ctx, what, text, stack), node.pos)
        if isinstance(node, (And, Or)):
            children = tuple(self._inline(c, visibility, ctx, what, text, stack) for c in node.children)
            return type(node)(children, node.pos)
        return node

    def macros_in(self, node: Node, seen: set[str]) -> set[str]:
        for sub in walk(node):
            if isinstance(sub, MacroRef) and sub.name not in seen and sub.name in self.macro_asts:
                seen.add(sub.name)
                self.macros_in(self.macro_asts[sub.name], seen)
        return seen

    def validate(self, node: Node, ctx: _Ctx, what: str, text: str) -> None:
        for sub in walk(node):
            if isinstance(sub, Check):
                try:
                    validate_check(sub, text)
                except ConditionError as exc:
                    error = self._condition_error(exc, ctx, what)
                    raise _Invalid(error, isinstance(exc, UnknownField)) from None

    # rules ------------------------------------------------------------------------------------------

    def exception_nodes(self, rule: _RuleInfo, lists: set[str]) -> list[Node]:
        nodes: list[Node] = []
        for ex in rule.exceptions:
            text = _exception_text(ex)
            if not text:
                continue
            what = f"exception '{ex.name}' (as condition: {text})"
            node = self.parse(text, ex.ctx, what)
            lists |= self.refs
            self.validate(node, ex.ctx, what, text)
            nodes.append(Not(node))
        return nodes

    def compile_rule(self, info: _RuleInfo) -> Rule:
        ctx = info.ctx
        own = self.parse(info.cond, ctx, "condition")
        lists = set(self.refs)
        self.validate(own, ctx, "condition", info.cond)
        for macro in sorted(self.macros_in(own, set())):
            if macro in self.validated:
                continue
            m = self.c.macros[macro]
            self.validate(self.macro_asts[macro], m.ctx, f"condition (used by rule '{info.name}')", m.cond)
            self.validated.add(macro)
        full = self._inline(own, None, ctx, "condition", info.cond, ())
        extra = self.exception_nodes(info, lists)
        if extra:
            full = And((full, *extra))
        try:
            output = OutputFormat(info.output)
        except ConditionError as exc:
            raise _Invalid(self._condition_error(exc, ctx, "output"), isinstance(exc, UnknownField)) from None
        macros = frozenset(self.macros_in(own, set()))
        for macro in macros:
            lists |= self.macro_refs[macro]
        return Rule(
            name=info.name, priority=info.priority, tags=tuple(sorted(info.tags)), enabled=info.enabled,
            source=info.source, condition=info.cond, output=info.output, desc=info.desc,
            exceptions=tuple(_public_exception(e) for e in info.exceptions), ast=full,
            predicate=compile_node(full), output_format=output, file=ctx.file, line=ctx.line,
            macros_used=macros, lists_used=frozenset(lists))


class _Invalid(Exception):
    def __init__(self, error: RulesError, unknown_field: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.unknown_field = unknown_field


def _exception_text(ex: _ExceptionInfo) -> str:
    """The condition text Falco builds for one exception ('' when it has no values)."""
    if not isinstance(ex.fields, list):
        parts: list[str] = []
        for value in ex.values:
            if isinstance(value, list):
                raise ex.ctx.error(
                    f"exception '{ex.name}': expected values array to contain a list of strings")
            parts.append(_quote_item(_checked_item(value, ex)))
        return f"({ex.fields} {ex.comps} ({', '.join(parts)}))" if parts else ""
    alternatives: list[str] = []
    for values in ex.values:
        if not isinstance(values, list) or len(values) != len(ex.fields):
            raise ex.ctx.error(f"exception '{ex.name}': fields and values lists must have equal length "
                               f"(fields {ex.fields}, values {values})")
        terms: list[str] = []
        for name, comp, value in zip(ex.fields, ex.comps, values, strict=True):
            if isinstance(value, list):
                operand = "(" + ", ".join(_quote_item(_checked_item(v, ex)) for v in value) + ")"
            else:
                operand = _checked_item(value, ex)
                if comp in _LIST_OPERATORS:
                    operand = operand if operand.startswith("(") else f"({operand})"
                else:
                    operand = _quote_item(operand)
            terms.append(f"{name} {comp} {operand}")
        alternatives.append("(" + " and ".join(terms) + ")")
    return "(" + " or ".join(alternatives) + ")" if alternatives else ""


def _checked_item(value: Any, ex: _ExceptionInfo) -> str:
    if not isinstance(value, str):
        raise ex.ctx.error(f"exception '{ex.name}': nested lists are not allowed here: {value!r}")
    return value


def _public_exception(ex: _ExceptionInfo) -> RuleException:
    def freeze(value: Any) -> Any:
        return tuple(freeze(v) for v in value) if isinstance(value, list) else value

    return RuleException(ex.name, freeze(ex.fields), freeze(ex.comps), tuple(freeze(v) for v in ex.values))


def _expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()))
        else:
            out.append(path)
    return out


def _build(collector: _Collector, files: list[str]) -> Ruleset:
    compiler = _Compiler(collector)
    compiler.compile_lists()
    compiler.compile_macros()
    warnings = list(collector.warnings)
    rules: list[Rule] = []
    skipped: list[SkippedRule] = []
    for info in sorted(collector.rules.values(), key=lambda i: i.index):
        if info.source != SOURCE:
            skipped.append(SkippedRule(info.name, info.source, f"source '{info.source}' is not {SOURCE}"))
            continue
        try:
            rules.append(compiler.compile_rule(info))
        except _Invalid as invalid:
            if invalid.unknown_field and info.skip_if_unknown_filter:
                warnings.append(f"{invalid.error} (rule skipped: skip-if-unknown-filter is true)")
                skipped.append(SkippedRule(info.name, info.source, "unknown field (skip-if-unknown-filter)"))
                continue
            raise invalid.error from None
    for name, macro in sorted(collector.macros.items(), key=lambda kv: kv[1].index):
        if name not in compiler.used_macros:
            warnings.append(f"{macro.ctx.where()} macro not referred to by any other rule/macro")
    for name, list_info in sorted(collector.lists.items(), key=lambda kv: kv[1].index):
        if name not in compiler.used_lists:
            warnings.append(f"{list_info.ctx.where()} list not referred to by any other rule/macro")
    return Ruleset(
        rules=rules, skipped_rules=skipped,
        lists={name: compiler.list_items[name] for name in compiler.list_items},
        macros={name: m.cond for name, m in collector.macros.items()},
        warnings=warnings, files=files, required_engine_version=collector.engine_version,
        required_plugin_versions=collector.plugin_versions)


def load_rules(paths: Sequence[str | Path] | str | Path) -> Ruleset:
    """Load and compile Falco rules files, in order; raises RulesError with file, item and position."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = _expand_paths(paths)
    if not files:
        raise RulesError("no rules files given")
    collector = _Collector()
    reader = _Reader(collector)
    for path in files:
        reader.read_file(path)
    return _build(collector, [str(p) for p in files])


def load_rules_text(*texts: str, name: str = "<rules>") -> Ruleset:
    """Like load_rules, for rules given as YAML text (tests, notebooks). Several texts load in order."""
    collector = _Collector()
    reader = _Reader(collector)
    names = [name if len(texts) == 1 else f"{name}#{i + 1}" for i in range(len(texts))]
    for text, label in zip(texts, names, strict=True):
        reader.read_text(text, label)
    return _build(collector, names)
