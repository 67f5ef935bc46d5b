"""The plugin API entry points implemented in Python, bound to the library's cffi module.

The C part (``plugin_shim.c``) answers the metadata itself and calls the ``gkpy_*`` functions below
(cffi ``extern "Python"``), each of which returns ``BASE + ss_plugin_rc`` so that C can tell a result
from cffi's default 0 when Python could not run at all.

All state hangs off the plugin handle: one ``Plugin`` object per ``init`` (Falco runs one per event
source, and again after a restart), registered under an integer id and reached from C through a cffi
handle stored in the C state. Nothing escapes as an exception: every entry point catches, stores the
message for ``get_last_error`` and returns SS_PLUGIN_FAILURE.

The library's embedding start-up code calls ``attach(ffi, lib)`` once per loaded copy of the library.
"""

from __future__ import annotations

import itertools
import sys
import traceback
from collections.abc import Callable
from typing import Any, Final, TypeVar

from falco_gitlab.model import EnrichedRecord
from falco_source.config import ConfigError, PluginConfig, broker_list, parse_config
from falco_source.extract import Extractor
from falco_source.hostlog import SEV_ERROR, SEV_WARNING, HostLog
from falco_source.params import OpenParamsError, parse_open_params
from falco_source.source import RC_FAILURE, RC_SUCCESS, Counters, KafkaSource, SourceError

BASE: Final = 1000
F = TypeVar("F", bound=Callable[..., Any])
_REGISTRY: dict[int, Plugin] = {}
_IDS = itertools.count(1)
_ATTACHED: set[int] = set()


class Instance:
    """One open capture: the Kafka source and the memory handed to the framework."""

    def __init__(self, ffi: Any, source: KafkaSource, batch_size: int) -> None:
        self.source = source
        self.batch_size = batch_size
        self.c_offsets = ffi.new("uint32_t[]", batch_size)
        self.c_events = ffi.new("ss_plugin_event *[]", batch_size)
        self.handle = ffi.new_handle(self)
        self.buffer: bytearray = bytearray()
        self.records: list[EnrichedRecord] = []  # decoded record of each event of the current batch
        self.c_buffer: Any = None
        self.c_progress: Any = None


class Plugin:
    """State of one plugin handle (one init ... destroy)."""

    def __init__(self, ffi: Any, lib: Any, cstate: Any, config: PluginConfig, log: HostLog) -> None:
        self.id = next(_IDS)
        self.cstate = cstate
        self.config = config
        self.log = log
        self.plugin_id = int(lib.plugin_get_id())
        self.counters = Counters()
        self.extractor = Extractor()
        self.instances: dict[int, Instance] = {}
        self.current: Instance | None = None  # the capture extraction looks batch records up in
        self.handle = ffi.new_handle(self)
        self.c_blob: Any = None
        self.c_args: dict[str, Any] = {}
        self.c_args_key: Any = None
        self.c_text: Any = None

    def close_all(self) -> None:
        for instance in list(self.instances.values()):
            instance.source.close()
        self.instances.clear()
        self.current = None


def _host_log(lib: Any, cstate: Any, level: str) -> HostLog:
    def sink(severity: int, message: str) -> None:
        lib.gk_log(cstate, severity, message.encode("utf-8", "replace"))

    return HostLog(sink, level)


def _error(lib: Any, cstate: Any, message: str) -> None:
    lib.gk_set_error(cstate, message.encode("utf-8", "replace"))


def _internal(lib: Any, cstate: Any, where: str, exc: BaseException) -> int:
    text = f"internal error in {where}: {type(exc).__name__}: {exc}"
    _error(lib, cstate, text)
    lib.gk_log(cstate, SEV_ERROR, ("".join(traceback.format_exception(exc))).encode("utf-8", "replace"))
    return BASE + RC_FAILURE


def _extern(ffi: Any, **options: Any) -> Callable[[F], F]:
    """``ffi.def_extern`` with a type mypy can follow."""
    decorator: Callable[[F], F] = ffi.def_extern(**options)
    return decorator


