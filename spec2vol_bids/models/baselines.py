"""The mean-volume baseline: predicts one fixed volume, whatever the EEG.

SSIM between fMRI volumes is dominated by anatomy, so every model is reported next to the
training subjects' mean target (or, as an upper reference, the held-out subject's own mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig


@dataclass(kw_only=True)
class MeanConfig(ModelConfig):
    """The mean model has no hyper-parameters beyond the shapes."""

    name: str = "mean"


class MeanVolume(nn.Module):
    """Predict the stored mean volume (a buffer, saved with the state dict) for every sample.

    Parameters
    ----------
    config : MeanConfig
        The shapes; kept as ``self.config``.
    """

    def __init__(self, config: MeanConfig):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(config.out_shape))

    @torch.no_grad()
    def fit_mean(self, targets: torch.Tensor) -> "MeanVolume":
        """Set the mean from target volumes (n, D, H, W), or from one volume (D, H, W).

        Returns the model, so that ``MeanVolume(config).fit_mean(targets)`` reads well.
        """
        targets = torch.as_tensor(targets)
        if targets.shape[-3:] != self.mean.shape or targets.dim() not in (3, 4):
            raise ValueError(f"targets of shape {tuple(targets.shape)} do not match the "
                             f"output shape {tuple(self.mean.shape)}")
        if targets.dim() == 4:
            targets = targets.double().mean(0)
        self.mean.copy_(targets.to(self.mean.dtype))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, ...) -> (batch, D, H, W), the mean volume repeated."""
        return self.mean.expand(x.shape[0], *self.mean.shape)
