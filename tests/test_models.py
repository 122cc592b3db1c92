"""Spec2VolCAMU-Net, the baselines, the registry and the checkpoint format."""

import dataclasses
import json
import pickle
import time

import pytest
import torch
import torch.nn.functional as F

from spec2vol_bids.errors import DataError, MissingInputError
from spec2vol_bids.models import build_model, list_models, load_checkpoint, save_checkpoint
from spec2vol_bids.models.baselines import MeanVolume
from spec2vol_bids.models.encoder import ConvAttentionBlock
from spec2vol_bids.models.spec2vol import Spec2Vol
from spec2vol_bids.models.vmunet import SS2D

TINY = dict(eeg_channels=16, freq_bins=64, out_shape=(8, 32, 32), size="tiny")


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return build_model("spec2vol", eeg_channels=43, freq_bins=249, out_shape=(32, 64, 64))


def test_full_parameter_count(full_model):
    # The authors' model: 45.9 M parameters, encoder 1.3 M, decoder 44.7 M.
    assert isinstance(full_model, Spec2Vol)
    assert abs(n_params(full_model) - 45.9e6) <= 0.01 * 45.9e6
    assert abs(n_params(full_model.encoder) - 1.3e6) <= 0.05 * 1.3e6
    assert abs(n_params(full_model.decoder) - 44.7e6) <= 0.01 * 44.7e6
    e2fnet = build_model("e2fnet", eeg_channels=43, freq_bins=249, out_shape=(32, 64, 64))
    assert abs(n_params(e2fnet) - 19.2e6) <= 0.01 * 19.2e6


@pytest.mark.parametrize("channels, bins, depth", [(43, 249, 32), (63, 249, 30), (64, 249, 30)])
def test_full_model_shapes(full_model, channels, bins, depth):
    # Only the last layer depends on D, the first on nothing but the context: reuse the
    # full model's weights where the shapes allow, to keep this test quick.
    model = build_model("spec2vol", eeg_channels=channels, freq_bins=bins,
                        out_shape=(depth, 64, 64))
    model.load_state_dict({k: v for k, v in full_model.state_dict().items()
                           if not k.startswith("decoder.final_conv")}, strict=False)
    with torch.no_grad():
        y = model.eval()(torch.rand(1, 20, channels, bins))
    assert y.shape == (1, depth, 64, 64)
    assert torch.isfinite(y).all()


