"""The plugin's open parameters: live consumption in a group, or a bounded replay of the topic.

========================  =======================================================================
``live`` (or empty)       consumer group ``group_id``; resumes from the committed offsets; a group
                          without commits starts at ``initial_offset`` (init_config)
``live:earliest``         the same, a group without commits starts at the oldest record
``live:latest``           the same, a group without commits starts at new records only
``replay``                every record retained in the topic, up to the end offsets seen at open,
                          then EOF (Falco exits 0 when no other source runs); commits nothing
``replay:<ISO-8601>``     the same from a time, e.g. ``replay:2024-05-01T00:00:00Z``
``replay:@<epoch ms>``    the same from a time in milliseconds since the epoch
``replay:-<N><s|m|h|d>``  the same from a time relative to now, e.g. ``replay:-24h``
========================  =======================================================================
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

_RELATIVE: Final = re.compile(r"^-(\d+)([smhd])$")
_UNIT_MS: Final = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class OpenParamsError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class OpenParams:
    mode: Literal["live", "replay"]
    # live: None (init_config's initial_offset), "earliest" or "latest"
    # replay: "earliest", or a timestamp in ms since the epoch
    start: str | int | None = None

    def describe(self) -> str:
        if self.mode == "live":
            return f"live (group offsets; new group starts at {self.start or 'initial_offset'})"
        if self.start == "earliest":
            return "replay from the earliest retained record"
        assert isinstance(self.start, int)
        when = datetime.fromtimestamp(self.start / 1000).astimezone().isoformat(timespec="seconds")
        return f"replay from {when}"


USAGE: Final = (
    "open_params must be one of: live, live:earliest, live:latest, replay, replay:earliest, "
    "replay:<ISO-8601 time with zone>, replay:@<epoch milliseconds>, replay:-<N><s|m|h|d>"
)


def parse_open_params(text: str, *, now_ms: int | None = None) -> OpenParams:
    value = text.strip()
    mode, _, arg = value.partition(":")
    mode = mode.strip().lower() or "live"
    arg = arg.strip()
    if mode == "live":
        if arg in ("", "earliest", "latest"):
            return OpenParams("live", arg or None)
        raise OpenParamsError(f"unknown live start {arg!r}; {USAGE}")
    if mode != "replay":
        raise OpenParamsError(f"unknown mode {mode!r}; {USAGE}")
    if arg in ("", "earliest", "beginning"):
        return OpenParams("replay", "earliest")
    if arg.startswith("@"):
        if not arg[1:].isdigit():
            raise OpenParamsError(f"bad epoch milliseconds {arg!r}; {USAGE}")
        return OpenParams("replay", int(arg[1:]))
    relative = _RELATIVE.match(arg)
    if relative:
        base = int(time.time() * 1000) if now_ms is None else now_ms
        return OpenParams("replay", max(0, base - int(relative.group(1)) * _UNIT_MS[relative.group(2)]))
    try:
        moment = datetime.fromisoformat(arg)
    except ValueError:
        raise OpenParamsError(f"bad replay start {arg!r}; {USAGE}") from None
    if moment.tzinfo is None:
        raise OpenParamsError(f"replay time {arg!r} has no time zone (add Z or +00:00); {USAGE}")
    return OpenParams("replay", max(0, int(moment.timestamp() * 1000)))


LIST: Final = [
    {"value": "live", "desc": "consume in the consumer group group_id, resuming from its committed offsets"},
    {"value": "live:earliest", "desc": "live; a group without committed offsets starts at the oldest record"},
    {"value": "replay",
     "desc": "bounded replay of every retained record up to the end offsets at open, then EOF"},
    {"value": "replay:2024-01-01T00:00:00Z", "desc": "bounded replay from a time (ISO-8601 with zone)"},
    {"value": "replay:-24h", "desc": "bounded replay of the last N s/m/h/d"},
]


def list_open_params_json() -> str:
    return json.dumps(LIST, separators=(",", ":"))
