"""``python -m enrich``: the same as ``falco-gitlab enrich``."""

from __future__ import annotations

import argparse
import sys

from enrich.cli import configure, run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m enrich",
                                     description="run an enrich worker (raw topic -> enriched topic)")
    configure(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
