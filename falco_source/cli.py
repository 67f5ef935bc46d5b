"""``falco-gitlab plugin``: build the Falco plugin library, or describe it.

    falco-gitlab plugin build [--output PATH] [--plugin-id N] [--python-venv DIR | --no-venv]
    falco-gitlab plugin info [--library PATH] [--json]

Only the standard library is imported at module level (the dispatcher imports every role's module).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from falco_source import DEFAULT_PLUGIN_ID, ENV_PYTHONPATH, ENV_VENV, LIBRARY_NAME, PLUGIN_NAME

DEFAULT_OUTPUT = Path("build") / "plugin" / LIBRARY_NAME  # relative to the working directory


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plugin_command", metavar="ACTION", required=True)
    build = sub.add_parser(
        "build", help=f"compile {LIBRARY_NAME}",
        description=f"Compile the Falco plugin library ({LIBRARY_NAME}): cffi embedding of CPython.",
    )
    build.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT,
                       help=f"where to write the library (default: ./{DEFAULT_OUTPUT})")
    build.add_argument("--plugin-id", type=int, default=DEFAULT_PLUGIN_ID,
                       help=f"event source plugin ID (default {DEFAULT_PLUGIN_ID}, the development ID; "
                       "use the ID registered with falcosecurity for production)")
    venv = build.add_mutually_exclusive_group()
    venv.add_argument("--python-venv", metavar="DIR",
                      help="virtual environment the plugin runs (default: the one running this command); "
                      f"{ENV_VENV} overrides it at run time")
    venv.add_argument("--no-venv", action="store_true",
                      help="run with the interpreter's own site-packages (packages installed system-wide)")
    build.add_argument("--verbose", "-v", action="store_true", help="show the compiler commands")

    info = sub.add_parser(
        "info", help="print name, ID, version, fields, init schema and a falco.yaml snippet"
    )
    info.add_argument("--library", type=Path,
                      help="read the metadata from a built library (no Python is started in it)")
    info.add_argument("--plugin-id", type=int, default=DEFAULT_PLUGIN_ID,
                      help="ID to show when no --library is given")
    info.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    if args.plugin_command == "build":
        return _build(args)
    return _info(args)


def _build(args: argparse.Namespace) -> int:
    from falco_source.build import BuildError, build_plugin

    venv = "" if args.no_venv else args.python_venv
    try:
        result = build_plugin(args.output, plugin_id=args.plugin_id, venv=venv, verbose=args.verbose)
    except BuildError as exc:
        print(f"falco-gitlab plugin build: {exc}", file=sys.stderr)
        return 1
    path = result.path.resolve()
    print(f"built {path}", file=sys.stderr)
    print(f"  plugin {PLUGIN_NAME}, id {result.plugin_id}, libpython {result.libpython}", file=sys.stderr)
    print(f"  virtual environment: {result.venv or '(none: the interpreter site-packages)'}"
          f" (override at run time with {ENV_VENV}; extra paths: {ENV_PYTHONPATH})", file=sys.stderr)
    print(path)
    return 0


def _library_info(path: Path) -> dict[str, Any]:
    """Metadata straight from a built library's C functions (they never start Python)."""
    import ctypes

    lib = ctypes.CDLL(str(path.resolve()), mode=ctypes.RTLD_LOCAL)

    def text(name: str) -> str:
        function = getattr(lib, f"plugin_{name}")
        function.restype = ctypes.c_char_p
        function.argtypes = []
        value: bytes = function()
        return value.decode("utf-8")

    lib.plugin_get_id.restype = ctypes.c_uint32
    lib.plugin_get_init_schema.restype = ctypes.c_char_p
    lib.plugin_get_init_schema.argtypes = [ctypes.POINTER(ctypes.c_int)]
    schema_type = ctypes.c_int(0)
    schema = lib.plugin_get_init_schema(ctypes.byref(schema_type)).decode("utf-8")
    return {
        "library": str(path.resolve()),
        "name": text("get_name"),
        "id": int(lib.plugin_get_id()),
        "version": text("get_version"),
        "required_api_version": text("get_required_api_version"),
        "event_source": text("get_event_source"),
        "description": text("get_description"),
        "contact": text("get_contact"),
        "fields": json.loads(text("get_fields")),
        "init_schema": json.loads(schema),
    }


def _info(args: argparse.Namespace) -> int:
    from falco_source import meta

    if args.library is not None:
        if not args.library.exists():
            print(f"falco-gitlab plugin info: {args.library} does not exist", file=sys.stderr)
            return 1
        data = _library_info(args.library)
        data["open_params"] = meta.info(data["id"])["open_params"]  # a static list, same in every build
        library_path = data["library"]
    else:
        data = meta.info(args.plugin_id)
        library_path = str((Path.cwd() / DEFAULT_OUTPUT).resolve())
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{data['name']} {data['version']}  (plugin id {data['id']}, event source "
          f"'{data['event_source']}', plugin API {data['required_api_version']})")
    print(data["description"])
    print(f"\nfields ({len(data['fields'])}):")
    for entry in data["fields"]:
        arg = "[path]" if "arg" in entry else ""
        print(f"  {entry['name'] + arg:<34} {entry['type']:<7} {entry['desc']}")
    print("\ninit_config keys:")
    for key, spec in data["init_schema"].get("properties", {}).items():
        required = " (required)" if key in data["init_schema"].get("required", []) else ""
        print(f"  {key:<20} {spec.get('description', '')}{required}")
    print("\nopen_params:")
    for entry in data["open_params"]:
        print(f"  {entry['value']:<30} {entry['desc']}")
    print("\nfalco.yaml:\n")
    print(falco_yaml_snippet(library_path))
    return 0


def falco_yaml_snippet(library_path: str) -> str:
    return f"""\
engine:
  kind: nodriver              # plugin-only: no kernel driver
load_plugins: [{PLUGIN_NAME}]
plugins:
  - name: {PLUGIN_NAME}
    library_path: {library_path}
    init_config:              # a YAML map; Falco hands it to the plugin as JSON
      brokers: "kafka-1:9092,kafka-2:9092"
      topic: gitlab.audit.enriched
      group_id: falco-gitlab
    open_params: "live"       # or "replay", "replay:-24h", "replay:2024-05-01T00:00:00Z"
rules_files:
  - /etc/falco/rules.d/gitlab.yaml
json_output: true
stdout_output:
  enabled: true
# run plugin-only:  falco -c falco.yaml --disable-source syscall"""
