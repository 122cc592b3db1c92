"""The ``spec2vol`` command line: its options, their types, and ``--config-file``.

Options can also come from a TOML file whose keys are the long option names
(``participant-label = ["01"]`` or ``participant_label``); the command line wins over the file.
Defaults are not set here but in :mod:`spec2vol_bids.config` (shown in ``--help`` from there):
an option left out is ``None`` and the configuration fills it in.
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from datetime import date, datetime, time
from pathlib import Path

from spec2vol_bids import __version__, config
from spec2vol_bids.errors import MissingInputError, UsageError, one_line

_TRAINING = config.defaults(config.Training)
_PARTICIPANT = config.defaults(config.Participant)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose mistakes become :class:`UsageError` (exit 64, one line)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def grid_size(text: str) -> int:
    value = positive_int(text)
    if value > config.MAX_GRID:
        raise argparse.ArgumentTypeError(f"must be at most {config.MAX_GRID} voxels, got {text}")
    return value


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**32 - 1, got {text}")
    return value


def _default(value) -> str:
    return f" (default: {value})"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``spec2vol BIDS_DIR OUTPUT_DIR {participant,group} [options]``."""
    parser = ArgumentParser(
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
    _data_options(parser.add_argument_group("selecting data"))
    _participant_options(parser.add_argument_group("preprocessing (participant level)"))
    _training_options(parser.add_argument_group("training and evaluation (group level)"))
    _execution_options(parser.add_argument_group("resources and behaviour"))
    return parser


def _data_options(g) -> None:
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
    g.add_argument("--bold-space", metavar="SPACE[:cohort-N][:res-N]",
                   help="the space of --bold-derivatives to use, in fMRIPrep's --output-spaces "
                        "syntax, e.g. MNI152NLin2009cAsym:res-2, or func for the series without "
                        "a space entity (needed when several exist)")
    g.add_argument("--skip-bids-validation", action="store_true", default=None,
                   help="do not validate BIDS_DIR before processing")


def _participant_options(g) -> None:
    g.add_argument("--volume-marker", metavar="[eeg:|events:]NAME",
                   help="the marker series of the scanner's volume triggers, in the EEG file "
                        "(e.g. R128) or events.tsv (e.g. trial_type=10); default: the one trigger "
                        "train that fits the BOLD volumes")
    g.add_argument("--first-volume-trigger", type=positive_int, metavar="K",
                   help="trigger K of the train marks the first BOLD volume (the K-1 before are "
                        "dummy scans); triggers beyond the last volume are then ignored")
    g.add_argument("--eeg-offset", type=nonnegative_float, metavar="SECONDS",
                   help="the first volume starts this many seconds into the EEG and the others "
                        "follow every TR; markers are not used (0: the EEG starts with the scan)")
    freq = g.add_mutually_exclusive_group()
    freq.add_argument("--freq-bins", type=positive_int, metavar="F",
                      help="FFT bins kept per TR window, DC excluded"
                           + _default(f"{config.FREQ_BINS}, the authors'"))
    freq.add_argument("--fmax", type=positive_float, metavar="HZ",
                      help="keep the FFT bins up to this frequency instead of --freq-bins")
    g.add_argument("--target-grid", type=grid_size, nargs=3, metavar=("X", "Y", "Z"),
                   help="BOLD target grid (default: native when 64x64 in-plane and <= 40 slices, "
                        "else 64 64 30), by 3-D DCT truncation")
    g.add_argument("--discard-volumes", type=nonnegative_int, metavar="N",
                   help="initial volumes dropped before pairing" + _default(_PARTICIPANT["discard_volumes"]))
    g.add_argument("--context", type=positive_int, metavar="N",
                   help="TR windows of EEG before each volume fed to the model"
                        + _default(f"{config.CONTEXT}, or --model's own"))


def _training_options(g) -> None:
    g.add_argument("--model", metavar="NAME|MODEL_PT",
                   help=f"group level: the model to train, {', '.join(config.MODELS)} (a network, "
                        "or a linear baseline fitted in closed form)"
                        f"{_default(_TRAINING['model'])}; participant level: a trained model file "
                        "(e.g. OUTPUT_DIR/models/final/model.pt) to synthesise BOLD for every run "
                        "with EEG, EEG-only participants included")
    g.add_argument("--model-config", choices=config.SIZES,
                   help="'full' is the published size; 'tiny' is for CPU demos and tests"
                        + _default(_TRAINING["size"]))
    numbers = [("--epochs", positive_int, "epochs"), ("--batch-size", positive_int, "batch size"),
               ("--grad-accum", positive_int, "gradient accumulation steps"),
               ("--lr", positive_float, "peak learning rate of the network's AdamW (the "
                                        "residual protocol's readout has SGD at its own rate)"),
               ("--weight-decay", nonnegative_float, "weight decay (AdamW's; for the residual "
                                                      "protocol's SGD readout an L2 penalty)"),
               ("--warmup-steps", nonnegative_int, "linear warm-up steps"),
               ("--restart-epochs", positive_int, "cosine schedule restarts every N epochs"),
               ("--clip-grad", nonnegative_float, "gradient norm clipping (0: none)")]
    for flag, kind, what in numbers:
        g.add_argument(flag, type=kind, help=what + _default(_TRAINING[flag[2:].replace("-", "_")]))
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help=_default(_TRAINING["device"]).strip())
    g.add_argument("--precision", choices=config.PRECISIONS,
                   help="arithmetic of training and synthesis: 'auto' is bfloat16 autocast on a GPU "
                        "that has it in hardware (Ampere and newer) and float32 elsewhere"
                        + _default(_TRAINING["precision"]))
    g.add_argument("--deterministic", action="store_true", default=None,
                   help="the same numbers from every run of a command on one GPU (PyTorch's "
                        "deterministic algorithms, a fixed cuBLAS workspace); an operation without "
                        "a deterministic version then stops the run")
    g.add_argument("--select", choices=["last", "val"],
                   help="checkpoint kept: the last epoch, or the best epoch on one held-out "
                        "*training* subject (its dynamics under the residual protocol, its SSIM "
                        "under the published one); never the test subject"
                        + _default(_TRAINING["select"]))
    g.add_argument("--protocol", choices=config.PROTOCOLS,
                   help="what the network learns: 'residual', each voxel's deviation from the "
                        "training subjects' mean volume (within their responses' leading "
                        "components, with a linear readout beside the network; docs/model.md), or "
                        "'published', the volume itself with the authors' loss"
                        + _default(_TRAINING["protocol"]))
    g.add_argument("--eeg-normalisation", choices=config.NORMALISATIONS,
                   help="EEG input scaling: one min-max pair from the training subjects (as "
                        "published), a mean and std per channel and bin from them, or 'run': "
                        "each run standardised with its own (the ridge baseline always is)"
                        " (default: 'run' with --protocol residual, 'minmax' with published)")
    g.add_argument("--split", choices=["loso", "fixed"],
                   help="leave-one-subject-out folds, or one fixed split (--test-subjects)"
                        + _default(_TRAINING["split"]))
    g.add_argument("--test-subjects", nargs="+", metavar="LABEL", help="test subjects of --split fixed")
    g.add_argument("--folds", nargs="+", metavar="LABEL",
                   help="run only these folds (held-out subject labels), e.g. one per SLURM task")
    g.add_argument("--no-final", action="store_true", default=None,
                   help="do not train the final all-subject model")
    g.add_argument("--compare", nargs="+", choices=config.COMPARE,
                   help="also train and evaluate these on every fold: the other network, "
                        "'ridge', a linear model fitted in closed form (penalty and component "
                        "gains by inner cross-validation over the training subjects), or "
                        "'hrf-ridge', the same on the band amplitudes convolved with the "
                        "canonical HRF")
    g.add_argument("--channels", nargs="+", metavar="NAME",
                   help="EEG channels to use when runs have different channel sets")


