"""The ``spec2vol-simulate`` command line.

It follows ``spec2vol``'s conventions (:mod:`spec2vol_bids.cli.parser`): a mistake on the
command line is one line on stderr and exit code 64, and ``--version`` names the command. Its
defaults are those of :func:`~.dataset.simulate_dataset`.
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

from spec2vol_bids import __version__
from spec2vol_bids.cli.parser import (ArgumentParser, nonnegative_float, nonnegative_int, positive_float,
                                      positive_int, seed)
from spec2vol_bids.errors import EX_INTERRUPTED, Spec2VolError
from spec2vol_bids.simulate.dataset import simulate_dataset
from spec2vol_bids.simulate.eeg_writers import EEG_DTYPES, EEG_FORMATS, GENERATOR, VOLUME_MARKERS
from spec2vol_bids.simulate.latent import COUPLINGS, HRF_DELAYS, MAX_SOURCES
from spec2vol_bids.simulate.options import EEG_OFFSET

_DEFAULTS = {name: p.default for name, p in inspect.signature(simulate_dataset).parameters.items()
             if p.kind is p.KEYWORD_ONLY}


def _default(name: str) -> str:
    """`` (default …)`` for an option's help, as the command line would spell the value."""
    value = _DEFAULTS[name]
    if isinstance(value, tuple):
        value = " ".join(map(str, value))
    elif isinstance(value, float):
        value = f"{value:g}"
    return f" (default {value})"


def _option(parser, flag: str, kind, text: str, **kwargs) -> None:
    """An option whose default is :func:`simulate_dataset`'s, shown at the end of its help."""
    name = flag[2:].replace("-", "_")
    parser.add_argument(flag, type=kind, default=_DEFAULTS[name], help=text + _default(name), **kwargs)


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=GENERATOR,
        description="Write a simulated simultaneous EEG-fMRI BIDS dataset whose EEG predicts its BOLD "
                    "signal, with the ground truth under derivatives/simulation/.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="the dataset folder to create")
    _option(p, "--subjects", positive_int, "number of subjects")
    _option(p, "--sessions", nonnegative_int, "sessions per subject; 0: no ses- level")
    _option(p, "--runs", positive_int, "runs per session")
    _option(p, "--task", str, "task label")
    _option(p, "--volumes", positive_int, "BOLD volumes per run")
    _option(p, "--tr", positive_float, "repetition time in s")
    _option(p, "--sfreq", positive_float, "EEG sampling rate in Hz")
    _option(p, "--channels", positive_int, "EEG channels, plus one ECG")
    _option(p, "--grid", int, "BOLD grid", nargs=3, metavar=("X", "Y", "Z"))
    _option(p, "--eeg-format", str, "EEG file format", choices=list(EEG_FORMATS))
    _option(p, "--volume-marker", str, "volume marker in the EEG: R128 (BrainAmp), 'Scan Start' (NODDI) or none",
            choices=VOLUME_MARKERS)
    _option(p, "--eeg-only-subjects", nonnegative_int, "subjects with EEG but no BOLD")
    _option(p, "--bold-only-subjects", nonnegative_int, "subjects with BOLD but no EEG")
    _option(p, "--sources", positive_int, f"latent sources, 1 to {MAX_SOURCES}")
    p.add_argument("--eeg-offset", type=nonnegative_float, default=_DEFAULTS["eeg_offset"],
                   help=f"seconds of EEG before the first volume (default {EEG_OFFSET:g}, or 0 with "
                        "--volume-marker none)")
    _option(p, "--eeg-dtype", str, "BrainVision sample format; int16 stores 0.1 µV steps", choices=EEG_DTYPES)
    _option(p, "--coupling", str, "how a source's EEG amplitude drives its BOLD: linear, or u-shaped "
            "(|log amplitude - its mean|; a positive control for nonlinear models)", choices=list(COUPLINGS))
    _option(p, "--hrf-delay", float, f"seconds the BOLD response comes after SPM's canonical HRF, "
            f"{HRF_DELAYS[0]:g} to {HRF_DELAYS[1]:g} (its peak at 5 s + this)", metavar="SECONDS")
    p.add_argument("--seed", type=seed, default=_DEFAULTS["seed"],
                   help="random seed; the same seed gives identical files")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds a dataset written by this command")
    p.add_argument("--version", action="version", version=f"{GENERATOR} {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``spec2vol-simulate``.

    Parameters
    ----------
    argv : list of str | None
        The arguments; ``None``: ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit code: 0, 64 for a usage error, 73 or 74 when the dataset cannot be written,
        130 when interrupted.
    """
    try:
        args = _parser().parse_args(argv)
        start = time.perf_counter()
        opts = {k: v for k, v in vars(args).items() if k not in ("out_dir", "overwrite")}
        out = simulate_dataset(args.out_dir, overwrite=args.overwrite, progress=print, **opts)
    except Spec2VolError as exc:
        print(f"{GENERATOR}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{GENERATOR}: interrupted; nothing was written", file=sys.stderr)
        return EX_INTERRUPTED
    print(f"Simulated dataset written to {out.resolve()} in {time.perf_counter() - start:.1f} s "
          f"(ground truth in {out.resolve() / 'derivatives' / 'simulation'})")
    return 0
