"""VM-UNet, the Vision-Mamba U-Net decoder of Spec2VolCAMU-Net.

The wiring follows the VM-UNet authors' code (needed for the published parameter count):
a 4x4 patch embedding, four encoder stages of VSS blocks with patch merging after the first
three, and four decoder stages -- the first on the bottleneck, the others adding the matching
encoder stage's *input* and expanding 2x before their blocks -- then a final 4x expansion and
a 1x1 convolution. Tokens are kept as (batch, H, W, features) throughout.

A VSS block is ``x + DropPath(SS2D(LayerNorm(x)))``; SS2D runs the selective scan along four
paths over the token grid (row-major, column-major and both reversed) and sums them back on
the grid. The scan backend is chosen by :func:`.selective_scan.selective_scan`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .selective_scan import selective_scan


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class SS2D(nn.Module):
    """2-D selective scan over four paths of a token grid.

    Parameters
    ----------
    dim : int
        Token width d.
    d_state : int
        States per channel of the selective scan.
    expand : int
        Inner width factor e (inner width e * d).
    """

    paths = 4

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2):
        super().__init__()
        inner = expand * dim
        self.d_state = d_state
        self.dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv2d = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        k, rank = self.paths, self.dt_rank
        # One projection per path, stored stacked (the authors' layout and parameter names).
        bound = inner ** -0.5  # nn.Linear's default initialisation
        self.x_proj_weight = nn.Parameter(torch.empty(k, rank + 2 * d_state, inner)
                                          .uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, inner, rank)
                                            .uniform_(-rank ** -0.5, rank ** -0.5))
        # dt log-uniform in [1e-3, 0.1]; the bias is its inverse softplus so that
        # softplus(bias) starts there.
        dt = torch.exp(torch.rand(k, inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel of every path.
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                   .repeat(k * inner, 1))
        self.Ds = nn.Parameter(torch.ones(k * inner))
        self.out_norm = nn.LayerNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, H, W, d) -> (batch, H, W, d)."""
        batch, height, width, _ = x.shape
        length = height * width
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))  # (batch, inner, H, W)
        inner = x.shape[1]
        rows = x.reshape(batch, inner, length)
        cols = x.transpose(2, 3).reshape(batch, inner, length)
        paths = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)  # (b, 4, e·d, L)
        proj = torch.einsum("bkdl,kcd->bkcl", paths, self.x_proj_weight)
        dts, Bs, Cs = proj.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        y = selective_scan(
            paths.reshape(batch, -1, length), dts.reshape(batch, -1, length),
            -torch.exp(self.A_logs.float()), Bs, Cs, self.Ds.float(),
            delta_bias=self.dt_projs_bias.float().view(-1), delta_softplus=True,
        ).view(batch, self.paths, inner, length)
        # Undo the reversals and the transposition, and sum the four paths on the grid.
        y_rows = (y[:, 0] + y[:, 2].flip(-1)).view(batch, inner, height, width)
        y_cols = (y[:, 1] + y[:, 3].flip(-1)).view(batch, inner, width, height)
        y = (y_rows + y_cols.transpose(2, 3)).permute(0, 2, 3, 1)
        y = self.out_norm(y) * F.silu(z)
        return self.out_proj(y)


