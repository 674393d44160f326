"""``python -m couplings.cli``: the same as the ``couplings`` command."""

import sys

from couplings.cli import main

sys.exit(main())
