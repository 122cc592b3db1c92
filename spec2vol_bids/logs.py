"""Logging: the console for the user, a log file per run in ``OUTPUT_DIR/logs/`` for the record.

The console gets spec2vol's own lines (DEBUG with ``-v``); tracebacks and the libraries' Python
warnings go to the log file (and to the console with ``-v``/``-vv``), so a user's terminal never
shows a raw ``warn()`` line or a traceback for a mistake.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path

#: the loggers whose records go to the log file
LOGGERS = ("spec2vol_bids", "mne", "py.warnings")


class _NoTracebackFormatter(logging.Formatter):
    """Console format: tracebacks go to the log file (and to stderr only with -vv, once)."""

    def format(self, record):
        record = logging.makeLogRecord(record.__dict__)
        record.exc_info = record.exc_text = None
        return super().format(record)


def setup(verbose: int) -> None:
    """Send spec2vol's records to the console: INFO, or DEBUG with ``-v``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_NoTracebackFormatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))
    handler.setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)
    root = logging.getLogger("spec2vol_bids")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    # MNE and pybids talk a lot at INFO; their warnings still reach the log file.
    for name in ("mne", "bids"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [handler] if verbose else [logging.NullHandler()]
    warnings_log.propagate = False


def add_log_file(output_dir: Path, level: str, started: datetime) -> Path:
    """Also log (at DEBUG, with tracebacks) to ``OUTPUT_DIR/logs/<level>-<time>-<pid>.log``,
    named as the run's log folder (:func:`~spec2vol_bids.provenance.run_log_dir`)."""
    from spec2vol_bids.provenance import run_log_dir

    folder = run_log_dir(output_dir, level, started)
    path = folder.with_name(f"{folder.name}.log")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s | %(message)s"))
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return path


def close() -> None:
    """Detach and close the log files (the command line may run in-process, e.g. in tests)."""
    logging.captureWarnings(False)
    for name in LOGGERS:
        log = logging.getLogger(name)
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(handler)
            handler.close()
