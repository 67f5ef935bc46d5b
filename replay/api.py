"""One-call helpers for rule fixtures and parity harnesses.

    from replay.api import alerts_for_payloads
    alerts = alerts_for_payloads(["rules/gitlab.yaml"], [b'{"event_type": "user_impersonation", ...}'])
    # -> list of dicts exactly as Falco prints them with json_output: true

Comparing with real Falco: the ``hostname`` differs between machines and ``output`` starts with the
local wall-clock time, so compare with ``normalise_alert`` on both sides (or run both with the same
``FALCO_HOSTNAME`` and time zone).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from falco_gitlab.model import EnrichedRecord
from replay.engine import Evaluator, RuleMatching
from replay.inputs import GeoLookup, flatten_payloads, records_from_path
from replay.rules import Ruleset, load_rules

RulesArg = Ruleset | Sequence[str | Path] | str | Path


def _ruleset(rules: RulesArg) -> Ruleset:
    return rules if isinstance(rules, Ruleset) else load_rules(rules)


def alerts_for_records(rules: RulesArg, records: Iterable[EnrichedRecord], *,
                       rule_matching: RuleMatching = "first", hostname: str | None = None
                       ) -> list[dict[str, Any]]:
    """Falco JSON alerts (dicts) for enriched records."""
    evaluator = Evaluator(_ruleset(rules), rule_matching=rule_matching, hostname=hostname)
    return [alert.to_falco_json() for alert in evaluator.evaluate_all(records)]


def alerts_for_payloads(rules: RulesArg, payloads: Iterable[bytes | str],
                        *, destination: str | None = None, geo: GeoLookup | None = None,
                        received_at_ns: int | None = None, rule_matching: RuleMatching = "first",
                        hostname: str | None = None) -> list[dict[str, Any]]:
    """Falco JSON alerts (dicts) for raw GitLab payloads (each one JSON object, bytes or str).

    Malformed payloads raise replay.errors.InputError.
    """
    raw = (p.encode("utf-8") if isinstance(p, str) else p for p in payloads)
    records = flatten_payloads(raw, destination=destination, geo=geo, received_at_ns=received_at_ns)
    return alerts_for_records(rules, records, rule_matching=rule_matching, hostname=hostname)


def alerts_for_path(rules: RulesArg, path: str | Path, *,
                    destination: str | None = None, geo: GeoLookup | None = None,
                    rule_matching: RuleMatching = "first", hostname: str | None = None
                    ) -> list[dict[str, Any]]:
    """Falco JSON alerts for a fixture file or directory (raw payloads or enriched records)."""
    records = records_from_path(path, destination=destination, geo=geo)
    return alerts_for_records(rules, records, rule_matching=rule_matching, hostname=hostname)


def normalise_alert(alert: dict[str, Any]) -> dict[str, Any]:
    """An alert without what depends on the machine (hostname, the local-time prefix of ``output``)."""
    out = dict(alert)
    out.pop("hostname", None)
    output = out.get("output")
    if isinstance(output, str) and ": " in output:
        out["output"] = output.split(": ", 1)[1]
    return out
