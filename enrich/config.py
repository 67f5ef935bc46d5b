"""Settings of the enrich worker: msgspec Structs loaded from TOML plus ``FALCO_GITLAB_ENRICH_*`` variables.

Every section forbids unknown keys, so a misspelt setting is a startup error rather than a silent default.
``docs/enrich.md`` documents each key; ``examples/enrich.toml`` is a commented example.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

import msgspec

from falco_gitlab.config import ConfigError, load_config, read_secret
from falco_gitlab.contract import TOPIC_DLQ, TOPIC_ENRICHED, TOPIC_RAW
from falco_gitlab.kafka_security import KafkaSecurity

ENV_PREFIX = "FALCO_GITLAB_ENRICH_"


class KafkaSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    bootstrap_servers: str = "localhost:9092"
    client_id: str = "falco-gitlab-enrich"
    input_topic: str = TOPIC_RAW
    output_topic: str = TOPIC_ENRICHED
    dlq_topic: str = TOPIC_DLQ
    group_id: str = "falco-gitlab-enrich"
    # The transactional id must be unique per live worker and stable across its restarts, so that a
    # restarted worker fences its predecessor. Default: "<prefix>.<group_id>.<hostname>.<worker_index>".
    transactional_id: str | None = None
    transactional_id_prefix: str = "falco-gitlab-enrich"
    worker_index: int = 0
    transaction_timeout_ms: int = 10_000
    session_timeout_ms: int = 30_000
    heartbeat_interval_ms: int = 3_000
    rebalance_timeout_ms: int = 60_000
    max_poll_interval_ms: int = 120_000
    request_timeout_ms: int = 30_000
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    fetch_max_bytes: int = 52_428_800
    max_partition_fetch_bytes: int = 1_048_576
    # The largest record the producer accepts; keep it <= max.message.bytes of the enriched and DLQ
    # topics. A record that is larger goes to the DLQ (see docs/enrich.md).
    max_request_size: int = 1_048_576
    max_batch_size: int = 262_144
    linger_ms: int = 5
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    security: KafkaSecurity = msgspec.field(default_factory=KafkaSecurity)


class GeoIPSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # MaxMind City (or Country) database, GeoLite2 or GeoIP2 layout; unset: no geo fields.
    city_db: str | None = None
    # Optional MaxMind ASN database (GeoLite2-ASN / GeoIP2-ISP layout) for gitlab.asn / gitlab.as_org.
    asn_db: str | None = None
    # "memory": a private in-memory copy (immune to the file being rewritten in place);
    # "mmap": map the file itself (no copy; update it only by atomic rename, as geoipupdate does).
    mode: Literal["memory", "mmap"] = "memory"
    cache_size: int = 65_536
    # How often the database files are checked for replacement (mtime, size, inode).
    reload_check_interval_s: float = 60.0


class ProcessingSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Records per transaction (getmany max_records).
    batch_size: int = 500
    poll_timeout_ms: int = 500
    # Event uids remembered per partition to drop ingest double-publishes; 0 disables.
    dedup_window: int = 20_000
    # Back-off after a failed transaction (doubles up to the maximum).
    retry_backoff_ms: int = 200
    retry_backoff_max_ms: int = 10_000
    # How long a graceful shutdown may take to commit the last transaction.
    shutdown_timeout_s: float = 30.0


class MetricsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    log_interval_s: float = 60.0
    # Serve Prometheus text metrics on http://<host>:<port>/metrics; 0 disables.
    port: int = 0
    host: str = "127.0.0.1"


class LogSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class EnrichConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    kafka: KafkaSettings = msgspec.field(default_factory=KafkaSettings)
    geoip: GeoIPSettings = msgspec.field(default_factory=GeoIPSettings)
    processing: ProcessingSettings = msgspec.field(default_factory=ProcessingSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)


def transactional_id(kafka: KafkaSettings, hostname: str | None = None) -> str:
    """The configured transactional id, else one derived from group, host name and worker index."""
    if kafka.transactional_id:
        return kafka.transactional_id
    host = hostname if hostname is not None else socket.gethostname()
    return f"{kafka.transactional_id_prefix}.{kafka.group_id}.{host}.{kafka.worker_index}"


def validate(config: EnrichConfig) -> EnrichConfig:
    """Cross-field checks that msgspec cannot express; raises ConfigError."""
    kafka, processing, geoip = config.kafka, config.processing, config.geoip
    positive = {
        "processing.batch_size": processing.batch_size,
        "processing.poll_timeout_ms": processing.poll_timeout_ms,
        "kafka.transaction_timeout_ms": kafka.transaction_timeout_ms,
        "kafka.session_timeout_ms": kafka.session_timeout_ms,
        "kafka.heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "kafka.max_request_size": kafka.max_request_size,
        "geoip.cache_size": geoip.cache_size,
        "geoip.reload_check_interval_s": geoip.reload_check_interval_s,
        "metrics.log_interval_s": config.metrics.log_interval_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config error: `{key}` must be positive, got {value}")
    if processing.dedup_window < 0:
        raise ConfigError("config error: `processing.dedup_window` must be >= 0")
    if kafka.worker_index < 0:
        raise ConfigError("config error: `kafka.worker_index` must be >= 0")
    if not 0 <= config.metrics.port <= 65535:
        raise ConfigError("config error: `metrics.port` must be 0..65535")
    if kafka.heartbeat_interval_ms >= kafka.session_timeout_ms:
        raise ConfigError(
            "config error: `kafka.heartbeat_interval_ms` must be below `kafka.session_timeout_ms`")
    # A worker that stalls long enough to be thrown out of the group must also have had its open
    # transaction timed out by the broker, or it could commit a batch another worker also processes.
    if kafka.transaction_timeout_ms > kafka.session_timeout_ms - kafka.heartbeat_interval_ms:
        raise ConfigError(
            "config error: `kafka.transaction_timeout_ms` must not exceed "
            "`kafka.session_timeout_ms` - `kafka.heartbeat_interval_ms` (see docs/enrich.md, "
            "'Delivery guarantees')"
        )
    for key, path in (("geoip.city_db", geoip.city_db), ("geoip.asn_db", geoip.asn_db)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"config error: `{key}`: {path} is not a readable file")
    security = kafka.security
    read_secret(security.sasl_password, security.sasl_password_file, "kafka.security.sasl_password")
    if security.protocol.startswith("SASL") and not security.sasl_username:
        raise ConfigError("config error: `kafka.security.sasl_username` is required with SASL")
    return config


def load(path: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> EnrichConfig:
    """Load, validate and return the enrich configuration."""
    return validate(load_config(EnrichConfig, path, ENV_PREFIX, environ))
