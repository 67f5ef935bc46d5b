"""Counters of one enrich worker: logged periodically, optionally served as Prometheus text."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, fields
from typing import Any

log = logging.getLogger("enrich.metrics")


@dataclass(slots=True)
class Counters:
    records_in: int = 0  # records consumed (every record of every committed batch)
    enriched: int = 0  # records written to the enriched topic
    dlq: int = 0  # records written to the dead-letter topic
    duplicates: int = 0  # records skipped because their event uid was already enriched
    batches: int = 0  # committed transactions
    aborted: int = 0  # transactions aborted (the batch is retried)
    rewound: int = 0  # batches dropped unprocessed because a rebalance overtook them
    batch_seconds_total: float = 0.0
    batch_seconds_max: float = 0.0
    geo_reloads: int = 0
    geo_cache_hits: int = 0
    geo_cache_misses: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_HELP = {
    "records_in": ("counter", "Records consumed from the raw topic and committed"),
    "enriched": ("counter", "Records written to the enriched topic"),
    "dlq": ("counter", "Records written to the dead-letter topic"),
    "duplicates": ("counter", "Records skipped as duplicates of an already enriched event uid"),
    "batches": ("counter", "Committed transactions"),
    "aborted": ("counter", "Aborted transactions (batch retried)"),
    "rewound": ("counter", "Fetched batches dropped unprocessed because of a rebalance"),
    "batch_seconds_total": ("counter", "Total seconds spent processing and committing batches"),
    "batch_seconds_max": ("gauge", "Longest batch since the last periodic log line"),
    "geo_reloads": ("counter", "GeoIP database reloads"),
    "geo_cache_hits": ("counter", "GeoIP cache hits"),
    "geo_cache_misses": ("counter", "GeoIP cache misses"),
}


def prometheus_text(counters: Counters, labels: dict[str, str]) -> str:
    label_text = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    lines = []
    for name, value in counters.snapshot().items():
        kind, help_text = _HELP[name]
        metric = f"falco_gitlab_enrich_{name}"
        if kind == "counter" and not name.endswith("_total"):
            metric += "_total"
        lines.append(f"# HELP {metric} {help_text}")
        lines.append(f"# TYPE {metric} {kind}")
        lines.append(f"{metric}{{{label_text}}} {value}")
    return "\n".join(lines) + "\n"


async def log_periodically(counters: Counters, interval: float, refresh: Any = None) -> None:
    """Log the counters (and the rate since the previous line) every ``interval`` seconds."""
    previous = counters.snapshot()
    previous_time = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        if refresh is not None:
            refresh()
        now = time.monotonic()
        current = counters.snapshot()
        elapsed = max(now - previous_time, 1e-9)
        batches = current["batches"] - previous["batches"]
        seconds = current["batch_seconds_total"] - previous["batch_seconds_total"]
        log.info(
            "enrich counters",
            extra={
                **{k: v for k, v in current.items() if not k.startswith("batch_seconds")},
                "events_per_s": round((current["records_in"] - previous["records_in"]) / elapsed, 1),
                "batch_ms_avg": round(1000 * seconds / batches, 2) if batches else 0.0,
                "batch_ms_max": round(1000 * current["batch_seconds_max"], 2),
            },
        )
        counters.batch_seconds_max = 0.0
        previous, previous_time = current, now


async def serve(counters: Counters, host: str, port: int, labels: dict[str, str],
                refresh: Any = None) -> asyncio.Server:
    """A minimal HTTP/1.0 server answering GET /metrics (anything else: 404)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                if refresh is not None:
                    refresh()
                body = prometheus_text(counters, labels).encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            else:
                body, head = b"not found\n", b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)
