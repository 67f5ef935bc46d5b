"""The rule fixtures and the seed payloads through real Falco with the gitlabkafka plugin: the alerts must be
identical to the replay evaluator's.

Skipped, not faked, unless all of these exist:

- a Falco binary: ``$FALCO_BIN`` or ``falco`` on PATH (0.40 or newer: plugin API 3.10);
- the built plugin: ``$FALCO_GITLAB_PLUGIN_LIB`` or ``build/plugin/libgitlabkafka.so``
  (``falco-gitlab plugin build``);
- a Kafka broker: ``$KAFKA_BOOTSTRAP_SERVERS``, else the project's own broker (``falco-gitlab kafka
  start``, needs Java 17).

What it does, per scenario: turn the events into enriched records exactly as enrich would
(``enrich.flatten``, with the fixture's geolocation), produce them in order to a fresh one-partition
topic, then run, with the time zone and host name pinned::

    falco -c <tmp>/falco.yaml --disable-source syscall

with this falco.yaml (``open_params: replay`` is a bounded replay: the plugin reads the topic up to the
end offsets seen at open and returns EOF, and Falco exits 0)::

    json_output: true
    stdout_output: {enabled: true}
    engine: {kind: nodriver}
    rule_matching: all            # "first" for the seed scenario
    rules_files: [rules/gitlab.yaml, tests/rules/test_overrides.yaml]
    plugins:
      - name: gitlabkafka
        library_path: <plugin>
        init_config: {brokers: <bootstrap>, topic: <topic>}
        open_params: replay
    load_plugins: [gitlabkafka]

Falco's JSON alert lines (its plain-text summary at exit is ignored) are compared, in order, with what
``replay`` produces for the same records, both through ``replay.api.normalise_alert`` (which drops the
host name and the local-time prefix of ``output``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from falco_gitlab.model import EnrichedRecord, encode_enriched
from replay.api import alerts_for_records, normalise_alert
from replay.engine import RuleMatching
from replay.rules import load_rules


def _load_fixturekit() -> ModuleType:
    path = Path(__file__).resolve().parent / "rules" / "fixturekit.py"
    spec = importlib.util.spec_from_file_location("gitlab_rules_fixturekit", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name) or importlib.util.module_from_spec(spec)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


fk = _load_fixturekit()

FALCO_BIN = os.environ.get("FALCO_BIN") or shutil.which("falco")
PLUGIN_LIB = Path(os.environ.get("FALCO_GITLAB_PLUGIN_LIB")
                  or fk.REPO / "build" / "plugin" / "libgitlabkafka.so")
FALCO_TIMEOUT = 300

pytestmark = pytest.mark.skipif(FALCO_BIN is None, reason="falco not installed")


@pytest.fixture(scope="module")
def plugin_lib() -> Path:
    if not PLUGIN_LIB.is_file():
        pytest.skip(f"plugin not built: {PLUGIN_LIB} (run falco-gitlab plugin build)")
    return PLUGIN_LIB


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    address = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if address:
        yield address
        return
    from falco_gitlab import devkafka

    try:
        devkafka.find_java()
    except Exception as exc:  # no Java, no project broker
        pytest.skip(f"no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS ({exc})")
    broker = devkafka.LocalKafka(tmp_path_factory.mktemp("kafka"))
    try:
        yield broker.start()
    finally:
        broker.stop(purge=True)


def _produce(bootstrap: str, records: list[EnrichedRecord]) -> str:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"test.rules.falco.{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for record in records:
        producer.produce(topic, value=encode_enriched(record))
    assert producer.flush(30) == 0
    return topic


def _run_falco(tmp: Path, plugin: Path, bootstrap: str, topic: str, rules: list[Path],
               rule_matching: RuleMatching) -> list[dict[str, Any]]:
    config = {
        "json_output": True,
        "json_include_output_property": True,
        "json_include_tags_property": True,
        "stdout_output": {"enabled": True},
        "syslog_output": {"enabled": False},
        "engine": {"kind": "nodriver"},
        "rule_matching": rule_matching,
        "priority": "debug",
        "rules_files": [str(path) for path in rules],
        "plugins": [{
            "name": "gitlabkafka",
            "library_path": str(plugin),
            "init_config": {"brokers": bootstrap, "topic": topic},
            "open_params": "replay",
        }],
        "load_plugins": ["gitlabkafka"],
    }
    config_file = tmp / "falco.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "TZ": "UTC", "FALCO_HOSTNAME": "test"}
    assert FALCO_BIN is not None
    result = subprocess.run([FALCO_BIN, "-c", str(config_file), "--disable-source", "syscall"],
                            capture_output=True, text=True, env=env, timeout=FALCO_TIMEOUT, check=False)
    assert result.returncode == 0, f"falco failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _expected(rules: list[Path], records: list[EnrichedRecord],
              rule_matching: RuleMatching) -> list[dict[str, Any]]:
    return alerts_for_records(load_rules(rules), records, rule_matching=rule_matching, hostname="test")


def _seed_records() -> list[EnrichedRecord]:
    from enrich.flatten import flatten

    files = fk.seed_files()
    if len(files) != 23:
        pytest.skip(f"seed payloads not found in {fk.SEED_DIR}")
    return [flatten(path.read_bytes(), destination=fk.SEED_DESTINATION, header_event_type=None,
                    received_at_ns=fk.RECEIVED_AT_NS) for path in files]


SCENARIOS: dict[str, tuple[list[Path], RuleMatching]] = {
    # every fixture event, with the test overrides, every matching rule
    "fixtures": ([fk.RULES_FILE, fk.OVERRIDES_FILE], "all"),
    # the 23 captured payloads, default lists, Falco's default rule matching
    "seed": ([fk.RULES_FILE], "first"),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_falco_alerts_equal_replay(name: str, plugin_lib: Path, bootstrap: str, tmp_path: Path) -> None:
    rules, rule_matching = SCENARIOS[name]
    records = [event.record() for event in fk.fixture_events()] if name == "fixtures" else _seed_records()
    topic = _produce(bootstrap, records)
    falco_alerts = _run_falco(tmp_path, plugin_lib, bootstrap, topic, rules, rule_matching)
    replay_alerts = _expected(rules, records, rule_matching)
    assert replay_alerts, f"{name}: the scenario produces alerts"
    assert [normalise_alert(a) for a in falco_alerts] == [normalise_alert(a) for a in replay_alerts]
