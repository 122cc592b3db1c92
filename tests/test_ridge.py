"""The linear baselines (ridge, hrf-ridge): their closed form against an independent solve,
hrf-ridge's HRF-convolved features against an independent convolution, the cross-validation
groups, per-run EEG standardisation, and training progress lines in batch logs."""

from __future__ import annotations

import logging

import json

import numpy as np
import pytest
import torch
from scipy import stats
from test_data import CHANNELS, write_derivatives

from spec2vol_bids import data, linear, train
from spec2vol_bids.config import Training
from spec2vol_bids.errors import DataError
from spec2vol_bids.models import build_model, load_checkpoint, save_checkpoint
from spec2vol_bids.models.ridge import canonical_hrf


def _problem(seed=0, n=60, context=2, channels=3, bins=8, shape=(2, 3, 4), name="ridge", **hrf):
    """Inputs, a random linear map of their band features plus noise, and subject groups."""
    rng = np.random.default_rng(seed)
    model = build_model(name, eeg_channels=channels, freq_bins=bins, out_shape=shape,
                        context=context, band=2, components=64, **hrf)
    x = torch.from_numpy(rng.normal(size=(n, context, channels, bins)).astype(np.float32))
    features = model.net.features(x).numpy()
    truth = rng.normal(size=(features.shape[1], int(np.prod(shape))))
    y = features @ truth + 0.5 * rng.normal(size=(n, int(np.prod(shape))))
    return model, x, features, y, np.repeat(np.arange(3), n // 3)


@pytest.mark.parametrize("name, hrf", [("ridge", {}), ("hrf-ridge", {"hrf_tr": 2.0})])
def test_ridge_equals_the_calibrated_primal_solution_at_the_chosen_penalty(name, hrf):
    model, x, features, y, groups = _problem(name=name, context=6 if hrf else 2, **hrf)
    mask = np.ones(model.config.out_shape, bool)
    info = model.net.fit(features, y, groups, mask)
    # with as many components as voxels the response basis spans every response: no reduction
    assert info["components"] == y.shape[1]
    basis = model.net.components.double().numpy()[: info["components"]]
    f = features.astype(np.float64)

    def primal(rows):
        return np.linalg.solve(f[rows].T @ f[rows] + info["penalty"] * np.eye(f.shape[1]),
                               f[rows].T @ y[rows])
    # each component's gain: least squares from its out-of-group predictions to its scores
    predicted = np.concatenate([f[groups == g] @ primal(groups != g) for g in range(3)]) @ basis.T
    measured = np.concatenate([y[groups == g] for g in range(3)]) @ basis.T
    gains = np.array([max(0.0, (predicted[:, c] @ measured[:, c]) / (predicted[:, c] @ predicted[:, c]))
                      for c in range(basis.shape[0])])
    np.testing.assert_allclose(info["gains"], gains, rtol=1e-6)
    assert not np.allclose(gains, 1.0)
    weights = primal(np.ones(len(f), bool)) @ basis.T * gains @ basis
    new = torch.randn(5, *x.shape[1:])
    expected = model.net.features(new).double().numpy() @ weights
    got = model.net(new).reshape(5, -1).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_hrf_ridge_features_are_the_band_amplitudes_convolved_with_spms_canonical_hrf():
    """SPM's canonical HRF from scipy's gamma densities; window i of a 20-window context is
    (20 − i) TRs before the predicted volume."""
    context, tr = 20, 1.5
    model = build_model("hrf-ridge", eeg_channels=3, freq_bins=8, out_shape=(2, 3, 4),
                        context=context, band=2, hrf_tr=tr)
    x = torch.randn(4, context, 3, 8)
    lags = (context - np.arange(context)) * tr
    h = stats.gamma.pdf(lags, 6) - stats.gamma.pdf(lags, 16) / 6
    bands = x.double().numpy().reshape(4, context, 3, 4, 2).mean(-1)  # bins averaged in pairs
    expected = np.einsum("l,nlcb->ncb", h / np.linalg.norm(h), bands).reshape(4, -1)
    np.testing.assert_allclose(model.net.features(x).double().numpy(), expected, rtol=1e-5, atol=1e-6)
    fine = np.linspace(0, 32, 3201)
    response = canonical_hrf(fine)
    assert fine[np.argmax(response)] == pytest.approx(5.0, abs=0.2)  # the peak
    assert canonical_hrf(np.array([15.0]))[0] < 0  # the undershoot
    assert canonical_hrf(np.array([0.0, -2.0])).tolist() == [0, 0]
    with pytest.raises(ValueError, match="repetition time"):
        build_model("hrf-ridge", eeg_channels=3, freq_bins=8, out_shape=(2, 3, 4))


def test_penalty_is_the_best_inner_cross_validation_score():
    model, x, features, y, groups = _problem(seed=1)
    info = model.net.fit(features, y, groups, np.ones(model.config.out_shape, bool))
    scores = {float(k): v for k, v in info["scores"].items()}
    best = max(scores, key=scores.get)
    gram = features.astype(np.float64) @ features.T.astype(np.float64)
    assert info["penalty"] == pytest.approx(best * np.trace(gram) / len(gram))
    # the score recomputed in the primal: fit on two groups, correlate voxel-wise on the third
    f = features.astype(np.float64)
    lam = best * np.trace(gram) / len(gram)
    per_group = []
    for g in range(3):
        held = groups == g
        w = np.linalg.solve(f[~held].T @ f[~held] + lam * np.eye(f.shape[1]), f[~held].T @ y[~held])
        p, t = f[held] @ w, y[held]
        per_group.append(np.mean([np.corrcoef(p[:, v], t[:, v])[0, 1] for v in range(y.shape[1])]))
    assert scores[best] == pytest.approx(np.mean(per_group), abs=1e-6)


def test_cv_groups_are_subjects_then_runs_then_contiguous_blocks(tmp_path):
    out = write_derivatives(tmp_path / "out", subjects=("01", "02"), n_volumes=40)
    runs = data.find_runs(out)
    run_of = np.repeat([0, 1], 10)
    assert list(linear.cv_groups(runs, run_of)) == ["01"] * 10 + ["02"] * 10
    one = [runs[0]]
    blocks = linear.cv_groups(one, np.zeros(20, int))
    assert list(blocks) == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    with pytest.raises(Exception, match="at least 8 training samples"):
        linear.cv_groups(one, np.zeros(7, int))


def test_run_normalisation_uses_each_runs_own_windows(tmp_path):
    out = write_derivatives(tmp_path / "out", subjects=("01", "02"), n_volumes=40)
    runs = data.find_runs(out)
    norm = data.norm_stats(runs, CHANNELS, kind="run")
    assert norm == {"kind": "run"}
    dataset = data.PairedDataset(runs, CHANNELS, norm)
    for r, run in enumerate(runs):
        spec = np.load(run.spectrogram).astype(np.float64)
        windows = spec[run.discard:run.n_volumes - 1]
        mu, sd = windows.mean(0), windows.std(0)
        i = next(i for i in range(len(dataset)) if dataset.sample(i)[0] == r)
        j = dataset.sample(i)[1]
        expected = (spec[j - run.context:j] - mu) / sd
        np.testing.assert_allclose(dataset[i].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_fit_ridge_saves_and_reloads(tmp_path):
    out = write_derivatives(tmp_path / "out", subjects=("01", "02", "03"), n_volumes=50)
    runs = [r for r in data.find_runs(out) if r.subject != "01"]
    result = linear.fit_ridge(runs, CHANNELS, work_dir=tmp_path / "work")
    assert result.norm == {"kind": "run"}
    # with no EEG variation the output is the training subjects' mean volume
    zero = torch.zeros(1, runs[0].context, len(CHANNELS), result.model.config.freq_bins)
    mean = data.PairedDataset(runs, CHANNELS, result.norm, tmp_path / "work").mean_target()
    np.testing.assert_allclose(result.model(zero)[0].numpy(), mean, rtol=1e-5, atol=1e-5)
    save_checkpoint(tmp_path / "ridge.pt", result.model, model_name="ridge", channels=CHANNELS,
                    norm_stats=result.norm)
    loaded, meta = load_checkpoint(tmp_path / "ridge.pt")
    x = torch.randn(3, *zero.shape[1:])
    torch.testing.assert_close(loaded(x), result.model(x))
    assert meta["norm_stats"] == {"kind": "run"}


def test_fit_hrf_ridge_takes_the_runs_tr_and_refuses_mixed_ones(tmp_path):
    out = write_derivatives(tmp_path / "out", subjects=("01", "02", "03"), n_volumes=50)
    runs = data.find_runs(out)
    result = linear.fit_ridge(runs, CHANNELS, work_dir=tmp_path / "work", model_name="hrf-ridge")
    tr = float(runs[0].meta["RepetitionTime"])
    assert result.model.config.name == "hrf-ridge" and result.model.config.hrf_tr == tr
    save_checkpoint(tmp_path / "hrf.pt", result.model, model_name="hrf-ridge", channels=CHANNELS,
                    norm_stats=result.norm)
    loaded, _ = load_checkpoint(tmp_path / "hrf.pt")
    x = torch.randn(3, runs[0].context, len(CHANNELS), result.model.config.freq_bins)
    torch.testing.assert_close(loaded(x), result.model(x))
    sidecar = next((out / "sub-03" / "eeg").glob("*_spectrogram.json"))
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "RepetitionTime": 2 * tr}))
    with pytest.raises(DataError, match=f"{tr:g} s, {2 * tr:g} s"):
        linear.fit_ridge(data.find_runs(out), CHANNELS, work_dir=tmp_path / "work",
                         model_name="hrf-ridge")


def test_batch_logs_show_progress_every_few_seconds(tmp_path, caplog, monkeypatch):
    """Under pytest stderr is not a terminal, as in SLURM or a container: progress lines are
    logged on a timer, also while a batch runs."""
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0.05)
    # ten batches: long enough for several lines on a fast CPU too
    out = write_derivatives(tmp_path / "out", subjects=("01",), n_volumes=46)
    runs = data.find_runs(out)
    config = Training(size="tiny", protocol="published", epochs=2, batch_size=4, grad_accum=1,
                      device="cpu", warmup_steps=1, progress=False)
    with caplog.at_level(logging.INFO, logger="spec2vol_bids.train"):
        train.train(runs, CHANNELS, config, work_dir=tmp_path / "work",
                    checkpoint=tmp_path / "ck.pt", description="fold 01 spec2vol")
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    assert len(lines) >= 3, lines
    assert all(line.startswith("fold 01 spec2vol: epoch ") and ", batch " in line
               and ", loss " in line for line in lines)
    assert any(" min " in line and "unknown" not in line for line in lines)

