import sys

from falco_gitlab.cli import main

sys.exit(main())
