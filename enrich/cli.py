"""``falco-gitlab enrich``: run one enrich worker (raw topic -> enriched topic, exactly once).

Only the standard library is imported at module level; aiokafka, geoip and msgspec are imported by
``run`` so that ``falco-gitlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="PATH",
                        default=os.environ.get("FALCO_GITLAB_ENRICH_CONFIG"),
                        help="TOML configuration file (env FALCO_GITLAB_ENRICH_CONFIG); every key can also "
                             "be set as FALCO_GITLAB_ENRICH_<SECTION>__<KEY>")
    parser.add_argument("--bootstrap-servers", metavar="HOST:PORT[,...]",
                        help="Kafka brokers (overrides kafka.bootstrap_servers)")
    parser.add_argument("--group-id", help="consumer group (overrides kafka.group_id)")
    parser.add_argument("--worker-index", type=int, metavar="N",
                        help="index of this worker on this host, part of the default transactional id "
                             "(overrides kafka.worker_index)")
    parser.add_argument("--transactional-id",
                        help="explicit transactional id (overrides kafka.transactional_id)")
    parser.add_argument("--input-topic", help="raw topic (overrides kafka.input_topic)")
    parser.add_argument("--output-topic", help="enriched topic (overrides kafka.output_topic)")
    parser.add_argument("--dlq-topic", help="dead-letter topic (overrides kafka.dlq_topic)")
    parser.add_argument("--city-db", metavar="PATH", help="MaxMind City database (overrides geoip.city_db)")
    parser.add_argument("--asn-db", metavar="PATH", help="MaxMind ASN database (overrides geoip.asn_db)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="records per transaction (overrides processing.batch_size)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="overrides log.level")
    parser.add_argument("--log-format", choices=("text", "json"), help="overrides log.format")
    parser.add_argument("--check-config", action="store_true",
                        help="load and validate the configuration (and open the GeoIP databases), print "
                             "it as JSON and exit")
    parser.add_argument("--passthrough", action="store_true", help=argparse.SUPPRESS)  # benchmark baseline


_OVERRIDES = {
    "bootstrap_servers": ("kafka", "bootstrap_servers"),
    "group_id": ("kafka", "group_id"),
    "worker_index": ("kafka", "worker_index"),
    "transactional_id": ("kafka", "transactional_id"),
    "input_topic": ("kafka", "input_topic"),
    "output_topic": ("kafka", "output_topic"),
    "dlq_topic": ("kafka", "dlq_topic"),
    "city_db": ("geoip", "city_db"),
    "asn_db": ("geoip", "asn_db"),
    "batch_size": ("processing", "batch_size"),
    "log_level": ("log", "level"),
    "log_format": ("log", "format"),
}


def _apply_overrides(config: Any, args: argparse.Namespace) -> Any:
    import msgspec

    for attribute, (section, key) in _OVERRIDES.items():
        value = getattr(args, attribute, None)
        if value is not None:
            setattr(config, section, msgspec.structs.replace(getattr(config, section), **{key: value}))
    return config


def run(args: argparse.Namespace) -> int:
    import sys

    import msgspec

    from enrich import config as enrich_config
    from falco_gitlab.config import ConfigError
    from falco_gitlab.logs import setup_logging

    try:
        config = enrich_config.load(args.config)
        config = enrich_config.validate(_apply_overrides(config, args))
    except ConfigError as exc:
        print(f"falco-gitlab enrich: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level, config.log.format)
    if args.check_config:
        from enrich.geo import GeoDatabaseError, GeoIP

        try:
            GeoIP(config.geoip.city_db, config.geoip.asn_db, mode=config.geoip.mode).close()
        except GeoDatabaseError as exc:
            print(f"falco-gitlab enrich: {exc}", file=sys.stderr)
            return 2
        document = msgspec.to_builtins(config)
        document["kafka"]["transactional_id"] = enrich_config.transactional_id(config.kafka)
        security = document["kafka"]["security"]
        if security.get("sasl_password"):
            security["sasl_password"] = "***"  # noqa: S105 (masking, not a password)
        print(msgspec.json.format(msgspec.json.encode(document)).decode())
        return 0

    from enrich.service import serve

    return serve(config, passthrough=bool(args.passthrough))
