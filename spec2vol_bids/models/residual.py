"""The residual output: a network predicts each voxel's deviation from the mean volume.

SSIM and PSNR of fMRI volumes are dominated by anatomy, and the EEG says nothing about a
subject's anatomy; what it can predict is how each voxel's signal moves in time. A network
wrapped here predicts that movement in standardised units, ``r``, and the volume it outputs is

    y = mean + scale * r

with ``mean`` the training subjects' mean target volume and ``scale`` each voxel's temporal
standard deviation in their runs (both buffers, stored with the weights). An untrained network
whose last layer starts at zero therefore outputs the mean volume, the baseline every model is
compared with, and training moves it only where the EEG predicts the signal.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualOutput(nn.Module):
    """``mean + scale * net(x)``; ``net`` keeps its own configuration (``self.config``).

    Parameters
    ----------
    net : nn.Module
        Maps (batch, context, C, F) to (batch, D, H, W) standardised deviations.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.config = net.config
        shape = tuple(net.config.out_shape)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))

    @torch.no_grad()
    def set_target_stats(self, mean, scale) -> "ResidualOutput":
        """Store the training subjects' mean volume and per-voxel temporal scale (D, H, W)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, D, H, W): the mean volume moved by scale-weighted predicted deviations
        return self.mean + self.scale * self.net(x).float()
