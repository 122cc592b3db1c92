"""What each part of the residual protocol does: ablations on participant-level derivatives.

Every variant trains the tiny network of ``--model`` on the training subjects of each fold with
the product's own pieces (EEG standardised per run, :func:`~spec2vol_bids.deviations.
target_stats`, the masked loss, the group level's optimiser, schedule and training loop) and is
scored on the held-out subject like the group level scores it (``dynamics``: mean voxel-wise
correlation of synthesised and measured series inside the brain mask; SSIM), beside the linear
baselines (``ridge``, ``hrf-ridge``) and the mean volume of the same fold:

* ``recipe``: the residual protocol as ``--protocol residual`` trains it;
* ``no-readout``: without the linear readout (the network alone, projected on the components);
* ``readout-only``: the linear readout alone (the network's output held at zero);
* ``no-projection``: the network's deviations used as they are, every voxel free (no components,
  no readout);
* ``on-ridge``: the readout replaced by the fold's ridge map, frozen; the network learns what it
  leaves (with ``--curve``: what each epoch of the network adds to the best linear model);
* ``ridge-start``: the readout starts from the fold's ridge map and is trained with the network.

Usage (after ``spec2vol BIDS OUT participant``)::

    python benchmarks/ablate_residual.py OUT [--folds 01 02] [--epochs 8] [--lr 3e-3]
        [--variants recipe no-readout readout-only no-projection on-ridge ridge-start] [--seeds 0 1 2]
        [--model spec2vol|e2fnet] [--size tiny|full] [--weight-decay 0.01] [--curve]
        [--readout-sgd 0.1] [--readout-adamw] [--kernels 2] [--select-val] [--hrf]
        [--mixup 1.0] [--device cuda]

``--curve`` scores the held-out subject after every epoch as well (the full-size network's
learning curve: ``--size full --variants recipe --curve``). The linear readout is trained as the
group level trains it, by SGD (momentum 0.9, the same weight decay and schedule) while the network
has AdamW; ``--readout-sgd LR`` changes its step size (its maps' per ``READOUT_MASK_VOXELS`` mask
voxels, scaled with the mask as the group level scales it), ``--readout-adamw`` trains it with
AdamW instead (the residual protocol before; :mod:`spec2vol_bids.optimisers` says why). It learns
``--kernels`` lag profiles shared by every band feature; ``--kernels 0`` gives every context
window its own weights (the readout before; docs/model.md's earlier ablations ran with ``--kernels
0`` and, unless they name ``--readout-sgd``, ``--readout-adamw``). ``--select-val`` holds the last
training subject of each fold out of training and keeps the epoch with its best dynamics (as the
group level's ``--select val`` under the residual protocol). ``--hrf`` gives the model hrf-ridge's
prior: its network sees one window, the context summed with the canonical HRF's weights, its
readout reads hrf-ridge's features, and ``on-ridge`` / ``ridge-start`` use the hrf-ridge map
(``no-projection`` is not defined with it). ``--mixup ALPHA`` trains on mixtures of pairs of
samples of each batch, inputs and targets with the same Beta(ALPHA, ALPHA) weight. Prints the CPU
flags, the learned readout's weight by lag for every fold, then one line per variant: dynamics and
SSIM as mean ± SD over the held-out subjects (and seeds), and the seconds per fold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spec2vol_bids import devices, group, linear, optimisers, train
from spec2vol_bids.config import (LINEAR_MODELS, READOUT_KERNELS, READOUT_LR, READOUT_MASK_VOXELS,
                                  Training)
from spec2vol_bids.data import PairedDataset, find_runs, norm_stats, resolve_channels
from spec2vol_bids.deviations import DeviationTargets, masked_mse, target_stats
from spec2vol_bids.models import build_model
from spec2vol_bids.models.residual import KernelReadout, ResidualOutput
from spec2vol_bids.models.ridge import hrf_lag_weights

sys.path.insert(0, str(Path(__file__).parent))
from ablate_learning import cpu_flags  # noqa: E402

VARIANTS = ("recipe", "no-readout", "readout-only", "no-projection", "on-ridge", "ridge-start")


class Silent(nn.Module):
    """A network whose output is always zero (the readout-only variant)."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(self, x):
        return x.new_zeros(len(x), *self.config.out_shape)


