"""Logging through the host's log function (Falco's logger), with levels and rate limiting."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

# ss_plugin_log_severity
SEV_FATAL: Final = 1
SEV_CRITICAL: Final = 2
SEV_ERROR: Final = 3
SEV_WARNING: Final = 4
SEV_NOTICE: Final = 5
SEV_INFO: Final = 6
SEV_DEBUG: Final = 7
SEV_TRACE: Final = 8

LEVELS: Final = {"error": SEV_ERROR, "warning": SEV_WARNING, "info": SEV_INFO, "debug": SEV_DEBUG}

Sink = Callable[[int, str], None]


def _python_level_to_severity(level: int) -> int:
    if level >= logging.CRITICAL:
        return SEV_CRITICAL
    if level >= logging.ERROR:
        return SEV_ERROR
    if level >= logging.WARNING:
        return SEV_WARNING
    if level >= logging.INFO:
        return SEV_INFO
    return SEV_DEBUG


def _discard(severity: int, message: str) -> None:
    del severity, message


class HostLog:
    """Messages for the owner's log function; ``sink`` receives (severity, text)."""

    def __init__(self, sink: Sink, level: str = "info") -> None:
        self._sink = sink
        self.threshold = LEVELS.get(level, SEV_INFO)
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def detach(self) -> None:
        """Stop forwarding (the host's handle is about to be freed)."""
        self._sink = _discard

    def log(self, severity: int, message: str) -> None:
        if severity <= self.threshold:
            with contextlib.suppress(Exception):  # logging must never break the caller
                self._sink(severity, message)

    def error(self, message: str) -> None:
        self.log(SEV_ERROR, message)

    def warning(self, message: str) -> None:
        self.log(SEV_WARNING, message)

    def info(self, message: str) -> None:
        self.log(SEV_INFO, message)

    def debug(self, message: str) -> None:
        self.log(SEV_DEBUG, message)

    def limited(self, key: str, severity: int, message: str, every: float = 10.0) -> None:
        """At most one message per ``key`` every ``every`` seconds, counting the ones held back."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < every:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._suppressed.pop(key, 0)
        self.log(severity, f"{message} ({held} similar messages suppressed)" if held else message)


class KafkaLogger:
    """The ``logger`` confluent-kafka forwards librdkafka's log lines to (``.log(level, fmt, *args)``)."""

    def __init__(self, log: HostLog) -> None:
        self._log = log

    def log(self, level: int, msg: str, *args: Any) -> None:
        try:
            text = msg % args if args else msg
        except (TypeError, ValueError):
            text = " ".join([msg, *map(str, args)])
        severity = _python_level_to_severity(level)
        self._log.limited(f"rdkafka:{text[:60]}", severity, f"librdkafka: {text}", every=30.0)
