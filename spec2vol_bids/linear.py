"""The linear baselines of a fold (``ridge``, ``hrf-ridge``), fitted in closed form on the
training subjects' samples.

The ridge model (:mod:`spec2vol_bids.models.ridge`) sees the same ``(context, C, F)`` inputs as
the networks, each run standardised with its own EEG statistics, and predicts every voxel's
deviation from its run's mean in units of the voxel's temporal SD; its output adds those
deviations to the training subjects' mean volume (:mod:`spec2vol_bids.models.residual`). The
mean volume, the per-voxel scale, the brain mask and the penalty all come from the training
subjects; the held-out subject of a fold plays no part.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from spec2vol_bids.data import PairedDataset, Run, norm_stats
from spec2vol_bids.deviations import target_stats
from spec2vol_bids.errors import DataError
from spec2vol_bids.models import build_model
from spec2vol_bids.train import HISTORY_COLUMNS, TrainResult

logger = logging.getLogger(__name__)

#: contiguous blocks the inner cross-validation splits a single training run into
BLOCKS = 4

def fit_ridge(runs: Sequence[Run], channels: Sequence[str], *, work_dir: str | Path,
              model_name: str = "ridge", description: str | None = None) -> TrainResult:
    """Fit the linear baseline ``model_name`` (one of ``config.LINEAR_MODELS``) on ``runs`` (every
    training subject of a fold).

    The penalty is chosen by cross-validation over these runs' subjects (see :func:`cv_groups`).

    Raises
    ------
    DataError
        No samples, too few to cross-validate over, or (``hrf-ridge``) runs whose repetition
        times differ.
    """
    tic = time.perf_counter()
    description = description or model_name
    norm = norm_stats(runs, channels, kind="run")
    dataset = PairedDataset(runs, channels, norm, work_dir)
    if len(dataset) == 0:
        raise DataError("no training samples: runs are shorter than discard + context + 1 volumes")
    hrf = {"hrf_tr": repetition_time(runs)} if model_name == "hrf-ridge" else {}
    model = build_model(model_name, eeg_channels=len(channels), freq_bins=dataset.freq_bins(),
                        out_shape=dataset.target_shape(), context=runs[0].context, **hrf)
    stats = target_stats(dataset, runs, model.config.components, responses=True)
    with torch.no_grad():
        features = np.stack([model.net.features(dataset[i][0][None]).numpy()[0]
                             for i in range(len(dataset))])
    run_of = np.repeat(np.arange(len(runs)), [len(run.sample_volumes) for run in runs])
    info = model.net.fit(features, stats["responses"], cv_groups(runs, run_of), stats["mask"],
                         basis=stats["basis"][:, stats["mask"].ravel()])
    model.set_target_stats(stats["mean"], stats["scale"])
    seconds = time.perf_counter() - tic
    logger.info("%s: penalty %.3g chosen by inner cross-validation (scores by penalty relative to "
                "the mean diagonal of X·Xᵀ: %s), %d components (gains %.3g–%.3g), %d samples, %.1f s",
                description, info["penalty"],
                ", ".join(f"{k}: {v:.3f}" for k, v in info["scores"].items()), info["components"],
                info["gains"].min(), info["gains"].max(), len(features), seconds)
    history = [{**dict.fromkeys(HISTORY_COLUMNS, float("nan")), "epoch": 1, "step": 0,
                "seconds": seconds}]
    return TrainResult(model=model.eval(), norm=norm, history=history, selected_epoch=1,
                       out_shape=dataset.target_shape())


def repetition_time(runs: Sequence[Run]) -> float:
    """The one repetition time of ``runs`` (their spectrograms' ``RepetitionTime``), which sets
    the lags of ``hrf-ridge``'s HRF weights."""
    trs = sorted({float(run.meta["RepetitionTime"]) for run in runs})
    if len(trs) > 1:
        raise DataError(f"hrf-ridge needs one repetition time, the training runs have "
                        f"{', '.join(f'{tr:g} s' for tr in trs)}; run the group level on runs of "
                        f"one TR (--participant-label) or leave hrf-ridge out of --compare")
    return trs[0]


def cv_groups(runs: Sequence[Run], run_of: np.ndarray) -> np.ndarray:
    """The inner cross-validation's groups: subjects; runs when there is one subject; with a
    single run, :data:`BLOCKS` contiguous blocks of its samples (never shuffled samples, whose
    neighbours in time would leak through the slow BOLD response)."""
    subjects = np.asarray([runs[r].subject for r in run_of])
    if len(np.unique(subjects)) > 1:
        return subjects
    if len(np.unique(run_of)) > 1:
        return run_of
    if len(run_of) < 2 * BLOCKS:
        raise DataError(f"the ridge baseline's inner cross-validation needs at least {2 * BLOCKS} "
                        f"training samples; this fold has {len(run_of)}")
    return np.arange(len(run_of)) * BLOCKS // len(run_of)
