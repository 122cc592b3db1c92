"""Spec2VolCAMU-Net: spectrogram encoder + VM-UNet decoder.

(batch, context, channels, bins) -> encoder -> (batch, N, channels, bins') with
bins' = 63 for 249 bins -> fitted to the (H, W) grid -> VM-UNet -> (batch, D, H, W).

Fitting the encoded map to the grid (one rule for both axes): an axis shorter than the grid
is zero-padded at its end, as the authors do (43 channels x 63 bins -> 64 x 64); an axis
longer than the grid (more than H EEG channels, or more than about 4·W input bins) is first
reduced to the grid size by adaptive average pooling over neighbouring channels (bins),
then nothing needs padding. With the published 64 x 64 grid this keeps every montage of up
to 64 channels and 249 bins exactly as published.

H and W must be multiples of ``patch * 2**(stages - 1)`` (32 for the published decoder).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .encoder import SpectrogramEncoder
from .vmunet import VMUNet


@dataclass(kw_only=True)
class Spec2VolConfig(ModelConfig):
    """Spec2VolCAMU-Net hyper-parameters (defaults: the published model).

    Attributes
    ----------
    width : int
        Encoder width N (also VM-UNet's input channels).
    branch_width : int
        Width of each of the three parallel branch convolutions.
    heads : int
        Frequency self-attention heads.
    encoder_blocks : int
        Conv-attention blocks (each halves the bins).
    dims, depths, decoder_depths : tuple of int
        VM-UNet stage widths, encoder and decoder VSS blocks per stage.
    patch : int
        VM-UNet patch size.
    d_state : int
        Selective-scan states per channel.
    expand : int
        SS2D inner width factor.
    drop_path : float
        Largest stochastic-depth rate.
    """

    name: str = "spec2vol"
    width: int = 256
    branch_width: int = 32
    heads: int = 8
    encoder_blocks: int = 2
    dims: tuple[int, ...] = field(default=(96, 192, 384, 768))
    depths: tuple[int, ...] = field(default=(2, 2, 9, 2))
    decoder_depths: tuple[int, ...] = field(default=(2, 9, 2, 2))
    patch: int = 4
    d_state: int = 16
    expand: int = 2
    drop_path: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        self.dims, self.depths, self.decoder_depths = (
            tuple(int(n) for n in v) for v in (self.dims, self.depths, self.decoder_depths))
        if not len(self.dims) == len(self.depths) == len(self.decoder_depths):
            raise ValueError("dims, depths and decoder_depths need one entry per stage")
        multiple = self.patch * 2 ** (len(self.dims) - 1)
        _, height, width = self.out_shape
        if height % multiple or width % multiple:
            raise ValueError(f"the output grid {height}x{width} must be a multiple of "
                             f"{multiple} in H and W for this decoder")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


class Spec2Vol(nn.Module):
    """Spec2VolCAMU-Net; see the module docstring.

    Parameters
    ----------
    config : Spec2VolConfig
        The hyper-parameters; kept as ``self.config``.
    """

    def __init__(self, config: Spec2VolConfig):
        super().__init__()
        self.config = config
        self.encoder = SpectrogramEncoder(config.context, config.width, config.branch_width,
                                          config.heads, config.encoder_blocks)
        self.decoder = VMUNet(config.width, config.out_shape[0], config.dims, config.depths,
                              config.decoder_depths, config.patch, config.d_state,
                              config.expand, config.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, context, channels, bins) -> (batch, D, H, W)."""
        return self.decoder(fit_to_grid(self.encoder(x), self.config.out_shape[1:]))


def fit_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pool axes longer than ``grid`` down to it, zero-pad shorter ones at their end."""
    height, width = grid
    if x.shape[-2] > height or x.shape[-1] > width:
        x = F.adaptive_avg_pool2d(x, (min(x.shape[-2], height), min(x.shape[-1], width)))
    return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))