class HrfInput(ResidualOutput):
    """``--hrf``: the residual protocol's model given hrf-ridge's prior. The network sees one
    window, the sample's context summed with the canonical HRF's weights at the runs' TR, and the
    readout reads that window's band features (hrf-ridge's features: the network's context is
    one window, so the wrapper's readout has their size)."""

    def __init__(self, config: Training, channels: int, freq_bins: int, out_shape, context: int,
                 tr: float):
        net = build_model(config.model, eeg_channels=channels, freq_bins=freq_bins,
                          out_shape=out_shape, context=1, size=config.size)
        super().__init__(net, config.readout_components)
        self.register_buffer("lags", torch.from_numpy(hrf_lag_weights(context, tr)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("l,blcf->bcf", self.lags, x.float())[:, None]  # (batch, 1, C, F)
        return super().forward(pooled)


def variant_model(variant: str, config: Training, channels, train_set, stats, context: int,
                  ridge=None, hrf_tr: float | None = None, kernels: int = 0):
    components = 0 if variant == "no-projection" else config.readout_components
    if hrf_tr:
        model = HrfInput(config, len(channels), train_set.freq_bins(), train_set.target_shape(),
                         context, hrf_tr)
    else:
        model = build_model(config.model, eeg_channels=len(channels), freq_bins=train_set.freq_bins(),
                            out_shape=train_set.target_shape(), context=context, size=config.size,
                            readout_components=components,
                            readout_kernels=kernels if components else 0)
    if variant == "no-projection":
        model = ResidualOutput(model)
    model.set_target_stats(stats["mean"], stats["scale"], stats["basis"] if components else None)
    if variant == "no-readout":
        model.readout.requires_grad_(False)
    if variant == "readout-only":
        model.net = Silent(model.net.config)
    if variant in ("on-ridge", "ridge-start"):
        # the fold's ridge map, expressed in the residual protocol's components (the same
        # training responses, so the same span)
        net = ridge.model.net
        with torch.no_grad():
            w = net.weights.double() @ net.components.double() @ model.basis.double().T
            model.readout.weight.copy_(w.T.float())
        model.readout.weight.requires_grad_(variant == "ridge-start")
    return model


def optimiser(model, config: Training, n_samples: int, mask_voxels: int,
              readout_lr: float | None, readout_adamw: bool):
    """The group level's optimisers (the readout on SGD, at ``readout_lr`` if given, scaled for
    a mask of ``mask_voxels`` as the group level scales it), or with ``readout_adamw`` AdamW for
    every weight (the residual protocol before the SGD readout)."""
    if not readout_adamw:
        return optimisers.optimiser(model, config, n_samples, 1, config.batch_size, mask_voxels,
                                    readout_lr=readout_lr or READOUT_LR)
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                              weight_decay=config.weight_decay)
    return adamw, optimisers.schedule(adamw, config, n_samples, 1, config.batch_size)


def mixup(alpha: float, seed: int):
    """A collate function that mixes each batch with itself in shuffled order: ``x = λ·x_i +
    (1 − λ)·x_j`` and the same ``λ`` for the targets, ``λ ~ Beta(alpha, alpha)`` per sample
    (Zhang et al. 2018). A linear map from input to target holds for every mixture, so the
    network is pushed towards one between the training samples."""
    rng = np.random.default_rng(seed)

    def collate(items):
        x, y = torch.utils.data.default_collate(items)
        lam = torch.from_numpy(rng.beta(alpha, alpha, len(x))).float()
        order = torch.from_numpy(rng.permutation(len(x)))

        def mix(t):  # (batch, ...): each sample with the one ``order`` pairs it with
            weight = lam.view(-1, *[1] * (t.dim() - 1))
            return weight * t.float() + (1 - weight) * t[order].float()
        return mix(x), mix(y)
    return collate


def train_variant(variant, config, channels, train_runs, work, on_epoch=None, ridge=None,
                  readout_sgd=None, hrf=False, device=torch.device("cpu"), mixup_alpha=0.0,
                  kernels=0, readout_adamw=False):
    norm = norm_stats(train_runs, channels, kind="run")
    dataset = PairedDataset(train_runs, channels, norm, work)
    stats = target_stats(dataset, train_runs, config.readout_components)
    train.seed_everything(config.seed)
    model = variant_model(variant, config, channels, dataset, stats, train_runs[0].context, ridge,
                          linear.repetition_time(train_runs) if hrf else None, kernels).to(device)
    optimizer, scheduler = optimiser(model, config, len(dataset), int(stats["mask"].sum()),
                                     readout_sgd, readout_adamw)
    shifted = DeviationTargets(dataset, stats["shift"])
    dtype = devices.autocast_dtype(device, config.precision)  # scored in it too, as the group level
    criterion = masked_mse(model.scale, stats["mask"])
    for epoch in range(config.epochs):
        loader = torch.utils.data.DataLoader(shifted, batch_size=config.batch_size,
                                             collate_fn=mixup(mixup_alpha, config.seed * 1000 + epoch)
                                             if mixup_alpha > 0 else None,
                                             sampler=train.epoch_order(config.seed, epoch, len(shifted)))
        loss = train._train_epoch(model, model, loader, optimizer, scheduler, config,
                                  device, desc="", show=False,
                                  progress=lambda *a: None, criterion=criterion)
        if on_epoch is not None:
            on_epoch(epoch + 1, loss, train.TrainResult(model=model.eval(), norm=norm, history=[],
                                                        selected_epoch=epoch + 1,
                                                        out_shape=dataset.target_shape(),
                                                        autocast=dtype))
    return train.TrainResult(model=model.eval(), norm=norm, history=[], selected_epoch=config.epochs,
                             out_shape=dataset.target_shape(), autocast=dtype)


def score(result, runs, channels, mean, work, device=torch.device("cpu")) -> list[tuple[float, float]]:
    rows = [group.evaluate_model_on_run(run, channels, result, mean, work_dir=work,
                                        device=device) for run in runs]
    return [(row["dynamics"], float(np.mean(row["ssim"]))) for row in rows]


def lag_profile(readout: KernelReadout, runs) -> str:
    """The learned readout's weight at each lag: the norm over band features and components of
    its map at that context window, as a fraction of the largest, by seconds before the volume
    (window ``i`` of ``context`` ends ``context − i`` TRs before it)."""
    kernels = readout.kernels.detach().double()  # (R, context)
    maps = readout.maps.weight.detach().double().view(len(readout.maps.weight), len(kernels), -1)
    weight = torch.einsum("rl,krf->lkf", kernels, maps).flatten(1).norm(dim=1)
    weight = (weight / weight.max()).numpy()
    tr, context = linear.repetition_time(runs), len(weight)
    peak = (context - int(np.argmax(weight))) * tr
    return (f"readout weight by lag peaks {peak:g} s before the volume; from {context * tr:g} s to "
            f"{tr:g} s: " + " ".join(f"{w:.2f}" for w in weight))


def run_variant(args, variant, seed, held, train_runs, val_runs, test_runs, channels, mean,
                work, ridge) -> tuple[list, float]:
    """Train one variant on a fold; its held-out ``(dynamics, SSIM)`` rows and its seconds
    (with ``val_runs``: at the epoch with the best validation dynamics, else the last)."""
    config = Training(model=args.model, size=args.size, epochs=args.epochs, batch_size=8,
                      grad_accum=1, lr=args.lr, warmup_steps=10, weight_decay=args.weight_decay,
                      seed=seed)
    device = torch.device(args.device)
    tic = time.perf_counter()
    picked = {"val": -np.inf, "state": None, "epoch": 0}

    def on_epoch(epoch, loss, partial):
        val = np.nan
        if val_runs:
            val = np.mean([d for d, _ in score(partial, val_runs, channels, mean, work, device)])
            if val > picked["val"]:
                picked.update(val=val, epoch=epoch, state={
                    k: v.detach().clone() for k, v in partial.model.state_dict().items()})
        if args.curve:
            found = score(partial, test_runs, channels, mean, work, device)
            print(f"  fold {held} {variant} epoch {epoch}: train loss {loss:.4f}, held-out "
                  f"dynamics {np.mean([d for d, _ in found]):.3f}, validation {val:.3f}, "
                  f"{time.perf_counter() - tic:.0f} s", flush=True)
    result = train_variant(variant, config, channels, train_runs, work, on_epoch=on_epoch,
                           ridge=ridge, readout_sgd=args.readout_sgd, hrf=args.hrf, device=device,
                           mixup_alpha=args.mixup, kernels=args.kernels,
                           readout_adamw=args.readout_adamw)
    took = time.perf_counter() - tic
    if val_runs:
        result.model.load_state_dict(picked["state"])
        print(f"  fold {held} {variant} seed {seed}: epoch {picked['epoch']} kept (validation "
              f"{picked['val']:.3f})", flush=True)
    if isinstance(result.model.readout, KernelReadout) and result.model.readout.maps.weight.any():
        print(f"  fold {held} {variant} seed {seed}: {lag_profile(result.model.readout, train_runs)}",
              flush=True)
    return score(result, test_runs, channels, mean, work, device), took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a spec2vol participant-level OUTPUT_DIR")
    parser.add_argument("--folds", nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                        help="default: all (on-ridge and ridge-start only with --kernels 0 or --hrf)")
    parser.add_argument("--model", default="spec2vol", choices=["spec2vol", "e2fnet"])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--curve", action="store_true",
                        help="also score the held-out subject after every epoch (a learning curve)")
    parser.add_argument("--readout-sgd", type=float, default=READOUT_LR, metavar="LR",
                        help="the SGD step size of the linear readout (its maps': per "
                             f"{READOUT_MASK_VOXELS} mask voxels; momentum 0.9; default: the "
                             "group level's)")
    parser.add_argument("--readout-adamw", action="store_true",
                        help="train the readout with AdamW, as the network (the residual protocol "
                             "before its SGD readout)")
    parser.add_argument("--hrf", action="store_true",
                        help="give the model hrf-ridge's prior: the network sees the context summed "
                             "with the canonical HRF, the readout hrf-ridge's features, and on-ridge "
                             "/ ridge-start start from the hrf-ridge map")
    parser.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                        help="mix each training batch with itself (Beta(ALPHA, ALPHA) weights)")
    parser.add_argument("--kernels", type=int, default=READOUT_KERNELS, metavar="R",
                        help="the readout's learned lag profiles, shared by all band features "
                             "(default: the group level's); 0: a weight per context window, the "
                             "residual protocol before them (not used with --hrf)")
    parser.add_argument("--device", default="cpu",
                        help="where the networks train and predict (on a GPU in the group level's "
                             "--precision auto); the linear baselines are scored on the CPU")
    parser.add_argument("--select-val", action="store_true",
                        help="hold out the last training subject; keep its best-dynamics epoch")
    args = parser.parse_args()
    copies_ridge = {"on-ridge", "ridge-start"}
    if args.variants is None:
        args.variants = [v for v in VARIANTS
                         if v not in copies_ridge or not args.kernels or args.hrf]
    if args.kernels and not args.hrf and copies_ridge & set(args.variants):
        parser.error("on-ridge and ridge-start copy ridge's map into a readout with a weight per "
                     "context window: add --kernels 0")
    if args.hrf and "no-projection" in args.variants:
        parser.error("--hrf: leave no-projection out of --variants (it has no readout to give "
                     "hrf-ridge's features)")
    print(cpu_flags(), f"; torch threads {torch.get_num_threads()}")
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    runs = [run for run in find_runs(args.out) if run.target is not None]
    channels = resolve_channels(runs)
    subjects = sorted({run.subject for run in runs})
    results: dict[str, list] = {}
    seconds: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as work:
        for held in args.folds or subjects:
            train_runs = [r for r in runs if r.subject != held]
            test_runs = [r for r in runs if r.subject == held]
            mean = PairedDataset(train_runs, channels, {"kind": "run"}, work).mean_target()
            fitted = {name: linear.fit_ridge(train_runs, channels, work_dir=work, model_name=name)
                      for name in LINEAR_MODELS}
            for name, result in fitted.items():
                results.setdefault(name, []).extend(score(result, test_runs, channels, mean, work))
            print(f"  fold {held}: " + ", ".join(f"{name} {results[name][-1][0]:.3f}"
                                                 for name in fitted), flush=True)
            results.setdefault("mean volume", []).extend(score(None, test_runs, channels, mean, work))
            val_runs = []
            if args.select_val:  # ridge and the mean volume keep every training subject
                train_runs, val_runs = group.split_validation(train_runs, "val")
            for variant in args.variants:
                for seed in args.seeds:
                    found, took = run_variant(args, variant, seed, held, train_runs, val_runs,
                                              test_runs, channels, mean, work,
                                              fitted["hrf-ridge" if args.hrf else "ridge"])
                    seconds.setdefault(variant, []).append(took)
                    results.setdefault(variant, []).extend(found)
                    print(f"  fold {held} {variant} seed {seed}: dynamics "
                          f"{np.mean([d for d, _ in found]):.3f}", flush=True)
    print(f"{args.model} ({args.size}), {args.epochs} epochs, lr {args.lr}, weight decay "
          f"{args.weight_decay}, readout {'AdamW' if args.readout_adamw else 'SGD lr %g' % args.readout_sgd}"
          f"{'' if args.hrf else ' with %d lag profiles' % args.kernels}, "
          f"{'HRF-convolved inputs (--hrf), ' if args.hrf else ''}"
          f"{'validation-selected epoch' if args.select_val else 'last epoch'}, "
          f"folds {' '.join(args.folds or subjects)}, seeds {args.seeds}")
    for name, rows in results.items():
        dyn, ssim = np.array(rows).T
        timing = f", {np.mean(seconds[name]):.0f} s per fold" if name in seconds else ""
        print(f"{name:14s} dynamics {dyn.mean():.3f} ± {dyn.std():.3f}  SSIM {ssim.mean():.3f}"
              f" ± {ssim.std():.3f}{timing}")


if __name__ == "__main__":
    main()
