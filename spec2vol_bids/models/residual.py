"""The residual output: a network predicts each voxel's deviation from the mean volume.

SSIM and PSNR of fMRI volumes are dominated by anatomy, and the EEG says nothing about a
subject's anatomy; what it can predict is how each voxel's signal moves in time. A network
wrapped here predicts that movement in standardised units, ``r``, and the volume it outputs is

    y = mean + scale * r

with ``mean`` the training subjects' mean target volume and ``scale`` each voxel's temporal
standard deviation in their runs (both buffers, stored with the weights).

With ``components`` = k > 0 (the residual protocol of the networks), ``r`` is kept to the span
of the training responses' k leading principal components (``basis``, zero outside the brain
mask), and a linear readout of the band-averaged input adds its own component scores:

    r = (P(net(x)) + readout(band_features(x))) · basis,   P: projection onto the basis rows

A few hundred training samples hold far more voxels than independent responses; without the
projection a network fits the voxels' noise, and without the readout it has to discover the
input-to-component mapping through a decoder built for images (docs/model.md, "What the
networks learn", has the ablation). Both start at zero: before training the model outputs
the mean volume, the baseline every model is compared with.

The readout (:class:`KernelReadout`, ``kernels`` > 0) learns a few lag profiles over the context
windows, shared by every channel, band and component: the BOLD response to the EEG is slow and
has nearly the same shape everywhere, and a weight per window, band and component (``kernels``
= 0, the readout of earlier versions) has to estimate that shape hundreds of times over from a
few hundred samples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: frequency bins averaged into one feature of the linear readout (and of the ridge baseline)
BAND = 4


def band_features(x: torch.Tensor, band: int = BAND) -> torch.Tensor:
    """(batch, context, C, F) → (batch, context · C · F // band): bins averaged by ``band``."""
    kept = x[..., : x.shape[-1] // band * band]
    return kept.reshape(*x.shape[:-1], -1, band).mean(-1).flatten(1)


def leading_components(responses: np.ndarray, components: int) -> np.ndarray:
    """Orthonormal rows (k, voxels) spanning the ``components`` leading principal directions of
    ``responses`` (samples, voxels), from their Gram matrix (samples², not voxels²); directions
    without variance (beyond the responses' rank) are left out, so k may be smaller."""
    y = responses.astype(np.float64)
    values, vectors = np.linalg.eigh(y @ y.T)
    order = np.argsort(values)[::-1]
    top = order[:int(min(components, np.sum(values > values.max() * 1e-10)))]
    return (vectors[:, top].T @ y) / np.sqrt(np.maximum(values[top], 1e-12))[:, None]


class KernelReadout(nn.Module):
    """A linear readout whose weight on each context window is shared: ``kernels`` learned lag
    profiles (R, context), each with its own map from the band features to the components.

    ``nn.Linear`` on the flattened context gives every window, channel and band its own weight
    per component, so it must estimate the haemodynamic delay separately for each of them;
    here R profiles are estimated once from all of them (R = 1 is a learned HRF, R = 2 adds a
    shape that can shift it in time). The profiles start as orthonormal polynomials in the lag
    (constant, linear, ...), the maps at zero, so the readout starts at zero."""

    def __init__(self, context: int, features: int, components: int, kernels: int):
        super().__init__()
        kernels = min(kernels, context)  # a context of one window has one profile to learn
        lag = np.linspace(-1.0, 1.0, context)
        start = np.linalg.qr(np.vander(lag, kernels, increasing=True))[0].T  # (R, context)
        self.kernels = nn.Parameter(torch.from_numpy(start * np.sign(start[:, -1:])).float())
        self.maps = nn.Linear(kernels * features, components, bias=False)
        nn.init.zeros_(self.maps.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, context · C · F // band) from :func:`band_features` → (batch, components)."""
        windows = features.view(len(features), self.kernels.shape[1], -1)  # (batch, context, C·F/band)
        pooled = torch.einsum("rl,blf->brf", self.kernels, windows)  # (batch, R, C·F/band)
        return self.maps(pooled.flatten(1))


class ResidualOutput(nn.Module):
    """``mean + scale * r``, ``r`` from ``net`` (see the module docstring).

    Parameters
    ----------
    net : nn.Module
        Maps (batch, context, C, F) to (batch, D, H, W) standardised deviations; keeps its own
        configuration (``self.config``).
    components : int
        0: ``r = net(x)``; k > 0: the projection and linear readout above.
    """

    def __init__(self, net: nn.Module, components: int = 0, kernels: int = 0):
        super().__init__()
        self.net = net
        self.config = net.config
        shape = tuple(net.config.out_shape)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))
        self.readout = None
        if components:
            config = net.config
            features = config.context * config.eeg_channels * (config.freq_bins // BAND)
            self.register_buffer("basis", torch.zeros(components, int(np.prod(shape))))
            if kernels:
                self.readout = KernelReadout(config.context, features // config.context,
                                             components, kernels)
            else:
                self.readout = nn.Linear(features, components, bias=False)
                nn.init.zeros_(self.readout.weight)

    @torch.no_grad()
    def set_target_stats(self, mean, scale, basis=None) -> "ResidualOutput":
        """Store the training subjects' mean volume and per-voxel temporal scale (D, H, W), and
        with ``components`` > 0 their responses' leading components (k, D·H·W), orthonormal rows
        that are zero outside the brain mask (fewer rows than k: the rest stay zero)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
        if basis is not None:
            basis = torch.as_tensor(basis, dtype=self.basis.dtype)
            self.basis.zero_()
            self.basis[: len(basis)] = basis
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.net(x).float()  # (batch, D, H, W)
        if self.readout is not None:
            scores = r.flatten(1) @ self.basis.T + self.readout(band_features(x.float()))
            r = (scores @ self.basis).view(r.shape)  # (batch, k) -> (batch, D, H, W)
        return self.mean + self.scale * r
