"""Evaluating a loaded ruleset against enriched records, producing Falco-shaped alerts.

    ruleset = load_rules(["rules/gitlab.yaml"])
    evaluator = Evaluator(ruleset)                     # rule_matching="first", like Falco's default
    for alert in evaluator.evaluate(record):           # record: falco_gitlab.model.EnrichedRecord
        print(json.dumps(alert.to_falco_json()))

Falco's ``rule_matching`` setting decides what happens when several rules match one event: ``first``
(Falco's default) emits only the first matching rule in load order, ``all`` emits one alert per
matching rule. Disabled rules and rules below ``min_priority`` are not evaluated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from falco_gitlab.model import EnrichedRecord
from replay.compiler import Predicate
from replay.errors import ReplayError
from replay.fieldspec import FIELDS, SOURCE, Event
from replay.output import default_hostname, iso_time, output_prefix, parse_priority, priority_rank
from replay.parser import And, Check, Const, ListValue, Node, Not, Or, Value
from replay.rules import Rule, Ruleset

RuleMatching = Literal["first", "all"]
RULE_MATCHING_DEFAULT: Final[RuleMatching] = "first"
EVENT_TYPE_FIELD: Final = "gitlab.event_type"


@dataclass(slots=True)
class Alert:
    """One alert, with the attributes of Falco's JSON output."""

    rule: str
    priority: str
    output: str  # the full line: "<time>: <Priority> <rule output>"
    output_fields: dict[str, Any]
    time: str  # ISO-8601 UTC with nanoseconds
    source: str
    tags: list[str]
    hostname: str
    ts: int = 0  # event time, ns since the epoch

    def to_falco_json(self) -> dict[str, Any]:
        """The alert as Falco prints it with ``json_output: true`` (same keys, same order)."""
        return {
            "hostname": self.hostname,
            "output": self.output,
            "output_fields": self.output_fields,
            "priority": self.priority,
            "rule": self.rule,
            "source": self.source,
            "tags": list(self.tags),
            "time": self.time,
        }

    def to_text(self) -> str:
        """The alert as Falco prints it with ``json_output: false``."""
        return self.output


@dataclass(slots=True)
class Stats:
    events: int = 0
    alerts: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)


class Evaluator:
    """Evaluates every enabled rule of a ruleset on each record, in Falco's rule order."""

    def __init__(self, ruleset: Ruleset, *, rule_matching: RuleMatching = RULE_MATCHING_DEFAULT,
                 min_priority: str | None = None, hostname: str | None = None,
                 time_format_iso_8601: bool = False) -> None:
        if rule_matching not in ("first", "all"):
            raise ReplayError(f"rule_matching must be 'first' or 'all', not {rule_matching!r}")
        threshold = 7
        if min_priority is not None:
            canonical = parse_priority(min_priority)
            if canonical is None:
                raise ReplayError(f"unknown priority {min_priority!r}")
            threshold = priority_rank(canonical)
        self.ruleset = ruleset
        self.time_format_iso_8601 = time_format_iso_8601
        self._time_key = "evt.time.iso8601" if time_format_iso_8601 else "evt.time"
        self.rule_matching: RuleMatching = rule_matching
        self.hostname = hostname if hostname is not None else default_hostname()
        self.rules: tuple[Rule, ...] = tuple(
            rule for rule in ruleset.rules if rule.enabled and priority_rank(rule.priority) <= threshold)
        self._pairs = tuple((rule, rule.predicate) for rule in self.rules)
        self._build_index()
        self.stats = Stats()
        self._num = 0

    def _build_index(self) -> None:
        """Like Falco's event type index: per gitlab.event_type, the rules that can match it (in order).

        Sound because required_event_types only names types without which a condition is false.
        """
        constrained = list(zip(self._pairs, [_event_types(rule.ast) for rule in self.rules], strict=True))
        known: set[str] = set().union(*(c for _pair, c in constrained if c is not None))
        self._unconstrained = tuple(pair for pair, c in constrained if c is None)
        self._by_type = {
            event_type: tuple(pair for pair, c in constrained if c is None or event_type in c)
            for event_type in known
        }
        self._event_type = FIELDS[EVENT_TYPE_FIELD].make_getter(None)

    def _candidates(self, event: Event) -> tuple[tuple[Rule, Predicate], ...]:
        return self._by_type.get(self._event_type(event), self._unconstrained)

    def matching_rules(self, record: EnrichedRecord, *, num: int | None = None) -> list[Rule]:
        """The enabled rules whose condition holds for the record (all of them, in order)."""
        event = Event(record, self._next_num() if num is None else num)
        return [rule for rule, predicate in self._candidates(event) if predicate(event)]

    def _next_num(self) -> int:
        self._num += 1
        return self._num

    def evaluate(self, record: EnrichedRecord) -> list[Alert]:
        """The alerts Falco would emit for this record (at most one with rule_matching='first')."""
        event = Event(record, self._next_num())
        alerts: list[Alert] = []
        first = self.rule_matching == "first"
        for rule, predicate in self._candidates(event):
            if predicate(event):
                alerts.append(self._alert(rule, event))
                if first:
                    break
        stats = self.stats
        stats.events += 1
        for alert in alerts:
            stats.alerts += 1
            stats.by_rule[alert.rule] = stats.by_rule.get(alert.rule, 0) + 1
        return alerts

    def evaluate_all(self, records: Iterable[EnrichedRecord]) -> Iterator[Alert]:
        for record in records:
            yield from self.evaluate(record)

    def _alert(self, rule: Rule, event: Event) -> Alert:
        fmt = rule.output_format
        fields = fmt.fields(event)
        fields[self._time_key] = event.ts
        return Alert(
            rule=rule.name,
            priority=rule.priority,
            output=f"{output_prefix(event.ts, rule.priority, iso_8601=self.time_format_iso_8601)} "
                   f"{fmt.render(event)}",
            output_fields=dict(sorted(fields.items())),
            time=iso_time(event.ts),
            source=SOURCE,
            tags=list(rule.tags),
            hostname=self.hostname,
            ts=event.ts,
        )


def required_event_types(rule: Rule) -> set[str]:
    """The gitlab.event_type values without which the rule's condition cannot hold.

    Derived from ``gitlab.event_type = x`` / ``in (...)`` checks: an ``and`` takes the intersection of
    its constrained operands, an ``or`` the union (unconstrained if any operand is), ``not`` is
    unconstrained. Exceptions only remove matches, so they never widen the set. An empty set means
    the condition does not constrain the event type.
    """
    found = _event_types(rule.ast)
    return set(found) if found else set()


def _event_types(node: Node) -> frozenset[str] | None:
    if isinstance(node, Check):
        if node.field.name != EVENT_TYPE_FIELD or node.field.arg is not None:
            return None
        if node.op == "=" and isinstance(node.operand, Value):
            return frozenset({node.operand.text})
        if node.op in ("in", "intersects") and isinstance(node.operand, ListValue):
            return frozenset(item.text for item in node.operand.items)
        return None
    if isinstance(node, And):
        constrained = [found for child in node.children if (found := _event_types(child)) is not None]
        if not constrained:
            return None
        result = constrained[0]
        for other in constrained[1:]:
            result &= other
        return result
    if isinstance(node, Or):
        union: set[str] = set()
        for child in node.children:
            found = _event_types(child)
            if found is None:
                return None
            union |= found
        return frozenset(union)
    if isinstance(node, Const):
        return frozenset() if not node.value else None
    if isinstance(node, Not):
        return None
    return None
