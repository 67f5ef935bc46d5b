"""The `falco-gitlab` command: one subcommand per role.

Each role lives in its own module exposing ``configure(parser)`` and ``run(args) -> int``. Those modules
import only the standard library at module level and pull in their heavy dependencies inside ``run``, so
that ``falco-gitlab --help`` or ``falco-gitlab kafka status`` stays fast and never imports aiohttp.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from falco_gitlab import __version__

# (subcommand, module, one-line help)
SUBCOMMANDS: tuple[tuple[str, str, str], ...] = (
    ("ingest", "ingest.cli", "run the GitLab audit event webhook receiver (publishes to Kafka)"),
    ("enrich", "enrich.cli", "run an enrich worker (raw topic -> enriched topic, exactly once)"),
    ("plugin", "falco_source.cli", "build or inspect the Falco plugin shared library"),
    ("replay", "replay.cli", "evaluate a Falco rules file against enriched or raw events, without Falco"),
    ("kafka", "falco_gitlab.devkafka", "start, stop or inspect the project's local Apache Kafka broker"),
    ("fields", "falco_gitlab.fields_cli", "print the gitlab.* field catalogue (text, markdown or json)"),
    ("demo", "falco_gitlab.demo", "run the whole pipeline locally on sample events and show the alerts"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="falco-gitlab",
        description="GitLab audit events into Falco through Kafka.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in SUBCOMMANDS:
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        module = _import_role(module_name)
        if module is not None:
            module.configure(sub_parser)
    return parser


def _import_role(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # A role whose module is not built yet stays listed but unusable, with the reason.
        if exc.name and module_name.startswith(exc.name.split(".")[0]):
            return None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = _import_role(args._module)
    if module is None:
        parser.error(f"the '{args.command}' role is not available in this installation")
    rc: int = module.run(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
