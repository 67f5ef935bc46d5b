"""What the library answers before init, generated at build time from the shared contract.

The same functions run at build (to embed the answers as C data) and at run time (to check that the
Python code the library finds still matches what was embedded: a catalogue changed after the build
would silently shift field ids, so init refuses to start and asks for a rebuild).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from falco_gitlab import __version__
from falco_gitlab.fields import CATALOGUE, FieldType, plugin_fields
from falco_source import EVENT_SOURCE, PLUGIN_NAME, REQUIRED_API_VERSION
from falco_source.config import init_schema
from falco_source.params import list_open_params_json

DESCRIPTION: Final = (
    "GitLab audit events from Kafka (the falco-gitlab pipeline's enriched topic), as the 'gitlab' "
    "event source with the gitlab.* fields; live consumer group or bounded replay"
)
CONTACT: Final = "falco-gitlab-pipeline maintainers; see docs/plugin.md of the project"

# (name, monotonic) in the order of plugin_get_metrics; Falco prefixes them with the plugin name.
METRICS: Final[tuple[tuple[str, bool], ...]] = (
    ("events_delivered", True),
    ("records_dropped_oversized", True),
    ("records_dropped_malformed", True),
    ("consumer_lag", False),
    ("kafka_errors", True),
    ("commits", True),
)

FTYPE_CODES: Final = {FieldType.STRING: 9, FieldType.UINT64: 8, FieldType.BOOL: 25}


def plugin_version() -> str:
    return __version__


def fields_json() -> str:
    """The get_fields answer (canonical: the digest is computed over this exact text)."""
    return json.dumps(plugin_fields(), separators=(",", ":"), ensure_ascii=True)


def fields_digest() -> str:
    return hashlib.sha256(fields_json().encode("ascii")).hexdigest()[:16]


def field_table() -> list[tuple[int, bool]]:
    """(ftype code, takes an argument) for each field id."""
    return [(FTYPE_CODES[f.type], f.arg is not None) for f in CATALOGUE]


def init_schema_json() -> str:
    return json.dumps(init_schema(), separators=(",", ":"), ensure_ascii=True)


def open_params_json() -> str:
    return list_open_params_json()


def extract_event_sources_json() -> str:
    return json.dumps([EVENT_SOURCE])


def info(plugin_id: int) -> dict[str, Any]:
    return {
        "name": PLUGIN_NAME,
        "id": plugin_id,
        "version": plugin_version(),
        "required_api_version": REQUIRED_API_VERSION,
        "event_source": EVENT_SOURCE,
        "description": DESCRIPTION,
        "contact": CONTACT,
        "fields": plugin_fields(),
        "init_schema": init_schema(),
        "open_params": json.loads(open_params_json()),
        "metrics": [name for name, _ in METRICS],
    }
