"""E2fNet, the strongest published baseline, in plain PyTorch.

Its authors' code builds the middle of the network with diffusers' ``UNet2DModel`` and calls
it with a constant zero timestep; here that U-Net is written out (no diffusers dependency)
with the same blocks, so the parameter count (19.2 M for 43 channels, 249 bins, D = 32) and
the cost (77 GFLOP per sample) match:

* encoder: Conv2d(20 -> 32, 1x5, stride (1, 2), pad (0, 3)) + BN + ReLU, Conv2d(32 -> 64,
  same) + BN + ReLU, Conv2d(64 -> 128, 3x3) + BN + ReLU, Conv2d(128 -> 256, 3x3), then a
  bicubic resize of (channels, bins') to the output grid. The 3x3 convolutions use padding 1
  (the grid is resized afterwards, so this only affects the borders);
* U-Net (diffusers' defaults for ``block_out_channels=(256, 256)``, ``layers_per_block=1``):
  3x3 conv in, one ResNet block + a stride-2 downsampling, one ResNet block, a middle of
  ResNet + self-attention + ResNet, two up blocks of two ResNet blocks with concatenated
  skips (the first followed by nearest 2x upsampling + conv), GroupNorm + SiLU + 3x3 conv out.
  The sinusoidal embedding of timestep 0 feeds the time MLP and each block's time projection;
* decoder: 3x3 convs 256 -> 128 -> 64 -> 32 with BN + ReLU, 3x3 conv to D, sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


@dataclass(kw_only=True)
class E2fNetConfig(ModelConfig):
    """E2fNet hyper-parameters (defaults: the published model).

    Attributes
    ----------
    encoder_widths : tuple of int
        Output widths of the four encoder convolutions (the last is the U-Net width).
    decoder_widths : tuple of int
        Widths of the decoder's BN + ReLU convolutions.
    norm_groups : int
        GroupNorm groups in the U-Net.
    attention_head_dim : int
        Width of each head of the U-Net's middle self-attention.
    """

    name: str = "e2fnet"
    encoder_widths: tuple[int, ...] = field(default=(32, 64, 128, 256))
    decoder_widths: tuple[int, ...] = field(default=(128, 64, 32))
    norm_groups: int = 32
    attention_head_dim: int = 8

    def __post_init__(self):
        super().__post_init__()
        self.encoder_widths = tuple(int(n) for n in self.encoder_widths)
        self.decoder_widths = tuple(int(n) for n in self.decoder_widths)
        if len(self.encoder_widths) != 4:
            raise ValueError("encoder_widths needs four widths")
        width = self.encoder_widths[-1]
        if width % self.norm_groups or width % self.attention_head_dim or width % 2:
            raise ValueError(f"the U-Net width {width} must be even and a multiple of "
                             f"norm_groups and attention_head_dim")


def _conv_bn_relu(c_in, c_out, kernel, stride=1, padding=0):
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.BatchNorm2d(c_out), nn.ReLU()]


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D: GN-SiLU-conv, + time projection, GN-SiLU-conv, shortcut."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class SelfAttention(nn.Module):
    """diffusers' spatial self-attention: GroupNorm, multi-head attention, residual."""

    def __init__(self, width: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = width // head_dim
        self.group_norm = nn.GroupNorm(groups, width)
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(width, width)
                                                        for _ in range(4))

    def forward(self, x):
        batch, width, height, wid = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (batch, tokens, width)

        def heads(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.to_q(h)), heads(self.to_k(h)),
                                           heads(self.to_v(h)))
        a = self.to_out(a.transpose(1, 2).flatten(2))
        return x + a.transpose(1, 2).view(batch, width, height, wid)


class UNet(nn.Module):
    """The two-level U-Net of E2fNet at one width (diffusers' UNet2DModel layout)."""

    def __init__(self, width: int, groups: int, head_dim: int):
        super().__init__()
        time_dim = 4 * width
        self.width = width
        self.conv_in = nn.Conv2d(width, width, 3, padding=1)
        self.time_linear_1 = nn.Linear(width, time_dim)
        self.time_linear_2 = nn.Linear(time_dim, time_dim)
        self.down0 = ResnetBlock(width, width, time_dim, groups)
        self.downsample = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.down1 = ResnetBlock(width, width, time_dim, groups)
        self.mid0 = ResnetBlock(width, width, time_dim, groups)
        self.mid_attention = SelfAttention(width, head_dim, groups)
        self.mid1 = ResnetBlock(width, width, time_dim, groups)
        self.up0 = nn.ModuleList(ResnetBlock(2 * width, width, time_dim, groups)
                                 for _ in range(2))
        self.upsample = nn.Conv2d(width, width, 3, padding=1)
        self.up1 = nn.ModuleList(ResnetBlock(2 * width, width, time_dim, groups)
                                 for _ in range(2))
        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, width, 3, padding=1)
        # The sinusoidal embedding of timestep 0 (cosines first): ones then zeros.
        half = width // 2
        self.register_buffer("time_zero", torch.cat([torch.ones(half), torch.zeros(half)]),
                             persistent=False)

    def forward(self, x):
        temb = self.time_linear_2(F.silu(self.time_linear_1(self.time_zero)))[None]
        x = self.conv_in(x)
        skips = [x]
        x = self.down0(x, temb)
        skips.append(x)
        x = self.downsample(x)
        skips.append(x)
        x = self.down1(x, temb)
        skips.append(x)
        x = self.mid1(self.mid_attention(self.mid0(x, temb)), temb)
        for block in self.up0:
            x = block(torch.cat([x, skips.pop()], dim=1), temb)
        x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        for block in self.up1:
            x = block(torch.cat([x, skips.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(x)))


class E2fNet(nn.Module):
    """E2fNet; see the module docstring.

    Parameters
    ----------
    config : E2fNetConfig
        The hyper-parameters; kept as ``self.config``.
    """

    def __init__(self, config: E2fNetConfig):
        super().__init__()
        self.config = config
        w1, w2, w3, w4 = config.encoder_widths
        self.encoder = nn.Sequential(
            *_conv_bn_relu(config.context, w1, (1, 5), (1, 2), (0, 3)),
            *_conv_bn_relu(w1, w2, (1, 5), (1, 2), (0, 3)),
            *_conv_bn_relu(w2, w3, 3, padding=1),
            nn.Conv2d(w3, w4, 3, padding=1),
        )
        self.unet = UNet(w4, config.norm_groups, config.attention_head_dim)
        layers, c_in = [], w4
        for c_out in config.decoder_widths:
            layers += _conv_bn_relu(c_in, c_out, 3, padding=1)
            c_in = c_out
        self.decoder = nn.Sequential(*layers, nn.Conv2d(c_in, config.out_shape[0], 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, context, channels, bins) -> (batch, D, H, W), values in (0, 1)."""
        x = self.encoder(x)
        x = F.interpolate(x, size=self.config.out_shape[1:], mode="bicubic", align_corners=False)
        return torch.sigmoid(self.decoder(self.unet(x)))

