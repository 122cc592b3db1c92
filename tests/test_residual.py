"""The residual protocol: its targets against an independent computation, the projected output
with its linear readout, the masked loss, checkpoints, and what ``--protocol`` selects."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch
from test_data import CHANNELS, write_derivatives

from spec2vol_bids import data, evaluate, optimisers, train
from spec2vol_bids.config import READOUT_LR, READOUT_MASK_VOXELS, Training
from spec2vol_bids.deviations import DeviationTargets, masked_mse, target_stats
from spec2vol_bids.models import build_model, load_checkpoint, save_checkpoint
from spec2vol_bids.models.residual import KernelReadout, ResidualOutput, band_features


def _training_set(tmp_path):
    out = write_derivatives(tmp_path / "out", subjects=("01", "02"), n_volumes=40)
    runs = data.find_runs(out)
    dataset = data.PairedDataset(runs, CHANNELS, {"kind": "run"}, tmp_path / "work")
    return runs, dataset


def test_targets_equal_an_independent_computation(tmp_path):
    runs, dataset = _training_set(tmp_path)
    stats = target_stats(dataset, runs, components=5)
    volumes = [nib.load(run.target).get_fdata().transpose(3, 2, 0, 1)[run.sample_volumes]
               for run in runs]  # (samples, D, H, W) in model order
    run_means = [v.mean(0) for v in volumes]
    every = np.concatenate(volumes)
    deviations = np.concatenate([v - m for v, m in zip(volumes, run_means)])
    np.testing.assert_allclose(stats["mean"], every.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["scale"], deviations.std(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["shift"][1], every.mean(0) - run_means[1], rtol=1e-4, atol=1e-4)
    mask = evaluate.brain_mask(every.mean(0).astype(np.float32), nib.load(runs[0].target).affine)
    assert (stats["mask"] == mask).all()
    # the basis: orthonormal rows spanning the leading principal directions of the masked,
    # standardised deviations (numpy's SVD of the samples, not their Gram matrix)
    z = deviations[:, mask] / deviations.std(0)[mask]
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    rows = stats["basis"][:, mask.ravel()].astype(np.float64)
    np.testing.assert_allclose(rows @ rows.T, np.eye(5), atol=1e-4)
    np.testing.assert_allclose(np.abs(rows @ vt[:5].T), np.eye(5), atol=1e-3)
    assert not stats["basis"][:, ~mask.ravel()].any()
    # a training sample's target keeps its movement and takes the training mean as anatomy
    shifted = DeviationTargets(dataset, stats["shift"])
    i = len(dataset) - 1
    r, j = dataset.sample(i)
    expected = volumes[r][list(runs[r].sample_volumes).index(j)] - run_means[r] + every.mean(0)
    np.testing.assert_allclose(shifted[i][1].numpy(), expected, rtol=1e-4, atol=1e-3)


def test_residual_output_projects_and_reads_out():
    net = build_model("spec2vol", eeg_channels=4, freq_bins=8, out_shape=(2, 32, 32), context=3,
                      size="tiny", readout_components=3)
    assert isinstance(net, ResidualOutput) and net.readout.weight.shape == (3, 3 * 4 * 2)
    rng = np.random.default_rng(0)
    mean, scale = rng.normal(size=(2, 32, 32)), rng.uniform(0.5, 2, size=(2, 32, 32))
    basis = np.linalg.qr(rng.normal(size=(2 * 32 * 32, 3)))[0].T
    net.set_target_stats(mean, scale, basis)
    x = torch.randn(4, 3, 4, 8)
    with torch.no_grad():
        # untrained, the readout is zero: the network's output projected onto the basis
        inner = net.net(x).flatten(1).double().numpy()
        expected = mean + scale * ((inner @ basis.T) @ basis).reshape(4, 2, 32, 32)
        np.testing.assert_allclose(net(x).numpy(), expected, rtol=1e-4, atol=1e-4)
        net.readout.weight.normal_()
        features = x.reshape(4, 3, 4, 2, 4).mean(-1).flatten(1)
        np.testing.assert_allclose(band_features(x, 4).numpy(), features.numpy(), atol=1e-6)
        scores = inner @ basis.T + features.double().numpy() @ net.readout.weight.double().numpy().T
        expected = mean + scale * (scores @ basis).reshape(4, 2, 32, 32)
        np.testing.assert_allclose(net(x).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_kernel_readout_is_a_linear_map_with_shared_lag_profiles():
    """Its output equals the full linear map whose weight on window l, feature f, component k is
    sum_r kernels[r, l] · maps[k, r, f] (numpy); it starts at zero, its profiles orthonormal."""
    readout = KernelReadout(context=5, features=6, components=3, kernels=2)
    profiles = readout.kernels.detach().double().numpy()
    np.testing.assert_allclose(profiles @ profiles.T, np.eye(2), atol=1e-6)
    np.testing.assert_allclose(profiles[0], np.full(5, 5 ** -0.5), atol=1e-6)  # the constant
    x = torch.randn(4, 5 * 6)
    assert not readout(x).detach().any()
    with torch.no_grad():
        readout.kernels.normal_()
        readout.maps.weight.normal_()
    kernels = readout.kernels.detach().double().numpy()
    maps = readout.maps.weight.detach().double().numpy().reshape(3, 2, 6)
    weight = np.einsum("rl,krf->klf", kernels, maps).reshape(3, 30)
    np.testing.assert_allclose(readout(x).detach().numpy(), x.double().numpy() @ weight.T,
                               rtol=1e-4, atol=1e-4)


def test_kernel_readout_learns_a_shared_response_from_few_samples():
    """Trained by SGD on 40 samples whose targets are one lag profile (a gamma-shaped response)
    times a feature map, plus noise, the kernel readout recovers the map (r > 0.95) and predicts
    new samples better, component by component, than a readout with a weight per window trained
    the same way: it has 32 weights to estimate where that one has 60 per component."""
    rng = np.random.default_rng(0)
    context, features, components = 10, 6, 3
    lag = np.arange(context, 0, -1) * 2.0
    profile = lag ** 5 * np.exp(-lag)
    mapping = rng.normal(size=(features, components))

    def samples(n):
        x = rng.normal(size=(n, context, features))
        y = np.einsum("l,blf,fk->bk", profile / np.linalg.norm(profile), x, mapping)
        y += 0.5 * rng.normal(size=y.shape)
        return torch.tensor(x.reshape(n, -1), dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    def fit(readout, x, y):
        optimiser = torch.optim.SGD(readout.parameters(), lr=0.05, momentum=0.9)
        for _ in range(400):
            optimiser.zero_grad()
            ((readout(x) - y) ** 2).mean().backward()
            optimiser.step()
        return readout

    (x, y), (new_x, new_y) = samples(40), samples(2000)
    kernel = fit(KernelReadout(context, features, components, kernels=2), x, y)
    window = torch.nn.Linear(context * features, components, bias=False)
    torch.nn.init.zeros_(window.weight)
    window = fit(window, x, y)
    with torch.no_grad():
        scores = {name: [np.corrcoef(m(new_x)[:, k], new_y[:, k])[0, 1] for k in range(components)]
                  for name, m in (("kernel", kernel), ("window", window))}
        learned = np.einsum("rl,krf->klf", kernel.kernels.numpy(),
                            kernel.maps.weight.numpy().reshape(components, 2, features))
    assert all(k > w for k, w in zip(scores["kernel"], scores["window"])), scores
    true = np.einsum("l,fk->klf", profile, mapping)
    assert np.corrcoef(learned.ravel(), true.ravel())[0, 1] > 0.95


@pytest.mark.parametrize("model", ["spec2vol", "e2fnet"])
def test_kernel_readout_with_a_context_of_one_window(model):
    """One window has one profile to learn: the readout keeps one and predicts (``--context 1``)."""
    net = build_model(model, eeg_channels=4, freq_bins=8, out_shape=(2, 32, 32), context=1,
                      size="tiny", readout_components=3, readout_kernels=2)
    assert net.readout.kernels.shape == (1, 1) and net.readout.maps.in_features == 4 * 2
    with torch.no_grad():
        net.readout.maps.weight.normal_()
        x = torch.randn(2, 1, 4, 8)
        expected = band_features(x) * net.readout.kernels[0, 0] @ net.readout.maps.weight.T
        np.testing.assert_allclose(net.readout(band_features(x)).numpy(), expected.numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_readout_is_trained_by_sgd_and_the_network_by_adamw():
    config = Training(lr=2e-3)
    model = build_model("spec2vol", eeg_channels=4, freq_bins=8, out_shape=(2, 32, 32), context=3,
                        size="tiny", readout_components=config.readout_components,
                        readout_kernels=config.readout_kernels)
    assert isinstance(model.readout, KernelReadout)
    optimizer, scheduler = optimisers.optimiser(model, config, 100, 1, 8,
                                                mask_voxels=2 * READOUT_MASK_VOXELS)
    adamw, sgd = optimizer.parts
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(sgd, torch.optim.SGD)
    readout = {id(p) for p in model.readout.parameters()}
    assert {id(p) for g in sgd.param_groups for p in g["params"]} == readout
    network = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert network == {id(p) for p in model.parameters()} - readout
    optimizer.step()  # (no gradients yet: PyTorch wants the optimiser stepped first)
    scheduler.step()  # both follow the warm-up: step 1 of 51
    assert adamw.param_groups[0]["lr"] == pytest.approx(2e-3 * 2 / 51)
    maps, profiles = sgd.param_groups  # twice the reference mask: the maps' step doubles
    assert maps["params"] == [model.readout.maps.weight] and profiles["params"] == [model.readout.kernels]
    assert maps["lr"] == pytest.approx(2 * READOUT_LR * 2 / 51)
    assert maps["weight_decay"] == pytest.approx(config.weight_decay / 2)
    assert profiles["lr"] == pytest.approx(READOUT_LR * 2 / 51)
    assert profiles["weight_decay"] == pytest.approx(config.weight_decay)
    with pytest.raises(ValueError, match="mask"):
        optimisers.optimiser(model, config, 100, 1, 8)
    published = build_model("spec2vol", eeg_channels=4, freq_bins=8, out_shape=(2, 32, 32),
                             context=3, size="tiny")
    alone, _ = optimisers.optimiser(published, Training(protocol="published"), 100, 1, 8)
    assert isinstance(alone, torch.optim.AdamW)


def test_readout_trains_alike_on_a_finer_grid():
    """The same standardised data on a grid with every voxel split in eight, as a finer
    resampling gives: with the maps' step scaled by the mask's size the readout makes the same
    predictions and learns the same lag profiles as on the coarse grid; with the coarse grid's
    step it lags."""
    rng = np.random.default_rng(2)
    context, features, components, split = 4, 3, 5, 8
    voxels = READOUT_MASK_VOXELS
    basis = np.linalg.qr(rng.normal(size=(voxels, components)))[0].T  # (k, voxels), orthonormal
    x = torch.from_numpy(rng.normal(size=(32, context * features))).float()
    scores = x.numpy() @ rng.normal(size=(context * features, components)) / np.sqrt(12)
    target = torch.from_numpy(scores * np.sqrt(voxels / components) @ basis).float()  # ~1 a voxel

    class OnGrid(torch.nn.Module):
        def __init__(self, rows):
            super().__init__()
            self.readout = KernelReadout(context, features, components, kernels=2)
            self.register_buffer("basis", torch.from_numpy(rows).float())

        def forward(self, x):  # (batch, context · features) → (batch, 1, 1, voxels on the grid)
            return (self.readout(x) @ self.basis)[:, None, None]

    def fit(rows, y, mask_voxels):
        model = OnGrid(rows)
        loss = masked_mse(torch.ones(1, 1, rows.shape[1]), np.ones((1, 1, rows.shape[1]), bool))
        optimizer, scheduler = optimisers.optimiser(model, Training(), 32, 1, 8, mask_voxels)
        for _ in range(60):
            optimizer.zero_grad()
            loss(model(x), y[:, None, None]).backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():  # the predictions at the first copy of each coarse voxel
            return model(x)[:, 0, 0, ::rows.shape[1] // voxels].numpy(), model.readout.kernels.numpy()

    fine = np.repeat(basis, split, axis=1) / np.sqrt(split)
    fine_target = torch.repeat_interleave(target, split, dim=1)
    coarse, coarse_profiles = fit(basis, target, voxels)
    assert np.corrcoef(coarse.ravel(), target.numpy().ravel())[0, 1] > 0.5  # it learned
    predicted, profiles = fit(fine, fine_target, voxels * split)
    np.testing.assert_allclose(predicted, coarse, atol=1e-4 * np.abs(coarse).max())
    np.testing.assert_allclose(profiles, coarse_profiles, atol=1e-4)
    lagging, _ = fit(fine, fine_target, voxels)
    assert np.linalg.norm(lagging) < 0.5 * np.linalg.norm(coarse)


def test_masked_loss_is_the_standardised_error_inside_the_mask():
    rng = np.random.default_rng(1)
    scale = torch.from_numpy(rng.uniform(0.5, 2, size=(2, 3, 4)).astype(np.float32))
    mask = rng.uniform(size=(2, 3, 4)) > 0.4
    pred, target = torch.randn(5, 2, 3, 4), torch.randn(5, 2, 3, 4)
    z = ((pred - target) / scale).numpy()
    expected = np.mean([np.mean(z[i][mask] ** 2) for i in range(5)])
    assert float(masked_mse(scale, mask)(pred, target)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kernels", [0, 2])  # 0: the readout of models saved before profiles
def test_residual_checkpoint_round_trip(tmp_path, kernels):
    net = build_model("e2fnet", eeg_channels=4, freq_bins=8, out_shape=(2, 16, 16), context=3,
                      size="tiny", readout_components=2, readout_kernels=kernels)
    rng = np.random.default_rng(2)
    net.set_target_stats(rng.normal(size=(2, 16, 16)), np.ones((2, 16, 16)),
                         np.linalg.qr(rng.normal(size=(512, 2)))[0].T)
    with torch.no_grad():
        for weight in net.readout.parameters():
            weight.normal_()
    path = save_checkpoint(tmp_path / "model.pt", net, model_name="e2fnet", channels=["a", "b", "c", "d"],
                           norm_stats={"kind": "run"})
    if not kernels:  # as an earlier version wrote it: its config had no readout_kernels
        payload = torch.load(path, weights_only=True)
        del payload["config"]["readout_kernels"]
        torch.save(payload, path)
    loaded, meta = load_checkpoint(path)
    assert meta["config"]["readout_components"] == 2
    assert meta["config"].get("readout_kernels", 0) == kernels
    assert isinstance(loaded.readout, KernelReadout if kernels else torch.nn.Linear)
    x = torch.randn(2, 3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x))


@pytest.mark.parametrize("protocol, normalisation, components, kernels",
                         [("residual", "run", 64, 2), ("published", "minmax", 0, 0)])
def test_protocol_selects_scaling_and_output(protocol, normalisation, components, kernels):
    training = Training(protocol=protocol)
    assert training.eeg_normalisation == normalisation
    assert training.readout_components == components
    assert training.readout_kernels == kernels
    assert Training(protocol=protocol, eeg_normalisation="standard").eeg_normalisation == "standard"
    model = build_model("spec2vol", eeg_channels=4, freq_bins=8, out_shape=(2, 32, 32), context=3,
                        size="tiny", readout_components=training.readout_components)
    assert isinstance(model, ResidualOutput) == (protocol == "residual")


def test_residual_training_resumes_to_the_same_weights(tmp_path):
    """A fold of the residual protocol stopped after one epoch and resumed ends with the weights
    (buffers included) of an uninterrupted run; its normalisation is the runs' own."""
    out = write_derivatives(tmp_path / "out", subjects=("01", "02"), n_volumes=40)
    runs = data.find_runs(out)
    config = Training(model="spec2vol", size="tiny", epochs=2, batch_size=8, grad_accum=1,
                      warmup_steps=1, device="cpu", progress=False)
    full = train.train(runs, CHANNELS, config, work_dir=tmp_path / "w", checkpoint=tmp_path / "a.pt")
    assert full.norm == {"kind": "run"} and isinstance(full.model, ResidualOutput)
    assert np.isfinite(full.history[-1]["train_loss"]) and full.history[-1]["train_loss"] < 1.5
    train.train(runs, CHANNELS, dataclasses.replace(config, epochs=1), work_dir=tmp_path / "w",
                checkpoint=tmp_path / "b.pt")
    resumed = train.train(runs, CHANNELS, config, work_dir=tmp_path / "w", checkpoint=tmp_path / "b.pt")
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6)


