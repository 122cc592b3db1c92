"""The ``spec2vol`` command line: :mod:`.parser` (options, ``--config-file``) and :mod:`.run`
(logging, dispatch, exit codes)."""

from spec2vol_bids.cli.run import main

__all__ = ["main"]
