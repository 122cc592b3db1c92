"""Metrics of synthesised volumes (SSIM, PSNR, 3-D SSIM, dynamics) and the group tables.

SSIM of whole volumes is dominated by anatomy: a model that always predicts the mean volume
scores well on it. The *dynamics* score — voxel-wise Pearson correlation of the synthesised and
measured time series inside the brain, after removing each voxel's mean — is what anatomy
cannot fake, and the mean-volume baseline scores 0 on it by construction.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from nilearn.masking import compute_epi_mask
from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                           structural_similarity_index_measure)

from spec2vol_bids.derivatives import atomic_path, write_json

logger = logging.getLogger(__name__)

METRICS = ("ssim", "psnr", "ssim3d", "dynamics")
COLUMNS = {
    "participant_id": {"Description": "The held-out participant."},
    "model": {"Description": "The model that synthesised the volumes: the trained network's "
                             "registry name, 'ridge' and 'hrf-ridge' for the linear baselines "
                             "(lagged band amplitudes; band amplitudes convolved with the "
                             "canonical HRF), 'mean' for the "
                             "mean-volume baseline (the training subjects' mean target volume, "
                             "predicted for every sample) or, on a dataset simulated by "
                             "spec2vol-simulate, 'oracle': the ceiling its ground truth leaves "
                             "(each voxel fitted in sample on the true source regressors; uses "
                             "the held-out subject's BOLD, so it is not a model)."},
    "fold": {"Description": "The cross-validation fold (the held-out participant's label in "
                            "leave-one-subject-out, 'fixed' for a fixed split)."},
    "ssim": {"Description": "Structural similarity of synthesised and measured volumes "
                            "(torchmetrics, 2-D Gaussian window 11, sigma 1.5, slices as channels, "
                            "data range 1), averaged over the participant's samples.",
             "Units": "arbitrary"},
    "psnr": {"Description": "Peak signal-to-noise ratio (data range 1) per volume, averaged over "
                            "the participant's samples.", "Units": "dB"},
    "ssim3d": {"Description": "Structural similarity of torchmetrics (1.9) with a 3-D Gaussian "
                              "window of sigma 1.5, which it makes 11 voxels wide on every axis "
                              "whatever the kernel size given (that, the largest odd number up to "
                              "11 the slice count allows, only sets one axis's reflect padding), "
                              "and its own border handling; data range 1, averaged over the "
                              "participant's samples.", "Units": "arbitrary"},
    "dynamics": {"Description": "Voxel-wise Pearson correlation of the synthesised and measured "
                                "time series after removing each voxel's mean (0 where either is "
                                "constant), averaged over the voxels of a brain mask computed from "
                                "the measured mean volume (nilearn compute_epi_mask), then over "
                                "runs.", "Units": "arbitrary"},
    "n_samples": {"Description": "Number of synthesised volumes the metrics average over."},
}


def _kernel(size: int, limit: int) -> int:
    """The largest odd kernel size ≤ ``size`` that fits ``limit``. With a Gaussian window
    torchmetrics uses it only for the depth padding (its window is 11 wide whatever it is)."""
    k = min(size, limit)
    return k if k % 2 else k - 1


def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample SSIM, PSNR and 3-D SSIM of ``(B, D, H, W)`` volumes in ``[0, 1]``."""
    pred, target = pred.float(), target.float()
    ssim = structural_similarity_index_measure(pred, target, data_range=1.0, kernel_size=11,
                                               sigma=1.5, reduction="none")
    psnr = peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3), reduction="none")
    k3 = _kernel(11, min(pred.shape[1:]))
    ssim3d = structural_similarity_index_measure(pred[:, None], target[:, None], data_range=1.0,
                                                 kernel_size=k3, sigma=1.5, reduction="none")
    return {"ssim": ssim.numpy(), "psnr": psnr.reshape(-1).numpy(), "ssim3d": ssim3d.numpy()}


