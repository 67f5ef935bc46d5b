"""``falco-gitlab ingest``: run the GitLab audit event streaming receiver.

Only the standard library is imported at module level (``falco-gitlab --help`` must stay fast); aiohttp,
confluent-kafka and msgspec are imported inside ``run``.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from typing import Any

DESCRIPTION = """\
Receive GitLab audit event streaming requests and publish each event, byte for byte, to Kafka.

GitLab sends one POST per event (or a JSON array of events) with the destination's verification token
in X-Gitlab-Event-Streaming-Token. Each event becomes one record on the raw topic with headers
naming the destination, event type, receive time, request id and a unique event id; the key keeps one
actor's events in order. When Kafka does not acknowledge within kafka.publish_timeout_s, the events
are written to a local durable spool, answered 202, and published once Kafka is back.
"""

EPILOG = """\
configuration:
  A TOML file (--config) overlaid with environment variables FALCO_GITLAB_INGEST_<SECTION>__<KEY>,
  e.g. FALCO_GITLAB_INGEST_KAFKA__BOOTSTRAP_SERVERS=broker:9092. Command-line options win over both.
  Tokens, for simple set-ups:
    FALCO_GITLAB_INGEST_TOKEN=<token>[,<token>]         destination "default"
    FALCO_GITLAB_INGEST_TOKEN_<NAME>=<token>[,<token>]  destination "<name>" (lower-cased)
    FALCO_GITLAB_INGEST_TOKEN_FILE[_<NAME>]=<path>      one token per line
    FALCO_GITLAB_INGEST_TOKENS_FILE=<path>              lines of "<destination> <token>"
  See docs/ingest.md and examples/ingest.toml.

endpoints:
  POST /<any path>  the webhook (200 published, 202 spooled, 400/408/413 to the dead-letter topic,
                    401 bad token, 403 network not allowed, 503 Kafka down and spool full)
  GET /healthz, GET /readyz, GET /metrics (Prometheus)

examples:
  FALCO_GITLAB_INGEST_TOKEN=$(cat token) falco-gitlab ingest --bootstrap-servers kafka:9092 \\
      --spool-dir /var/lib/falco-gitlab/spool
  falco-gitlab ingest --config /etc/falco-gitlab/ingest.toml --workers 4
  falco-gitlab ingest --config /etc/falco-gitlab/ingest.toml --check-config
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--host", help="listen address (server.host, default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="listen port (server.port, default 8080)")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the port with SO_REUSEPORT (server.workers, default 1)",
    )
    parser.add_argument(
        "--bootstrap-servers", metavar="HOST:PORT[,...]", help="Kafka brokers (kafka.bootstrap_servers)"
    )
    parser.add_argument("--topic", help="raw topic (kafka.topic, default gitlab.audit.raw)")
    parser.add_argument("--spool-dir", metavar="DIR", help="local spool directory (spool.dir)")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="logging.level (default info)"
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="logging.format (default text)")
    parser.add_argument(
        "--debug-json",
        action="store_true",
        default=None,
        help="log every received body and its non-secret headers (server.debug_json)",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print a summary (never a token) and exit",
    )
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)


def _apply_overrides(config: Any, args: argparse.Namespace) -> None:
    if args.host is not None:
        config.server.host = args.host
    if args.port is not None:
        config.server.port = args.port
    if args.workers is not None:
        config.server.workers = args.workers
    if args.bootstrap_servers is not None:
        config.kafka.bootstrap_servers = args.bootstrap_servers
    if args.topic is not None:
        config.kafka.topic = args.topic
    if args.spool_dir is not None:
        config.spool.dir = args.spool_dir
    if args.log_level is not None:
        config.logging.level = args.log_level
    if args.log_format is not None:
        config.logging.format = args.log_format
    if args.debug_json:
        config.server.debug_json = True


