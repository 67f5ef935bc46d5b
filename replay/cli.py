"""``falco-gitlab replay``: evaluate Falco rules against enriched or raw GitLab events, without Falco.

Only the standard library is imported at module level (the dispatcher imports every role for --help).
Exit status: 0 success, 1 rules or input error, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_TOPIC = "gitlab.audit.enriched"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  falco-gitlab replay --rules rules/gitlab.yaml --check\n"
        "  falco-gitlab replay --rules rules/gitlab.yaml --input tests/fixtures/  # raw payloads\n"
        "  falco-gitlab replay --rules rules/gitlab.yaml --input events.enriched --rule-matching all\n"
        "  falco-gitlab replay --rules rules/gitlab.yaml --bootstrap-servers localhost:9092 \\\n"
        "      --topic gitlab.audit.enriched --since 2024-06-01T00:00:00Z --stats\n"
        "see docs/replay.md for the supported rule language and the file formats"
    )
    parser.add_argument("--rules", "-r", action="append", required=True, metavar="FILE",
                        help="Falco rules file or directory (repeatable; loaded in order)")
    source = parser.add_argument_group("events (one of)")
    source.add_argument("--input", "-i", metavar="PATH",
                        help="file or directory of raw GitLab payloads (JSON object, array or lines) or a "
                             "length-prefixed enriched-record file; '-' reads standard input")
    source.add_argument("--bootstrap-servers", metavar="HOST:PORT",
                        help="read enriched records from Kafka (read_committed)")
    kafka = parser.add_argument_group("Kafka")
    kafka.add_argument("--topic", default=DEFAULT_TOPIC, help=f"enriched topic (default {DEFAULT_TOPIC})")
    start = kafka.add_mutually_exclusive_group()
    start.add_argument("--from-beginning", action="store_true",
                       help="start at the earliest retained record (the default for a bounded replay)")
    start.add_argument("--since", metavar="ISO8601", help="start at the first record at or after this time")
    kafka.add_argument("--follow", action="store_true",
                       help="keep reading new records (live) instead of stopping at the end offsets seen "
                            "at start; starts at the end unless --from-beginning/--since")
    kafka.add_argument("--group-id", help="consumer group (default: a throw-away group, nothing committed)")
    raw = parser.add_argument_group("raw payloads")
    raw.add_argument("--destination", metavar="NAME", help="gitlab.destination for raw payloads")
    raw.add_argument("--geoip-city", metavar="PATH", help="MaxMind City/Country database for raw payloads")
    raw.add_argument("--geoip-asn", metavar="PATH", help="MaxMind ASN database for raw payloads")
    evaluation = parser.add_argument_group("evaluation and output")
    evaluation.add_argument("--rule-matching", choices=("first", "all"), default="first",
                            help="first: only the first matching rule alerts per event (Falco's default); "
                                 "all: every matching rule alerts")
    evaluation.add_argument("--min-priority", metavar="P",
                            help="evaluate only rules at least this severe (emergency ... debug)")
    evaluation.add_argument("--check", action="store_true",
                            help="only load and validate the rules, print a summary, exit non-zero on error")
    evaluation.add_argument("--stats", action="store_true",
                            help="print events read and alerts per rule to standard error at the end")
    evaluation.add_argument("--output", choices=("json", "text"), default="json",
                            help="json: Falco's json_output lines (default); text: Falco's plain text lines")
    evaluation.add_argument("--time-format-iso-8601", action="store_true",
                            help="prefix outputs with the ISO-8601 UTC time, like Falco's "
                                 "time_format_iso_8601 (the official container images enable it)")
    evaluation.add_argument("--hostname", help="hostname reported in alerts (default: FALCO_HOSTNAME or the "
                                               "machine's host name)")
    evaluation.add_argument("--quiet", "-q", action="store_true", help="do not print rule loading warnings")


def run(args: argparse.Namespace) -> int:
    from replay.errors import ReplayError

    try:
        return _run(args)
    except ReplayError as exc:
        print(f"falco-gitlab replay: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, without a second error at exit.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _run(args: argparse.Namespace) -> int:
    from replay.engine import Evaluator
    from replay.errors import InputError
    from replay.output import parse_priority
    from replay.rules import load_rules

    if args.min_priority is not None and parse_priority(args.min_priority) is None:
        raise InputError(f"--min-priority: unknown priority {args.min_priority!r}")
    ruleset = load_rules(args.rules)
    if not args.quiet:
        for warning in ruleset.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    if args.check:
        _print_check(ruleset)
        return 0
    if (args.input is None) == (args.bootstrap_servers is None):
        raise InputError("give exactly one of --input PATH and --bootstrap-servers HOST:PORT (or --check)")
    if args.input is not None and (args.follow or args.since or args.from_beginning or args.group_id):
        raise InputError("--follow, --since, --from-beginning and --group-id apply to Kafka input only")

    evaluator = Evaluator(ruleset, rule_matching=args.rule_matching, min_priority=args.min_priority,
                          hostname=args.hostname, time_format_iso_8601=args.time_format_iso_8601)
    problems: list[str] = []

    def on_error(where: str, reason: str) -> None:
        problems.append(where)
        print(f"warning: skipped {where}: {reason}", file=sys.stderr)

    records = _records(args, on_error)
    out = sys.stdout
    as_json = args.output == "json"
    try:
        for record in records:
            for alert in evaluator.evaluate(record):
                if as_json:
                    out.write(json.dumps(alert.to_falco_json(), ensure_ascii=False, separators=(",", ":")))
                else:
                    out.write(alert.to_text())
                out.write("\n")
            if args.follow:
                out.flush()
    except KeyboardInterrupt:
        if not args.follow:
            raise
    finally:
        out.flush()
        if args.stats:
            _print_stats(evaluator, len(problems))
    return 0


def _records(args: argparse.Namespace, on_error: Any) -> Any:
    from replay.inputs import iter_kafka, open_geoip, parse_since, records_from_path

    if args.input is not None:
        geo = open_geoip(args.geoip_city, args.geoip_asn) if (args.geoip_city or args.geoip_asn) else None
        return records_from_path(args.input, destination=args.destination, geo=geo, on_error=on_error)
    since_ms = parse_since(args.since) if args.since else None
    return iter_kafka(args.bootstrap_servers, args.topic, from_beginning=args.from_beginning,
                      since_ms=since_ms, follow=args.follow, group_id=args.group_id, on_error=on_error)


def _print_check(ruleset: Any) -> None:
    print(f"OK: {ruleset.summary()}")
    print(f"files: {', '.join(ruleset.files)}")
    if ruleset.required_engine_version:
        print(f"required_engine_version: {ruleset.required_engine_version}")
    for alternatives in ruleset.required_plugin_versions:
        print("required_plugin_versions: " + " | ".join(f"{a['name']} {a['version']}" for a in alternatives))
    for skipped in ruleset.skipped_rules:
        print(f"skipped: {skipped.name} ({skipped.reason})")


def _print_stats(evaluator: Any, skipped: int) -> None:
    stats = evaluator.stats
    err = sys.stderr
    print(f"events: {stats.events}  alerts: {stats.alerts}  skipped inputs: {skipped}  "
          f"rules evaluated: {len(evaluator.rules)}", file=err)
    for name, count in sorted(stats.by_rule.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:8d}  {name}", file=err)
