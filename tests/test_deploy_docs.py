"""The operator docs (docs/operations.md, docs/gitlab-setup.md) against what they describe.

Docs drift silently; these checks make the drift a test failure: every repository path a doc names
exists, every file under deploy/ is documented, every link and anchor resolves, every metric, alert
and configuration key the docs (and the Prometheus rules) mention exists in the code.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OPERATOR_DOCS = (DOCS / "operations.md", DOCS / "gitlab-setup.md")
RULES_FILE = ROOT / "deploy" / "prometheus" / "falco-gitlab.rules.yaml"
# Docs written alongside the components; a link to one that does not exist yet is skipped, not failed.
COMPONENT_DOCS = {"ingest.md", "enrich.md", "plugin.md"}

_PATH = re.compile(r"`((?:deploy|docs|rules|tests|falco_gitlab|ingest|enrich|falco_source|replay)/[^`\s]*)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    value = re.sub(r"[`*_]", "", heading.strip().lower())
    value = re.sub(r"[^\w\- ]", "", value)
    return value.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    in_code = False
    found: set[str] = set()
    for line in text(path).splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


@pytest.mark.parametrize("doc", OPERATOR_DOCS, ids=lambda p: p.name)
def test_every_repository_path_in_the_doc_exists(doc: Path) -> None:
    missing = []
    for match in _PATH.finditer(text(doc)):
        candidate = match.group(1).rstrip(".,:;")
        if "<" in candidate or "*" in candidate:
            continue
        if not (ROOT / candidate).exists() and not _generated(ROOT / candidate):
            missing.append(candidate)
    assert not missing, f"{doc.name} names paths that do not exist: {sorted(set(missing))}"


def _generated(path: Path) -> bool:
    """Created at set-up time (tokens, certificates, databases): its directory exists and git-ignores it."""
    return path.parent.is_dir() and (path.parent / ".gitignore").is_file()


def test_every_deploy_file_is_documented() -> None:
    corpus = "\n".join(text(doc) for doc in OPERATOR_DOCS)
    undocumented = []
    for path in sorted((ROOT / "deploy").rglob("*")):
        if not path.is_file() or path.name in (".gitignore",) or path.name.endswith(".dockerignore"):
            continue
        relative = str(path.relative_to(ROOT))
        # Either the full path, or the file name in a doc that also names its directory.
        parent = str(path.parent.relative_to(ROOT))
        if relative in corpus or (f"`{path.name}`" in corpus and parent in corpus):
            continue
        undocumented.append(relative)
    assert not undocumented, f"deploy files no operator doc mentions: {undocumented}"


def _links() -> list[tuple[Path, str]]:
    return [(doc, link) for doc in OPERATOR_DOCS for link in _LINK.findall(text(doc))
            if not link.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize(("doc", "link"), _links(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_links_and_anchors_resolve(doc: Path, link: str) -> None:
    target, _, anchor = link.partition("#")
    path = doc if not target else (doc.parent / target)
    if not path.exists():
        if path.name in COMPONENT_DOCS:
            pytest.skip(f"{path.name} is not written yet")
        pytest.fail(f"{doc.name}: link to missing {target}")
    if anchor:
        assert anchor in anchors(path), f"{doc.name}: no heading for #{anchor} in {path.name}"


# --- metrics ----------------------------------------------------------------------------------------


def ingest_metric_names() -> set[str]:
    source = text(ROOT / "ingest" / "metrics.py")
    prefix = re.search(r'p = "(falco_gitlab_ingest_)"', source)
    if prefix is None:
        pytest.skip("ingest/metrics.py does not define its metric prefix the expected way")
    names = {prefix.group(1) + name for name in re.findall(r'p \+ "(\w+)"', source)}
    histograms = {n for n in names if n.endswith("_seconds")}
    return names | {h + suffix for h in histograms for suffix in ("_bucket", "_sum", "_count")}


def enrich_metric_names() -> set[str]:
    try:
        metrics = importlib.import_module("enrich.metrics")
    except ImportError as exc:
        pytest.skip(f"enrich.metrics: {exc}")
    names = set()
    for field, (kind, _help) in metrics._HELP.items():
        name = f"falco_gitlab_enrich_{field}"
        if kind == "counter" and not field.endswith("_total"):
            name += "_total"
        names.add(name)
    return names


def plugin_metric_names() -> set[str]:
    try:
        meta = importlib.import_module("falco_source.meta")
    except ImportError as exc:
        pytest.skip(f"falco_source.meta: {exc}")
    return {name for name, _monotonic in meta.METRICS}


def _metric_tokens(content: str) -> set[str]:
    return set(re.findall(r"\bfalco_gitlab_(?:ingest|enrich)_[a-z0-9_]+", content))


@pytest.mark.parametrize("path", [*OPERATOR_DOCS, RULES_FILE], ids=lambda p: p.name)
def test_metric_names_exist(path: Path) -> None:
    known = ingest_metric_names() | enrich_metric_names()
    unknown = sorted(t for t in _metric_tokens(text(path)) if t not in known)
    assert not unknown, f"{path.name} uses metrics nobody exports: {unknown}"
    plugin = plugin_metric_names()
    for token in re.findall(r"falcosecurity_plugins_gitlabkafka_([a-z_]+)", text(path)):
        base = re.sub(r"(_total)?$", "", token.split("(")[0])
        assert any(base.startswith(name) or name.startswith(base) for name in plugin), token


def test_prometheus_rules_are_well_formed_and_documented() -> None:
    document = yaml.safe_load(text(RULES_FILE))
    operations = text(DOCS / "operations.md")
    names = []
    for group in document["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"])
            names.append(rule["alert"])
            assert f"`{rule['alert']}`" in operations, f"{rule['alert']} is not explained in operations.md"
    assert len(names) == len(set(names))
    # Topic and group names in the expressions are the real ones.
    for topic in re.findall(r'topic="([^"]+)"', text(RULES_FILE)):
        assert topic in ("gitlab.audit.raw", "gitlab.audit.enriched", "gitlab.audit.dlq")
    enrich_group = _struct_default("enrich.config", "KafkaSettings", "group_id")
    plugin_group = _struct_default("falco_source.config", "PluginConfig", "group_id")
    for group_name in re.findall(r'consumergroup="([^"]+)"', text(RULES_FILE)):
        assert group_name in (enrich_group, plugin_group), group_name


def _struct_default(module: str, struct: str, field: str) -> Any:
    try:
        cls = getattr(importlib.import_module(module), struct)
    except (ImportError, AttributeError) as exc:
        pytest.skip(f"{module}.{struct}: {exc}")
    for info in msgspec.structs.fields(cls):
        if info.name == field:
            return info.default
    raise AssertionError(f"{module}.{struct} has no field {field}")


# --- configuration keys named in the docs -----------------------------------------------------------


def _struct_paths(cls: Any, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for info in msgspec.structs.fields(cls):
        path = f"{prefix}{info.name}"
        paths.add(path)
        inner = info.type
        for candidate in getattr(inner, "__args__", (inner,)):
            if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
                paths |= _struct_paths(candidate, path + ".")
    return paths


def test_configuration_keys_in_the_docs_exist() -> None:
    schemas = []
    for module, name in (("ingest.config", "IngestConfig"), ("enrich.config", "EnrichConfig")):
        try:
            schemas.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError) as exc:
            pytest.skip(f"{module}.{name}: {exc}")
    known = set().union(*(_struct_paths(schema) for schema in schemas))
    sections = {path.split(".")[0] for path in known if "." in path}
    corpus = "\n".join(text(doc) for doc in OPERATOR_DOCS)
    mentioned = set(re.findall(r"`([a-z_]+\.[a-z_]+(?:\.[a-z_]+)?)`", corpus))
    unknown = sorted(key for key in mentioned if key.split(".")[0] in sections and key not in known)
    assert not unknown, f"the docs name configuration keys that do not exist: {unknown}"


def test_plugin_settings_in_the_docs_exist() -> None:
    try:
        config = importlib.import_module("falco_source.config")
    except ImportError as exc:
        pytest.skip(f"falco_source.config: {exc}")
    known = _struct_paths(config.PluginConfig)
    corpus = "\n".join(text(doc) for doc in OPERATOR_DOCS)
    for key in ("max_event_size", "initial_offset", "commit_interval_ms", "security_protocol", "group_id"):
        if f"`{key}`" in corpus:
            assert key in known, key