def attach(ffi: Any, lib: Any) -> None:
    """Bind the extern "Python" functions of one loaded copy of the library."""
    if id(ffi) in _ATTACHED:
        return
    _ATTACHED.add(id(ffi))
    from falco_source import meta

    expected_digest = meta.fields_digest()

    def on_error(exception: type[BaseException], value: BaseException, tb: Any) -> None:
        traceback.print_exception(exception, value, tb, file=sys.stderr)

    def plugin_of(cstate: Any) -> Plugin:
        plugin: Plugin = ffi.from_handle(cstate.py)
        return plugin

    def batch_record(plugin: Plugin, index: int) -> EnrichedRecord | None:
        # the record next_batch decoded for the event at this index of the current batch, if any
        current = plugin.current
        if index >= 0 and current is not None and index < len(current.records):
            return current.records[index]
        return None

    def data_of(data: Any, size: int, decoded: Any) -> Any:
        # the payload as a buffer, only when it will be decoded
        return None if decoded is not None else ffi.buffer(data, size)

    @_extern(ffi, error=0, onerror=on_error)
    def gkpy_init(cstate: Any, c_config: Any) -> int:
        try:
            built_digest = ffi.string(lib.gk_fields_digest()).decode("ascii")
            if built_digest != expected_digest:
                message = ("the library was built for another gitlab.* field catalogue than the Python code "
                           f"it loaded (digest {built_digest} != {expected_digest}): rebuild it with "
                           "`falco-gitlab plugin build`")
                _error(lib, cstate, message)
                lib.gk_log(cstate, SEV_ERROR, message.encode("utf-8", "replace"))
                return BASE + RC_FAILURE
            text = ffi.string(c_config)
            try:
                config = parse_config(text)
            except ConfigError as exc:
                _error(lib, cstate, str(exc))
                lib.gk_log(cstate, SEV_ERROR, str(exc).encode("utf-8", "replace"))
                return BASE + RC_FAILURE
            log = _host_log(lib, cstate, config.log_level)
            plugin = Plugin(ffi, lib, cstate, config, log)
            _REGISTRY[plugin.id] = plugin
            cstate.py = plugin.handle
            cstate.id = plugin.id
            log.debug(f"embedded Python {sys.version.split()[0]} at {sys.prefix}, falco_source from "
                      f"{__file__.rsplit('/', 2)[0]}")
            log.info(
                f"initialised (plugin id {plugin.plugin_id}, topic {config.topic}, brokers "
                f"{','.join(broker_list(config))}, batch size {config.batch_size})"
            )
            return BASE + RC_SUCCESS
        except BaseException as exc:
            return _internal(lib, cstate, "init", exc)

    @_extern(ffi, onerror=on_error)
    def gkpy_destroy(cstate: Any) -> None:
        try:
            plugin = plugin_of(cstate)
        except BaseException:
            cstate.py = ffi.NULL
            return
        try:
            plugin.close_all()
            plugin.log.debug("destroyed")
        except BaseException as exc:
            _internal(lib, cstate, "destroy", exc)
        finally:
            plugin.log.detach()  # the C state is freed right after this returns
            _REGISTRY.pop(plugin.id, None)
            cstate.py = ffi.NULL

    @_extern(ffi, error=0, onerror=on_error)
    def gkpy_open(cstate: Any, cinst: Any, c_params: Any) -> int:
        try:
            plugin = plugin_of(cstate)
            text = ffi.string(c_params).decode("utf-8", "replace")
            try:
                params = parse_open_params(text)
            except OpenParamsError as exc:
                _error(lib, cstate, f"invalid open_params {text!r}: {exc}")
                return BASE + RC_FAILURE
            source = KafkaSource(plugin.config, params, plugin.plugin_id, plugin.log, plugin.counters)
            try:
                source.open()
            except SourceError as exc:
                _error(lib, cstate, str(exc))
                plugin.log.error(str(exc))
                return BASE + RC_FAILURE
            instance = Instance(ffi, source, plugin.config.batch_size)
            plugin.instances[id(instance)] = instance
            plugin.current = instance
            cinst.py = instance.handle
            cinst.offs = instance.c_offsets
            cinst.evts = instance.c_events
            cinst.capacity = instance.batch_size
            return BASE + RC_SUCCESS
        except BaseException as exc:
            return _internal(lib, cstate, "open", exc)

    @_extern(ffi, onerror=on_error)
    def gkpy_close(cstate: Any, cinst: Any) -> None:
        try:
            plugin = plugin_of(cstate)
            instance: Instance = ffi.from_handle(cinst.py)
            plugin.instances.pop(id(instance), None)
            if plugin.current is instance:
                plugin.current = None
            instance.source.close()
            extractor = plugin.extractor
            plugin.log.debug(f"closed; extraction decoded {extractor.decoded} events and reused "
                             f"{extractor.reused} records decoded by next_batch")
        except BaseException as exc:
            _internal(lib, cstate, "close", exc)
        finally:
            cinst.py = ffi.NULL

    @_extern(ffi, error=0, onerror=on_error)
    def gkpy_next_batch(cstate: Any, cinst: Any, c_count: Any) -> int:
        c_count[0] = 0
        try:
            instance: Instance = ffi.from_handle(cinst.py)
            try:
                rc, events, offsets, records = instance.source.next_batch(instance.batch_size)
            except SourceError as exc:
                _error(lib, cstate, str(exc))
                return BASE + RC_FAILURE
            count = len(offsets)
            if count:
                instance.buffer = events  # previous batch released: the framework is done with it
                instance.records = records
                instance.c_buffer = ffi.from_buffer(events)
                cinst.batch_base = instance.c_buffer
                ffi.memmove(cinst.offs, offsets, 4 * count)
                c_count[0] = count
            return BASE + rc
        except BaseException as exc:
            return _internal(lib, cstate, "next_batch", exc)

    @_extern(ffi, error=0, onerror=on_error)
    def gkpy_get_progress(cstate: Any, cinst: Any, c_pct: Any, c_text: Any) -> int:
        try:
            instance: Instance = ffi.from_handle(cinst.py)
            pct, text = instance.source.progress()
            instance.c_progress = ffi.new("char[]", text.encode("utf-8", "replace"))
            c_pct[0] = pct
            c_text[0] = instance.c_progress
            return BASE + RC_SUCCESS
        except BaseException as exc:
            return _internal(lib, cstate, "get_progress", exc)

    @_extern(ffi, error=0, onerror=on_error)
    def gkpy_decode(cstate: Any, evtnum: int, data: Any, address: int, size: int, index: int) -> int:
        try:
            plugin = plugin_of(cstate)
            extractor = plugin.extractor
            key = (evtnum, address, size)
            decoded = batch_record(plugin, index)
            record = extractor.load(key, data_of(data, size, decoded), decoded)
            if record is None:
                plugin.log.limited("extract-decode", SEV_WARNING,
                                   f"event {evtnum} is not an enriched record, its fields are absent: "
                                   f"{extractor.error}")
            blob, string_slots, numeric_slots, numbers = extractor.table()
            plugin.c_blob = ffi.from_buffer(blob)  # stays valid until the next decode
            lib.gk_load_cache(cstate, plugin.c_blob, len(blob), string_slots, len(string_slots),
                              numeric_slots, numbers, len(numeric_slots))
            return BASE + RC_SUCCESS
        except BaseException as exc:
            return _internal(lib, cstate, "extract_fields", exc)

    @_extern(ffi, error=0, onerror=on_error)
    def gkpy_extract_arg(cstate: Any, evtnum: int, data: Any, address: int, size: int, index: int,
                         field_id: int, c_arg: Any, c_out: Any) -> int:
        try:
            plugin = plugin_of(cstate)
            extractor = plugin.extractor
            key = (evtnum, address, size)
            if key != extractor.key:
                decoded = batch_record(plugin, index)
                extractor.load(key, data_of(data, size, decoded), decoded)
            if plugin.c_args_key != key:
                plugin.c_args_key = key
                plugin.c_args.clear()
            path = ffi.string(c_arg).decode("utf-8", "replace")
            held = plugin.c_args.get(path)
            if held is None:
                value = extractor.value_at(path)
                if value is None:
                    return BASE + 0
                held = plugin.c_args[path] = ffi.from_buffer(value)
            c_out[0] = held
            return BASE + 1
        except BaseException as exc:
            return _internal(lib, cstate, "extract_fields", exc)

    @_extern(ffi, error=0, onerror=on_error)
    def gkpy_event_to_string(cstate: Any, evtnum: int, data: Any, address: int, size: int, c_out: Any) -> int:
        try:
            plugin = plugin_of(cstate)
            extractor = plugin.extractor
            key = (evtnum, address, size)
            if key != extractor.key:
                extractor.load(key, ffi.buffer(data, size))
            plugin.c_text = ffi.new("char[]", extractor.describe().encode("utf-8", "replace"))
            c_out[0] = plugin.c_text
            return BASE + RC_SUCCESS
        except BaseException as exc:
            return _internal(lib, cstate, "event_to_string", exc)

    @_extern(ffi, error=0, onerror=on_error)
    def gkpy_get_metrics(cstate: Any, c_values: Any, count: int) -> int:
        try:
            plugin = plugin_of(cstate)
            for instance in list(plugin.instances.values()):  # Falco's metrics thread: snapshot
                instance.source.lag()
            c = plugin.counters
            values = (c.delivered, c.dropped_oversized, c.dropped_malformed, c.lag, c.kafka_errors, c.commits)
            for i, value in enumerate(values[:count]):
                c_values[i] = value
            return BASE + RC_SUCCESS
        except BaseException as exc:
            return _internal(lib, cstate, "get_metrics", exc)
