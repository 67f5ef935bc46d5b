"""rules/gitlab.yaml: it loads in the replay evaluator, every rule is well formed and has fixtures, every
fixture behaves, the seed payloads give the reviewed alerts, and docs/rules.md is up to date.

Fixtures (tests/rules/fixtures.yaml) are evaluated with tests/rules/test_overrides.yaml loaded after the
rules, so both sides of every tunable list are exercised. A positive must fire its rule with
``rule_matching: all`` and be claimed by it with Falco's default ``first`` (which checks the rule order:
specific rules before general ones); a negative must not fire it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from falco_gitlab import rules_reference
from replay.api import alerts_for_payloads
from replay.engine import Evaluator, required_event_types
from replay.rules import Ruleset, load_rules


def _load_fixturekit() -> ModuleType:
    path = Path(__file__).resolve().parent / "rules" / "fixturekit.py"
    spec = importlib.util.spec_from_file_location("gitlab_rules_fixturekit", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fk = _load_fixturekit()

REPO = fk.REPO
DOCS_FILE = REPO / "docs" / "rules.md"
CATEGORY_TAGS = frozenset(rules_reference.CATEGORIES)
TECHNIQUE = re.compile(r"^T\d{4}(\.\d{3})?$")
TACTICS = frozenset({
    "mitre_reconnaissance", "mitre_resource_development", "mitre_initial_access", "mitre_execution",
    "mitre_persistence", "mitre_privilege_escalation", "mitre_defense_evasion", "mitre_credential_access",
    "mitre_discovery", "mitre_lateral_movement", "mitre_collection", "mitre_command_and_control",
    "mitre_exfiltration", "mitre_impact",
})
PRIORITIES = frozenset({"Emergency", "Alert", "Critical", "Error", "Warning", "Notice", "Informational",
                        "Debug"})
# Rules that deliberately look at every event type.
ANY_EVENT_TYPE_RULES = frozenset({"GitLab Event From Unknown Destination", "GitLab Event Processing Problem"})

FIXTURE_SPEC = fk.load_spec()
FIXTURE_EVENTS = list(fk.fixture_events(FIXTURE_SPEC))


@pytest.fixture(scope="module")
def ruleset() -> Ruleset:
    return load_rules([fk.RULES_FILE])


@pytest.fixture(scope="module")
def tuned_ruleset() -> Ruleset:
    return load_rules([fk.RULES_FILE, fk.OVERRIDES_FILE])


@pytest.fixture(scope="module")
def evaluate_all(tuned_ruleset: Ruleset) -> Any:
    evaluator = Evaluator(tuned_ruleset, rule_matching="all", hostname="test")
    return lambda record: [alert.rule for alert in evaluator.evaluate(record)]


@pytest.fixture(scope="module")
def evaluate_first(tuned_ruleset: Ruleset) -> Any:
    evaluator = Evaluator(tuned_ruleset, rule_matching="first", hostname="test")
    return lambda record: [alert.rule for alert in evaluator.evaluate(record)]


# --- the ruleset --------------------------------------------------------------------------------------


def test_ruleset_loads_without_unsupported_constructs(ruleset: Ruleset) -> None:
    assert ruleset.warnings == []
    assert ruleset.skipped_rules == []
    assert len(ruleset.rules) >= 60
    assert ruleset.required_engine_version == "0.31.0"
    assert ruleset.required_plugin_versions == [[{"name": "gitlabkafka", "version": "0.1.0"}]]


def test_overrides_file_loads(tuned_ruleset: Ruleset) -> None:
    assert tuned_ruleset.warnings == []
    assert tuned_ruleset.lists["gitlab_trusted_admins"] == ("Trusted Admin",)
    assert tuned_ruleset.rule("GitLab Event From Unknown Destination").enabled


def test_rule_names_are_unique(ruleset: Ruleset) -> None:
    duplicates = [name for name, count in Counter(r.name for r in ruleset.rules).items() if count > 1]
    assert duplicates == []


@pytest.mark.parametrize("name", [r["rule"] for r in FIXTURE_SPEC["fixtures"]])
def test_rule_is_well_formed(ruleset: Ruleset, name: str) -> None:
    rule = ruleset.rule(name)
    assert rule.source == "gitlab"
    assert rule.name.startswith("GitLab ")
    assert rule.desc.strip()
    assert rule.output.startswith("GitLab "), "outputs start with 'GitLab <what happened>'"
    assert rule.priority in PRIORITIES
    assert "gitlab" in rule.tags
    categories = [tag for tag in rule.tags if tag in CATEGORY_TAGS]
    assert len(categories) == 1, f"exactly one category tag, got {categories}"
    assert any(tag in TACTICS for tag in rule.tags), "a mitre_<tactic> tag"
    assert any(TECHNIQUE.match(tag) for tag in rule.tags), "a MITRE ATT&CK technique id (Txxxx)"
    unknown = [t for t in rule.tags if t != "gitlab" and t not in CATEGORY_TAGS and t not in TACTICS
               and not TECHNIQUE.match(t)]
    assert unknown == []
    if name not in ANY_EVENT_TYPE_RULES:
        assert required_event_types(rule), "the condition pins gitlab.event_type"


def test_every_rule_has_positive_and_negative_fixtures(ruleset: Ruleset) -> None:
    by_rule: dict[str, Counter[str]] = {}
    for event in FIXTURE_EVENTS:
        by_rule.setdefault(event.rule, Counter())[event.kind] += 1
    names = {rule.name for rule in ruleset.rules}
    assert set(by_rule) == names
    missing = [name for name, kinds in by_rule.items() if not kinds["positive"] or not kinds["negative"]]
    assert missing == []


def test_defaults(ruleset: Ruleset) -> None:
    # Trust nobody and list no service accounts until the user says so.
    assert ruleset.lists["gitlab_trusted_admins"] == ()
    assert ruleset.lists["gitlab_service_accounts"] == ()
    assert ruleset.lists["gitlab_allowed_destinations"] == ()
    assert set(ruleset.lists["gitlab_allowed_git_protocols"]) == {"ssh", "http", "web"}
    disabled = [rule.name for rule in ruleset.rules if not rule.enabled]
    assert disabled == ["GitLab Event From Unknown Destination"]


def test_catch_all_rules_come_last(ruleset: Ruleset) -> None:
    """They see only events no security rule claimed (rule_matching: first)."""
    assert [rule.name for rule in ruleset.rules[-2:]] == [
        "GitLab Event From Unknown Destination", "GitLab Event Processing Problem"]


def test_every_design_original_detection_is_covered(ruleset: Ruleset) -> None:
    """The 24 detections of the original plugin (DESIGN.md section 6), by the event types they need."""
    covered: set[str] = set()
    for rule in ruleset.rules:
        covered |= required_event_types(rule)
    original = {
        "repository_git_operation", "user_enable_admin_mode", "login_failed_with_standard_authentication",
        "login_failed_with_otp_authentication", "login_failed_with_webauthn_authentication",
        "omniauth_login_failed", "user_access_locked", "user_disable_two_factor",
        "group_require_two_factor_authentication_updated", "group_two_factor_grace_period_updated",
        "user_admin_status_updated", "user_impersonation", "project_require_password_to_approve_updated",
        "require_reauthentication_to_approve_updated", "policy_project_updated", "ip_restrictions_changed",
        "create_ssh_certificate", "add_gpg_key", "personal_access_token_created",
        "project_access_token_created", "group_access_token_created", "group_deploy_token_created",
        "cluster_agent_token_created", "event_type_filters_created", "update_event_streaming_destination",
        "destroy_event_streaming_destination", "amazon_s3_configuration_deleted",
        "google_cloud_logging_configuration_deleted", "updated_group_audit_event_streaming_destination",
        "deleted_instance_audit_event_streaming_destination", "audit_events_streaming_headers_update",
        "audit_events_streaming_headers_destroy",
    }
    assert original - covered == set()
    assert any(rule.condition.strip() == "gitlab.pluginerrormessage exists" for rule in ruleset.rules)


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("event", [e for e in FIXTURE_EVENTS if e.kind == "positive"], ids=lambda e: e.id)
def test_positive_fixture_fires(event: Any, evaluate_all: Any, evaluate_first: Any) -> None:
    record = event.record()
    assert event.rule in evaluate_all(record)
    assert evaluate_first(record) == [event.rule], "with rule_matching first, the rule owns this event"


@pytest.mark.parametrize("event", [e for e in FIXTURE_EVENTS if e.kind == "negative"], ids=lambda e: e.id)
def test_negative_fixture_does_not_fire(event: Any, evaluate_all: Any) -> None:
    assert event.rule not in evaluate_all(event.record())


def test_fixture_alert_output_fields(tuned_ruleset: Ruleset) -> None:
    """Spot check of a full alert: the fields a responder needs are in the output."""
    event = next(e for e in FIXTURE_EVENTS
                 if e.rule == "GitLab Git Push From Unknown Country" and e.kind == "positive")
    (alert,) = alerts_for_payloads(tuned_ruleset, [event.raw], destination=event.destination,
                                   geo=lambda _ip: event.geo, hostname="test")
    assert alert["rule"] == "GitLab Git Push From Unknown Country"
    assert alert["priority"] == "Warning"
    assert alert["source"] == "gitlab"
    assert alert["output_fields"]["gitlab.countryisocode"] == "RU"
    assert alert["output_fields"]["gitlab.git_protocol"] == "ssh"
    assert alert["output_fields"]["gitlab.destination"] == "gitlab-prod"
    assert ("user=Alice Example project=acme/backend protocol=ssh ip=95.173.136.70 country=RU"
            in alert["output"])


# --- the seed payloads --------------------------------------------------------------------------------


def _expected_seed() -> dict[str, list[dict[str, Any]]]:
    expected: dict[str, list[dict[str, Any]]] = {}
    for line in fk.SEED_EXPECTED_FILE.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        alerts = expected.setdefault(entry["payload"], [])
        assert entry.get("why"), f"{entry['payload']}: every expectation is justified"
        if entry["rule"] is not None:
            alerts.append({key: entry[key] for key in ("rule", "priority", "output")})
    return expected


def _require_seed() -> list[Path]:
    files = fk.seed_files()
    if len(files) != 23:
        pytest.skip(f"seed payloads not found in {fk.SEED_DIR}")
    return files


def test_seed_replay_gives_reviewed_alerts(ruleset: Ruleset) -> None:
    files = _require_seed()
    expected = _expected_seed()
    assert set(expected) == {f.name for f in files}
    for path in files:
        alerts = alerts_for_payloads(ruleset, [path.read_bytes()], destination=fk.SEED_DESTINATION,
                                     hostname="test")
        assert [fk.alert_summary(a) for a in alerts] == expected[path.name], path.name


def test_seed_replay_through_cli() -> None:
    files = _require_seed()
    result = subprocess.run(
        [sys.executable, "-m", "falco_gitlab", "replay", "--rules", str(fk.RULES_FILE),
         "--input", str(fk.SEED_DIR), "--destination", fk.SEED_DESTINATION, "--hostname", "test"],
        capture_output=True, text=True, check=True, cwd=REPO, timeout=120,
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    printed = sorted((fk.alert_summary(json.loads(line)) for line in lines), key=lambda a: a["output"])
    wanted = sorted((a for alerts in _expected_seed().values() for a in alerts), key=lambda a: a["output"])
    assert len(files) == 23
    assert printed == wanted


# --- the reference ------------------------------------------------------------------------------------


def test_rules_reference_is_up_to_date(ruleset: Ruleset) -> None:
    rendered = rules_reference.render(ruleset, "rules/gitlab.yaml")
    assert DOCS_FILE.read_text(encoding="utf-8") == rendered, (
        "docs/rules.md is stale: run .venv/bin/python -m falco_gitlab.rules_reference > docs/rules.md")


def test_rules_reference_lists_every_rule(ruleset: Ruleset) -> None:
    text = rules_reference.render(ruleset, "rules/gitlab.yaml")
    for rule in ruleset.rules:
        assert f"### {rule.name}\n" in text
    for category in {rules_reference.category_of(rule) for rule in ruleset.rules}:
        assert category in CATEGORY_TAGS
