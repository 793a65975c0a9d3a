"""``python -m consumers``: see :mod:`consumers.cli`."""

import sys

from consumers.cli import main

sys.exit(main())
