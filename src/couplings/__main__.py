"""``python -m couplings``: the command line."""

import sys

from couplings.cli import main

sys.exit(main())