def test_residual_val_selection_keeps_the_best_validation_dynamics(tmp_path):
    """Under the residual protocol ``--select val`` keeps the epoch whose validation subject's
    dynamics (per run, mean voxel-wise r inside the training mask) is highest; the score and the
    validation loss (in the training loss's units) equal an independent computation."""
    out = write_derivatives(tmp_path / "out", subjects=("01", "02", "03"), n_volumes=40)
    runs = data.find_runs(out)
    train_runs, val_runs = runs[:2], runs[2:]
    config = Training(model="spec2vol", size="tiny", epochs=2, batch_size=8, grad_accum=1,
                      warmup_steps=1, device="cpu", progress=False, select="val")
    result = train.train(train_runs, CHANNELS, config, work_dir=tmp_path / "w",
                         checkpoint=tmp_path / "v.pt", val_runs=val_runs)
    scores = [h["val_dynamics"] for h in result.history]
    assert np.all(np.isfinite(scores))
    assert result.selected_epoch == 1 + int(np.argmax(scores))

    stats = target_stats(data.PairedDataset(train_runs, CHANNELS, result.norm, tmp_path / "w"),
                         train_runs, components=64)
    mask = stats["mask"]
    val = data.PairedDataset(val_runs, CHANNELS, result.norm, tmp_path / "w")
    # the kept model adds the training-side subjects' mean volume (validation included), as the
    # mean-volume baseline does; during training it added the training subjects'
    pooled = data.PairedDataset(runs, CHANNELS, result.norm, tmp_path / "w").mean_target()
    np.testing.assert_allclose(result.model.mean.numpy(), pooled, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        pairs = [val[i] for i in range(len(val))]
        pred = result.model(torch.stack([x for x, _ in pairs])).numpy() - pooled + stats["mean"]
    measured = torch.stack([y for _, y in pairs]).numpy().astype(np.float64)
    run_of = np.asarray([val.sample(i)[0] for i in range(len(val))])
    per_run, squared = [], []
    for r in np.unique(run_of):
        p, y = pred[run_of == r][:, mask], measured[run_of == r][:, mask]
        per_run.append(np.mean([np.corrcoef(p[:, v], y[:, v])[0, 1] for v in range(p.shape[1])]))
        moved = measured[run_of == r] + stats["mean"] - measured[run_of == r].mean(0)
        squared.append(((pred[run_of == r] - moved) / stats["scale"])[:, mask] ** 2)
    best = result.history[result.selected_epoch - 1]
    assert best["val_dynamics"] == pytest.approx(np.mean(per_run), abs=1e-5)
    assert best["val_loss"] == pytest.approx(np.concatenate(squared).mean(), rel=1e-4)
