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

``hrf-ridge`` is the same fit on the regressors of EEG-informed fMRI: each band-averaged feature's
context windows summed with the canonical haemodynamic response's weight at their lag, so the
model maps C · F / band HRF-convolved band amplitudes (512 in the demo) to the components
instead of 20 times as many lagged ones. The BOLD response to the EEG is slow and has nearly the
same shape everywhere; ``ridge`` has to estimate that shape separately for every feature and
component from a few hundred samples, ``hrf-ridge`` is given it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import special
from torch import nn

from .config import ModelConfig
from .residual import BAND, band_features, leading_components

#: penalties tried by the inner cross-validation, relative to the mean diagonal of X·Xᵀ
PENALTIES = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def canonical_hrf(seconds: np.ndarray) -> np.ndarray:
    """SPM's canonical haemodynamic response at ``seconds`` after a neural event: a gamma density
    of shape 6 (peak at 5 s) minus one sixth of a gamma density of shape 16 (the undershoot), both
    of unit scale; 0 at and before the event. The simulator computes its own
    (:mod:`spec2vol_bids.simulate.latent`), so that its ground truth does not rest on this code."""
    t = np.asarray(seconds, dtype=np.float64)
    positive = np.maximum(t, 1e-12)

    def density(shape: float) -> np.ndarray:
        return np.exp((shape - 1) * np.log(positive) - positive - special.gammaln(shape))
    return np.where(t > 0, density(6.0) - density(16.0) / 6.0, 0.0)


def hrf_lag_weights(context: int, tr: float) -> np.ndarray:
    """Unit-norm weights (context,) of the context windows: window ``i`` of a sample ends where
    the next begins, ``context − i`` TRs before the predicted volume (window ``context − 1`` is
    the one just before it, :class:`spec2vol_bids.data.PairedDataset`), and gets the canonical
    HRF at that lag."""
    h = canonical_hrf((context - np.arange(context)) * float(tr))
    return h / np.linalg.norm(h)


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
    hrf_tr : float
        0: every context window's features enter on their own (``ridge``). > 0: the repetition
        time in seconds, and each feature's windows are summed with :func:`hrf_lag_weights`
        (``hrf-ridge``).
    """

    name: str = "ridge"
    band: int = BAND
    components: int = 64
    hrf_tr: float = 0.0


@dataclass(kw_only=True)
class HrfRidgeConfig(RidgeConfig):
    """Ridge regression on HRF-convolved band amplitudes (``hrf_tr``: the runs' TR, required)."""

    name: str = "hrf-ridge"

    def __post_init__(self):
        super().__post_init__()
        if not float(self.hrf_tr) > 0:
            raise ValueError(f"hrf-ridge needs the runs' repetition time: hrf_tr must be positive, "
                             f"got {self.hrf_tr}")


class Ridge(nn.Module):
    """``(batch, context, C, F)`` → ``(batch, D, H, W)`` standardised deviations, linearly."""

    def __init__(self, config: RidgeConfig):
        super().__init__()
        self.config = config
        n_features = config.eeg_channels * (config.freq_bins // config.band)
        # rebuilt from the config, so not stored in the checkpoint
        lags = hrf_lag_weights(config.context, config.hrf_tr) if config.hrf_tr else None
        self.register_buffer("lag_weights", None if lags is None else torch.from_numpy(lags).float(),
                             persistent=False)
        if lags is None:
            n_features *= config.context
        voxels = int(np.prod(config.out_shape))
        self.register_buffer("weights", torch.zeros(n_features, config.components))
        self.register_buffer("components", torch.zeros(config.components, voxels))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, context, C, F) → (batch, context · C · F // band), bins averaged by band; with
        ``hrf_tr``, (batch, C · F // band), the windows summed with their HRF weights."""
        flat = band_features(x, self.config.band)  # (batch, context · C · F // band)
        if self.lag_weights is None:
            return flat
        lagged = flat.view(x.shape[0], x.shape[1], -1)  # (batch, context, C · F // band)
        return torch.einsum("l,blf->bf", self.lag_weights.to(lagged.dtype), lagged)

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
