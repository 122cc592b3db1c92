"""Peak memory of a training epoch's data loading vs materialising every (20, C, F) input.

An Oddball-sized spectrogram set (17 subjects × 6 runs × 170 windows × 43 channels × 249 bins,
float32, 742 MB on disk) is simulated in a temporary folder. Each measurement runs in a fresh
interpreter and reports its peak resident set (``ru_maxrss``):

* ``lazy``: :class:`spec2vol_bids.data.PairedDataset` over all runs, min–max statistics computed
  by streaming, one shuffled epoch through a DataLoader (batch 16), no model;
* ``materialise``: the inputs of every sample stacked into one (N, 20, C, F) float32 array, as
  the authors' code does. All 17 subjects need 12.6 GB; by default it is measured on subsets of
  subjects (``--materialise-subjects``) and extrapolated linearly to 17 (say ``17`` to measure it).

Usage: ``python benchmarks/bench_data_memory.py [--materialise-subjects 2 4] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SUBJECTS, RUNS, WINDOWS, CHANNELS, BINS = 17, 6, 170, 43, 249
DISCARD, CONTEXT = 6, 20


def simulate(root: Path) -> None:
    rng = np.random.default_rng(0)
    names = [f"E{i + 1}" for i in range(CHANNELS)]
    for s in range(1, SUBJECTS + 1):
        folder = root / f"sub-{s:02d}" / "eeg"
        folder.mkdir(parents=True, exist_ok=True)
        for r in range(1, RUNS + 1):
            stem = folder / f"sub-{s:02d}_task-oddball_run-{r}_desc-spec2vol_spectrogram"
            np.save(stem.with_suffix(".npy"),
                    rng.standard_normal((WINDOWS, CHANNELS, BINS), dtype=np.float32))
            stem.with_suffix(".json").write_text(json.dumps({
                "RepetitionTime": 2.0, "Channels": names, "DiscardVolumes": DISCARD,
                "Context": CONTEXT, "NumberOfWindows": WINDOWS}))


def lazy(root: Path) -> dict:
    import torch

    from spec2vol_bids import data, train

    tic = time.perf_counter()
    runs = data.find_runs(root)
    channels = data.resolve_channels(runs)
    norm = data.norm_stats(runs, channels)
    dataset = data.PairedDataset(runs, channels, norm)
    loader = torch.utils.data.DataLoader(dataset, batch_size=16,
                                         sampler=train.epoch_order(0, 0, len(dataset)))
    checksum, samples = 0.0, 0
    for x in loader:
        checksum += float(x[:, -1, 0, 0].sum())
        samples += len(x)
    return {"samples": samples, "seconds": time.perf_counter() - tic}


def materialise(root: Path, subjects: int) -> dict:
    tic = time.perf_counter()
    files = sorted(root.glob("sub-*/eeg/*.npy"))[: subjects * RUNS]
    per_run = WINDOWS - DISCARD - CONTEXT
    inputs = np.empty((len(files) * per_run, CONTEXT, CHANNELS, BINS), dtype=np.float32)
    k = 0
    for path in files:
        spec = np.load(path)
        for j in range(DISCARD + CONTEXT, WINDOWS):
            inputs[k] = spec[j - CONTEXT:j]
            k += 1
    inputs -= inputs.min()  # the authors' global min-max scaling, in place
    inputs /= inputs.max()
    return {"samples": k, "seconds": time.perf_counter() - tic, "subjects": subjects}


def child(mode: str, root: Path, subjects: int) -> None:
    result = lazy(root) if mode == "lazy" else materialise(root, subjects)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(mode: str, root: Path, subjects: int = SUBJECTS) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(root), str(subjects)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--materialise-subjects", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--keep", type=Path, help="simulate into (or reuse) this folder")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), int(args.child[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        if not any(root.glob("sub-*/eeg/*.npy")):
            simulate(root)
        gb = SUBJECTS * RUNS * WINDOWS * CHANNELS * BINS * 4 / 1e9
        full = SUBJECTS * RUNS * (WINDOWS - DISCARD - CONTEXT) * CONTEXT * CHANNELS * BINS * 4 / 1e9
        print(f"spectrograms: {SUBJECTS}x{RUNS} runs x {WINDOWS} windows x {CHANNELS} ch x {BINS} bins "
              f"= {gb:.2f} GB; materialised inputs would be {full:.1f} GB")
        lazy_result = measure("lazy", root)
        print(f"lazy epoch:   peak RSS {lazy_result['peak_rss_mb']:8.0f} MB "
              f"({lazy_result['samples']} samples, {lazy_result['seconds']:.1f} s)")
        points = []
        for n in args.materialise_subjects:
            r = measure("materialise", root, n)
            points.append((n, r["peak_rss_mb"]))
            print(f"materialise {n:2d} subjects: peak RSS {r['peak_rss_mb']:8.0f} MB "
                  f"({r['samples']} samples, {r['seconds']:.1f} s)")
        if len(points) >= 2 and points[-1][0] != SUBJECTS:
            slope, intercept = np.polyfit(*zip(*points), 1)
            at_full = intercept + slope * SUBJECTS
            print(f"materialise {SUBJECTS} subjects (linear extrapolation): peak RSS {at_full:8.0f} MB")
        else:
            at_full = points[-1][1]
        print(f"ratio materialised / lazy: {at_full / lazy_result['peak_rss_mb']:.1f}x (target >= 15x)")


if __name__ == "__main__":
    main()
