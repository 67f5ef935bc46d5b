"""``python -m ingest ...`` is ``falco-gitlab ingest ...``."""

import sys

from falco_gitlab.cli import main

sys.exit(main(["ingest", *sys.argv[1:]]))
