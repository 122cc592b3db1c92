"""How much of the simulated BOLD dynamics the participant-level derivatives let any model learn.

Reads a spec2vol OUTPUT_DIR (after the participant level) of a dataset written by
``spec2vol-simulate`` and prints, per held-out subject, the dynamics score (mean voxel-wise Pearson
r inside the EPI mask, as the group level computes it) of

* an *oracle*: each voxel regressed on the true HRF-convolved source regressors of that run
  (in-sample; the ceiling the simulated noise leaves), and
* a *ridge regression* trained on the other subjects from the 20 context windows of the
  spectrogram (bins averaged in groups of 4): a cheap linear reference for the networks.

Usage: ``python benchmarks/learnability.py BIDS_DIR OUTPUT_DIR [--test 05 06] [--lam 1e4]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.masking import compute_epi_mask


def load_run(out: Path, subject: str, discard: int, context: int):
    """Context features (n, 20·C·F/4) and targets (n, voxels) of a subject's single run."""
    spec = np.load(next((out / f"sub-{subject}" / "eeg").glob("*_desc-spec2vol_spectrogram.npy")))
    img = nib.load(next((out / f"sub-{subject}" / "func").glob("*_desc-target_bold.nii.gz")))
    target = img.get_fdata(dtype=np.float32)
    n = min(len(spec), target.shape[-1])
    bands = spec[..., : spec.shape[2] // 4 * 4].reshape(spec.shape[0], spec.shape[1], -1, 4).mean(-1)
    x = np.stack([bands[j - context:j].ravel() for j in range(discard + context, n)])
    y = target[..., discard + context:n].reshape(-1, n - discard - context).T
    mask = compute_epi_mask(nib.Nifti1Image(target[..., discard + context:n].mean(-1), img.affine))
    return x, y, np.asarray(mask.dataobj).ravel() > 0


def dynamics(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    p = pred[:, mask] - pred[:, mask].mean(0)
    t = truth[:, mask] - truth[:, mask].mean(0)
    den = np.sqrt((p ** 2).sum(0) * (t ** 2).sum(0))
    return float(np.where(den > 0, (p * t).sum(0) / np.where(den > 0, den, 1), 0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--test", nargs="+", default=None, help="held-out subjects (default: last two)")
    parser.add_argument("--lam", type=float, default=1e4, help="ridge penalty")
    parser.add_argument("--discard", type=int, default=6)
    parser.add_argument("--context", type=int, default=20)
    args = parser.parse_args()
    subjects = sorted(p.name[4:] for p in args.output_dir.glob("sub-*") if p.is_dir())
    test = args.test or subjects[-2:]
    runs = {s: load_run(args.output_dir, s, args.discard, args.context) for s in subjects}
    train = [s for s in subjects if s not in test]
    x_train = np.concatenate([runs[s][0] for s in train])
    y_train = np.concatenate([runs[s][1] for s in train])
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xn = (x_train - mu) / sd
    y_mean = y_train.mean(0)
    # dual (kernel) form: n_samples << n_features
    alpha = np.linalg.solve(xn @ xn.T + args.lam * np.eye(len(xn)), y_train - y_mean)
    sim = args.bids_dir / "derivatives" / "simulation"
    for s in test:
        x, y, mask = runs[s]
        ridge = ((x - mu) / sd) @ xn.T @ alpha + y_mean
        table = pd.read_csv(next((sim / f"sub-{s}" / "func").glob("*_desc-volumes_timeseries.tsv")),
                            sep="\t")
        reg = table[[c for c in table if c.startswith("regressor")]].to_numpy()
        reg = reg[args.discard + args.context: args.discard + args.context + len(y)]
        design = np.c_[reg - reg.mean(0), np.ones(len(reg))]
        oracle = design @ np.linalg.lstsq(design, y, rcond=None)[0]
        print(f"sub-{s}: trained on {len(train)} subjects; dynamics ridge {dynamics(ridge, y, mask):.3f}, "
              f"oracle {dynamics(oracle, y, mask):.3f}, mean volume 0.000")


if __name__ == "__main__":
    main()
