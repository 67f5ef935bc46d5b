"""Condition grammar of the replay evaluator, and rule-file level name resolution errors."""

from __future__ import annotations

import pytest

from replay.errors import ConditionError, RulesError, UnsupportedConstruct
from replay.parser import And, Check, FieldRef, ListValue, MacroRef, Not, Or, Value, parse_condition, to_text
from replay.rules import load_rules_text


def m(name: str) -> MacroRef:
    return MacroRef(name)


# --- precedence and structure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a and b or c", Or((And((m("a"), m("b"))), m("c")))),
        ("a or b and c", Or((m("a"), And((m("b"), m("c")))))),
        ("not a and b", And((Not(m("a")), m("b")))),
        ("not a or not b", Or((Not(m("a")), Not(m("b"))))),
        ("not (a or b)", Not(Or((m("a"), m("b"))))),
        ("not(a or b)", Not(Or((m("a"), m("b"))))),
        ("not not a", m("a")),
        ("(a or b) and c", And((Or((m("a"), m("b"))), m("c")))),
        ("a and (b or (c and not d))", And((m("a"), Or((m("b"), And((m("c"), Not(m("d"))))))))),
        ("a and(b)", And((m("a"), m("b")))),
        ("  a\n  and\tb  ", And((m("a"), m("b")))),
        ("a and b and c", And((m("a"), m("b"), m("c")))),
        ("notify", m("notify")),
        ("android and orange", And((m("android"), m("orange")))),
    ],
)
def test_precedence_and_grouping(text: str, expected: object) -> None:
    assert parse_condition(text) == expected


def check(field: str, op: str, operand: object, arg: str | None = None) -> Check:
    return Check(FieldRef(field, arg), op, operand)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gitlab.event_type = user_impersonation",
         check("gitlab.event_type", "=", Value("user_impersonation"))),
        ("gitlab.event_type==x", check("gitlab.event_type", "=", Value("x"))),
        ("gitlab.event_type != 'a b'", check("gitlab.event_type", "!=", Value("a b", True))),
        ('gitlab.author_name = "say \\"hi\\""', check("gitlab.author_name", "=", Value('say "hi"', True))),
        ("gitlab.author_name contains adm", check("gitlab.author_name", "contains", Value("adm"))),
        ("gitlab.asn >= 64496", check("gitlab.asn", ">=", Value("64496"))),
        ("gitlab.asn<10", check("gitlab.asn", "<", Value("10"))),
        ("gitlab.country exists", check("gitlab.country", "exists", None)),
        ("gitlab.event_type in (a, b, \"c d\")",
         check("gitlab.event_type", "in", ListValue((Value("a"), Value("b"), Value("c d", True))))),
        ("gitlab.event_type in ()", check("gitlab.event_type", "in", ListValue(()))),
        ("gitlab.event_type intersects (a)",
         check("gitlab.event_type", "intersects", ListValue((Value("a"),)))),
        ("gitlab.value[details.change] = name", check("gitlab.value", "=", Value("name"), "details.change")),
        ('gitlab.value["a b"] exists', check("gitlab.value", "exists", None, "a b")),
        ("gitlab.entity_path glob 'grp/*'", check("gitlab.entity_path", "glob", Value("grp/*", True))),
    ],
)
def test_checks(text: str, expected: Check) -> None:
    assert parse_condition(text) == expected


