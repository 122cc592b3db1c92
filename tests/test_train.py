"""Tests of the training protocol: schedule, data order, checkpoint/resume, selection."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from test_data import CHANNELS, write_derivatives

from spec2vol_bids import data, devices, optimisers, train
from spec2vol_bids.config import Training
from spec2vol_bids.errors import DataError, UsageError

torch.set_num_threads(1)


def test_schedule_warms_up_then_restarts():
    f = [optimisers.lr_factor(s, warmup_steps=4, cycle_steps=10) for s in range(30)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f[4] == 1.0 and f[14] == 1.0 and f[24] == 1.0  # hard restarts every cycle
    assert f[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(f[i] > f[i + 1] for i in range(4, 13))


def test_data_order_depends_on_seed_and_epoch_only():
    a = train.epoch_order(3, 5, 50)
    assert a == train.epoch_order(3, 5, 50) and sorted(a) == list(range(50))
    assert a != train.epoch_order(3, 6, 50) and a != train.epoch_order(4, 5, 50)
    shards = [train.shard(a[:7], r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [4, 4] and set(shards[0] + shards[1]) == set(a[:7])


def test_loss_is_half_ssim_half_mse():
    y = torch.rand(2, 16, 32, 32)
    assert float(train.loss_fn(y, y)) == pytest.approx(0.0, abs=1e-6)
    worse = train.loss_fn(torch.zeros_like(y), y)
    assert 0.5 * float((y ** 2).mean()) < float(worse) <= 0.5 * (1 + 1) + 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = write_derivatives(tmp_path_factory.mktemp("train") / "out", subjects=("01", "02", "03"),
                            n_volumes=40)
    return data.find_runs(out)


#: the published protocol; the residual one shares the schedule, order and checkpoints
#: (tests/test_residual.py checks its resume)
CONFIG = Training(model="spec2vol", protocol="published", size="tiny", epochs=3, batch_size=8,
                  grad_accum=2, warmup_steps=2, restart_epochs=2, device="cpu", progress=False)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_from_checkpoint_gives_the_same_weights(runs, tmp_path):
    full = train.train(runs[:2], CHANNELS, CONFIG, work_dir=tmp_path / "w", checkpoint=tmp_path / "a.pt")
    assert [h["epoch"] for h in full.history] == [1, 2, 3]
    assert full.history[-1]["step"] == 3 * math.ceil(math.ceil(28 / 8) / 2)
    # stop after the first epoch, then continue from its checkpoint
    train.train(runs[:2], CHANNELS, dataclasses.replace(CONFIG, epochs=1), work_dir=tmp_path / "w",
                checkpoint=tmp_path / "b.pt")
    state = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "scheduler", "rng", "history"}
    # a checkpoint of other options is not resumed from
    other = train.train(runs[:2], CHANNELS, dataclasses.replace(CONFIG, epochs=1, lr=5e-4),
                        work_dir=tmp_path / "w", checkpoint=tmp_path / "b.pt")
    assert other.history[0]["epoch"] == 1
    train.train(runs[:2], CHANNELS, dataclasses.replace(CONFIG, epochs=1), work_dir=tmp_path / "w",
                checkpoint=tmp_path / "c.pt")
    resumed = train.train(runs[:2], CHANNELS, CONFIG, work_dir=tmp_path / "w", checkpoint=tmp_path / "c.pt")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for name, value in _weights(full.model).items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6)


def test_a_checkpoint_of_other_derivatives_is_not_resumed_from(runs, tmp_path, caplog):
    """Same options and run names, but a run's derivatives remade (its sidecar's input hash
    changed): the fold starts afresh instead of carrying on with weights of the old data."""
    caplog.set_level("INFO", logger="spec2vol_bids.train")
    one = dataclasses.replace(CONFIG, epochs=1)
    train.train(runs[:2], CHANNELS, one, work_dir=tmp_path / "w", checkpoint=tmp_path / "d.pt")
    # without a validation subject the epoch's line has no validation scores, not "nan"
    assert re.search(r"epoch 1/1: train loss \d\.\d{4}, \d+\.\d s", caplog.text)
    assert "nan" not in caplog.text
    remade = [runs[0], dataclasses.replace(runs[1], meta={**runs[1].meta, "InputHash": "remade"})]
    caplog.clear()
    train.train(remade, CHANNELS, CONFIG, work_dir=tmp_path / "w", checkpoint=tmp_path / "d.pt")
    assert "made with other options or data" in caplog.text and "resuming" not in caplog.text
    caplog.clear()  # the control: the same derivatives resume
    train.train(remade, CHANNELS, CONFIG, work_dir=tmp_path / "w", checkpoint=tmp_path / "d.pt")
    assert "resuming after epoch 3" in caplog.text


def test_val_selection_keeps_the_best_validation_epoch(runs, tmp_path, caplog):
    caplog.set_level("INFO", logger="spec2vol_bids.train")
    cfg = dataclasses.replace(CONFIG, select="val", epochs=3)
    result = train.train(runs[:2], CHANNELS, cfg, work_dir=tmp_path, checkpoint=tmp_path / "v.pt",
                         val_runs=runs[2:])
    ssims = [h["val_ssim"] for h in result.history]
    last = result.history[-1]
    assert (f"epoch 3/3: train loss {last['train_loss']:.4f}, val SSIM {last['val_ssim']:.4f}, "
            f"val dynamics {last['val_dynamics']:.4f}") in caplog.text
    assert result.selected_epoch == 1 + max(range(3), key=lambda i: ssims[i])
    val = data.PairedDataset(runs[2:], CHANNELS, result.norm, tmp_path)
    scores = train.validate(result.model, val, torch.device("cpu"), 8)
    assert scores["ssim"] == pytest.approx(max(ssims), abs=1e-6)
    assert math.isnan(scores["dynamics"])  # the published protocol selects on SSIM, as the authors
    assert result.norm == data.norm_stats(runs[:2], CHANNELS)  # training runs only


def test_bad_options(runs, tmp_path):
    with pytest.raises(UsageError, match="--epochs"):
        train.train(runs[:2], CHANNELS, dataclasses.replace(CONFIG, epochs=0), work_dir=tmp_path,
                    checkpoint=tmp_path / "x.pt")
    with pytest.raises(DataError, match="held-out training subject"):
        train.train(runs[:2], CHANNELS, dataclasses.replace(CONFIG, select="val"), work_dir=tmp_path,
                    checkpoint=tmp_path / "x.pt")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            devices.resolve_device("cuda")


def test_precision_choice_on_a_cpu():
    cpu = torch.device("cpu")
    assert devices.autocast_dtype(cpu, "auto") is None and devices.autocast_dtype(cpu, "fp32") is None
    assert devices.autocast_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(UsageError, match="--precision must be one of auto, fp32, bf16"):
        devices.autocast_dtype(cpu, "fp16")


def test_precision_and_determinism_change_what_they_say(runs, tmp_path):
    """On a CPU ``auto`` trains in float32 and the deterministic algorithms change no weight;
    ``bf16`` trains in bfloat16 autocast, which rounds every step differently."""
    one = dataclasses.replace(CONFIG, epochs=1)

    def fit(name, **changes):
        return _weights(train.train(runs[:2], CHANNELS, dataclasses.replace(one, **changes),
                                    work_dir=tmp_path / "w", checkpoint=tmp_path / f"{name}.pt").model)
    auto = fit("auto")
    try:
        exact = fit("deterministic", deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        devices.set_deterministic(False)
    fp32, bf16 = fit("fp32", precision="fp32"), fit("bf16", precision="bf16")
    for name, value in auto.items():
        torch.testing.assert_close(exact[name], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(fp32[name], value, rtol=0, atol=1e-6)
    moved = max(float((bf16[k].float() - v.float()).abs().max()) for k, v in auto.items())
    assert moved > 1e-4