def _execution_options(g) -> None:
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                   help="intermediate files (default: .OUTPUT_DIR-NAME_work beside OUTPUT_DIR)")
    g.add_argument("--nprocs", "--n-cpus", type=positive_int, metavar="N",
                   help="runs processed in parallel" + _default(config.Execution.nprocs))
    g.add_argument("--omp-nthreads", type=positive_int, metavar="N",
                   help="threads per process for FFTs and PyTorch (default: all cores / nprocs)")
    g.add_argument("--seed", type=seed, help="random seed" + _default(_TRAINING["seed"]))
    g.add_argument("--config-file", type=Path, metavar="TOML",
                   help="a TOML file holding any of these options by their long names")
    g.add_argument("--notrack", action="store_true", default=None,
                   help="accepted for fMRIPrep compatibility; spec2vol never sends anything anywhere")
    g.add_argument("-v", "--verbose", action="count", default=None,
                   help="more messages; -vv also prints the traceback of an internal error")


def parse_args(argv: list[str] | None = None) -> config.Config:
    """The run's :class:`~spec2vol_bids.config.Config` from the command line and its TOML file."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config-file", type=Path)
    known, _ = pre.parse_known_args(argv)
    from_file = _config_defaults(parser, known.config_file) if known.config_file is not None else {}
    parser.set_defaults(**from_file)
    values = vars(parser.parse_args(argv))
    if (values["analysis_level"] == "participant" and from_file.get("model") in config.MODELS
            and not any(a == "--model" or a.startswith("--model=") for a in argv)):
        values["model"] = None  # the group's model, named in a file both levels read
    values.pop("notrack", None)
    values["argv"] = ["spec2vol", *argv]
    return config.build(values)


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
    aliases = {opt[2:].replace("-", "_"): action.dest for action in parser._actions
               for opt in action.option_strings if opt.startswith("--")}
    defaults = {}
    for key, value in table.items():
        dest = aliases.get(key.replace("-", "_"), key.replace("-", "_"))
        if dest not in known or dest in ("bids_dir", "output_dir", "analysis_level"):
            raise UsageError(f"unknown option {key!r} in the configuration file; use the long option "
                             "names of spec2vol --help", path=path)
        try:
            defaults[dest] = _coerce(known[dest], value)
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
