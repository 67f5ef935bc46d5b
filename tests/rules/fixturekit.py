"""Shared by tests/test_rules.py and tests/test_rules_falco.py: turns tests/rules/fixtures.yaml into raw
GitLab payloads and enriched records, and knows where the rules, the overrides and the seed are.

Loaded by file path (``load_fixturekit()`` in the tests), so it needs no package around it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from enrich.flatten import flatten
from falco_gitlab.model import EnrichedRecord, GeoInfo

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RULES_FILE = REPO / "rules" / "gitlab.yaml"
FIXTURES_FILE = HERE / "fixtures.yaml"
OVERRIDES_FILE = HERE / "test_overrides.yaml"
SEED_EXPECTED_FILE = HERE / "seed_expected_alerts.jsonl"
_REPO_SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "gitlab"
SEED_DIR = Path(os.environ.get("FALCO_GITLAB_SEED_DIR", _REPO_SAMPLES))
SEED_DESTINATION = "gitlab-test"
DEFAULT_DESTINATION = "gitlab-prod"
# Fixed receive time (2024-01-01T00:00:00Z) for events whose created_at cannot be used.
RECEIVED_AT_NS = 1_704_067_200 * 1_000_000_000


@dataclass(frozen=True)
class FixtureEvent:
    rule: str
    kind: str  # "positive" or "negative"
    index: int
    payload: dict[str, Any]
    destination: str
    geo: GeoInfo | None
    note: str | None

    @property
    def id(self) -> str:
        return f"{self.rule} [{self.kind} {self.index}]"

    @property
    def raw(self) -> bytes:
        return json.dumps(self.payload, separators=(",", ":")).encode("utf-8")

    def record(self) -> EnrichedRecord:
        geo = self.geo
        return flatten(self.raw, destination=self.destination, header_event_type=None,
                       received_at_ns=RECEIVED_AT_NS, geo=(lambda _ip: geo) if geo is not None else None)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` merged into a copy of ``base``; nested mappings merge, None deletes the key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_spec() -> dict[str, Any]:
    with FIXTURES_FILE.open(encoding="utf-8") as handle:
        spec: dict[str, Any] = yaml.safe_load(handle)
    return spec


def build_event(bases: dict[str, Any], rule: str, kind: str, index: int,
                entry: dict[str, Any]) -> FixtureEvent:
    unknown = set(entry) - {"base", "event", "ip", "geo", "destination", "note"}
    if unknown:
        raise ValueError(f"{rule} {kind} {index}: unknown fixture keys {sorted(unknown)}")
    payload = deep_merge(bases[entry["base"]], entry.get("event") or {})
    if "ip" in entry:
        payload["ip_address"] = entry["ip"]
        payload.setdefault("details", {})["ip_address"] = entry["ip"]
    geo = GeoInfo(**entry["geo"]) if entry.get("geo") else None
    return FixtureEvent(rule=rule, kind=kind, index=index, payload=payload,
                        destination=entry.get("destination", DEFAULT_DESTINATION), geo=geo,
                        note=entry.get("note"))


def fixture_events(spec: dict[str, Any] | None = None) -> Iterator[FixtureEvent]:
    spec = spec if spec is not None else load_spec()
    bases = spec["bases"]
    for fixture in spec["fixtures"]:
        for kind in ("positive", "negative"):
            for index, entry in enumerate(fixture.get(kind) or []):
                yield build_event(bases, fixture["rule"], kind, index, entry)


def seed_files() -> list[Path]:
    return sorted(SEED_DIR.glob("*.json"))


def alert_summary(alert: dict[str, Any]) -> dict[str, Any]:
    """What the seed expectation compares: rule, priority, the output without its time prefix."""
    output = alert["output"]
    return {"rule": alert["rule"], "priority": alert["priority"], "output": output.split(": ", 1)[1]}
