"""Why the published protocol learns the anatomy and not the EEG-driven dynamics: ablations.

Variants of the EEG input scaling on a dataset spec2vol simulates, run through the product's own
options (one ``spec2vol group`` per variant on copies of one participant-level output), each
printed next to the mean volume and the ridge baseline (``--compare ridge``, fitted in closed form
with its penalty from an inner cross-validation over the training subjects):

* ``minmax``: the published scaling, one min-max pair from the training subjects;
* ``standard``: a mean and SD per channel and bin from the training subjects;
* ``run``: every run standardised with its own statistics (what the ridge baseline uses).

Every variant trains with ``--protocol published`` (the loss 0.5·(1 − SSIM) + 0.5·MSE on the
volume), the schedule of ``--config-file examples/cpu-demo.toml`` and the command line; the
residual protocol's own ablations are ``benchmarks/ablate_residual.py``.

Usage::

    python benchmarks/ablate_learning.py WORK [--subjects 6 --volumes 200 --channels 32 --seed 0]
        [--variants minmax standard run] [--folds 01 02] [--epochs 6] [--model spec2vol]

Prints one line per variant and model: dynamics and SSIM (mean ± std over the held-out subjects)
and the wall time of its group run; CPU flags first.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

VARIANTS = {
    "minmax": ["--eeg-normalisation", "minmax"],
    "standard": ["--eeg-normalisation", "standard"],
    "run": ["--eeg-normalisation", "run"],
}


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "unknown CPU"
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    return "CPU flags: " + " ".join(f"{f}={'yes' if f' {f}' in flags + ' ' else 'no'}" for f in wanted)


def spec2vol(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "spec2vol_bids", *map(str, args)], text=True,
                          capture_output=True)
    if proc.returncode:
        raise SystemExit(f"spec2vol {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--volumes", type=int, default=200)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--tr", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0, help="simulation seed")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--folds", nargs="+", default=None, help="held-out subjects (default: all)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--model", default="spec2vol", choices=["spec2vol", "e2fnet"])
    args = parser.parse_args()
    print(cpu_flags())
    bids, base = args.work / "bids", args.work / "participant"
    if not (base / "dataset_description.json").exists():
        spec2vol_simulate = [sys.executable, "-m", "spec2vol_bids.simulate", str(bids), "--overwrite",
                             "--subjects", str(args.subjects), "--volumes", str(args.volumes),
                             "--channels", str(args.channels), "--grid", "32", "32", "16",
                             "--tr", str(args.tr), "--seed", str(args.seed)]
        subprocess.run(spec2vol_simulate, check=True, capture_output=True)
        spec2vol(bids, base, "participant", "--config-file", "examples/cpu-demo.toml",
                 "--skip-bids-validation")
    extra = ["--folds", *args.folds] if args.folds else []
    if args.epochs:
        extra += ["--epochs", args.epochs, "--restart-epochs", args.epochs]
    for name in args.variants:
        out = args.work / f"group-{name}-{args.model}-{args.train_seed}"
        subprocess.run(["rm", "-rf", str(out), str(out) + "_work"], check=True)
        subprocess.run(["cp", "-r", str(base), str(out)], check=True)
        tic = time.perf_counter()
        spec2vol(bids, out, "group", "--config-file", "examples/cpu-demo.toml", "--no-final",
                 "--model", args.model, "--compare", "ridge", "--seed", args.train_seed,
                 "--protocol", "published",
                 "-w", str(out) + "_work", *VARIANTS[name], *extra)
        seconds = time.perf_counter() - tic
        tables = [pd.read_csv(p, sep="\t") for p in sorted(out.glob("models/fold-*/metrics.tsv"))]
        table = pd.concat(tables)
        for model, rows in table.groupby("model"):
            print(f"{name:20s} {model:9s} dynamics {rows.dynamics.mean():6.3f} ± "
                  f"{rows.dynamics.std(ddof=0):.3f}  SSIM {rows.ssim.mean():.3f} ± "
                  f"{rows.ssim.std(ddof=0):.3f}  ({len(rows)} subjects, group run {seconds:.0f} s)")


if __name__ == "__main__":
    main()
