"""``python -m cdc`` is the ``cdc`` console script."""

import sys

from cdc.cli import main

sys.exit(main())
