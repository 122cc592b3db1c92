"""The residual protocol's targets: each voxel's deviation from its run's mean, standardised.

From the *training* runs of a fold only: the mean volume over their samples, each voxel's
temporal SD within runs (pooled), the brain mask of the mean volume and the leading principal
components of the standardised deviations inside it (:class:`~spec2vol_bids.models.residual.
ResidualOutput` keeps a network's output to their span). A training sample's target becomes its
volume with the run's mean replaced by the training mean: the network is asked for the movement
of the signal, never for a subject's anatomy, which the EEG cannot tell.
"""

from __future__ import annotations

from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from spec2vol_bids import evaluate
from spec2vol_bids.data import PairedDataset, Run
from spec2vol_bids.models.residual import leading_components


def target_stats(dataset: PairedDataset, runs: Sequence[Run], components: int, *,
                 responses: bool = False) -> dict:
    """``mean``, ``scale`` (D, H, W), ``mask``, ``basis`` (k, D·H·W) and ``shift`` (runs, D, H, W).

    ``shift[r]`` turns run ``r``'s targets into the residual protocol's (training mean − run
    mean). The deviations of every training sample inside the mask are held in memory once
    (samples × mask voxels, float32) to find the components; with ``responses`` they are
    returned too (``responses``, in units of ``scale``, in the dataset's sample order).
    """
    run_means, deviations, counts = [], [], []
    for r, run in enumerate(runs):
        block = _sample_targets(dataset, r, run)
        run_means.append(block.mean(axis=0))
        deviations.append((block - run_means[-1]).astype(np.float32))
        counts.append(len(block))
    weights = np.asarray(counts, dtype=np.float64) / sum(counts)
    mean = np.tensordot(weights, np.stack(run_means), axes=1)
    scale = np.sqrt(sum(np.square(d, dtype=np.float64).sum(axis=0) for d in deviations) / sum(counts))
    scale = np.where(scale > 0, scale, 1.0)
    mask = evaluate.brain_mask(mean.astype(np.float32), nib.load(runs[0].target).affine)
    z = np.concatenate([d[:, mask] for d in deviations]) / scale[mask].astype(np.float32)
    del deviations
    rows = leading_components(z, components)
    basis = np.zeros((len(rows), mask.size), dtype=np.float32)
    basis[:, mask.ravel()] = rows
    shift = mean[None] - np.stack(run_means)
    stats = {"mean": mean.astype(np.float32), "scale": scale.astype(np.float32), "mask": mask,
             "basis": basis, "shift": shift.astype(np.float32)}
    if responses:
        stats["responses"] = z
    return stats


def shifts_to(mean: np.ndarray, dataset: PairedDataset, runs: Sequence[Run]) -> np.ndarray:
    """``(runs, D, H, W)``: ``mean`` − each run's mean over its samples, what moves the targets of
    runs outside the statistics (the validation subject's) onto the training mean, as
    ``target_stats``' ``shift`` moves the training runs'."""
    moved = [mean - _sample_targets(dataset, r, run).mean(axis=0) for r, run in enumerate(runs)]
    return np.stack(moved).astype(np.float32)


def _sample_targets(dataset: PairedDataset, r: int, run: Run) -> np.ndarray:
    """Run ``r``'s target volumes at its samples, (samples, D, H, W) float64."""
    return np.asarray(np.load(dataset._targets[r], mmap_mode="r")[run.sample_volumes],
                      dtype=np.float64)


class DeviationTargets(torch.utils.data.Dataset):
    """``dataset``'s samples with each run's targets moved by ``shift[run]``."""

    def __init__(self, dataset: PairedDataset, shift: np.ndarray):
        self.dataset = dataset
        self.shift = torch.from_numpy(np.ascontiguousarray(shift))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y + self.shift[self.dataset.sample(i)[0]]

    def sample(self, i: int) -> tuple[int, int]:
        return self.dataset.sample(i)


def masked_mse(scale: torch.Tensor, mask: np.ndarray):
    """The residual protocol's loss: mean squared error inside ``mask`` in units of ``scale``."""
    # on scale's device (the model's), so a training step moves nothing between devices
    weight = torch.as_tensor(mask, dtype=torch.float32, device=scale.device) / scale.float() ** 2
    weight /= float(mask.sum())

    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((pred.float() - target) ** 2 * weight).sum() / len(pred)
    return loss
