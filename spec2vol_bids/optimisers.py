"""Optimisers and learning-rate schedules of the group level's training.

Under the published protocol every weight is trained by AdamW, as the authors do. Under the
residual protocol the linear readout beside the network is trained by SGD with momentum
instead: gradient descent from zero on a linear least-squares map follows the ridge path, so
stopping it acts like a penalty, whereas AdamW's per-weight step sizes let the weights of
uninformative inputs grow as fast as the others (docs/model.md, "Why the recipe's linear part
lags ridge"). The network keeps AdamW. Both follow the same warm-up and cosine restarts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spec2vol_bids.config import READOUT_LR, READOUT_MASK_VOXELS, Training


def lr_factor(step: int, *, warmup_steps: int, cycle_steps: int) -> float:
    """Linear warm-up, then cosine decay restarted every ``cycle_steps`` optimiser steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    phase = ((step - warmup_steps) % cycle_steps) / cycle_steps
    return 0.5 * (1.0 + math.cos(math.pi * phase))


class Joint:
    """Optimisers (or their schedules) stepped, zeroed, saved and restored as one; the first
    one's parameter groups come first (its learning rate is the one logged)."""

    def __init__(self, parts):
        self.parts = list(parts)

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    @property
    def last_epoch(self) -> int:
        return self.parts[0].last_epoch

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        for part, saved in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(saved)


def schedule(optimizer, config: Training, n_samples: int, world: int, local_batch: int):
    """The warm-up + cosine-with-restarts schedule of ``optimizer``, stepped per optimiser step."""
    batches = math.ceil(math.ceil(n_samples / world) / local_batch)
    cycle = max(1, config.restart_epochs * math.ceil(batches / config.grad_accum))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=config.warmup_steps, cycle_steps=cycle))


def optimiser(model: nn.Module, config: Training, n_samples: int, world: int, local_batch: int,
              mask_voxels: int | None = None, readout_lr: float = READOUT_LR):
    """``(optimizer, scheduler)`` for ``model``: AdamW at ``config.lr`` for the network and, when
    the model has a linear readout, SGD with momentum 0.9 for it, each with :func:`schedule`.

    The readout's lag profiles (``kernels``) step at ``readout_lr``; its maps to the components
    at ``readout_lr`` per READOUT_MASK_VOXELS voxels of the loss's brain mask (``mask_voxels``,
    which a readout needs), their weight decay divided by the same factor. The targets are
    standardised per voxel and the masked loss averages over the mask, so the components'
    scores, and the maps to them, grow as the root of the mask's size while the maps' gradient
    shrinks as that root and its curvature as the size: scaled so, the maps take the same
    steps relative to their size on any grid, and the profiles, whose gradient does not depend
    on the grid, keep theirs. AdamW's steps do not depend on the gradient's scale."""
    readout = getattr(model, "readout", None)
    readout = {} if readout is None else dict(readout.named_parameters())
    network = [p for p in model.parameters() if all(p is not q for q in readout.values())]
    parts = [torch.optim.AdamW(network, lr=config.lr, weight_decay=config.weight_decay)] \
        if network else []
    if readout:
        if not mask_voxels:
            raise ValueError("a model with a linear readout needs the size of its loss's mask")
        gain = mask_voxels / READOUT_MASK_VOXELS
        maps = {"params": [p for name, p in readout.items() if name != "kernels"],
                "lr": readout_lr * gain, "weight_decay": config.weight_decay / gain}
        profiles = {"params": [p for name, p in readout.items() if name == "kernels"]}
        parts.append(torch.optim.SGD([maps, profiles] if profiles["params"] else [maps],
                                     lr=readout_lr, momentum=0.9,
                                     weight_decay=config.weight_decay))
    schedules = [schedule(part, config, n_samples, world, local_batch) for part in parts]
    if len(parts) == 1:
        return parts[0], schedules[0]
    return Joint(parts), Joint(schedules)
