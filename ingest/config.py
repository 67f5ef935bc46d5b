"""Settings of the ingest service: msgspec Structs loaded from TOML plus ``FALCO_GITLAB_INGEST_*`` variables.

Every section forbids unknown keys, so a misspelt setting is a startup error rather than a silent default.
``docs/ingest.md`` documents each key; ``examples/ingest.toml`` is a commented example.

Destinations (one per GitLab instance or top-level group that streams here) come from three places,
merged by name:

* ``[[destinations]]`` tables in the file: ``name``, ``tokens``, ``token_files``, ``allow_networks``;
* environment variables for simple set-ups, which ``load_ingest_config`` takes out of the environment
  before the generic ``<PREFIX><SECTION>__<KEY>`` overrides are applied:
  ``FALCO_GITLAB_INGEST_TOKEN=<token>[,<token>...]`` (destination ``default``),
  ``FALCO_GITLAB_INGEST_TOKEN_<NAME>=...`` (destination ``<name>``, lower-cased),
  ``FALCO_GITLAB_INGEST_TOKEN_FILE=<path>`` and ``FALCO_GITLAB_INGEST_TOKEN_FILE_<NAME>=<path>``;
* a tokens file (``tokens_file``, env ``FALCO_GITLAB_INGEST_TOKENS_FILE``): one ``<destination> <token>``
  pair per line, ``#`` comments; a destination listed twice has two valid tokens (rotation).

A token file named by ``token_files`` / ``TOKEN_FILE*`` holds one token per line (rotation: old and new).
Token values never appear in any message this module produces.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgspec

from falco_gitlab.config import ConfigError, load_config, read_secret
from falco_gitlab.contract import TOPIC_DLQ, TOPIC_RAW
from falco_gitlab.kafka_security import KafkaSecurity

ENV_PREFIX = "FALCO_GITLAB_INGEST_"
_ENV_TOKEN = ENV_PREFIX + "TOKEN"
_ENV_TOKEN_FILE = ENV_PREFIX + "TOKEN_FILE"
DEFAULT_DESTINATION = "default"

# GitLab generates 16-24 character verification tokens (base58 or base64) and accepts 16-24 when an
# admin sets one; a shorter secret is refused rather than guessed at.
MIN_TOKEN_LENGTH = 16
MAX_TOKEN_LENGTH = 512
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TlsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """HTTPS for the webhook listener. Either both files, or ``secrets_dir`` holding ``server.crt`` and
    ``server.key`` (the layout of the original plugin's ``SecretsDir``)."""

    cert_file: str | None = None
    key_file: str | None = None
    secrets_dir: str | None = None
    key_password_file: str | None = None


class ServerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "0.0.0.0"
    port: int = 8080
    # Worker processes sharing the port (SO_REUSEPORT); each has its own spool subdirectory.
    workers: int = 1
    # Set SO_REUSEPORT even with one worker (several independent instances on one host and port).
    reuse_port: bool = False
    max_body_bytes: int = 1_048_576
    # A request whose body has not fully arrived this long after its head was read is answered 408.
    body_timeout_s: float = 5.0
    # An idle keep-alive connection, or one that has not sent a complete request head, is closed after this.
    idle_timeout_s: float = 10.0
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 64
    # Peers whose X-Forwarded-For is believed (load balancers, reverse proxies); CIDRs or addresses.
    trusted_proxies: list[str] = []
    # Time given to requests in progress and to the final flush to Kafka on SIGTERM.
    shutdown_timeout_s: float = 10.0
    # Log every received body (and the non-secret headers) at INFO, like the original plugin's DebugJSON.
    debug_json: bool = False
    # The asyncio event loop: "auto" = uvloop when it is installed (faster sockets and timers), else the
    # standard loop; "asyncio" forces the standard loop; "uvloop" requires uvloop.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    tls: TlsSettings = msgspec.field(default_factory=TlsSettings)


class KafkaSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    bootstrap_servers: str = "localhost:9092"
    client_id: str = "falco-gitlab-ingest"
    topic: str = TOPIC_RAW
    dlq_topic: str = TOPIC_DLQ
    # How long a request waits for Kafka's acknowledgement before its events go to the spool instead.
    # GitLab gives up after 8 s: keep this well below.
    publish_timeout_s: float = 2.5
    request_timeout_ms: int = 30_000
    # Measured best for one worker (bench/bench_ingest.py): 5 added latency, 1 more broker CPU per event.
    linger_ms: int = 2
    max_batch_size: int = 262_144
    # Largest record the producer accepts; 0 = max_body_bytes + 64 KiB. Keep the topics'
    # max.message.bytes at least as large (see docs/ingest.md).
    max_request_size: int = 0
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    # Dead-letter copies of oversized or truncated bodies keep at most this many bytes.
    dlq_max_bytes: int = 524_288
    security: KafkaSecurity = msgspec.field(default_factory=KafkaSecurity)


class SpoolSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dir: str = "/var/lib/falco-gitlab/ingest-spool"
    # Bound of the spool files of one worker; when reached, requests are answered 503.
    max_bytes: int = 1_073_741_824
    segment_bytes: int = 16_777_216
    # fsync every append (off only for tests and benchmarks: a crash may then lose accepted events).
    fsync: bool = True
    # Records the drainer has in flight at once.
    drain_batch: int = 500


class DedupSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    enabled: bool = True
    # The window: at most this many remembered events, none older than window_s.
    max_entries: int = 100_000
    window_s: float = 3600.0


class LogSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class DestinationSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    tokens: list[str] = []
    token_files: list[str] = []
    # Source networks allowed to use this destination's tokens; empty = any.
    allow_networks: list[str] = []


class IngestConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    kafka: KafkaSettings = msgspec.field(default_factory=KafkaSettings)
    spool: SpoolSettings = msgspec.field(default_factory=SpoolSettings)
    dedup: DedupSettings = msgspec.field(default_factory=DedupSettings)
    logging: LogSettings = msgspec.field(default_factory=LogSettings)
    destinations: list[DestinationSettings] = []
    tokens_file: str | None = None


@dataclass(frozen=True, slots=True)
class Destination:
    """A destination ready for use: every token read, every network parsed."""

    name: str
    tokens: tuple[str, ...]
    networks: tuple[Network, ...]


def _is_token_variable(name: str) -> bool:
    upper = name.upper()
    return upper == _ENV_TOKEN or upper.startswith(_ENV_TOKEN + "_")


def load_ingest_config(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> IngestConfig:
    """File + environment -> validated config, with the environment's tokens merged into destinations.

    Also resolves every destination once (reads token files, parses networks) so that any problem is
    reported at startup, naming the key or variable at fault.
    """
    env = dict(os.environ if environ is None else environ)
    token_vars = {k: v for k, v in env.items() if _is_token_variable(k)}
    generic = {k: v for k, v in env.items() if not _is_token_variable(k)}
    config = load_config(IngestConfig, path, ENV_PREFIX, environ=generic)
    _merge_env_tokens(config, token_vars)
    validate(config)
    return config


def _split_tokens(text: str) -> list[str]:
    return [part for part in re.split(r"[\s,]+", text) if part]


def _destination(config: IngestConfig, name: str) -> DestinationSettings:
    wanted = name.lower().replace("-", "_")
    for dest in config.destinations:
        if dest.name.lower().replace("-", "_") == wanted:
            return dest
    dest = DestinationSettings(name=name)
    config.destinations.append(dest)
    return dest


def _merge_env_tokens(config: IngestConfig, variables: Mapping[str, str]) -> None:
    for variable in sorted(variables):
        value = variables[variable]
        upper = variable.upper()
        if upper == _ENV_TOKEN_FILE or upper.startswith(_ENV_TOKEN_FILE + "_"):
            suffix = variable[len(_ENV_TOKEN_FILE) + 1 :]
            _destination(config, suffix.lower() or DEFAULT_DESTINATION).token_files.append(value.strip())
            continue
        suffix = variable[len(_ENV_TOKEN) + 1 :]
        tokens = _split_tokens(value)
        if not tokens:
            raise ConfigError(f"config error (from {variable}): the variable is set but holds no token")
        _destination(config, suffix.lower() or DEFAULT_DESTINATION).tokens.extend(tokens)


def _check_token(token: str, where: str) -> None:
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"config error ({where}): a token is {len(token)} characters long; GitLab tokens have at "
            f"least {MIN_TOKEN_LENGTH}"
        )
    if len(token) > MAX_TOKEN_LENGTH:
        raise ConfigError(f"config error ({where}): a token is longer than {MAX_TOKEN_LENGTH} characters")
    if any(ch.isspace() or not ch.isprintable() or not ch.isascii() for ch in token):
        raise ConfigError(f"config error ({where}): a token contains whitespace or non-ASCII characters")


def read_token_file(path: str, where: str) -> list[str]:
    """Tokens of a token file: one per line, blank lines and ``#`` comments ignored."""
    secret = read_secret(None, path, where)
    assert secret is not None
    tokens = [line.strip() for line in secret.splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise ConfigError(f"{where}: token file {path} holds no token")
    return tokens


def read_tokens_file(path: str) -> list[tuple[str, str]]:
    """``<destination> <token>`` pairs of the shared tokens file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config error (tokens_file): cannot read {path}: {exc.strerror}") from None
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split()
        if len(parts) != 2:
            raise ConfigError(
                f"config error (tokens_file {path}, line {number}): expected '<destination> <token>'"
            )
        pairs.append((parts[0], parts[1]))
    return pairs


def parse_network(text: str, where: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ConfigError(f"config error ({where}): {text!r} is not an IP address or CIDR network") from None


def resolve_destinations(config: IngestConfig) -> list[Destination]:
    """Read every token file, check every token and network; ConfigError names the key at fault."""
    merged: dict[str, tuple[list[str], list[Network]]] = {}
    order: list[str] = []

    def entry(name: str, where: str) -> tuple[list[str], list[Network]]:
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(
                f"config error ({where}): destination name {name!r} must be 1-64 characters of "
                "letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if name not in merged:
            merged[name] = ([], [])
            order.append(name)
        return merged[name]

    for index, dest in enumerate(config.destinations):
        where = f"destinations.{index}"
        tokens, networks = entry(dest.name, f"{where}.name")
        for t_index, token in enumerate(dest.tokens):
            _check_token(token, f"{where}.tokens.{t_index}")
            tokens.append(token)
        for f_index, path in enumerate(dest.token_files):
            key = f"{where}.token_files.{f_index}"
            for token in read_token_file(path, f"config error ({key})"):
                _check_token(token, f"{key}: {path}")
                tokens.append(token)
        for n_index, text in enumerate(dest.allow_networks):
            networks.append(parse_network(text, f"{where}.allow_networks.{n_index}"))
    if config.tokens_file:
        for name, token in read_tokens_file(config.tokens_file):
            tokens, _ = entry(name, f"tokens_file {config.tokens_file}")
            _check_token(token, f"tokens_file {config.tokens_file}, destination {name}")
            tokens.append(token)

    owner: dict[str, str] = {}
    result: list[Destination] = []
    for name in order:
        tokens, networks = merged[name]
        if not tokens:
            raise ConfigError(
                f"config error (destination {name!r}): no token configured (tokens, token_files, "
                f"{_ENV_TOKEN}_<NAME> or tokens_file)"
            )
        unique = tuple(dict.fromkeys(tokens))
        for token in unique:
            other = owner.setdefault(token, name)
            if other != name:
                raise ConfigError(
                    f"config error: destinations {other!r} and {name!r} share a token; each token must "
                    "identify one destination"
                )
        result.append(Destination(name=name, tokens=unique, networks=tuple(networks)))
    if not result:
        raise ConfigError(
            "config error: no destination configured; add a [[destinations]] table, set "
            f"{_ENV_TOKEN} or {ENV_PREFIX}TOKENS_FILE"
        )
    return result


def resolve_tls(settings: TlsSettings) -> tuple[str, str] | None:
    """(certificate file, key file) when HTTPS is configured, else None."""
    if settings.secrets_dir:
        if settings.cert_file or settings.key_file:
            raise ConfigError(
                "config error (server.tls): set either secrets_dir or cert_file/key_file, not both"
            )
        base = Path(settings.secrets_dir)
        return str(base / "server.crt"), str(base / "server.key")
    if bool(settings.cert_file) != bool(settings.key_file):
        raise ConfigError("config error (server.tls): cert_file and key_file go together")
    if settings.cert_file and settings.key_file:
        return settings.cert_file, settings.key_file
    return None


def validate(config: IngestConfig) -> None:
    """Every check that does not need the network; raises ConfigError."""
    server, kafka, spool, dedup = config.server, config.kafka, config.spool, config.dedup
    positive: list[tuple[str, float]] = [
        ("server.max_body_bytes", server.max_body_bytes),
        ("server.body_timeout_s", server.body_timeout_s),
        ("server.idle_timeout_s", server.idle_timeout_s),
        ("server.workers", server.workers),
        ("server.max_line_size", server.max_line_size),
        ("server.max_field_size", server.max_field_size),
        ("server.max_headers", server.max_headers),
        ("kafka.publish_timeout_s", kafka.publish_timeout_s),
        ("kafka.request_timeout_ms", kafka.request_timeout_ms),
        ("kafka.dlq_max_bytes", kafka.dlq_max_bytes),
        ("kafka.max_batch_size", kafka.max_batch_size),
        ("spool.max_bytes", spool.max_bytes),
        ("spool.segment_bytes", spool.segment_bytes),
        ("spool.drain_batch", spool.drain_batch),
        ("dedup.max_entries", dedup.max_entries),
        ("dedup.window_s", dedup.window_s),
    ]
    for key, value in positive:
        if value <= 0:
            raise ConfigError(f"config error: `{key}` must be greater than 0 (got {value})")
    if not 0 <= server.port <= 65535:
        raise ConfigError(f"config error: `server.port` must be 0-65535 (got {server.port})")
    if server.shutdown_timeout_s < 0:
        raise ConfigError("config error: `server.shutdown_timeout_s` must not be negative")
    if kafka.publish_timeout_s >= 8:
        raise ConfigError(
            "config error: `kafka.publish_timeout_s` must stay below GitLab's 8 s timeout "
            f"(got {kafka.publish_timeout_s})"
        )
    if server.body_timeout_s + kafka.publish_timeout_s >= 8:
        raise ConfigError(
            "config error: `server.body_timeout_s` + `kafka.publish_timeout_s` must stay below GitLab's "
            "8 s timeout"
        )
    if kafka.max_request_size and kafka.max_request_size < server.max_body_bytes:
        raise ConfigError(
            "config error: `kafka.max_request_size` is smaller than `server.max_body_bytes`: an accepted "
            "event could not be published"
        )
    if spool.max_bytes < server.max_body_bytes * 2:
        raise ConfigError("config error: `spool.max_bytes` must be at least twice `server.max_body_bytes`")
    if not config.spool.dir:
        raise ConfigError("config error: `spool.dir` must be set")
    for index, text in enumerate(server.trusted_proxies):
        parse_network(text, f"server.trusted_proxies.{index}")
    resolve_tls(server.tls)
    security = kafka.security
    if security.protocol.startswith("SASL") and not security.sasl_username:
        raise ConfigError("config error: `kafka.security.sasl_username` is required with a SASL protocol")
    resolve_destinations(config)


def producer_max_request_size(config: IngestConfig) -> int:
    return config.kafka.max_request_size or config.server.max_body_bytes + 65_536