class VSSBlock(nn.Module):
    """``x + DropPath(SS2D(LayerNorm(x)))`` on (batch, H, W, d) tokens."""

    def __init__(self, dim: int, drop_path_rate: float = 0.0, d_state: int = 16,
                 expand: int = 2):
        super().__init__()
        # eps 1e-5 (PyTorch's default), as the authors' model runs: their VSSBlock's own default
        # is 1e-6, but their VSSM passes a plain nn.LayerNorm down to every block.
        self.ln_1 = nn.LayerNorm(dim, eps=1e-5)
        self.self_attention = SS2D(dim, d_state, expand)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + drop_path(self.self_attention(self.ln_1(x)), self.drop_path_rate,
                             self.training)


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (4d), LayerNorm, Linear to 2d: halves H and W."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """Linear(in -> scale² · out), pixel shuffle by ``scale``, LayerNorm(out)."""

    def __init__(self, in_dim: int, out_dim: int, scale: int):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(in_dim, scale * scale * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        s = self.scale
        # Feature order (p1, p2, c) as in the authors' rearrange 'b h w (p1 p2 c)'.
        x = self.expand(x).view(batch, height, width, s, s, -1)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * s, width * s, -1)
        return self.norm(x)


class VMUNet(nn.Module):
    """VM-UNet on a (batch, in_chans, H, W) map; H and W multiples of 32 for the defaults.

    Parameters
    ----------
    in_chans : int
        Input channels (the encoder width N).
    out_chans : int
        Output channels (the slices D of the volume).
    dims : sequence of int
        Token widths of the four stages.
    depths, decoder_depths : sequence of int
        VSS blocks per encoder stage and per decoder stage (decoder from the bottleneck up).
    patch : int
        Patch size of the embedding and of the final expansion.
    d_state, expand : int
        SS2D state size and inner width factor.
    drop_path_rate : float
        Largest stochastic-depth rate (linearly spaced over the blocks).
    """

    def __init__(self, in_chans: int, out_chans: int, dims=(96, 192, 384, 768),
                 depths=(2, 2, 9, 2), decoder_depths=(2, 9, 2, 2), patch: int = 4,
                 d_state: int = 16, expand: int = 2, drop_path_rate: float = 0.2):
        super().__init__()
        dims, depths, decoder_depths = list(dims), list(depths), list(decoder_depths)
        self.patch_embed = nn.Conv2d(in_chans, dims[0], patch, stride=patch)
        self.patch_norm = nn.LayerNorm(dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            start = sum(depths[:i])
            self.layers.append(nn.ModuleList(
                VSSBlock(dim, rates[start + j], d_state, expand) for j in range(depth)))
            if i < len(dims) - 1:
                self.downsample.append(PatchMerging(dim))
        # Decoder rates run from the largest (at the bottleneck) down to zero.
        rates = torch.linspace(0, drop_path_rate, sum(decoder_depths)).tolist()[::-1]
        up_dims = dims[::-1]
        self.upsample = nn.ModuleList(PatchExpand(up_dims[i - 1], up_dims[i], 2)
                                      for i in range(1, len(up_dims)))
        self.layers_up = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(up_dims, decoder_depths)):
            start = sum(decoder_depths[:i])
            self.layers_up.append(nn.ModuleList(
                VSSBlock(dim, rates[start + j], d_state, expand) for j in range(depth)))
        self.final_up = PatchExpand(dims[0], dims[0] // patch, patch)
        self.final_conv = nn.Conv2d(dims[0] // patch, out_chans, 1)
        self.apply(_init_weights)
        # The network starts as a constant (zero) volume. With the default initialisation its
        # first output is large input-dependent noise that the first steps spend removing; the
        # tiny model fits the volumes in about half the steps from a zero start
        # (benchmarks/bench_tiny_learning.py, docs/model.md).
        nn.init.zeros_(self.final_conv.weight)
        nn.init.zeros_(self.final_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, in_chans, H, W) -> (batch, out_chans, H, W)."""
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        skips = []
        for i, blocks in enumerate(self.layers):
            skips.append(x)
            for block in blocks:
                x = block(x)
            if i < len(self.downsample):
                x = self.downsample[i](x)
        for i, blocks in enumerate(self.layers_up):
            if i > 0:
                x = self.upsample[i - 1](x + skips[-i])
            for block in blocks:
                x = block(x)
        x = self.final_up(x).permute(0, 3, 1, 2)
        return self.final_conv(x)


def _init_weights(module: nn.Module) -> None:
    """The VM-UNet authors' initialisation of linear and norm layers."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
