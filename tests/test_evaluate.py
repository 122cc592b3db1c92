"""Tests of the metrics and the group tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_data import AFFINE, write_derivatives

from spec2vol_bids import data, evaluate


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = write_derivatives(tmp_path_factory.mktemp("eval") / "out", subjects=("01",))
    run = data.find_runs(out)[0]
    target = np.load(data.cache_target(run.target, tmp_path_factory.mktemp("work")))
    return target[run.sample_volumes]


def test_dynamics_of_truth_is_one_and_of_a_constant_is_zero(measured):
    truth = evaluate.evaluate_run(measured, measured, AFFINE)
    assert truth["dynamics"] == pytest.approx(1.0, abs=1e-5)
    assert truth["ssim"].mean() == pytest.approx(1.0, abs=1e-5)
    assert truth["ssim3d"].mean() == pytest.approx(1.0, abs=1e-5)
    constant = np.broadcast_to(measured.mean(axis=0), measured.shape)
    flat = evaluate.evaluate_run(constant, measured, AFFINE)
    assert flat["dynamics"] == 0.0
    assert np.all(flat["dynamics_map"] == 0.0)
    # anatomy alone scores well on SSIM: the reason the baseline is reported
    assert flat["ssim"].mean() > 0.3


def test_dynamics_is_a_correlation(measured):
    rng = np.random.default_rng(1)
    # an affine change of every voxel's series keeps its correlation; sign flips it
    scaled = 0.5 * measured + 0.2
    assert evaluate.evaluate_run(scaled, measured, AFFINE)["dynamics"] == pytest.approx(1.0, abs=1e-5)
    flipped = evaluate.evaluate_run(1 - measured, measured, AFFINE)
    assert flipped["dynamics"] == pytest.approx(-1.0, abs=1e-5)
    noisy = measured + rng.normal(scale=1.0, size=measured.shape).astype(np.float32)
    r = evaluate.dynamics_map(noisy, measured)
    expected = np.corrcoef(noisy[:, 8, 16, 16], measured[:, 8, 16, 16])[0, 1]
    assert r[8, 16, 16] == pytest.approx(expected, abs=1e-5)


def test_mask_comes_from_the_measured_data(measured):
    result = evaluate.evaluate_run(measured, measured, AFFINE)
    mask = result["mask"]
    assert mask.shape == measured.shape[1:]
    assert 0.1 < mask.mean() < 0.9  # the simulated brain, not the whole box
    assert not mask[:, 0, 0].any()
    assert np.all(result["dynamics_map"][~mask] == 0)


def test_image_metrics_match_torchmetrics_definitions():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.random((3, 16, 32, 32), dtype=np.float32))
    pred = (target + 0.1 * torch.randn(3, 16, 32, 32)).clamp(0, 1)
    metrics = evaluate.image_metrics(pred, target)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    np.testing.assert_allclose(metrics["psnr"], (-10 * torch.log10(mse)).numpy(), rtol=1e-5)
    assert metrics["ssim"].shape == (3,) and np.all(metrics["ssim"] < 1)
    assert metrics["ssim3d"].shape == (3,) and np.all(metrics["ssim3d"] < 1)


def test_tables_and_summary(tmp_path):
    rows = [{"participant_id": f"sub-0{i}", "model": m, "fold": f"0{i}", "ssim": s, "psnr": 20.0 + i,
             "ssim3d": s, "dynamics": d, "n_samples": 34}
            for i in (1, 2) for m, s, d in (("spec2vol", 0.6 + i / 10, 0.5), ("mean", 0.5, 0.0))]
    table = evaluate.write_table(rows, tmp_path / "group_metrics.tsv", sidecar={"Summary": {}})
    lines = (tmp_path / "group_metrics.tsv").read_text().splitlines()
    assert lines[0].split("\t") == list(evaluate.COLUMNS)
    assert lines[1].startswith("sub-01\tmean\t01\t")
    sidecar = json.loads((tmp_path / "group_metrics.json").read_text())
    assert set(evaluate.COLUMNS) <= set(sidecar) and "Summary" in sidecar
    assert all("Description" in sidecar[c] for c in evaluate.COLUMNS)
    back = evaluate.read_table(tmp_path / "group_metrics.tsv")
    assert back["fold"].tolist() == ["01", "01", "02", "02"]
    summary = evaluate.summarise(table)
    assert summary["spec2vol"]["ssim"]["mean"] == pytest.approx(0.75)
    assert summary["spec2vol"]["ssim"]["std"] == pytest.approx(0.05)
    assert summary["mean"]["dynamics"] == {"mean": 0.0, "std": 0.0}
    assert "spec2vol: ssim 0.750 ± 0.050" in "\n".join(evaluate.summary_lines(summary))
