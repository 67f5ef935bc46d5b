"""Process-level wiring of an enrich worker: GeoIP, signals, metrics, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from enrich.config import EnrichConfig, transactional_id
from enrich.geo import GeoDatabaseError, GeoIP
from enrich.metrics import Counters, log_periodically
from enrich.metrics import serve as serve_metrics
from enrich.worker import FatalWorkerError, Worker, enrich_transform, passthrough_transform

log = logging.getLogger("enrich")

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 2


def serve(config: EnrichConfig, *, passthrough: bool = False) -> int:
    """Run the worker until SIGTERM/SIGINT; returns the process exit code."""
    try:
        return asyncio.run(main(config, passthrough=passthrough))
    except KeyboardInterrupt:
        return EXIT_FATAL


async def main(config: EnrichConfig, *, passthrough: bool = False) -> int:
    kafka = config.kafka
    txn_id = transactional_id(kafka)
    geo: GeoIP | None = None
    if not passthrough:
        try:
            geo = await asyncio.to_thread(GeoIP, config.geoip.city_db, config.geoip.asn_db,
                                          mode=config.geoip.mode, cache_size=config.geoip.cache_size)
        except GeoDatabaseError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
    log.info(
        "enrich worker starting",
        extra={
            "brokers": kafka.bootstrap_servers,
            "input_topic": kafka.input_topic,
            "output_topic": kafka.output_topic,
            "dlq_topic": kafka.dlq_topic,
            "group_id": kafka.group_id,
            "transactional_id": txn_id,
            "batch_size": config.processing.batch_size,
            "mode": "passthrough" if passthrough else "enrich",
        },
    )
    if geo is not None:
        log.info("geoip: %s", geo.describe())

    counters = Counters()
    transform = passthrough_transform if passthrough else enrich_transform(
        geo if geo is not None and geo.enabled else None)
    worker = Worker(config, transform, transactional_id=txn_id, counters=counters)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: committing the current batch and leaving the group", signal.Signals(signum).name)
            stop.set()
            if main_task is not None:
                loop.call_later(config.processing.shutdown_timeout_s, main_task.cancel)
        elif main_task is not None:
            log.warning("second signal: stopping now without a final commit")
            main_task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)

    def refresh() -> None:
        if geo is not None:
            info = geo.cache_info()
            if info is not None:
                counters.geo_cache_hits, counters.geo_cache_misses = info.hits, info.misses
            counters.geo_reloads = geo.reloads

    background = [asyncio.create_task(log_periodically(counters, config.metrics.log_interval_s, refresh))]
    if geo is not None and geo.enabled:
        background.append(asyncio.create_task(geo.watch(config.geoip.reload_check_interval_s)))
    server = None
    if config.metrics.port:
        server = await serve_metrics(counters, config.metrics.host, config.metrics.port,
                                     {"group": kafka.group_id, "transactional_id": txn_id}, refresh)
        log.info("metrics on http://%s:%d/metrics", config.metrics.host, config.metrics.port)

    code = EXIT_OK
    try:
        await worker.run(stop)
    except FatalWorkerError as exc:
        log.error("enrich worker stopped: %s", exc)
        code = EXIT_FATAL
    except asyncio.CancelledError:
        code = EXIT_FATAL
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if server is not None:
            server.close()
        refresh()
        log.info("enrich worker stopped", extra=counters.snapshot())
        if geo is not None:
            geo.close()
        sys.stderr.flush()
    return code
