"""Semantics of the replay evaluator: operators, absent fields, exceptions, overrides, outputs."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import msgspec
import pytest

from falco_gitlab.model import ENRICHED_SCHEMA_VERSION, EnrichedRecord
from replay.compiler import glob_to_regex
from replay.engine import Alert, Evaluator, required_event_types
from replay.errors import ReplayError, RulesError
from replay.rules import Ruleset, load_rules_text

TS = 1_719_376_520_691_000_123  # 2024-06-26T04:35:20.691000123Z


def record(fields: dict[str, Any] | None = None, raw: dict[str, Any] | None = None,
           ts: int = TS) -> EnrichedRecord:
    return EnrichedRecord(version=ENRICHED_SCHEMA_VERSION, ts=ts, fields=dict(fields or {}),
                          raw=msgspec.json.encode(raw or {}))


def rule(name: str, condition: str, output: str = "out", priority: str = "WARNING", **extra: Any) -> str:
    lines = [f"- rule: {name}", "  desc: d", f"  condition: {json.dumps(condition)}",
             f"  output: {json.dumps(output)}", f"  priority: {priority}", "  source: gitlab"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines)


def ruleset(*items: str) -> Ruleset:
    return load_rules_text("\n".join(items))


def matches(condition: str, fields: dict[str, Any] | None = None, raw: dict[str, Any] | None = None) -> bool:
    evaluator = Evaluator(ruleset(rule("R", condition)), hostname="h")
    return bool(evaluator.evaluate(record(fields, raw)))


EVENT = {"event_type": "user_impersonation", "author_name": "Administrator", "entity_path": "grp/sub/proj",
         "asn": 64496, "ip_private": False, "country": "Australia"}


# --- operators -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("gitlab.event_type = user_impersonation", True),
        ("gitlab.event_type == user_impersonation", True),
        ("gitlab.event_type = User_Impersonation", False),  # case-sensitive
        ("gitlab.event_type != user_impersonation", False),
        ("gitlab.event_type != other", True),
        ("gitlab.author_name contains min", True),
        ("gitlab.author_name contains MIN", False),
        ("gitlab.author_name icontains MIN", True),
        ("gitlab.author_name startswith Admin", True),
        ("gitlab.author_name startswith admin", False),
        ("gitlab.author_name endswith trator", True),
        ("gitlab.entity_path glob 'grp/*'", True),
        ("gitlab.entity_path glob 'grp/*/proj'", True),
        ("gitlab.entity_path glob 'grp/?'", False),
        ("gitlab.entity_path glob 'GRP/*'", False),
        ("gitlab.entity_path iglob 'GRP/*'", True),
        ("gitlab.entity_path glob '[fg]rp/*'", True),
        ("gitlab.entity_path glob '[!g]rp/*'", False),
        ("gitlab.event_type in (a, user_impersonation)", True),
        ("gitlab.event_type in (a, b)", False),
        ("gitlab.event_type in ()", False),
        ("gitlab.event_type intersects (user_impersonation)", True),
        ("gitlab.author_name > 5", True),  # strcmp ordering on strings ('A' > '5')
        ("gitlab.author_name < 5", False),
        ("gitlab.asn = 64496", True),
        ("gitlab.asn != 64496", False),
        ("gitlab.asn > 64495", True),
        ("gitlab.asn >= 64496", True),
        ("gitlab.asn < 64496", False),
        ("gitlab.asn <= 64496", True),
        ("gitlab.asn in (1, 64496)", True),
        ("gitlab.asn in (1, 2)", False),
        ("gitlab.ip_private = false", True),
        ("gitlab.ip_private = true", False),
        ("gitlab.ip_private != true", True),
        ("gitlab.ip_private in (true)", False),
        ("gitlab.country exists", True),
        ("gitlab.city exists", False),
        ("evt.source = gitlab", True),
        ("evt.rawtime > 0", True),
        ("evt.num = 1", True),
    ],
)
def test_operator_semantics(condition: str, expected: bool) -> None:
    assert matches(condition, EVENT) is expected


@pytest.mark.parametrize("condition", [
    "gitlab.city = x", "gitlab.city != x", "gitlab.city contains x", "gitlab.city icontains x",
    "gitlab.city startswith x", "gitlab.city endswith x", "gitlab.city glob '*'", "gitlab.city in (x)",
    "gitlab.city < 1", "gitlab.city > 0", "gitlab.asn != 1", "gitlab.asn < 5", "gitlab.ip_private != true",
    "gitlab.city exists", "gitlab.value[details.nope] = x", "gitlab.value[details.nope] != x",
])
def test_comparisons_on_absent_fields_are_false_and_their_negation_true(condition: str) -> None:
    assert matches(condition, {}) is False
    assert matches(f"not {condition}", {}) is True


def test_argument_fields_resolve_raw_paths() -> None:
    raw = {"details": {"change": "name", "from": False, "to": 3, "list": ["a", {"b": 1}], "obj": {"k": "v"}}}
    assert matches("gitlab.value[details.change] = name", raw=raw)
    assert matches("gitlab.value[details.from] = false", raw=raw)
    assert matches("gitlab.value[details.to] = 3", raw=raw)
    assert matches("gitlab.value[details.list.1.b] = 1", raw=raw)
    assert matches("gitlab.value[details.obj] = '{\"k\":\"v\"}'", raw=raw)
    assert matches("gitlab.value[details.list.5] exists", raw=raw) is False


def test_undecodable_raw_makes_argument_fields_absent() -> None:
    rs = ruleset(rule("R", "not gitlab.value[a] exists"))
    bad = EnrichedRecord(version=1, ts=TS, fields={}, raw=b"not json")
    assert Evaluator(rs, hostname="h").evaluate(bad)


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ("gitlab.asn contains 1", "'contains' operator not supported for numeric filters"),
        ("gitlab.asn glob '1*'", "'glob' operator not supported for numeric filters"),
        ("gitlab.ip_private > 0", "'>' operator not supported for bool filters"),
        ("gitlab.asn = abc", "'abc' is not a valid number for uint64 field 'gitlab.asn'"),
        ("gitlab.asn in (1, x)", "'x' is not a valid number"),
        ("gitlab.ip_private = yes", "'yes' is not a valid boolean"),
        ("gitlab.value exists", "requires an argument"),
        ("gitlab.event_type[x] exists", "does not take an argument"),
        ("evt.time > 5", "outputs only"),
    ],
)
def test_type_errors_are_rejected_at_load(condition: str, message: str) -> None:
    with pytest.raises(RulesError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ruleset(rule("R", condition))


def test_icontains_folds_ascii_only() -> None:
    assert matches("gitlab.author_name icontains 'ÉCOLE'", {"author_name": "école"}) is False
    assert matches("gitlab.author_name icontains 'ECOLE'", {"author_name": "xecolex"}) is True


def test_glob_translation() -> None:
    assert glob_to_regex("a*c").match("a/b/c")
    assert glob_to_regex("a?c").match("a/c")
    assert glob_to_regex("a\\*c").match("a*c")
    assert not glob_to_regex("a\\*c").match("abc")
    assert glob_to_regex("[]a]x").match("]x")
    assert glob_to_regex("[^a]x").match("bx")
    assert glob_to_regex("a[").match("a[")
    assert not glob_to_regex("abc").match("abcd")
    assert glob_to_regex("ABC", ignore_case=True).match("abc")


def test_uint64_field_given_as_text_in_record_still_compares() -> None:
    assert matches("gitlab.asn = 5", {"asn": "5"})


# --- rule files: exceptions, append, override, enabled ---------------------------------------------


def names(rs: Ruleset, fields: dict[str, Any], raw: dict[str, Any] | None = None) -> list[str]:
    evaluator = Evaluator(rs, rule_matching="all", hostname="h")
    return [r.name for r in evaluator.matching_rules(record(fields, raw))]


def test_multi_field_exception() -> None:
    rs = ruleset(rule("R", "gitlab.event_type = login", exceptions=[
        {"name": "known", "fields": ["gitlab.author_name", "gitlab.client_ip"], "comps": ["=", "startswith"],
         "values": [["alice", "10."], ["bob", "192.168."]]}]))
    assert names(rs, {"event_type": "login", "author_name": "alice", "client_ip": "10.1.2.3"}) == []
    assert names(rs, {"event_type": "login", "author_name": "alice", "client_ip": "8.8.8.8"}) == ["R"]
    assert names(rs, {"event_type": "login", "author_name": "bob", "client_ip": "192.168.0.1"}) == []
    assert names(rs, {"event_type": "login", "author_name": "carol", "client_ip": "10.1.2.3"}) == ["R"]
    # absent field: the exception term is false, so the alert stays
    assert names(rs, {"event_type": "login", "author_name": "alice"}) == ["R"]


def test_multi_field_exception_default_comps_and_list_values() -> None:
    rs = ruleset(
        "- list: admins\n  items: [root, admin]",
        rule("R", "gitlab.event_type exists", exceptions=[
            {"name": "e", "fields": ["gitlab.author_name", "gitlab.event_type"], "comps": ["in", "="],
             "values": [[["alice", "bob"], "a"], ["admins", "b"]]},
            {"name": "d", "fields": ["gitlab.entity_path", "gitlab.event_type"], "values": [["x/y", "c"]]}]))
    assert names(rs, {"event_type": "a", "author_name": "bob"}) == []
    assert names(rs, {"event_type": "a", "author_name": "carol"}) == ["R"]
    assert names(rs, {"event_type": "b", "author_name": "admin"}) == []  # list name in a tuple value
    assert names(rs, {"event_type": "c", "entity_path": "x/y"}) == []  # default comps: =
    assert names(rs, {"event_type": "c", "entity_path": "x/z"}) == ["R"]


def test_single_field_exception() -> None:
    rs = ruleset(
        "- list: bots\n  items: [ci-bot]",
        rule("R", "gitlab.event_type = x", exceptions=[
            {"name": "svc", "fields": "gitlab.author_name", "values": ["deploy bot", "bots"]}]))
    assert names(rs, {"event_type": "x", "author_name": "deploy bot"}) == []
    assert names(rs, {"event_type": "x", "author_name": "ci-bot"}) == []
    assert names(rs, {"event_type": "x", "author_name": "human"}) == ["R"]


def test_exception_without_values_changes_nothing() -> None:
    rs = ruleset(rule("R", "gitlab.event_type = x", exceptions=[
        {"name": "later", "fields": ["gitlab.author_name"], "values": []}]))
    assert names(rs, {"event_type": "x", "author_name": "a"}) == ["R"]


@pytest.mark.parametrize(
    ("exceptions", "message"),
    [
        ([{"name": "e", "fields": ["gitlab.nope"], "values": []}],
         "'gitlab.nope' is not a supported filter field"),
        ([{"name": "e", "fields": ["gitlab.author_name"], "comps": ["=", "="], "values": []}],
         "fields and comps lists must have equal length"),
        ([{"name": "e", "fields": "gitlab.author_name", "comps": "=", "values": []}],
         "comps must be one of \\(in, pmatch, intersects\\)"),
        ([{"name": "e", "fields": ["gitlab.author_name"], "comps": ["~"], "values": []}],
         "'~' is not a supported comparison operator"),
        ([{"name": "e", "fields": ["gitlab.author_name", "gitlab.asn"], "values": [["a"]]}],
         "fields and values lists must have equal length"),
        ([{"name": "e", "fields": ["gitlab.asn"], "values": [["x"]]}], "not a valid number"),
        ([{"name": "e", "fields": ["gitlab.author_name"], "values": []},
          {"name": "e", "fields": ["gitlab.author_name"], "values": []}], "must be unique"),
        ([{"name": "e", "field": ["gitlab.author_name"], "values": []}], "unknown key 'field'"),
    ],
)
def test_invalid_exceptions(exceptions: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(RulesError, match=message):
        ruleset(rule("R", "gitlab.event_type = x", exceptions=exceptions))


def test_appending_exception_values_both_styles() -> None:
    base = rule("R", "gitlab.event_type = x", exceptions=[
        {"name": "who", "fields": ["gitlab.author_name"], "values": [["a"]]}])
    legacy = "- rule: R\n  append: true\n  exceptions:\n    - name: who\n      values: [[b]]"
    modern = ("- rule: R\n  override:\n    exceptions: append\n  exceptions:\n"
              "    - name: who\n      values: [[c]]\n"
              "    - name: new\n      fields: gitlab.entity_path\n      values: [p]")
    rs = ruleset(base, legacy, modern)
    for author in ("a", "b", "c"):
        assert names(rs, {"event_type": "x", "author_name": author}) == []
    assert names(rs, {"event_type": "x", "author_name": "d"}) == ["R"]
    assert names(rs, {"event_type": "x", "author_name": "d", "entity_path": "p"}) == []
    assert [e.name for e in rs.rules[0].exceptions] == ["who", "new"]


def test_appending_exception_fields_is_an_error() -> None:
    base = rule("R", "gitlab.event_type = x", exceptions=[
        {"name": "who", "fields": ["gitlab.author_name"], "values": [["a"]]}])
    bad = ("- rule: R\n  override:\n    exceptions: append\n  exceptions:\n    - name: who\n"
           "      fields: [gitlab.asn]\n      values: [[1]]")
    with pytest.raises(RulesError, match="can not append exception fields"):
        ruleset(base, bad)


def test_legacy_append_of_condition_and_macro_and_list() -> None:
    rs = ruleset(
        "- list: l\n  items: [a]", "- list: l\n  append: true\n  items: [b]",
        "- macro: m\n  condition: gitlab.event_type in (l)",
        "- macro: m\n  append: true\n  condition: or gitlab.event_type = c",
        rule("R", "m"), "- rule: R\n  append: true\n  condition: and gitlab.author_name = ok")
    assert rs.rules[0].condition == "m and gitlab.author_name = ok"
    for event_type in ("a", "b", "c"):
        assert names(rs, {"event_type": event_type, "author_name": "ok"}) == ["R"]
    assert names(rs, {"event_type": "a", "author_name": "no"}) == []
    assert any("deprecated" in w for w in rs.warnings)


def test_override_append_and_replace() -> None:
    rs = ruleset(
        "- list: l\n  items: [a]", "- list: l\n  items: [b]\n  override:\n    items: append",
        "- macro: m\n  condition: gitlab.event_type = zzz",
        "- macro: m\n  condition: gitlab.event_type in (l)\n  override:\n    condition: replace",
        rule("R", "m", output="first", tags=["b"]),
        "- rule: R\n  condition: and gitlab.author_name = ok\n  output: (more)\n  tags: [a]\n"
        "  override:\n    condition: append\n    output: append\n    tags: append",
        "- rule: R\n  priority: critical\n  desc: new\n  override:\n    priority: replace\n    desc: replace")
    r = rs.rules[0]
    assert (r.priority, r.desc, r.tags, r.output) == ("Critical", "new", ("a", "b"), "first (more)")
    assert rs.lists["l"] == ("a", "b")
    assert names(rs, {"event_type": "b", "author_name": "ok"}) == ["R"]
    assert names(rs, {"event_type": "zzz", "author_name": "ok"}) == []


def test_override_errors() -> None:
    base = rule("R", "gitlab.event_type = x")
    with pytest.raises(RulesError, match="key 'priority' cannot be appended to"):
        ruleset(base, "- rule: R\n  priority: info\n  override:\n    priority: append")
    with pytest.raises(RulesError, match="unexpected key 'desc'"):
        ruleset(base, "- rule: R\n  condition: and x\n  desc: y\n  override:\n    condition: append")
    with pytest.raises(RulesError, match="'condition' was specified but 'condition' is not defined"):
        ruleset(base, "- rule: R\n  desc: y\n  override:\n    condition: append\n    desc: replace")
    with pytest.raises(RulesError, match="no rule by that name"):
        ruleset("- rule: Nope\n  condition: and x\n  override:\n    condition: append")
    with pytest.raises(RulesError, match="cannot be used together"):
        ruleset(base, "- rule: R\n  append: true\n  condition: and x\n  override:\n    condition: append")
    with pytest.raises(RulesError, match="invalid override operation"):
        ruleset(base, "- rule: R\n  condition: x\n  override:\n    condition: merge")


def test_redefinition_replaces_and_keeps_position() -> None:
    rs = ruleset(rule("A", "gitlab.event_type = a"), rule("B", "gitlab.event_type exists"),
                 rule("A", "gitlab.event_type exists", output="new"))
    assert [r.name for r in rs.rules] == ["A", "B"]
    alerts = Evaluator(rs, hostname="h").evaluate(record({"event_type": "x"}))
    assert [a.rule for a in alerts] == ["A"]


def test_enabled_false_and_reenable() -> None:
    rs = ruleset(rule("R", "gitlab.event_type exists", enabled=False))
    assert rs.rules[0].enabled is False
    assert Evaluator(rs, hostname="h").evaluate(record({"event_type": "x"})) == []
    rs = ruleset(rule("R", "gitlab.event_type exists", enabled=False),
                 "- rule: R\n  enabled: true\n  override:\n    enabled: replace")
    assert Evaluator(rs, hostname="h").evaluate(record({"event_type": "x"}))
    rs = ruleset(rule("R", "gitlab.event_type exists"), "- rule: R\n  enabled: false")
    assert rs.rules[0].enabled is False


def test_disabled_rules_are_still_validated() -> None:
    with pytest.raises(RulesError, match="unknown field"):
        ruleset(rule("R", "gitlab.nope = 1", enabled=False))


def test_other_sources_are_skipped_with_a_warning() -> None:
    rs = load_rules_text(
        "- rule: S\n  desc: d\n  condition: proc.name = bash\n  output: o\n  priority: info\n"
        "- macro: sys\n  condition: proc.name = sh\n" + rule("G", "gitlab.event_type exists"))
    assert [r.name for r in rs.rules] == ["G"]
    assert [(s.name, s.source) for s in rs.skipped_rules] == [("S", "syscall")]
    assert any("unknown source syscall" in w for w in rs.warnings)


def test_skip_if_unknown_filter() -> None:
    rs = ruleset(rule("R", "gitlab.future_field = 1", **{"skip-if-unknown-filter": True}),
                 rule("G", "gitlab.event_type exists"))
    assert [r.name for r in rs.rules] == ["G"]
    assert any("skip-if-unknown-filter" in w for w in rs.warnings)


def test_invalid_items() -> None:
    with pytest.raises(RulesError, match="invalid priority 'severe'"):
        ruleset(rule("R", "gitlab.event_type exists", priority="severe"))
    with pytest.raises(RulesError, match="item has no mapping for key 'output'"):
        ruleset("- rule: R\n  desc: d\n  condition: gitlab.asn = 1\n  priority: info\n  source: gitlab")
    with pytest.raises(RulesError, match="unknown key 'conditon'"):
        ruleset("- rule: R\n  conditon: x\n  desc: d\n  output: o\n  priority: info")
    with pytest.raises(RulesError, match=r"<rules>:3: rule 'R'"):
        ruleset("- list: l\n  items: []\n- rule: R\n  desc: d\n  condition: 'x ='\n  output: o\n"
                "  priority: info\n"
                "  source: gitlab")
    with pytest.raises(RulesError, match="YAML parse error"):
        ruleset("- rule: [unclosed")
    with pytest.raises(RulesError, match="not a YAML array"):
        ruleset("rule: x")


def test_versions_are_recorded_and_unknown_items_warned() -> None:
    rs = ruleset("- required_engine_version: 0.31.0",
                 "- required_plugin_versions:\n  - name: gitlab\n    version: 0.1.0\n    alternatives:\n"
                 "      - name: other\n        version: 1.0.0",
                 "- something_else: 1", rule("R", "gitlab.event_type exists"))
    assert rs.required_engine_version == "0.31.0"
    assert rs.required_plugin_versions == [[{"name": "gitlab", "version": "0.1.0"},
                                            {"name": "other", "version": "1.0.0"}]]
    assert any("unknown top level item" in w for w in rs.warnings)


# --- evaluation order, outputs, JSON ---------------------------------------------------------------


def test_rule_matching_first_and_all() -> None:
    rs = ruleset(rule("A", "gitlab.event_type exists"), rule("B", "gitlab.event_type = x"),
                 rule("C", "gitlab.event_type = y"))
    event = record({"event_type": "x"})
    assert [a.rule for a in Evaluator(rs, hostname="h").evaluate(event)] == ["A"]
    assert [a.rule for a in Evaluator(rs, rule_matching="all", hostname="h").evaluate(event)] == ["A", "B"]
    with pytest.raises(ReplayError):
        Evaluator(rs, rule_matching="some")  # type: ignore[arg-type]


def test_min_priority() -> None:
    rs = ruleset(rule("Low", "gitlab.event_type exists", priority="debug"),
                 rule("High", "gitlab.event_type exists", priority="error"))
    evaluator = Evaluator(rs, min_priority="warning", hostname="h")
    assert [r.name for r in evaluator.rules] == ["High"]


def test_alert_json_shape() -> None:
    rs = ruleset(rule(
        "Admin", "gitlab.event_type = user_admin_status_updated",
        output="Admin (user=%gitlab.author_name to=%gitlab.value[details.to] country=%gitlab.country "
               "asn=%gitlab.asn private=%gitlab.ip_private)",
        priority="CRITICAL", tags=["z", "gitlab", "a"]))
    alerts = Evaluator(rs, hostname="host-1").evaluate(record(
        {"event_type": "user_admin_status_updated", "author_name": "root", "asn": 13335, "ip_private": True},
        {"details": {"to": True}}))
    assert len(alerts) == 1
    alert: Alert = alerts[0]
    doc = alert.to_falco_json()
    assert list(doc) == ["hostname", "output", "output_fields", "priority", "rule", "source", "tags", "time"]
    assert doc["time"] == "2024-06-26T04:35:20.691000123Z"
    assert doc["priority"] == "Critical"
    assert doc["rule"] == "Admin"
    assert doc["source"] == "gitlab"
    assert doc["hostname"] == "host-1"
    assert doc["tags"] == ["a", "gitlab", "z"]
    assert doc["output"].endswith(": Critical Admin (user=root to=true country=<NA> asn=13335 private=true)")
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.691000123", doc["output"].split(": ", 1)[0])
    assert doc["output_fields"] == {
        "evt.time": TS, "gitlab.asn": 13335, "gitlab.author_name": "root", "gitlab.country": None,
        "gitlab.ip_private": True, "gitlab.value[details.to]": "true"}
    assert list(doc["output_fields"]) == sorted(doc["output_fields"])
    assert alert.to_text() == doc["output"]
    json.dumps(doc)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("%gitlab.country", "<NA>"),
        ("%gitlab.countryisocode/%gitlab.country", "AU/Australia"),
        ("%gitlab.countryX", "AustraliaX"),
        ("(%gitlab.author_name)", "(root)"),
        ("*%gitlab.author_name", "root"),
        ("[%6gitlab.author_name]", "[root  ]"),
        ("[%2gitlab.author_name]", "[ro]"),
        ("%gitlab.value[details.change]!", "name!"),
        ("%evt.source %evt.num", "gitlab 1"),
    ],
)
def test_output_formatting(output: str, expected: str) -> None:
    rs = ruleset(rule("R", "gitlab.author_name exists", output=output))
    fields = {"author_name": "root", "country": "Australia", "countryisocode": "AU"}
    if output == "%gitlab.country":
        fields.pop("country")
    alert = Evaluator(rs, hostname="h").evaluate(record(fields, {"details": {"change": "name"}}))[0]
    assert alert.output.split(": Warning ", 1)[1] == expected


@pytest.mark.parametrize(("output", "message"), [
    ("x %gitlab.nope", "invalid formatting token %gitlab.nope"),
    ("x %", "cannot end with a '%'"),
    ("x %gitlab.value", "requires an argument"),
    ("x %proc.name", "invalid formatting token"),
    ("100% sure", "invalid formatting token %sure"),
])
def test_invalid_outputs(output: str, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        ruleset(rule("R", "gitlab.author_name exists", output=output))


def test_evt_time_in_output_is_local_clock() -> None:
    rs = ruleset(rule("R", "gitlab.author_name exists", output="at %evt.time"))
    alert = Evaluator(rs, hostname="h").evaluate(record({"author_name": "x"}))[0]
    prefix, text = alert.output.split(": Warning ", 1)
    assert text == f"at {prefix}"
    assert alert.output_fields == {"evt.time": TS}


def test_time_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kolkata")  # +05:30, no daylight saving time
    time.tzset()
    try:
        rs = ruleset(rule("R", "gitlab.author_name exists",
                          output="%evt.time|%evt.datetime|%evt.time.iso8601|%evt.rawtime"))
        alert = Evaluator(rs, hostname="h").evaluate(record({"author_name": "x"}))[0]
        assert alert.output == ("10:05:20.691000123: Warning 10:05:20.691000123|"
                                "2024-06-26 10:05:20.691000123|"
                                f"2024-06-26T04:35:20.691000123+0000|{TS}")
        assert alert.time == "2024-06-26T04:35:20.691000123Z"
        assert alert.output_fields == {"evt.datetime": TS, "evt.rawtime": TS, "evt.time": TS,
                                       "evt.time.iso8601": TS}
        iso = Evaluator(rs, hostname="h", time_format_iso_8601=True).evaluate(record({"author_name": "x"}))[0]
        assert iso.output.startswith("2024-06-26T04:35:20.691000123+0000: Warning 10:05:20")
    finally:
        monkeypatch.undo()
        time.tzset()


def test_stats_count_alerts_per_rule() -> None:
    rs = ruleset(rule("A", "gitlab.event_type = a"), rule("B", "gitlab.event_type = b"))
    evaluator = Evaluator(rs, hostname="h")
    for event_type in ("a", "b", "b", "c"):
        evaluator.evaluate(record({"event_type": event_type}))
    stats = evaluator.stats
    assert (stats.events, stats.alerts, stats.by_rule) == (4, 3, {"A": 1, "B": 2})


# --- required_event_types --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("gitlab.event_type = a", {"a"}),
        ("gitlab.event_type in (a, b) and gitlab.author_name = x", {"a", "b"}),
        ("gitlab.event_type in (a, b) and gitlab.event_type in (b, c)", {"b"}),
        ("gitlab.event_type = a or gitlab.event_type = b", {"a", "b"}),
        ("gitlab.event_type = a or gitlab.author_name = x", set()),
        ("not gitlab.event_type = a", set()),
        ("gitlab.author_name = x", set()),
        ("types and gitlab.author_name = x", {"m1", "m2"}),
        ("gitlab.event_type in (l)", {"l1", "l2"}),
    ],
)
def test_required_event_types(condition: str, expected: set[str]) -> None:
    rs = ruleset("- list: l\n  items: [l1, l2]", "- macro: types\n  condition: gitlab.event_type in (m1, m2)",
                 rule("R", condition))
    assert required_event_types(rs.rules[0]) == expected


def test_event_type_index_keeps_semantics() -> None:
    rs = ruleset(rule("Any", "gitlab.author_name = z"), rule("A", "gitlab.event_type = a"),
                 rule("NotA", "not gitlab.event_type = a"), rule("AB", "gitlab.event_type in (a, b)"))
    evaluator = Evaluator(rs, rule_matching="all", hostname="h")
    assert [r.name for r in evaluator.matching_rules(record({"event_type": "a"}))] == ["A", "AB"]
    assert [r.name for r in evaluator.matching_rules(record({"event_type": "b", "author_name": "z"}))] == \
        ["Any", "NotA", "AB"]
    assert [r.name for r in evaluator.matching_rules(record({}))] == ["NotA"]
