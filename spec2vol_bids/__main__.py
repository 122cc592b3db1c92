"""``python -m spec2vol_bids`` behaves like the ``spec2vol`` command."""

import sys

from spec2vol_bids.cli import main

sys.exit(main())
