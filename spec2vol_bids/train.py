"""One training run: the published protocol, checkpoint/resume and DDP.

Defaults follow the authors: loss 0.5·(1 − SSIM) + 0.5·MSE, AdamW (lr 1e-3, weight decay
1e-2), batch 16 with 2-step gradient accumulation, 50 epochs, cosine schedule with hard restarts
every 10 epochs after 50 warm-up steps, gradient clipping at 1.0 (under the residual protocol
the linear readout is trained by SGD: :mod:`spec2vol_bids.optimisers`). Checkpoint selection
never looks at test data: the last epoch, or the best score on one held-out *training* subject.

Every epoch ends with an atomic checkpoint (weights, optimiser, schedule, RNG states, history)
and the data order of an epoch is a pure function of ``(seed, epoch)``, so a fold killed at any
moment resumes at its last finished epoch and ends with the same weights as an uninterrupted run.
Under ``torchrun`` (``WORLD_SIZE`` > 1) the same code trains with DistributedDataParallel: each
rank takes every ``world``-th sample of the epoch's order, gradients are averaged, only rank 0
writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import random
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm import tqdm

from spec2vol_bids import evaluate
from spec2vol_bids.devices import (autocast, autocast_dtype, barrier, distributed, resolve_device,
                                   set_deterministic)
from spec2vol_bids.config import READOUT_LR, READOUT_MASK_VOXELS, Training, check_training
from spec2vol_bids.data import PairedDataset, Run, norm_stats, run_digest
from spec2vol_bids.derivatives import write_bytes
from spec2vol_bids.deviations import DeviationTargets, masked_mse, shifts_to, target_stats
from spec2vol_bids.errors import DataError, UsageError, one_line
from spec2vol_bids.models import build_model
from spec2vol_bids.optimisers import optimiser

logger = logging.getLogger(__name__)

#: What of the configuration shapes a fold's training (and so whether its checkpoint resumes):
#: not the device or its arithmetic (``precision``, ``deterministic``), the progress bars or
#: which folds a job runs.
PROTOCOL = ("model", "protocol", "size", "epochs", "batch_size", "grad_accum", "lr", "weight_decay",
            "warmup_steps", "restart_epochs", "clip_grad", "select", "eeg_normalisation", "seed")

#: The columns of a fold's ``history.tsv``, one row per epoch.
HISTORY_COLUMNS = ("epoch", "step", "train_loss", "val_loss", "val_ssim", "val_dynamics", "lr",
                   "seconds")


#: Seconds between progress lines in the log when stderr is not a terminal (batch jobs,
#: containers, ``| tee``), where no progress bar is drawn.
PROGRESS_SECONDS = 20.0


@dataclasses.dataclass
class TrainResult:
    """A trained model with what is needed to store and describe it."""

    model: torch.nn.Module
    norm: dict
    history: list[dict]
    selected_epoch: int
    out_shape: tuple
    #: the autocast dtype it was trained in and is to predict in (None: float32)
    autocast: torch.dtype | None = None


class Progress:
    """Where a training run is, logged every :data:`PROGRESS_SECONDS` by a background thread.

    The thread logs even while one slow batch runs, so a batch log is never silent for long;
    the ETA extrapolates the batches of this process (a resumed run counts from its restart).
    """

    def __init__(self, description: str, epochs: int, *, enabled: bool):
        self.description, self.epochs, self.enabled = description, epochs, enabled
        self.epoch, self.batch, self.n_batches, self.loss = 0, 0, 0, float("nan")
        self.done, self.started = 0, time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="spec2vol-progress")

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def at(self, epoch: int):
        """The per-batch callback of ``epoch``: ``(batch, n_batches, running loss)``."""
        self.epoch, self.batch = epoch, 0

        def update(batch: int, n_batches: int, loss: float) -> None:
            self.batch, self.n_batches, self.loss = batch, n_batches, loss
            self.done += 1
        return update

    def line(self) -> str:
        """``fold 01 spec2vol: epoch 2/3, batch 14/55, loss 0.2811, ETA 3 min 10 s``."""
        left = (self.n_batches - self.batch) + (self.epochs - self.epoch) * self.n_batches
        eta = "unknown (no batch finished yet)"
        if self.done and self.n_batches:
            seconds = round((time.perf_counter() - self.started) / self.done * left)
            eta = f"{seconds // 60} min {seconds % 60} s"
        return (f"{self.description}: epoch {self.epoch}/{self.epochs}, batch {self.batch}/"
                f"{self.n_batches or '?'}, loss {self.loss:.4f}, ETA {eta}")

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_SECONDS):
            logger.info("%s", self.line())


# -- protocol ---------------------------------------------------------------------------------

def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5·(1 − SSIM) + 0.5·MSE, SSIM in 2-D with the D slices as channels (data range 1)."""
    pred = pred.float()
    ssim = structural_similarity_index_measure(pred, target, data_range=1.0, kernel_size=11, sigma=1.5)
    return 0.5 * (1.0 - ssim) + 0.5 * torch.nn.functional.mse_loss(pred, target)


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The sample order of one epoch, a function of ``(seed, epoch)`` only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def shard(order: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s share of ``order``, padded by wrapping so every rank has as many steps."""
    if world == 1:
        return order
    total = math.ceil(len(order) / world) * world
    padded = (order * math.ceil(total / max(len(order), 1)))[:total]
    return padded[rank::world]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)),
                                                      pos, has_gauss, gauss],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuples(state["python"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """Python's RNG state with the tuples a weights-only load may have turned into lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# -- training ---------------------------------------------------------------------------------

def train(train_runs: Sequence[Run], channels: Sequence[str], config: Training, *,
          work_dir: str | Path, checkpoint: str | Path, val_runs: Sequence[Run] = (),
          description: str = "") -> TrainResult:
    """Train one model on ``train_runs`` and return it with its normalisation and history.

    Parameters
    ----------
    train_runs : list of Run
        Training runs (with targets); the EEG min–max scaling comes from these only.
    channels : list of str
        EEG channels in model order.
    config : spec2vol_bids.config.Training
        The protocol.
    work_dir : path
        Where targets are cached.
    checkpoint : path
        The per-epoch checkpoint file; training resumes from it when it exists and was made with
        the same configuration and data.
    val_runs : list of Run
        A held-out training subject's runs for ``select="val"``.
    description : str
        Shown on the progress bar and in log lines (e.g. ``"fold 01 spec2vol"``).
    """
    check_training(config)
    if config.select == "val" and not val_runs:
        raise DataError("--select val needs a held-out training subject; there are too few subjects")
    set_deterministic(config.deterministic)
    device = resolve_device(config.device)
    dtype = autocast_dtype(device, config.precision)  # an impossible one: refused before any work
    rank, world, local_rank = distributed()
    norm = norm_stats(train_runs, channels, kind=config.eeg_normalisation)
    train_set = PairedDataset(train_runs, channels, norm, work_dir)
    if len(train_set) == 0:
        raise DataError("no training samples: runs are shorter than discard + context + 1 volumes")
    val_set = PairedDataset(val_runs, channels, norm, work_dir) if config.select == "val" else None
    seed_everything(config.seed)
    model = _model(config, channels, train_set, context=train_runs[0].context, device=device,
                   source=train_runs[0].spectrogram)
    criterion, val_mask, mask_voxels = loss_fn, None, None
    if config.readout_components:
        stats = target_stats(train_set, train_runs, config.readout_components)
        model.set_target_stats(stats["mean"], stats["scale"], stats["basis"])
        criterion, val_mask = masked_mse(model.scale, stats["mask"]), stats["mask"]
        mask_voxels = int(stats["mask"].sum())
        train_set = DeviationTargets(train_set, stats["shift"])
        if val_set is not None:
            val_set = DeviationTargets(val_set, shifts_to(stats["mean"], val_set, val_runs))
    local_batch = max(1, config.batch_size // world)
    optimizer, scheduler = optimiser(model, config, len(train_set), world, local_batch, mask_voxels)
    fingerprint = json.dumps({**{name: getattr(config, name) for name in PROTOCOL},
                              "world": world, "channels": list(channels),
                              "selection": selection_metric(config),
                              "runs": {r.name: run_digest(r) for r in train_runs},
                              "val": {r.name: run_digest(r) for r in val_runs}, "norm": norm,
                              **({"readout": recipe} if (recipe := readout_recipe(config)) else {})},
                             sort_keys=True)
    checkpoint = Path(checkpoint)
    history, best, start_epoch = _resume(checkpoint, fingerprint, model, optimizer, scheduler,
                                         device, description)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)

    progress = Progress(description, config.epochs,
                        enabled=rank == 0 and not (config.progress and sys.stderr.isatty()))
    with progress:
        try:
            history, best = _epochs(net, model, train_set, val_set, optimizer, scheduler, config,
                                    device, history=history, best=best, start_epoch=start_epoch,
                                    checkpoint=checkpoint, fingerprint=fingerprint,
                                    description=description, progress=progress,
                                    criterion=criterion, val_mask=val_mask)
        except RuntimeError as exc:  # PyTorch's words for an operation --deterministic forbids
            words = " does not have a deterministic implementation"
            if words not in str(exc):
                raise
            raise UsageError(f"--deterministic: {one_line(str(exc).split(words)[0])} has no "
                             f"deterministic implementation in PyTorch, and {config.model} needs "
                             f"it on {device.type}; leave out --deterministic, or train on the "
                             "CPU") from None

    selected = config.epochs
    if config.select == "val":
        if best["state"] is None:
            raise _diverged(description, config.epochs,
                            f"no finite {selection_metric(config).replace('_', ' ')} in any epoch",
                            optimizer.param_groups[0]["lr"], checkpoint)
        model.load_state_dict(best["state"])
        selected = best["epoch"]
        if config.readout_components:  # the baselines' anatomy: all training-side subjects'
            pooled = PairedDataset([*train_runs, *val_runs], channels, norm, work_dir).mean_target()
            model.set_target_stats(pooled, model.scale)
    model.eval()
    return TrainResult(model=model, norm=norm, history=history, selected_epoch=selected,
                       out_shape=tuple(model.config.out_shape), autocast=dtype)


def readout_recipe(config: Training) -> dict | None:
    """How the residual protocol's linear readout is made (None: no readout), recorded with every
    fold so that folds trained with another readout are neither resumed nor reused."""
    if not config.readout_components:
        return None
    return {"components": config.readout_components, "kernels": config.readout_kernels,
            "sgd_lr": READOUT_LR, "maps_sgd_lr_per_mask_voxels": READOUT_MASK_VOXELS}


def selection_metric(config: Training) -> str:
    """The history column ``--select val`` maximises: under the residual protocol the validation
    subject's dynamics, what that protocol trains for (its SSIM is the training mean volume's,
    whatever the network learns); under the published one SSIM, as the authors select."""
    return "val_dynamics" if config.readout_components else "val_ssim"


def _epochs(net, model, train_set, val_set, optimizer, scheduler, config: Training, device, *,
            history, best, start_epoch, checkpoint, fingerprint, description, progress,
            criterion=loss_fn, val_mask=None):
    """Train from ``start_epoch`` to the end, checkpointing every epoch; ``(history, best)``."""
    rank, world, _ = distributed()
    metric = selection_metric(config)
    local_batch = max(1, config.batch_size // world)
    for epoch in range(start_epoch, config.epochs):
        tic = time.perf_counter()
        indices = shard(epoch_order(config.seed, epoch, len(train_set)), rank, world)
        loader = torch.utils.data.DataLoader(train_set, batch_size=local_batch, sampler=indices,
                                             num_workers=config.num_workers,
                                             pin_memory=device.type == "cuda")
        try:
            train_loss = _train_epoch(net, model, loader, optimizer, scheduler, config, device,
                                      desc=f"{description} epoch {epoch + 1}/{config.epochs}",
                                      show=config.progress and rank == 0,
                                      progress=progress.at(epoch + 1), criterion=criterion)
        except Diverged as exc:
            raise _diverged(description, epoch + 1, str(exc), exc.lr, checkpoint) from None
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise _diverged(description, epoch + 1, f"non-finite weights in {bad[0]}",
                            optimizer.param_groups[0]["lr"], checkpoint)
        row = {**dict.fromkeys(HISTORY_COLUMNS, float("nan")), "epoch": epoch + 1,
               "step": scheduler.last_epoch, "train_loss": train_loss,
               "lr": optimizer.param_groups[0]["lr"]}
        if val_set is not None:
            scores = validate(model, val_set, device, local_batch, criterion, mask=val_mask,
                              dtype=autocast_dtype(device, config.precision))
            row.update({f"val_{name}": value for name, value in scores.items()})
            if row[metric] > best["score"]:
                best = {"score": row[metric], "epoch": epoch + 1,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        row["seconds"] = time.perf_counter() - tic
        history.append(row)
        scored = ("" if val_set is None else f", val SSIM {row['val_ssim']:.4f}, val dynamics "
                                             f"{row['val_dynamics']:.4f}")
        logger.info("%s epoch %d/%d: train loss %.4f%s, %.1f s", description, epoch + 1,
                    config.epochs, train_loss, scored, row["seconds"])
        if rank == 0:
            _save(checkpoint, fingerprint, epoch + 1, model, optimizer, scheduler, history, best)
        barrier()
    return history, best


def _model(config: Training, channels, train_set: PairedDataset, *, context: int, device, source):
    try:
        return build_model(config.model, eeg_channels=len(channels), freq_bins=train_set.freq_bins(),
                           out_shape=train_set.target_shape(), context=context,
                           size=config.size,
                           readout_components=config.readout_components,
                           readout_kernels=config.readout_kernels).to(device)
    except ValueError as exc:
        # The network cannot produce this grid or take these inputs: the participant-level
        # options (--target-grid, --freq-bins) have to change, not the code.
        raise DataError(f"{config.model} cannot be built for targets of shape "
                        f"{tuple(train_set.target_shape())} from {len(channels)} channels x "
                        f"{train_set.freq_bins()} bins ({exc}); rerun the participant level with "
                        "another --target-grid or --freq-bins", path=source) from exc


def _resume(checkpoint: Path, fingerprint: str, model, optimizer, scheduler, device, description):
    """``(history, best, first epoch)`` from a checkpoint of the same fold, or a fresh start."""
    fresh = [], {"score": -math.inf, "epoch": 0, "state": None}, 0
    if not checkpoint.exists():
        return fresh
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    if state["fingerprint"] != fingerprint:
        logger.warning("%s: ignoring checkpoint %s, made with other options or data",
                       description, checkpoint)
        return fresh
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    logger.info("%s: resuming after epoch %d from %s", description, state["epoch"], checkpoint)
    return state["history"], state["best"], state["epoch"]


def _save(checkpoint: Path, fingerprint: str, epoch: int, model, optimizer, scheduler, history,
          best) -> None:
    """The end-of-epoch checkpoint, written atomically."""
    buffer = io.BytesIO()
    torch.save({"fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "history": history, "best": best}, buffer)
    write_bytes(checkpoint, buffer.getbuffer())


def _train_epoch(net, model, loader, optimizer, scheduler, config, device, *, desc, show,
                 progress, criterion=loss_fn) -> float:
    net.train()
    dtype = autocast_dtype(device, config.precision)
    total, count, seen, tic = 0.0, 0, 0, time.perf_counter()
    n_batches = len(loader)
    bar = tqdm(total=n_batches, desc=desc, unit="batch", leave=False, file=sys.stderr,
               disable=not show or None, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # the last group of an epoch may hold fewer than grad_accum batches
        group = min(config.grad_accum, n_batches - (i // config.grad_accum) * config.grad_accum)
        stepping = (i + 1) % config.grad_accum == 0 or i + 1 == n_batches
        sync = net.no_sync() if (not stepping and net is not model) else contextlib.nullcontext()
        with sync, autocast(device, dtype):
            loss = criterion(net(x), y)
        with sync:
            (loss / group).backward()
        if stepping:
            norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), config.clip_grad if config.clip_grad > 0 else math.inf)
            # checked on the all-reduced gradients, so every DDP rank stops at the same step
            if not torch.isfinite(norm):
                raise Diverged(f"the gradient norm is {float(norm)}, the batch loss "
                               f"{float(loss.detach()):.4g}", optimizer)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total += float(loss.detach()) * len(x)
        count += len(x)
        seen += len(x)
        progress(i + 1, n_batches, total / count)
        bar.update(1)
        bar.set_postfix(loss=f"{total / count:.4f}",
                        samples_s=f"{seen / max(time.perf_counter() - tic, 1e-9):.1f}")
    bar.close()
    return total / max(count, 1)


class Diverged(Exception):
    """Raised inside an epoch when the loss or the gradients stop being finite."""

    def __init__(self, what: str, optimizer):
        super().__init__(what)
        self.lr = optimizer.param_groups[0]["lr"]


class TrainingDiverged(DataError):
    """The training of a fold produced non-finite numbers (exit 65): nothing of it is kept but
    its last good checkpoint."""


def _diverged(description: str, epoch: int, what: str, lr: float, checkpoint: Path) -> TrainingDiverged:
    kept = (f"the checkpoint of the last good epoch is kept in {checkpoint}" if checkpoint.exists()
            else "no epoch finished, so no checkpoint is kept")
    return TrainingDiverged(f"{description}: training diverged in epoch {epoch} ({what} at learning "
                            f"rate {lr:.3g}); lower --lr or raise --warmup-steps (or --clip-grad "
                            f"above 0); {kept}; nothing of this fold was written")


@torch.no_grad()
def validate(model, dataset: PairedDataset, device: torch.device, batch_size: int,
             criterion=loss_fn, mask: np.ndarray | None = None,
             dtype: torch.dtype | None = None) -> dict[str, float]:
    """``loss`` (mean ``criterion``), ``ssim`` (mean 2-D SSIM) and ``dynamics`` of ``model`` over
    ``dataset``: with a brain ``mask`` (D, H, W), each run's mean voxel-wise correlation of
    predicted and measured series inside it, averaged over runs (as the held-out subjects are
    scored); NaN without one. ``dtype``: the forward pass's autocast dtype (None: float32)."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    loss_sum, ssim_sum, n = 0.0, 0.0, 0
    inside = None if mask is None else torch.from_numpy(np.asarray(mask, dtype=bool))
    predicted, measured = [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            pred = model(x)
        pred = pred.float()
        ssim = structural_similarity_index_measure(pred, y, data_range=1.0, kernel_size=11,
                                                   sigma=1.5, reduction="none")
        loss_sum += float(criterion(pred, y)) * len(x)
        ssim_sum += float(ssim.sum())
        n += len(x)
        if inside is not None:
            predicted.append(pred.cpu()[:, inside].numpy())  # (batch, voxels in mask)
            measured.append(y.cpu()[:, inside].numpy())
    scores = {"loss": loss_sum / n, "ssim": ssim_sum / n, "dynamics": float("nan")}
    if inside is not None:
        pred, target = np.concatenate(predicted), np.concatenate(measured)
        run_of = np.asarray([dataset.sample(i)[0] for i in range(n)])
        scores["dynamics"] = float(np.mean([
            evaluate.dynamics_map(pred[run_of == r], target[run_of == r]).mean()
            for r in np.unique(run_of)]))
    return scores