def dynamics_map(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Voxel-wise Pearson r over time of two ``(N, ...)`` series; 0 where either is constant."""
    pred, target = pred.astype(np.float64), target.astype(np.float64)
    p, t = pred - pred.mean(axis=0), target - target.mean(axis=0)
    pp, tt = (p * p).sum(axis=0), (t * t).sum(axis=0)
    # a series whose variance is at rounding level of its values counts as constant
    ok = (pp > 1e-12 * (pred * pred).sum(axis=0)) & (tt > 1e-12 * (target * target).sum(axis=0))
    out = np.zeros(pp.shape)
    out[ok] = (p * t).sum(axis=0)[ok] / np.sqrt(pp[ok] * tt[ok])
    return out.astype(np.float32)


def brain_mask(mean_volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Brain mask ``(D, H, W)`` of a measured mean volume given in model order ``(D, H, W)``."""
    img = nib.Nifti1Image(np.ascontiguousarray(mean_volume.transpose(1, 2, 0)), affine)
    mask = np.asarray(compute_epi_mask(img).dataobj).astype(bool)
    return mask.transpose(2, 0, 1)


def evaluate_run(pred: np.ndarray, target: np.ndarray, affine: np.ndarray,
                 batch_size: int = 32, mask: np.ndarray | None = None) -> dict:
    """All metrics of one run's synthesised ``(N, D, H, W)`` volumes against the measured ones.

    ``mask`` (``(D, H, W)``, e.g. fMRIPrep's brain mask on the target grid) replaces the mask
    computed from the measured mean volume.

    Returns
    -------
    result : dict
        ``ssim``, ``psnr``, ``ssim3d`` (per-sample arrays), ``dynamics`` (mean r inside the
        mask), ``dynamics_map`` (``(D, H, W)`` r, 0 outside the mask) and ``mask``.
    """
    parts = {name: [] for name in ("ssim", "psnr", "ssim3d")}
    for start in range(0, len(pred), batch_size):
        stop = start + batch_size
        values = image_metrics(torch.from_numpy(np.array(pred[start:stop], dtype=np.float32)),
                               torch.from_numpy(np.array(target[start:stop], dtype=np.float32)))
        for name, value in values.items():
            parts[name].append(value)
    result = {name: np.concatenate(value) for name, value in parts.items()}
    mask = brain_mask(target.mean(axis=0), affine) if mask is None else np.asarray(mask, bool)
    rmap = dynamics_map(pred, target)
    rmap[~mask] = 0.0
    result.update(dynamics=float(rmap[mask].mean()) if mask.any() else 0.0, dynamics_map=rmap,
                  mask=mask)
    return result


def subject_row(participant: str, model: str, fold: str, run_results: Sequence[dict]) -> dict:
    """One ``group_metrics.tsv`` row from a subject's per-run results."""
    row = {"participant_id": f"sub-{participant}", "model": model, "fold": fold}
    for name in ("ssim", "psnr", "ssim3d"):
        row[name] = float(np.concatenate([r[name] for r in run_results]).mean())
    row["dynamics"] = float(np.mean([r["dynamics"] for r in run_results]))
    row["n_samples"] = int(sum(len(r["ssim"]) for r in run_results))
    return row


def write_table(rows: Iterable[dict], path: str | Path, sidecar: dict | None = None) -> pd.DataFrame:
    """Write metric rows as a BIDS TSV (sorted by participant and model) with its JSON sidecar.

    The sidecar describes every column; ``sidecar`` adds keys to it (e.g. a summary).
    """
    path = Path(path)
    table = pd.DataFrame(list(rows), columns=list(COLUMNS))
    table = table.sort_values(["participant_id", "model"], kind="stable").reset_index(drop=True)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.6f")
    write_json(path.with_suffix(".json"), {**COLUMNS, **(sidecar or {})})
    return table


def read_table(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype={"participant_id": str, "model": str, "fold": str})


def summarise(table: pd.DataFrame) -> dict:
    """Mean and standard deviation (over subjects, ddof 0) of every metric, per model.

    Returns ``{model: {"n_subjects": n, metric: {"mean": m, "std": s}, ...}}``.
    """
    summary = {}
    for model, part in table.groupby("model", sort=True):
        summary[model] = {"n_subjects": int(len(part))}
        for name in METRICS:
            values = part[name].to_numpy(dtype=float)
            summary[model][name] = {"mean": float(values.mean()), "std": float(values.std())}
    return summary


def summary_lines(summary: dict) -> list[str]:
    """Human-readable ``mean ± std`` lines, one per model."""
    return [f"{model:>10}: " + ", ".join(f"{name} {s[name]['mean']:.3f} ± {s[name]['std']:.3f}"
                                         for name in METRICS) + f" (n={s['n_subjects']})"
            for model, s in summary.items()]