def test_full_model_optimiser_step(full_model):
    model = full_model.train()
    x, target = torch.rand(2, 20, 43, 249), torch.rand(2, 32, 64, 64)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    # the output layer starts at zero: the first step moves it only, the second everything
    for step in range(2):
        optimiser.zero_grad()
        F.mse_loss(model(x), target).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        nonzero = [k for k, p in model.named_parameters() if p.grad.abs().max() > 0]
        if step == 0:
            assert all(k.startswith("decoder.final_conv.") for k in nonzero) and len(nonzero) == 2
        optimiser.step()
    assert len(nonzero) == len(before)
    changed = sum(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert changed == len(before)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_grid_fitting_rules():
    # More channels than grid rows and more bins than grid columns: pooled to the grid.
    model = build_model("spec2vol", eeg_channels=70, freq_bins=300, out_shape=(4, 32, 32),
                        size="tiny")
    assert model(torch.rand(2, 20, 70, 300)).shape == (2, 4, 32, 32)
    # A non-square grid (multiples of 32) works.
    model = build_model("spec2vol", eeg_channels=10, freq_bins=40, out_shape=(3, 32, 64),
                        size="tiny")
    assert model(torch.rand(1, 20, 10, 40)).shape == (1, 3, 32, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("spec2vol", eeg_channels=10, freq_bins=40, out_shape=(3, 48, 48))


def test_attention_equals_multihead_attention_module():
    torch.manual_seed(1)
    block = ConvAttentionBlock(16, branch_width=4, heads=2).eval()
    rows = torch.randn(5, 11, 16)
    want, _ = block.attention(rows, rows, rows, need_weights=False)
    torch.testing.assert_close(block._attend(rows), want, rtol=1e-5, atol=1e-5)


def test_ss2d_paths_follow_the_grid():
    # Transposing the grid swaps the row-major and column-major paths: with the per-path
    # parameters swapped to match (and the depthwise kernel transposed), SS2D commutes with
    # the transposition. This pins down how the four paths are laid out and mapped back.
    torch.manual_seed(2)
    ss2d = SS2D(8, d_state=4).eval()
    swapped = SS2D(8, d_state=4).eval()
    state = ss2d.state_dict()
    order = [1, 0, 3, 2]
    inner = ss2d.conv2d.weight.shape[0]
    swapped_state = dict(state)
    for name in ("x_proj_weight", "dt_projs_weight", "dt_projs_bias"):
        swapped_state[name] = state[name][order]
    for name in ("A_logs", "Ds"):
        swapped_state[name] = state[name].unflatten(0, (4, inner))[order].flatten(0, 1)
    swapped_state["conv2d.weight"] = state["conv2d.weight"].transpose(2, 3)
    swapped.load_state_dict(swapped_state)
    x = torch.randn(2, 4, 8, 8)  # (batch, H, W, d) with H != W
    with torch.no_grad():
        torch.testing.assert_close(swapped(x.transpose(1, 2)), ss2d(x).transpose(1, 2),
                                   rtol=1e-4, atol=1e-5)


def test_same_seed_same_model_and_outputs():
    x = torch.rand(2, 20, 16, 64)

    def seeded(seed):
        torch.manual_seed(seed)
        model = build_model("spec2vol", drop_path=0.2, **TINY)
        torch.nn.init.constant_(model.decoder.final_conv.weight, 0.1)  # it starts at zero
        return model, model(x)  # training mode: drop path draws from the seeded generator

    (first, out_first), (second, out_second) = seeded(123), seeded(123)
    assert torch.equal(out_first, out_second)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(seeded(124)[1], out_first)


def simulated_pairs(n=8, context=20, channels=16, bins=64, out=(8, 32, 32), seed=0):
    """EEG spectra whose band power in two electrode groups drives two BOLD blobs."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.rand(n, 2, generator=gen)
    eeg = torch.rand(n, context, channels, bins, generator=gen) * 0.2
    eeg[:, :, : channels // 2, 8:16] += latent[:, 0, None, None, None]
    eeg[:, :, channels // 2:, 30:40] += latent[:, 1, None, None, None]
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in out), indexing="ij")
    anatomy = 0.6 * torch.exp(-2 * (xx ** 2 + yy ** 2 + zz ** 2))
    blobs = torch.stack([torch.exp(-8 * ((xx - 0.4) ** 2 + yy ** 2)),
                         torch.exp(-8 * ((xx + 0.4) ** 2 + (yy - 0.3) ** 2))])
    bold = anatomy + 0.3 * torch.einsum("nk,kdhw->ndhw", latent, blobs)
    return eeg, bold


@pytest.mark.parametrize("name", ["spec2vol", "e2fnet"])
def test_tiny_model_overfits_simulated_pairs(name):
    eeg, bold = simulated_pairs()
    torch.manual_seed(0)
    model = build_model(name, **TINY)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(eeg), bold)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert time.perf_counter() - start < 60
    assert losses[-1] <= losses[0] / 10


def test_mean_model_fits_and_predicts_the_mean():
    _, bold = simulated_pairs()
    model = build_model("mean", **TINY).fit_mean(bold)
    assert isinstance(model, MeanVolume)
    y = model(torch.rand(3, 20, 16, 64))
    assert y.shape == (3, 8, 32, 32)
    torch.testing.assert_close(y[2], bold.mean(0))
    with pytest.raises(ValueError, match="do not match"):
        model.fit_mean(torch.rand(2, 8, 16, 16))


def test_e2fnet_outputs_are_probabilities():
    model = build_model("e2fnet", **TINY)
    y = model(torch.rand(2, 20, 16, 64))
    assert y.shape == (2, 8, 32, 32)
    assert 0 < y.min() and y.max() < 1


def test_registry_rejects_unknown_names_and_fields():
    assert list_models() == ["spec2vol", "e2fnet", "mean", "ridge", "hrf-ridge"]
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        build_model("unet", **TINY)
    with pytest.raises(ValueError, match="no hyper-parameter"):
        build_model("spec2vol", heds=4, **TINY)
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("spec2vol", **{**TINY, "size": "huge"})
    model = build_model("spec2vol", heads=2, **TINY)
    assert model.config.heads == 2
    assert json.loads(json.dumps(dataclasses.asdict(model.config)))["dims"] == [32, 64, 128, 256]


@pytest.mark.parametrize("name", ["spec2vol", "e2fnet", "mean", "ridge", "hrf-ridge"])
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(5)
    model = build_model(name, **TINY, **({"hrf_tr": 1.5} if name == "hrf-ridge" else {})).eval()
    if name == "mean":
        model.fit_mean(simulated_pairs()[1])
    if name.endswith("ridge"):  # a fitted ridge is nothing but its stored buffers
        for buffer in model.state_dict().values():
            buffer.copy_(torch.randn_like(buffer))
    channels = [f"E{i}" for i in range(16)]
    stats = {"eeg_min": 0.0, "eeg_max": 12.5, "bins": [1, 64]}
    path = save_checkpoint(tmp_path / "model.pt", model, model_name=name, channels=channels,
                           norm_stats=stats, extra={"fold": "01", "epoch": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary left
    loaded, meta = load_checkpoint(path)
    assert meta["model_name"] == name and meta["channels"] == channels
    assert meta["norm_stats"] == stats and meta["extra"] == {"fold": "01", "epoch": 3}
    assert meta["config"] == json.loads(json.dumps(dataclasses.asdict(model.config)))
    assert loaded.config == model.config
    x = torch.rand(2, 20, 16, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_refuses_code_and_mismatches(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "spec2vol-model", "payload": Payload()}, evil)
    with pytest.raises(DataError, match="evil.pt") as info:
        load_checkpoint(evil)
    assert info.value.code == 65
    assert not marker.exists()

    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DataError, match="plain.pkl: not a readable .* safe loader"):
        load_checkpoint(plain)
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")  # safe, but not ours
    cut = tmp_path / "cut.pt"
    cut.write_bytes((tmp_path / "other.pt").read_bytes()[:300])
    with pytest.raises(DataError, match=r"cut.pt: not a readable spec2vol model checkpoint \(refused "
                                        r"by the safe loader: the file is damaged or truncated\); use an "
                                        r"intact model.pt written by spec2vol$"):
        load_checkpoint(cut)
    # the loader's own words for these are a bare byte value ("101") or nothing at all
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.pt: .*\(refused by the safe loader: the file is empty\)"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(DataError, match=r"notes.pt: .*loader: not a PyTorch file \(neither a zip "
                                        r"archive nor a pickle\)\)"):
        load_checkpoint(tmp_path / "notes.pt")
    with pytest.raises(DataError, match="other.pt: not a spec2vol model checkpoint"):
        load_checkpoint(tmp_path / "other.pt")

    model = build_model("spec2vol", **TINY)
    good = save_checkpoint(tmp_path / "model.pt", model, model_name="spec2vol",
                           channels=["E1"], norm_stats={})
    payload = torch.load(good, weights_only=True)
    payload["config"]["dims"] = [8, 16, 32, 64]  # weights no longer fit
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(DataError, match="mismatch.pt.*do not fit"):
        load_checkpoint(tmp_path / "mismatch.pt")
    payload["config"]["name"] = "transformer"
    torch.save(payload, tmp_path / "unknown.pt")
    with pytest.raises(DataError, match="unknown model 'transformer'"):
        load_checkpoint(tmp_path / "unknown.pt")
    with pytest.raises(MissingInputError):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="does not match"):
        save_checkpoint(tmp_path / "x.pt", model, model_name="e2fnet", channels=[],
                        norm_stats={})
