"""The oracle ceiling of a simulated dataset: what the simulation's own ground truth explains.

``spec2vol-simulate`` writes, under ``BIDS_DIR/derivatives/simulation``, every run's true
source regressors (the HRF-convolved source amplitudes, one row per volume). Regressing each
voxel of a held-out run's target on them, in sample, gives the dynamics score the simulated
noise leaves reachable: no model of the EEG can expect more. It uses the held-out subject's own
BOLD, so it is a ceiling to read the models against, never a model; on real data there is none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spec2vol_bids.data import Run

ORACLE = "oracle"
#: the simulation's per-run ground truth, in spec2vol-simulate's derivative dataset
TRUTH_SUFFIX = "_desc-volumes_timeseries.tsv"


def truth_regressors(bids_dir: Path | None, run: Run) -> np.ndarray | None:
    """The true source regressors at the run's sample volumes ``(n, sources)``, or ``None``
    when the dataset carries no simulation ground truth for the run."""
    if bids_dir is None:
        return None
    root = Path(bids_dir) / "derivatives" / "simulation" / f"sub-{run.subject}"
    found = sorted(root.glob(f"**/func/{run.name}{TRUTH_SUFFIX}")) if root.is_dir() else []
    if not found:
        return None
    table = pd.read_csv(found[0], sep="\t")
    regressors = table[[c for c in table if c.startswith("regressor_")]].to_numpy(dtype=np.float64)
    if not regressors.shape[1] or len(regressors) <= run.sample_volumes[-1]:
        return None  # not the run the target was made from
    return regressors[run.sample_volumes]


def oracle_prediction(regressors: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Each voxel of ``target`` ``(n, D, H, W)`` fitted by least squares on the regressors and
    an intercept, in sample."""
    design = np.c_[regressors - regressors.mean(axis=0), np.ones(len(regressors))]
    flat = target.reshape(len(target), -1).astype(np.float64)
    fitted = design @ np.linalg.lstsq(design, flat, rcond=None)[0]
    return fitted.reshape(target.shape).astype(np.float32)
