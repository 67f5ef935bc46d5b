"""replay: evaluate Falco rules against GitLab audit events without Falco (``falco-gitlab replay``).

Public API (stable; see docs/replay.md):

- ``replay.rules.load_rules(paths) -> Ruleset`` (raises ``replay.errors.RulesError``)
- ``replay.engine.Evaluator(ruleset, rule_matching="first"|"all").evaluate(record) -> list[Alert]``
- ``replay.engine.required_event_types(rule) -> set[str]``
- ``replay.inputs``: ``records_from_path``, ``write_enriched_file``, ``iter_kafka``
- ``replay.api.alerts_for_payloads(...)``: raw GitLab payloads to Falco JSON alerts in one call
"""