def _summary(config: Any) -> str:
    from ingest.app import build_ssl_context
    from ingest.config import resolve_destinations

    server, kafka, spool = config.server, config.kafka, config.spool
    tls = build_ssl_context(server.tls)  # loads the certificate and key: a bad pair fails here
    lines = [
        f"listen      {server.host}:{server.port} ({'https' if tls else 'http'}), {server.workers} worker(s),"
        f" event loop {'uvloop' if loop_factory(server.event_loop) else 'asyncio'}",
        f"kafka       {kafka.bootstrap_servers} -> {kafka.topic} (dead letters: {kafka.dlq_topic}),"
        f" publish timeout {kafka.publish_timeout_s:g} s",
        f"spool       {spool.dir} (max {spool.max_bytes} bytes per worker, fsync {spool.fsync})",
        f"body        max {server.max_body_bytes} bytes, within {server.body_timeout_s:g} s",
        f"dedup       {'on' if config.dedup.enabled else 'off'}"
        f" ({config.dedup.max_entries} events / {config.dedup.window_s:g} s)",
    ]
    for dest in resolve_destinations(config):
        networks = ", ".join(str(n) for n in dest.networks) or "any source"
        lines.append(f"destination {dest.name}: {len(dest.tokens)} token(s), {networks}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from falco_gitlab.config import ConfigError
    from falco_gitlab.logs import setup_logging
    from ingest.config import load_ingest_config, validate

    try:
        config = load_ingest_config(args.config)
        _apply_overrides(config, args)
        validate(config)
    except ConfigError as exc:
        print(f"falco-gitlab ingest: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        try:
            print(_summary(config))
        except ConfigError as exc:
            print(f"falco-gitlab ingest: {exc}", file=sys.stderr)
            return 2
        return 0
    setup_logging(config.logging.level, config.logging.format)
    if config.server.workers > 1 and args.worker_index is None:
        return _supervise(args, config.server.workers, config.server.shutdown_timeout_s)
    return _run_worker(config, args.worker_index or 0)


def _run_worker(config: Any, worker_index: int) -> int:
    import logging

    from falco_gitlab.config import ConfigError
    from ingest.app import serve

    try:
        run_async(serve(config, worker_index=worker_index), config.server.event_loop)
    except ConfigError as exc:
        print(f"falco-gitlab ingest: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        logging.getLogger("ingest").error("cannot serve", extra={"error": str(exc)})
        return 1
    return 0


def loop_factory(choice: str = "auto") -> Any:
    """The event loop factory for ``server.event_loop``: uvloop's for "uvloop" (and for "auto" when
    uvloop is installed), None for the standard asyncio loop."""
    from falco_gitlab.config import ConfigError

    if choice == "asyncio":
        return None
    import importlib

    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "config error: `server.event_loop` is uvloop but uvloop is not installed"
            ) from None
        return None
    return uvloop.new_event_loop


def run_async(coro: Any, event_loop: str = "auto") -> Any:
    """Run ``coro`` to completion on the event loop ``server.event_loop`` asks for."""
    import asyncio

    try:
        factory = loop_factory(event_loop)
    except BaseException:
        coro.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _child_args(args: argparse.Namespace, index: int) -> list[str]:
    argv = [sys.executable, "-m", "falco_gitlab", "ingest", "--worker-index", str(index)]
    options = {
        "--config": args.config,
        "--host": args.host,
        "--port": args.port,
        "--workers": args.workers,
        "--bootstrap-servers": args.bootstrap_servers,
        "--topic": args.topic,
        "--spool-dir": args.spool_dir,
        "--log-level": args.log_level,
        "--log-format": args.log_format,
    }
    for option, value in options.items():
        if value is not None:
            argv += [option, str(value)]
    if args.debug_json:
        argv.append("--debug-json")
    return argv


def _supervise(args: argparse.Namespace, workers: int, shutdown_timeout_s: float) -> int:
    """Run ``workers`` worker processes; restart one that dies; on SIGTERM/SIGINT stop them all."""
    import logging

    log = logging.getLogger("ingest.supervisor")
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children: dict[int, subprocess.Popen[bytes]] = {}
    restarts: dict[int, float] = {}
    for index in range(workers):
        children[index] = subprocess.Popen(_child_args(args, index))
    log.info("workers started", extra={"workers": workers, "pids": [c.pid for c in children.values()]})
    while not stopping:
        time.sleep(0.2)
        for index, child in list(children.items()):
            code = child.poll()
            if code is None or stopping:
                continue
            log.error("worker exited; restarting it", extra={"worker": index, "exit_code": code})
            # Crash-looping workers are restarted at most once a second.
            delay = max(0.0, 1.0 - (time.monotonic() - restarts.get(index, 0.0)))
            time.sleep(delay)
            restarts[index] = time.monotonic()
            children[index] = subprocess.Popen(_child_args(args, index))
    log.info("stopping workers")
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 2 * shutdown_timeout_s + 10
    worst = 0
    for child in children.values():
        try:
            code = child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker did not stop in time; killing it", extra={"pid": child.pid})
            child.kill()
            code = child.wait()
        worst = max(worst, abs(code))
    return 0 if worst == 0 else 1