def test_roundtrip_text() -> None:
    node = parse_condition('a and not (gitlab.x in (p, "q r")) or gitlab.y = "z"')
    assert parse_condition(to_text(node)) == node


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("a and ", "expected a '(' token, a field check, or an identifier"),
        ("(a or b", "expected a ')' token"),
        ("a b", "unexpected 'b'"),
        ("gitlab.event_type", "expected a valid check operator"),
        ("gitlab.event_type ~ x", "expected a valid check operator"),
        ("gitlab.asn > abc", "expected a number value"),
        ("gitlab.event_type in (a, ", "expected a string value in the list"),
        ("gitlab.event_type = 'unterminated", "expected a string value"),
        ('gitlab.author_name = "bad \\q"', "unsupported string escape sequence"),
        ("gitlab.value[] exists", "expected a valid field argument"),
        ("a andb", "expected a blank or '(' after 'and'"),
    ],
)
def test_syntax_errors(text: str, message: str) -> None:
    with pytest.raises(ConditionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_condition(text)


def test_error_position() -> None:
    with pytest.raises(ConditionError) as info:
        parse_condition("a and\n  gitlab.asn > nope")
    assert info.value.pos is not None
    assert (info.value.pos.line, info.value.pos.col) == (2, 16)
    assert "^" in info.value.excerpt()


@pytest.mark.parametrize(
    ("text", "construct"),
    [
        ("gitlab.entity_path pmatch (/a)", "pmatch"),
        ("gitlab.entity_path regex 'a.*'", "regex"),
        ("gitlab.entity_path bcontains 414243", "bcontains"),
        ("gitlab.entity_path bstartswith 41", "bstartswith"),
        ("tolower(gitlab.author_name) = admin", "tolower"),
        ("gitlab.author_name = val(gitlab.target_details)", "val"),
        ("gitlab.event_type in known_list", "parenthesised list"),
    ],
)
def test_unsupported_constructs_are_rejected(text: str, construct: str) -> None:
    with pytest.raises(UnsupportedConstruct, match=construct):
        parse_condition(text)


# --- name resolution through rules files ----------------------------------------------------------


def rules(*items: str) -> str:
    return "\n".join(items)


def rule(name: str, condition: str, output: str = "out", **extra: str) -> str:
    lines = [f"- rule: {name}", "  desc: d", f"  condition: {condition}", f"  output: {output}",
             "  priority: WARNING", "  source: gitlab"]
    lines += [f"  {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines)


def test_unknown_macro_is_named() -> None:
    with pytest.raises(RulesError, match=r"rule 'R'.*undefined macro 'no_such_macro'"):
        load_rules_text(rule("R", "gitlab.event_type = x and no_such_macro"))


def test_unknown_field_is_named() -> None:
    with pytest.raises(RulesError, match=r"rule 'R'.*unknown field 'gitlab\.nope'"):
        load_rules_text(rule("R", "gitlab.nope = x"))


def test_unsupported_evt_field_is_named() -> None:
    with pytest.raises(RulesError, match=r"evt\.type"):
        load_rules_text(rule("R", "evt.type = open"))


def test_error_in_macro_names_macro_and_rule() -> None:
    text = rules("- macro: bad\n  condition: gitlab.asn contains 1", rule("R", "bad"))
    with pytest.raises(RulesError, match=r"macro 'bad'.*used by rule 'R'.*'contains' operator not supported"):
        load_rules_text(text)


def test_macros_nest_and_expand() -> None:
    text = rules(
        "- macro: inner\n  condition: gitlab.event_type = a",
        "- macro: outer\n  condition: inner or gitlab.event_type = b",
        rule("R", "outer and not gitlab.author_name = x"),
    )
    ruleset = load_rules_text(text)
    assert to_text(ruleset.rules[0].ast) == \
        "((gitlab.event_type = a or gitlab.event_type = b) and not (gitlab.author_name = x))"


def test_macro_may_only_use_earlier_macros_but_rules_any() -> None:
    later = rules("- macro: first\n  condition: second", "- macro: second\n  condition: gitlab.asn = 1",
                  rule("R", "first"))
    with pytest.raises(RulesError, match=r"macro 'first'.*undefined macro 'second'.*defined before it"):
        load_rules_text(later)
    ok = rules(rule("R", "m"), "- macro: m\n  condition: gitlab.asn = 1")
    assert load_rules_text(ok).rules[0].name == "R"


def test_macro_cycle_is_an_error() -> None:
    text = rules("- macro: a\n  condition: gitlab.asn = 1", "- macro: b\n  condition: a",
                 "- macro: a\n  condition: b", rule("R", "a"))
    with pytest.raises(RulesError, match="cycle"):
        load_rules_text(text)


def test_lists_expand_in_conditions_and_in_lists() -> None:
    text = rules(
        "- list: base\n  items: [a, b]",
        "- list: more\n  items: [base, 'c d']",
        rule("R", "gitlab.event_type in (more, e) and gitlab.author_name in (\"base\")"),
    )
    ruleset = load_rules_text(text)
    assert ruleset.lists["more"] == ("a", "b", "c d")
    assert to_text(ruleset.rules[0].ast) == \
        '(gitlab.event_type in (a, b, "c d", e) and gitlab.author_name in ("base"))'


def test_list_item_naming_a_later_list_is_expanded_in_conditions() -> None:
    # Falco substitutes list names in the condition text one list at a time, in definition order.
    text = rules("- list: first\n  items: [second, x]", "- list: second\n  items: [y, z]",
                 rule("R", "gitlab.event_type in (first)"))
    ruleset = load_rules_text(text)
    assert ruleset.lists["first"] == ("second", "x")
    assert to_text(ruleset.rules[0].ast) == "gitlab.event_type in (y, z, x)"


def test_empty_list_never_matches_but_loads() -> None:
    text = rules("- list: empty\n  items: []", rule("R", "not gitlab.country in (empty)"))
    assert to_text(load_rules_text(text).rules[0].ast) == "not (gitlab.country in ())"


def test_list_used_as_single_value() -> None:
    one = rules("- list: one\n  items: [x]", rule("R", "gitlab.event_type = one"))
    assert to_text(load_rules_text(one).rules[0].ast) == "gitlab.event_type = x"
    two = rules("- list: two\n  items: [x, y]", rule("R", "gitlab.event_type = two"))
    with pytest.raises(RulesError, match=r"list 'two' \(2 items\) used as a single value"):
        load_rules_text(two)


def test_list_item_falco_would_split_is_rejected() -> None:
    text = rules("- list: bad\n  items: ['a,b']", rule("R", "gitlab.event_type in (bad)"))
    with pytest.raises(RulesError, match="would not be read as a single value"):
        load_rules_text(text)


def test_quoted_list_item_is_one_value() -> None:
    text = rules("- list: q\n  items: ['\"a,b\"', \"it's here\"]", rule("R", "gitlab.event_type in (q)"))
    node = load_rules_text(text).rules[0].ast
    assert isinstance(node, Check) and isinstance(node.operand, ListValue)
    assert [v.text for v in node.operand.items] == ["a,b", "it's here"]


def test_rule_records_macros_and_lists_used() -> None:
    text = rules(
        "- list: inner\n  items: [a]", "- list: outer\n  items: [inner, b]", "- list: ex\n  items: [bot]",
        "- macro: m\n  condition: gitlab.event_type in (outer)",
        rule("R", "m and gitlab.author_name exists"),
        "  exceptions:\n    - name: bots\n      fields: gitlab.author_name\n      values: [ex]",
    )
    r = load_rules_text(text).rules[0]
    assert r.macros_used == {"m"}
    assert r.lists_used == {"inner", "outer", "ex"}


@pytest.mark.parametrize(("text", "message"), [
    ("- list: l", "item has no mapping for key 'items'"),
    ("- list: l\n  items:", "value of 'items' is not a sequence"),
    ("- list: 'a b'\n  items: []", "invalid list name"),
    ("- macro: 'a.b'\n  condition: x", "invalid macro name"),
    ("- macro: m", "item has no mapping for key 'condition'"),
    ("- rule: R", "item has no mapping for key 'enabled'"),
    (rule("R", "gitlab.asn = 1") + "\n  tags:", "value of 'tags' is not a sequence"),
    (rule("R", "gitlab.asn = 1") + "\n  enabled: maybe", "not a boolean"),
    ("- list: l\n  items: [a]\n  append: true", "no list by that name"),
    ("- macro: m\n  condition: x\n  append: true", "no macro by that name"),
])
def test_item_validation(text: str, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        load_rules_text(text)
