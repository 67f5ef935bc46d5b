"""Generate the GitLab rules reference (docs/rules.md) from a rules file.

    python -m falco_gitlab.rules_reference > docs/rules.md
    python -m falco_gitlab.rules_reference --rules rules/gitlab.yaml --rules my_overrides.yaml

The rules are loaded with the replay evaluator (the same loader the tests and ``falco-gitlab replay``
use), so the reference shows them as Falco sees them: after appends and overrides, with the event
types each rule needs worked out from its condition.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from replay.engine import required_event_types
from replay.rules import Rule, Ruleset, load_rules

DEFAULT_RULES: Final = Path(__file__).resolve().parent.parent / "rules" / "gitlab.yaml"

# Category tag -> heading, in the order the reference lists them.
CATEGORIES: Final[dict[str, str]] = {
    "authentication": "Authentication",
    "mfa": "Two-factor authentication",
    "privilege": "Administrators and instance settings",
    "accounts": "Accounts",
    "tokens": "Tokens and OAuth applications",
    "keys": "SSH, GPG and deploy keys",
    "branch_protection": "Protected branches",
    "approvals": "Merge request approvals",
    "ci_cd": "CI/CD variables",
    "runners": "Runners",
    "visibility": "Visibility",
    "membership": "Membership",
    "audit_tampering": "Audit event streaming tampering",
    "sso": "SAML single sign-on and SCIM",
    "network": "Network and location",
    "exfiltration": "Exfiltration",
    "defense_evasion": "Defence evasion and destruction",
    "source_integrity": "Pipeline health and source integrity",
}
OTHER: Final = "other"

# Lists meant to be tuned by users, shown with their defaults.
TUNABLE_LISTS: Final = (
    "gitlab_known_countries",
    "gitlab_trusted_admins",
    "gitlab_service_accounts",
    "gitlab_allowed_destinations",
    "gitlab_allowed_git_protocols",
    "gitlab_suspicious_asns",
    "gitlab_privileged_roles",
)


def category_of(rule: Rule) -> str:
    """The rule's category tag (the first tag that names a category), else ``other``."""
    for tag in rule.tags:
        if tag in CATEGORIES:
            return tag
    return OTHER


def mitre_tags(rule: Rule) -> list[str]:
    return [tag for tag in rule.tags if tag.startswith("mitre_") or _is_technique(tag)]


def _is_technique(tag: str) -> bool:
    return len(tag) >= 5 and tag[0] == "T" and tag[1:5].isdigit()


def _anchor(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(c for c in text.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def _code_list(values: Sequence[str] | set[str]) -> str:
    return ", ".join(f"`{v}`" for v in sorted(values)) if values else "(any)"


def _grouped(ruleset: Ruleset) -> dict[str, list[Rule]]:
    groups: dict[str, list[Rule]] = {name: [] for name in (*CATEGORIES, OTHER)}
    for rule in ruleset.rules:
        groups[category_of(rule)].append(rule)
    return {name: rules for name, rules in groups.items() if rules}


def render(ruleset: Ruleset, source_label: str) -> str:
    """The Markdown reference for a loaded ruleset."""
    groups = _grouped(ruleset)
    out: list[str] = []
    add = out.append
    add("# GitLab rules reference")
    add("")
    add(f"Generated from `{source_label}` by `python -m falco_gitlab.rules_reference`; do not edit by hand.")
    add("")
    enabled = len(ruleset.enabled_rules)
    add(f"{len(ruleset.rules)} rules ({enabled} enabled by default), all for the `gitlab` source. "
        f"Required engine version: `{ruleset.required_engine_version or 'none'}`. "
        f"Required plugins: {_plugins(ruleset)}.")
    add("")
    add("Rules are listed by category in file order. With Falco's default `rule_matching: first` only the "
        "first matching rule in file order alerts for an event, so within each event type the specific "
        "rules come before the general ones. *Event types* are the `gitlab.event_type` values a rule "
        "can fire on, derived from its condition.")
    add("")
    add("| Category | Rules |")
    add("|---|---:|")
    for name, rules in groups.items():
        title = CATEGORIES.get(name, "Other")
        add(f"| [{title}](#{_anchor(title)}) (`{name}`) | {len(rules)} |")
    add(f"| **Total** | **{len(ruleset.rules)}** |")
    add("")
    add("## Lists to tune")
    add("")
    add("Override them in a rules file loaded after this one (`override: {items: append}` or `replace`).")
    add("")
    add("| List | Default items |")
    add("|---|---|")
    for list_name in TUNABLE_LISTS:
        if list_name in ruleset.lists:
            items = ruleset.lists[list_name]
            shown = ", ".join(f"`{item}`" for item in items) if items else "(empty)"
            add(f"| `{list_name}` | {shown} |")
    add("")
    for name, rules in groups.items():
        add(f"## {CATEGORIES.get(name, 'Other')}")
        add("")
        add("| Rule | Priority | Event types |")
        add("|---|---|---|")
        for rule in rules:
            disabled = " (disabled by default)" if not rule.enabled else ""
            add(f"| [{rule.name}](#{_anchor(rule.name)}){disabled} | {rule.priority} | "
                f"{_code_list(required_event_types(rule))} |")
        add("")
        for rule in rules:
            out.extend(_rule_section(rule))
    return "\n".join(out).rstrip("\n") + "\n"


def _plugins(ruleset: Ruleset) -> str:
    names = [f"`{alt.get('name')}` {alt.get('version')}" for group in ruleset.required_plugin_versions
             for alt in group]
    return ", ".join(names) if names else "none"


def _rule_section(rule: Rule) -> list[str]:
    lines = [f"### {rule.name}", ""]
    lines.append(" ".join(rule.desc.split()))
    lines.append("")
    lines.append(f"- Priority: {rule.priority}" + ("" if rule.enabled else " (disabled by default)"))
    lines.append(f"- Event types: {_code_list(required_event_types(rule))}")
    lines.append(f"- MITRE ATT&CK: {', '.join(f'`{t}`' for t in mitre_tags(rule)) or '(none)'}")
    lines.append(f"- Tags: {', '.join(f'`{t}`' for t in rule.tags)}")
    used = sorted(rule.macros_used | rule.lists_used)
    if used:
        lines.append(f"- Macros and lists: {', '.join(f'`{u}`' for u in used)}")
    if rule.exceptions:
        lines.append(f"- Exceptions: {', '.join(f'`{ex.name}`' for ex in rule.exceptions)}")
    lines.append("")
    lines.append("```")
    lines.append(rule.condition.strip())
    lines.append("```")
    lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m falco_gitlab.rules_reference",
        description="Print the Markdown rules reference of a GitLab Falco rules file.",
    )
    parser.add_argument("--rules", "-r", action="append", metavar="FILE",
                        help="rules file(s), loaded in order (default: rules/gitlab.yaml of this checkout)")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.rules] if args.rules else [DEFAULT_RULES]
    ruleset = load_rules(paths)
    label = ", ".join(_label(p) for p in paths)
    sys.stdout.write(render(ruleset, label))
    return 0


def _label(path: Path) -> str:
    """A stable, repository-relative name for the file when possible."""
    try:
        return path.resolve().relative_to(DEFAULT_RULES.parent.parent).as_posix()
    except ValueError:
        return path.as_posix()


if __name__ == "__main__":
    sys.exit(main())
