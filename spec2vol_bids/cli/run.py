"""Run the BIDS-App: configuration, logging, threads, dispatch to a level, exit codes.

No science happens here. A :class:`~spec2vol_bids.errors.Spec2VolError` becomes its one-line
message and exit code; an interruption exits 130; anything else is an internal error (exit 1,
the traceback in the log file).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback

from spec2vol_bids import logs
from spec2vol_bids.errors import EX_FAILURE, EX_INTERRUPTED, Spec2VolError, one_line

LOGGER = logging.getLogger("spec2vol_bids")


def _limit_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the BIDS-App; return its exit code (never raises for user mistakes)."""
    from spec2vol_bids.bids.validation import check_inputs
    from spec2vol_bids.cli.parser import parse_args

    verbose, config = 0, None
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        config = parse_args(argv)
        verbose = config.execution.verbose
        logs.setup(verbose)
        _limit_threads(config.execution.omp_nthreads)
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        check_inputs(config)
        if config.inputs.analysis_level == "participant":
            from spec2vol_bids.participant import run_participant

            return run_participant(config)
        from spec2vol_bids.group import run_group

        return run_group(config)
    except Spec2VolError as exc:
        # a user error is one line on the console at any verbosity; its traceback goes only to
        # the log file in OUTPUT_DIR/logs (when there is one)
        LOGGER.debug("user error", exc_info=True)
        print(f"spec2vol: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        level = config.inputs.analysis_level if config is not None else None
        resumes = {"participant": "skips the runs whose outputs are up to date and redoes the rest",
                   "group": "skips what is finished and resumes training from its last "
                            "checkpoint"}.get(level, "starts again")
        print(f"spec2vol: interrupted; the same command {resumes}", file=sys.stderr)
        return EX_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence: log it, exit 1
        LOGGER.debug("internal error", exc_info=True)
        if verbose >= 2:
            traceback.print_exc()
        print(f"spec2vol: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(rerun with -vv for the traceback; please report it)", file=sys.stderr)
        return EX_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        logs.close()
