"""A linear baseline: ridge regression from the EEG context to the BOLD deviations.

Inputs are the same ``(context, C, F)`` spectrogram windows the networks see, with every
``band`` frequency bins averaged (a 20 × 32 × 64 context gives 10 240 features). Outputs are the
voxels' standardised deviations (see :mod:`.residual`, which this model is wrapped in), reduced
to their ``components`` leading principal components over the training samples: regressing on a
few response components instead of every voxel keeps the weights small (features × components)
and drops the directions in which the training responses are only noise.

The penalty is chosen by leave-one-subject-out cross-validation over the *training* subjects
(the mean voxel-wise correlation of predicted and measured deviations inside the brain mask,
as the dynamics score); the held-out subject of a fold plays no part in it. The fit is closed
form, in the dual (samples × samples), so it takes seconds where a network takes minutes.

The correlation prefers a heavy penalty, which shrinks every component's prediction by its own
factor; a voxel's series mixes several components, so their relative sizes matter to it. Each
component's prediction is therefore multiplied by a gain, the least-squares factor (≥ 0) from
the same cross-validation's out-of-group predictions to the measured scores. On the README's
demo this lifts the held-out dynamics from 0.357 to 0.376; on a second simulated set it changes
little, 0.356 to 0.357 (docs/model.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import ModelConfig
from .residual import BAND, band_features, leading_components

#: penalties tried by the inner cross-validation, relative to the mean diagonal of X·Xᵀ
PENALTIES = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


@dataclass(kw_only=True)
class RidgeConfig(ModelConfig):
    """Ridge regression on band-averaged spectrogram contexts.

    Attributes
    ----------
    band : int
        Frequency bins averaged into one feature.
    components : int
        Principal components of the training responses regressed on (at most the number of
        training samples).
    """

    name: str = "ridge"
    band: int = BAND
    components: int = 64


class Ridge(nn.Module):
    """``(batch, context, C, F)`` → ``(batch, D, H, W)`` standardised deviations, linearly."""

    def __init__(self, config: RidgeConfig):
        super().__init__()
        self.config = config
        n_features = config.context * config.eeg_channels * (config.freq_bins // config.band)
        voxels = int(np.prod(config.out_shape))
        self.register_buffer("weights", torch.zeros(n_features, config.components))
        self.register_buffer("components", torch.zeros(config.components, voxels))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, context, C, F) → (batch, context · C · F // band): bins averaged by band."""
        return band_features(x, self.config.band)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.features(x.float()) @ self.weights  # (batch, components)
        return (scores @ self.components).reshape(x.shape[0], *self.config.out_shape)

    @torch.no_grad()
    def fit(self, features: np.ndarray, responses: np.ndarray, groups: np.ndarray,
            mask: np.ndarray, basis: np.ndarray | None = None) -> dict:
        """Fit on training samples; choose the penalty by leave-one-group-out CV.

        Parameters
        ----------
        features : ndarray, shape (n, n_features)
            :meth:`features` of the training inputs.
        responses : ndarray, shape (n, voxels in mask)
            The standardised deviations of the voxels inside ``mask``.
        groups : ndarray, shape (n,)
            The subject of each sample (the cross-validation leaves one out at a time).
        mask : ndarray of bool, shape (D, H, W)
            Where the responses are; outside it the model predicts 0.
        basis : ndarray, shape (k, voxels in mask), optional
            The responses' leading components when the caller has them already
            (:func:`.residual.leading_components` of ``responses``); computed here otherwise.

        Returns
        -------
        dict
            ``penalty`` (the chosen one, absolute), ``scores`` (CV score per relative penalty),
            ``components`` (how many were used) and ``gains`` (each component's calibration).
        """
        x = features.astype(np.float64)
        y = responses.astype(np.float64)
        if basis is None:
            basis = leading_components(y, self.config.components)
        basis = np.asarray(basis, dtype=np.float64)
        k = len(basis)
        scores = y @ basis.T  # (n, k)
        gram = x @ x.T
        scale = float(np.trace(gram)) / len(gram)
        out_of_group = {lam: _out_of_group(gram, scores, groups, lam * scale) for lam in PENALTIES}
        cv = {lam: _mean_correlation(p @ basis, y, groups) for lam, p in out_of_group.items()}
        best = max(cv, key=cv.get)
        predicted = out_of_group[best]
        gains = np.maximum((predicted * scores).sum(0), 0) / np.maximum((predicted ** 2).sum(0), 1e-300)
        alpha = np.linalg.solve(gram + best * scale * np.eye(len(gram)), scores)
        weights = np.zeros(self.weights.shape)
        weights[:, :k] = x.T @ alpha * gains
        components = np.zeros(self.components.shape)
        components[:k, mask.ravel()] = basis
        self.weights.copy_(torch.from_numpy(weights))
        self.components.copy_(torch.from_numpy(components))
        return {"penalty": best * scale, "scores": {str(k_): float(v) for k_, v in cv.items()},
                "components": int(k), "gains": gains}


def _out_of_group(gram, scores, groups, penalty: float) -> np.ndarray:
    """Every sample's predicted scores from a fit on the other groups' samples."""
    predicted = np.zeros_like(scores)
    for group in np.unique(groups):
        test = groups == group
        train = ~test
        alpha = np.linalg.solve(gram[np.ix_(train, train)] + penalty * np.eye(int(train.sum())),
                                scores[train])
        predicted[test] = gram[np.ix_(test, train)] @ alpha
    return predicted


def _mean_correlation(predicted: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups of the mean voxel-wise correlation of predicted and true responses."""
    return float(np.mean([_correlation(predicted[groups == g], y[groups == g])
                          for g in np.unique(groups)]))


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return float(np.mean(np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1), 0.0)))
