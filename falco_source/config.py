"""The plugin's ``init_config`` (a JSON object; Falco converts the YAML map of falco.yaml) and its checks.

``init`` only validates: the JSON against ``PluginConfig`` (unknown keys are errors), then what a schema
cannot say (files readable, secrets given once, consistent TLS/SASL settings, no override of the
consumer settings the plugin manages). Nothing here connects to Kafka; ``open`` does.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Final, Literal

import msgspec

from falco_gitlab.contract import TOPIC_ENRICHED


class ConfigError(ValueError):
    """An init_config problem, worded for the operator."""


def _describe(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class TlsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    ca_file: Annotated[str | None, _describe("CA bundle (PEM) to verify the brokers")] = None
    cert_file: Annotated[str | None, _describe("client certificate (PEM) for mutual TLS")] = None
    key_file: Annotated[str | None, _describe("client private key (PEM) for mutual TLS")] = None
    key_password: Annotated[str | None, _describe("password of key_file")] = None
    key_password_file: Annotated[str | None, _describe("file holding the password of key_file")] = None
    verify_hostname: Annotated[bool, _describe("check the broker certificate's host name")] = True


class SaslConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    mechanism: Annotated[
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"], _describe("SASL mechanism")
    ] = "SCRAM-SHA-512"
    username: Annotated[str, _describe("SASL user name")]
    password: Annotated[str | None, _describe("SASL password (prefer password_file)")] = None
    password_file: Annotated[str | None, _describe("file holding the SASL password")] = None


SecurityProtocol = Literal["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"]
LogLevel = Literal["error", "warning", "info", "debug"]
KafkaValue = str | int | float | bool

MIB: Final = 1024 * 1024


class PluginConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    brokers: Annotated[
        str | list[str],
        _describe("Kafka bootstrap servers: 'host:port,host:port' or a list of 'host:port'"),
    ]
    topic: Annotated[str, _describe("topic of enriched records")] = TOPIC_ENRICHED
    group_id: Annotated[
        str, _describe("consumer group of live mode (committed offsets are resumed from)")
    ] = "falco-gitlab"
    client_id: Annotated[str, _describe("Kafka client id")] = "falco-gitlab-plugin"
    security_protocol: Annotated[
        SecurityProtocol | None,
        _describe("plaintext, ssl, sasl_plaintext or sasl_ssl; default: from tls and sasl"),
    ] = None
    tls: Annotated[TlsConfig | None, _describe("TLS settings (implies ssl)")] = None
    sasl: Annotated[SaslConfig | None, _describe("SASL settings (implies sasl_*)")] = None
    batch_size: Annotated[
        int, msgspec.Meta(ge=1, le=65536, description="maximum number of events per next_batch call")
    ] = 128
    max_event_size: Annotated[
        int,
        msgspec.Meta(
            ge=1024, le=64 * MIB,
            description="maximum size of a Falco event in bytes (38-byte header included); "
            "larger records are dropped and counted",
        ),
    ] = MIB
    initial_offset: Annotated[
        Literal["earliest", "latest"],
        _describe("live mode: where a group without committed offsets starts"),
    ] = "latest"
    poll_timeout_ms: Annotated[
        int, msgspec.Meta(ge=1, le=1000, description="longest wait of one next_batch call when idle")
    ] = 30
    commit_interval_ms: Annotated[
        int,
        msgspec.Meta(
            ge=0, le=60000, description="live mode: least time between offset commits (0: every batch)"
        ),
    ] = 1000
    open_timeout_ms: Annotated[
        int, msgspec.Meta(ge=100, le=300000, description="how long open waits for the brokers")
    ] = 10000
    log_level: Annotated[LogLevel, _describe("least severity the plugin logs")] = "info"
    kafka: Annotated[
        dict[str, KafkaValue],
        _describe("extra librdkafka consumer properties, e.g. {\"session.timeout.ms\": 10000}"),
    ] = msgspec.field(default_factory=dict)


# Consumer properties the plugin sets itself: overriding them would break its delivery guarantees.
MANAGED_PROPERTIES: Final = frozenset({
    "bootstrap.servers", "metadata.broker.list", "group.id", "client.id", "enable.auto.commit",
    "enable.auto.offset.store", "isolation.level", "auto.offset.reset", "enable.partition.eof",
    "security.protocol", "sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.password",
    "ssl.ca.location", "ssl.certificate.location", "ssl.key.location", "ssl.key.password",
    "ssl.endpoint.identification.algorithm",
})

# librdkafka's defaults prefetch up to 64 MiB per consumer, then back off for a whole second once
# that is queued. The plugin drains its queue within milliseconds: 8 MiB (several thousand records)
# never starves it, and a small queue keeps reusing the same, cache-warm buffers instead of faulting
# in fresh pages (measured: the fetch thread's CPU per record halved, next_batch cheaper too).
# The `kafka` key overrides both.
PREFETCH_PROPERTIES: Final[dict[str, int]] = {
    "queued.max.messages.kbytes": 8192,
    "fetch.queue.backoff.ms": 10,
}

_BROKER = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_decoder: Final = msgspec.json.Decoder(PluginConfig)


def parse_config(text: str | bytes) -> PluginConfig:
    """Decode and check an init_config; raises ConfigError with the offending key named."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if not raw.strip():
        raw = b"{}"
    try:
        config = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid init_config: {_where(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"init_config is not valid JSON: {exc}") from None
    check_config(config)
    return config


def _where(message: str) -> str:
    # "... - at `$.tls.ca_file`" reads better as "... (at tls.ca_file)"
    return re.sub(r" - at `\$\.?([^`]*)`", lambda m: f" (at {m.group(1) or 'top level'})", message)


def broker_list(config: PluginConfig) -> list[str]:
    items = config.brokers.split(",") if isinstance(config.brokers, str) else config.brokers
    return [item.strip() for item in items if item.strip()]


def check_config(config: PluginConfig) -> None:
    """The checks a JSON schema cannot express. No network access."""
    brokers = broker_list(config)
    if not brokers:
        raise ConfigError("invalid init_config: brokers is empty")
    for broker in brokers:
        match = _BROKER.match(broker)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise ConfigError(f"invalid init_config: broker {broker!r} is not host:port")
    if not config.topic.strip():
        raise ConfigError("invalid init_config: topic is empty")
    if not config.group_id.strip():
        raise ConfigError("invalid init_config: group_id is empty")
    protocol = security_protocol(config)
    if config.tls is not None and protocol in ("plaintext", "sasl_plaintext"):
        raise ConfigError(f"invalid init_config: tls is set but security_protocol is {protocol}")
    if config.sasl is not None and protocol in ("plaintext", "ssl"):
        raise ConfigError(f"invalid init_config: sasl is set but security_protocol is {protocol}")
    if protocol.startswith("sasl") and config.sasl is None:
        raise ConfigError(f"invalid init_config: security_protocol {protocol} needs a sasl section")
    if config.tls is not None:
        tls = config.tls
        for key in ("ca_file", "cert_file", "key_file", "key_password_file"):
            _check_readable(getattr(tls, key), f"tls.{key}")
        if (tls.cert_file is None) != (tls.key_file is None):
            raise ConfigError("invalid init_config: tls.cert_file and tls.key_file go together")
        if tls.key_password is not None and tls.key_password_file is not None:
            raise ConfigError("invalid init_config: give tls.key_password or tls.key_password_file, not both")
    if config.sasl is not None:
        sasl = config.sasl
        if (sasl.password is None) == (sasl.password_file is None):
            raise ConfigError("invalid init_config: give exactly one of sasl.password and sasl.password_file")
        _check_readable(sasl.password_file, "sasl.password_file")
        if not sasl.username:
            raise ConfigError("invalid init_config: sasl.username is empty")
    for key in config.kafka:
        if key in MANAGED_PROPERTIES:
            raise ConfigError(
                f"invalid init_config: kafka.{key} is managed by the plugin; use the plugin's own settings"
            )


def _check_readable(path: str | None, key: str) -> None:
    if path is None:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"invalid init_config: {key}: {path} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"invalid init_config: {key}: {path} is not readable")


def _read_secret(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            secret = handle.read().strip()
    except OSError as exc:
        raise ConfigError(f"invalid init_config: {key}: cannot read {path}: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"invalid init_config: {key}: {path} is empty")
    return secret


def security_protocol(config: PluginConfig) -> str:
    if config.security_protocol is not None:
        return config.security_protocol
    if config.sasl is not None:
        return "sasl_ssl" if config.tls is not None else "sasl_plaintext"
    return "ssl" if config.tls is not None else "plaintext"


def consumer_properties(config: PluginConfig) -> dict[str, Any]:
    """librdkafka properties for the plugin's consumer (without the mode-specific ones)."""
    props: dict[str, Any] = {
        "bootstrap.servers": ",".join(broker_list(config)),
        "group.id": config.group_id,
        "client.id": config.client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "isolation.level": "read_committed",
        "security.protocol": security_protocol(config),
        **PREFETCH_PROPERTIES,
    }
    if config.tls is not None:
        tls = config.tls
        optional = {
            "ssl.ca.location": tls.ca_file,
            "ssl.certificate.location": tls.cert_file,
            "ssl.key.location": tls.key_file,
            "ssl.key.password": (
                _read_secret(tls.key_password_file, "tls.key_password_file")
                if tls.key_password_file else tls.key_password
            ),
        }
        props.update({key: value for key, value in optional.items() if value is not None})
        props["ssl.endpoint.identification.algorithm"] = "https" if tls.verify_hostname else "none"
    if config.sasl is not None:
        sasl = config.sasl
        props["sasl.mechanism"] = sasl.mechanism
        props["sasl.username"] = sasl.username
        props["sasl.password"] = (
            _read_secret(sasl.password_file, "sasl.password_file") if sasl.password_file else sasl.password
        )
    props.update(config.kafka)
    return props


def init_schema() -> dict[str, Any]:
    """JSON Schema of init_config with every $ref inlined (Falco validates it with valijson)."""
    schema = msgspec.json.schema(PluginConfig)
    defs: dict[str, Any] = schema.get("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                target = dict(defs[ref.removeprefix("#/$defs/")])
                target.pop("title", None)
                merged = {**inline(target), **{k: inline(v) for k, v in node.items() if k != "$ref"}}
                return merged
            # no "title"; no empty "required" (draft-04 readers such as older valijson reject it)
            return {k: inline(v) for k, v in node.items() if k != "title" and not (k == "required" and not v)}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    root = inline({"$ref": schema["$ref"]})
    return {"$schema": "http://json-schema.org/draft-07/schema#", **root}
