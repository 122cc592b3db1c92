"""The spectrogram encoder of Spec2VolCAMU-Net (MD-TF-CAE).

Input (batch, context, channels, bins): the ``context`` TR windows are the convolution
channels, the EEG channels and the frequency bins the two spatial axes (so the "temporal"
3x1 kernel runs across neighbouring electrodes, in the stored channel order). Each of the two
blocks halves the frequency axis: 249 bins -> 125 -> 63.

All tensors are kept in channels-last memory: the layer norms and the attention work on the
last (feature) axis and the convolutions take channels-last input, so no layout copies are
made between them. The attention is computed from ``nn.MultiheadAttention``'s parameters with
one input projection and ``scaled_dot_product_attention`` (faster on the CPU than the
module's own forward; same result). The scores run in float32 even under bf16 autocast: the
bf16 attention kernel is slower here and less accurate.

Measured on the 2-core CPU, three separate branch convolutions beat one 3x3 convolution with
the 3x1 and 1x3 kernels embedded (which would do 1.8x the multiply-adds), so the branches stay
separate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(batch, channels, H, W) in channels-last memory."""
    return x.contiguous(memory_format=torch.channels_last)


class ConvAttentionBlock(nn.Module):
    """Multi-directional convolutions, frequency self-attention and a strided downsampling.

    Parameters
    ----------
    width : int
        Feature width N.
    branch_width : int
        Output width of each of the three parallel convolutions.
    heads : int
        Attention heads.
    """

    def __init__(self, width: int, branch_width: int = 32, heads: int = 8):
        super().__init__()
        self.branch_h = nn.Conv2d(width, branch_width, (3, 1), padding=(1, 0))
        self.branch_w = nn.Conv2d(width, branch_width, (1, 3), padding=(0, 1))
        self.branch_hw = nn.Conv2d(width, branch_width, 3, padding=1)
        self.fuse = nn.Conv2d(3 * branch_width, width, 1)
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.down = nn.Conv2d(width, width, (1, 3), stride=(1, 2), padding=(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, N, channels, bins) -> (batch, N, channels, ceil(bins / 2))."""
        branches = torch.cat([self.branch_h(x), self.branch_w(x), self.branch_hw(x)], dim=1)
        y = F.silu(self.fuse(F.silu(branches))) + x
        y = self.norm1(y.permute(0, 2, 3, 1))  # (batch, channels, bins, N)
        # Each (batch, EEG channel) row is one sequence over the frequency bins.
        rows = y.flatten(0, 1)
        y = self.norm2(rows + self._attend(rows)).view(y.shape)
        return self.down(y.permute(0, 3, 1, 2))

    def _attend(self, rows: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention of (sequences, length, N) with the module's weights."""
        attention = self.attention
        heads = attention.num_heads
        qkv = F.linear(rows, attention.in_proj_weight, attention.in_proj_bias)
        q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).float()
        out = F.scaled_dot_product_attention(q, k, v).to(qkv.dtype)
        return attention.out_proj(out.transpose(1, 2).flatten(2))


class SpectrogramEncoder(nn.Module):
    """Projection of the context windows to N features and two conv-attention blocks.

    Parameters
    ----------
    context : int
        Number of TR windows per sample (the input's convolution channels).
    width : int
        Feature width N.
    branch_width : int
        Width of each parallel branch convolution.
    heads : int
        Attention heads.
    blocks : int
        Number of conv-attention blocks (each halves the frequency axis).
    """

    def __init__(self, context: int = 20, width: int = 256, branch_width: int = 32,
                 heads: int = 8, blocks: int = 2):
        super().__init__()
        self.project = nn.Conv2d(context, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            ConvAttentionBlock(width, branch_width, heads) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, context, channels, bins) -> (batch, N, channels, bins'), channels-last."""
        x = F.silu(self.project(channels_last(x)))
        for block in self.blocks:
            x = block(x)
        return x


def encoded_bins(bins: int, blocks: int = 2) -> int:
    """Frequency bins left after ``blocks`` stride-2 downsamplings (249 -> 63)."""
    for _ in range(blocks):
        bins = (bins - 1) // 2 + 1
    return bins
