"""Does the tiny Spec2VolCAMU-Net learn the EEG-driven dynamics? Initialisation and EEG scaling.

Writes the test suite's simulated derivatives (``tests/test_data.write_derivatives``: 4 subjects,
EEG band power that drives BOLD blobs through a haemodynamic delay), holds one subject out and
trains the tiny model directly (batch 8, AdamW lr 3e-3, 10 warm-up steps, SSIM + MSE loss) for
each combination of

* output layer: zero-started (spec2vol's) or PyTorch's default initialisation (the authors');
* EEG scaling: the published single min–max pair or one mean and std per channel and bin,
  both from the training subjects only.

Every ``--every`` steps it prints the training loss, the held-out dynamics score (mean voxel-wise
Pearson r inside the brain) and how much the output varies from sample to sample (a model
that ignores its input has 0).

Usage: ``python benchmarks/bench_tiny_learning.py [--steps 300] [--test 02] [--seed 0]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_data import write_derivatives  # noqa: E402

from spec2vol_bids import data, train  # noqa: E402
from spec2vol_bids.models import build_model  # noqa: E402


def dynamics(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean voxel-wise Pearson r over (samples, ...) inside the brain (mean target > 0.2)."""
    brain = truth.mean(0) > 0.2
    p, t = pred[:, brain], truth[:, brain]
    p, t = p - p.mean(0), t - t.mean(0)
    return float(((p * t).sum(0) / (p.norm(dim=0) * t.norm(dim=0) + 1e-12)).mean())


def stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [dataset[i] for i in range(len(dataset))]
    return (torch.stack([torch.as_tensor(x) for x, _ in pairs]),
            torch.stack([torch.as_tensor(y) for _, y in pairs]))


def run(out: Path, work: Path, *, zero_start: bool, scaling: str, held_out: str, steps: int,
        every: int, seed: int) -> None:
    runs = data.find_runs(out)
    training = [r for r in runs if r.subject != held_out]
    channels = data.resolve_channels(runs)
    norm = data.norm_stats(training, channels, kind=scaling)
    x, y = stack(data.PairedDataset(training, channels, norm, work))
    test_x, test_y = stack(data.PairedDataset([r for r in runs if r.subject == held_out],
                                              channels, norm, work))
    torch.manual_seed(seed)
    model = build_model("spec2vol", eeg_channels=len(channels), freq_bins=x.shape[-1],
                        out_shape=tuple(y.shape[1:]), context=x.shape[1], size="tiny")
    if not zero_start:
        model.decoder.final_conv.reset_parameters()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    order = torch.Generator().manual_seed(seed)
    label = f"{'zero-started' if zero_start else 'default-init'} output, {scaling} EEG"
    tic = time.perf_counter()
    for step in range(steps + 1):
        if step % every == 0:
            model.eval()
            with torch.no_grad():
                pred, fit = model(test_x), model(x[:64])
            print(f"{label:38s} step {step:4d}: train loss {train.loss_fn(fit, y[:64]):.3f}, "
                  f"held-out dynamics {dynamics(pred, test_y):6.3f}, output std across samples "
                  f"{pred.std(0).mean():.4f} (targets {test_y.std(0).mean():.4f}), "
                  f"{time.perf_counter() - tic:.0f} s", flush=True)
            model.train()
        batch = torch.randint(0, len(x), (8,), generator=order)
        loss = train.loss_fn(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimiser.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 10)
        optimiser.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--test", default="02", help="held-out subject (01-04)")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = write_derivatives(Path(tmp) / "out", subjects=("01", "02", "03", "04"), n_volumes=80)
        for scaling in ("standard", "minmax"):
            for zero_start in (True, False):
                run(out, Path(tmp) / "work", zero_start=zero_start, scaling=scaling,
                    held_out=opts.test, steps=opts.steps, every=opts.every, seed=opts.seed)


if __name__ == "__main__":
    main()
