"""The ``spec2vol`` command line: BIDS-App arguments, logging, dispatch to the two levels.

No science happens here. Options can also come from a TOML file (``--config-file``) whose keys
are the long option names (``participant-label = ["01"]`` or ``participant_label``); options on
the command line win over the file.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import tomllib
import traceback
from datetime import date, datetime, time
from pathlib import Path

from spec2vol_bids import __version__
from spec2vol_bids.errors import (
    EX_FAILURE,
    EX_INTERRUPTED,
    MissingInputError,
    Spec2VolError,
    UsageError,
    one_line,
)

LOGGER = logging.getLogger("spec2vol_bids")
# the loggers whose records go to OUTPUT_DIR/logs/
_LOGGERS = ("spec2vol_bids", "mne", "py.warnings")
MODEL_NAMES = ("spec2vol", "e2fnet")
# The largest target grid axis: the networks' outputs are volumes of an fMRI run, not images
MAX_GRID = 256


class _ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose mistakes become :class:`UsageError` (exit 64, one line)."""

    def error(self, message):
        raise UsageError(f"{message} (see spec2vol --help)")


def _label(value: str, prefix: str) -> str:
    value = value.strip()
    if value.startswith(f"{prefix}-"):
        value = value[len(prefix) + 1:]
    if not value or "/" in value or "\\" in value or ".." in value or not value.isalnum():
        raise UsageError(
            f"--{'participant' if prefix == 'sub' else 'session'}-label {value!r}: a label is letters "
            f"and digits only (with or without the '{prefix}-' prefix)"
        )
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _grid_size(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_GRID:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_GRID} voxels, got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**32 - 1, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``spec2vol BIDS_DIR OUTPUT_DIR {participant,group} [options]``."""
    parser = _ArgumentParser(
        prog="spec2vol",
        description=(
            "Synthesise fMRI volumes from simultaneously recorded scalp EEG with Spec2VolCAMU-Net. "
            "'participant' turns each run into EEG spectrograms and BOLD targets (and synthesises "
            "BOLD with --model); 'group' trains and evaluates the model leave-one-subject-out."
        ),
    )
    parser.add_argument("bids_dir", type=Path, help="the root folder of a BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="where the derivative dataset is written")
    parser.add_argument("analysis_level", choices=["participant", "group"], help="processing stage")
    parser.add_argument("--version", action="version", version=f"spec2vol {__version__}")

    g = parser.add_argument_group("selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="participants to process (with or without 'sub-'); default: all")
    g.add_argument("--session-label", nargs="+", metavar="LABEL", help="sessions to process")
    g.add_argument("--task", metavar="TASK", help="only runs of this task")
    g.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                   help="JSON filters per modality in fMRIPrep's format, e.g. {\"bold\": {\"run\": 1}}")
    g.add_argument("--eeg-derivatives", type=Path, metavar="PATH",
                   help="take EEG from this (artefact-corrected) derivative folder instead of the raw tree")
    g.add_argument("--bold-derivatives", type=Path, action="append", metavar="PATH",
                   help="take preprocessed BOLD (*_desc-preproc_bold) from this derivative dataset, "
                        "e.g. fMRIPrep's; repeatable")
    g.add_argument("--bold-space", metavar="SPACE[:res-N]",
                   help="the space of --bold-derivatives to use, in fMRIPrep's --output-spaces "
                        "syntax, e.g. MNI152NLin2009cAsym:res-2 (needed when several exist)")
    g.add_argument("--skip-bids-validation", action="store_true",
                   help="do not validate BIDS_DIR before processing")

    g = parser.add_argument_group("preprocessing (participant level)")
    g.add_argument("--volume-marker", metavar="[eeg:|events:]NAME",
                   help="the marker series of the scanner's volume triggers, in the EEG file "
                        "(e.g. R128) or events.tsv (e.g. trial_type=10); default: the one trigger "
                        "train that fits the BOLD volumes")
    g.add_argument("--first-volume-trigger", type=_positive_int, metavar="K",
                   help="trigger K of the train marks the first BOLD volume (the K-1 before are "
                        "dummy scans); triggers beyond the last volume are then ignored")
    g.add_argument("--eeg-offset", type=_nonnegative_float, metavar="SECONDS",
                   help="the first volume starts this many seconds into the EEG and the others "
                        "follow every TR; markers are not used (0: the EEG starts with the scan)")
    freq = g.add_mutually_exclusive_group()
    freq.add_argument("--freq-bins", type=_positive_int, metavar="F",
                      help="FFT bins kept per TR window, DC excluded (default: 249, the authors')")
    freq.add_argument("--fmax", type=_positive_float, metavar="HZ",
                      help="keep the FFT bins up to this frequency instead of --freq-bins")
    g.add_argument("--target-grid", type=_grid_size, nargs=3, metavar=("X", "Y", "Z"),
                   help="BOLD target grid (default: native when 64x64 in-plane and <= 40 slices, "
                        "else 64 64 30), by 3-D DCT truncation")
    g.add_argument("--discard-volumes", type=_nonnegative_int, default=6, metavar="N",
                   help="initial volumes dropped before pairing (default: 6)")
    g.add_argument("--context", type=_positive_int, default=20, metavar="N",
                   help="TR windows of EEG before each volume fed to the model (default: 20)")

    g = parser.add_argument_group("training and evaluation (group level)")
    g.add_argument("--model", metavar="NAME|MODEL_PT",
                   help="group level: the network to train, spec2vol (default) or e2fnet; "
                        "participant level: a trained model file (e.g. OUTPUT_DIR/models/final/model.pt) "
                        "to synthesise BOLD for every run with EEG, EEG-only participants included")
    g.add_argument("--model-config", default="full", choices=["full", "tiny"],
                   help="'full' is the published size; 'tiny' is for CPU demos and tests")
    g.add_argument("--epochs", type=_positive_int, default=50)
    g.add_argument("--batch-size", type=_positive_int, default=16)
    g.add_argument("--grad-accum", type=_positive_int, default=2,
                   help="gradient accumulation steps (default: 2)")
    g.add_argument("--lr", type=_positive_float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=1e-2)
    g.add_argument("--warmup-steps", type=_nonnegative_int, default=50)
    g.add_argument("--restart-epochs", type=_positive_int, default=10,
                   help="cosine schedule restarts every N epochs (default: 10)")
    g.add_argument("--clip-grad", type=_positive_float, default=1.0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--select", default="last", choices=["last", "val"],
                   help="checkpoint kept: the last epoch, or the best SSIM on one held-out "
                        "*training* subject; never the test subject")
    g.add_argument("--eeg-normalisation", default="minmax", choices=["minmax", "standard"],
                   help="EEG input scaling from the training subjects: one min-max pair (as "
                        "published) or a mean and std per channel and bin")
    g.add_argument("--split", default="loso", choices=["loso", "fixed"],
                   help="leave-one-subject-out folds, or one fixed split (--test-subjects)")
    g.add_argument("--test-subjects", nargs="+", metavar="LABEL", help="test subjects of --split fixed")
    g.add_argument("--folds", nargs="+", metavar="LABEL",
                   help="run only these folds (held-out subject labels), e.g. one per SLURM task")
    g.add_argument("--no-final", action="store_true", help="do not train the final all-subject model")
    g.add_argument("--compare", nargs="+", default=[], choices=["e2fnet"],
                   help="also train and evaluate these baselines on every fold")
    g.add_argument("--channels", nargs="+", metavar="NAME",
                   help="EEG channels to use when runs have different channel sets")

    g = parser.add_argument_group("resources and behaviour")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                   help="intermediate files (default: OUTPUT_DIR/../spec2vol_work... see README)")
    g.add_argument("--nprocs", "--n-cpus", type=_positive_int, metavar="N",
                   help="runs processed in parallel (default: 1)")
    g.add_argument("--omp-nthreads", type=_positive_int, metavar="N",
                   help="threads per process for FFTs and PyTorch (default: all cores / nprocs)")
    g.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    g.add_argument("--config-file", type=Path, metavar="TOML",
                   help="a TOML file holding any of these options by their long names")
    g.add_argument("--notrack", action="store_true",
                   help="accepted for fMRIPrep compatibility; spec2vol never sends anything anywhere")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more messages; -vv also prints tracebacks")
    return parser


def _config_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    """Read ``--config-file`` into parser defaults, refusing keys that are not options."""
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise MissingInputError("configuration file not found", path=path) from exc
    except IsADirectoryError as exc:
        raise MissingInputError("--config-file names a folder; give a TOML file", path=path) from exc
    except OSError as exc:
        raise MissingInputError(f"cannot read the configuration file ({exc.strerror})", path=path) from exc
    except UnicodeDecodeError as exc:
        raise UsageError("the configuration file is not UTF-8 text (TOML files are UTF-8)",
                         path=path) from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"not a valid TOML file ({one_line(exc)})", path=path) from exc
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "version", "config_file")}
    aliases = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                aliases[opt[2:].replace("-", "_")] = action.dest
    defaults = {}
    for key, value in table.items():
        dest = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
        if dest not in known or dest in ("bids_dir", "output_dir", "analysis_level"):
            raise UsageError(f"unknown option {key!r} in the configuration file; use the long option "
                             "names of spec2vol --help", path=path)
        action = known[dest]
        try:
            defaults[dest] = _coerce(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise UsageError(f"option {key!r}: {exc}", path=path) from exc
    return defaults


def _coerce(action: argparse.Action, value):
    """Give a TOML value the type the command line would have given it."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 3:
            raise TypeError("expected a count from 0 to 3 (how many -v)")
        return value
    if isinstance(value, (dict, datetime, date, time)) or (
            isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value)):
        raise TypeError(f"expected {'a list of values' if action.nargs else 'a single value'}")
    convert = action.type or (lambda v: v)
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*") or isinstance(action.nargs, int):
        values = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise TypeError(f"expected {action.nargs} values, got {len(values)}")
        if not values and action.nargs == "+":
            raise TypeError("expected at least one value")
        out = [convert(str(v)) if action.type else str(v) for v in values]
    else:
        if isinstance(value, list):
            raise TypeError("expected a single value")
        out = convert(str(value)) if action.type else str(value)
    if action.choices is not None:
        for v in out if isinstance(out, list) else [out]:
            if v not in action.choices:
                raise ValueError(f"{v!r} is not one of {', '.join(map(str, action.choices))}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and normalise the command line (and ``--config-file``)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config-file", type=Path)
    known, _ = pre.parse_known_args(argv)
    if known.config_file is not None:
        parser.set_defaults(**_config_defaults(parser, known.config_file))
    opts = parser.parse_args(argv)
    opts.participant_label = (
        sorted({_label(v, "sub") for v in opts.participant_label}) if opts.participant_label else None
    )
    opts.session_label = (
        sorted({_label(v, "ses") for v in opts.session_label}) if opts.session_label else None
    )
    for name in ("test_subjects", "folds"):
        values = getattr(opts, name)
        if values:
            setattr(opts, name, sorted({_label(v, "sub") for v in values}))
    opts.model_path = None
    if opts.analysis_level == "group":
        opts.model = opts.model or "spec2vol"
        if opts.model not in MODEL_NAMES:
            raise UsageError(f"--model {opts.model!r}: the group level trains one of "
                             f"{', '.join(MODEL_NAMES)}")
    elif opts.model is not None:
        opts.model_path = Path(opts.model).expanduser().absolute()
        opts.model = None
    if opts.split == "fixed" and not opts.test_subjects:
        raise UsageError("--split fixed needs --test-subjects")
    derivatives = opts.bold_derivatives or []
    if isinstance(derivatives, Path):  # one path given in --config-file
        derivatives = [derivatives]
    opts.bold_derivatives = [p.expanduser().absolute() for p in derivatives]
    if opts.bold_space is not None:
        from spec2vol_bids.layout import parse_space

        name, res = parse_space(opts.bold_space)
        opts.bold_space = f"{name}:res-{res}" if res is not None else name
    opts.bids_dir = opts.bids_dir.expanduser().absolute()
    opts.output_dir = opts.output_dir.expanduser().absolute()
    if opts.work_dir is None:
        opts.work_dir = opts.output_dir.parent / f".{opts.output_dir.name}_work"
    opts.work_dir = opts.work_dir.expanduser().absolute()
    opts.nprocs = opts.nprocs or 1
    if opts.omp_nthreads is None:
        opts.omp_nthreads = max(1, (os.cpu_count() or 1) // opts.nprocs)
    opts.argv = ["spec2vol", *argv]
    return opts


class _NoTracebackFormatter(logging.Formatter):
    """Console format: tracebacks go to the log file (and to stderr only with -vv, once)."""

    def format(self, record):
        record = logging.makeLogRecord(record.__dict__)
        record.exc_info = record.exc_text = None
        return super().format(record)


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose >= 1 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_NoTracebackFormatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))
    root = logging.getLogger("spec2vol_bids")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG)
    handler.setLevel(level)
    # MNE and pybids talk a lot at INFO; their warnings still reach the log file.
    for name in ("mne", "bids"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    # Python warnings of the libraries (numpy, nilearn, torch) go to the log file, and to the
    # console only with -v: a user's terminal gets spec2vol's own lines, not raw warn() output.
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [handler] if verbose else [logging.NullHandler()]
    warnings_log.propagate = False


def add_log_file(output_dir: Path, level: str) -> Path:
    """Also log (at DEBUG, with tracebacks) to ``OUTPUT_DIR/logs/<level>-<time>-<pid>.log``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = output_dir / "logs" / f"{level}-{stamp}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s | %(message)s"))
    for name in _LOGGERS:
        logging.getLogger(name).addHandler(handler)
    return path


def _close_log_files() -> None:
    """Detach and close the log files :func:`add_log_file` opened (main may run in-process)."""
    logging.captureWarnings(False)
    for name in _LOGGERS:
        log = logging.getLogger(name)
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(handler)
            handler.close()


def _limit_threads(n: int) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run the BIDS-App; return its exit code (never raises for user mistakes)."""
    verbose = 0
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        opts = parse_args(argv)
        verbose = opts.verbose
        _setup_logging(verbose)
        _limit_threads(opts.omp_nthreads)
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        if opts.analysis_level == "participant":
            from spec2vol_bids.participant import run_participant

            return run_participant(opts)
        from spec2vol_bids import layout
        from spec2vol_bids.group import run_group

        layout.check_output_dir(opts.bids_dir, opts.output_dir)
        layout.check_work_dir(opts.bids_dir, opts.work_dir)
        layout.check_bids_dir(opts.bids_dir)
        return run_group(opts)
    except Spec2VolError as exc:
        LOGGER.debug("user error", exc_info=True)
        if verbose >= 2:
            traceback.print_exc()
        print(f"spec2vol: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("spec2vol: interrupted", file=sys.stderr)
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
        _close_log_files()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
