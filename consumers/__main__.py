"""``python -m consumers`` is the ``cdc-worker`` console script."""

import sys

from consumers.cli import main

sys.exit(main(prog="python -m consumers"))
