"""``python -m spec2vol_bids.simulate`` behaves like the ``spec2vol-simulate`` command."""

import sys

from spec2vol_bids.simulate.cli import main

if __name__ == "__main__":
    sys.exit(main())
