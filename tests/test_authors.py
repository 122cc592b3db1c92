"""The authors' parameter names (spec2vol_bids.models.authors) and the checkpoint converter."""

import pickle

import pytest
import torch

from spec2vol_bids.errors import DataError, MissingInputError, UsageError
from spec2vol_bids.models import build_model, load_checkpoint
from spec2vol_bids.models.authors import (convert_authors_checkpoint, from_authors_key,
                                          from_authors_state_dict, main, to_authors_key,
                                          to_authors_state_dict)

# The authors' grid is always 64 x 64; few channels, bins and windows keep the tiny model fast.
TINY = dict(eeg_channels=6, freq_bins=32, out_shape=(4, 64, 64), context=4, size="tiny")
CHANNELS = ["Fp1", "Fp2", "C3", "C4", "O1", "O2"]
NORM = {"kind": "minmax", "min": -3.5, "max": 12.25}
VM = "decoder.model.vmunet."


def tiny_model(seed=0):
    """A tiny Spec2Vol with every parameter random (its output layer starts at zero)."""
    torch.manual_seed(seed)
    model = build_model("spec2vol", **TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def full_state():
    """The full-size model's state dict (built once; no forward pass)."""
    return build_model("spec2vol", eeg_channels=43, freq_bins=249, out_shape=(32, 64, 64)).state_dict()


def authors_keys(depths=(2, 2, 9, 2), decoder_depths=(2, 9, 2, 2), encoder_blocks=2):
    """The authors' full key set, enumerated from their module tree (Spectrogram2fMRI.py,
    vmunet/vmunet.py, vmunet/vmamba.py) independently of the renaming rules."""
    conv, norm = ("weight", "bias"), ("weight", "bias")
    keys = [f"encoder.initial_conv.0.{leaf}" for leaf in conv]
    for b in range(1, encoder_blocks + 1):
        block = f"encoder.block{b}."
        for branch in ("branch1.0", "branch2.0", "branch3.0", "fusion.0"):
            keys += [f"{block}multi_scale.{branch}.{leaf}" for leaf in conv]
        keys += [f"{block}{ln}.{leaf}" for ln in ("ln1", "ln2") for leaf in norm]
        keys += [f"{block}attn.attn.{leaf}" for leaf in
                 ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")]
        keys += [f"{block}downsample.{leaf}" for leaf in conv]
    keys += [f"{VM}patch_embed.proj.{leaf}" for leaf in conv]
    keys += [f"{VM}patch_embed.norm.{leaf}" for leaf in norm]
    ss2d = ["in_proj.weight", "conv2d.weight", "conv2d.bias", "x_proj_weight", "dt_projs_weight",
            "dt_projs_bias", "A_logs", "Ds", "out_norm.weight", "out_norm.bias", "out_proj.weight"]
    block_leaves = ["ln_1.weight", "ln_1.bias"] + [f"self_attention.{leaf}" for leaf in ss2d]
    for stage, (name, stage_depths) in enumerate((("layers", depths), ("layers_up", decoder_depths))):
        for i, depth in enumerate(stage_depths):
            keys += [f"{VM}{name}.{i}.blocks.{j}.{leaf}" for j in range(depth) for leaf in block_leaves]
            if name == "layers" and i < len(depths) - 1:
                keys += [f"{VM}layers.{i}.downsample.{leaf}" for leaf in
                         ("norm.weight", "norm.bias", "reduction.weight")]
            if name == "layers_up" and i > 0:
                keys += [f"{VM}layers_up.{i}.upsample.{leaf}" for leaf in
                         ("expand.weight", "norm.weight", "norm.bias")]
    keys += [f"{VM}final_up.{leaf}" for leaf in ("expand.weight", "norm.weight", "norm.bias")]
    keys += [f"{VM}final_conv.{leaf}" for leaf in conv]
    return keys


def test_tiny_round_trip_is_one_to_one_and_exact():
    state = tiny_model().state_dict()
    theirs = to_authors_state_dict(state)
    assert len(theirs) == len(state)  # one-to-one: no two of our keys share a name
    assert sorted(theirs) == sorted(authors_keys((1, 1, 1, 1), (1, 1, 1, 1)))
    back = from_authors_state_dict(theirs)
    assert list(back) == list(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key
        assert from_authors_key(to_authors_key(key)) == key


def test_full_size_key_map(full_state):
    assert len(full_state) == 455
    theirs = to_authors_state_dict(full_state)
    assert sorted(theirs) == sorted(authors_keys())
    assert not set(theirs) & set(full_state)  # no full name is shared
    shapes = {k: tuple(v.shape) for k, v in theirs.items()}
    assert shapes["encoder.block1.multi_scale.branch1.0.weight"] == (32, 256, 3, 1)
    assert shapes["encoder.block2.attn.attn.in_proj_weight"] == (768, 256)
    assert shapes[VM + "layers.0.blocks.0.self_attention.x_proj_weight"] == (4, 38, 192)
    assert shapes[VM + "layers_up.1.upsample.expand.weight"] == (1536, 768)  # our upsample.0
    assert shapes[VM + "final_up.norm.weight"] == (24,)
    back = from_authors_state_dict(theirs, reference=full_state)
    assert all(back[k] is full_state[k] for k in full_state)


def test_refuses_keys_that_do_not_map():
    theirs = to_authors_state_dict(tiny_model().state_dict())
    for bad in (VM + "layers.0.blocks.0.self_attention.x_proj.weight",  # unstacked x_proj
                "encoder.block0.ln1.weight",  # their blocks count from 1
                VM + "layers.01.blocks.0.ln_1.weight",
                "module." + VM + "final_conv.weight"):
        with pytest.raises(DataError, match="map to nothing") as info:
            from_authors_state_dict({**theirs, bad: torch.zeros(1)})
        assert "\n" not in str(info.value) and info.value.code == 65
    with pytest.raises(DataError, match="map to nothing"):
        to_authors_state_dict({"decoder.layers.0.0.ln_2.weight": torch.zeros(1)})


def test_refuses_shapes_that_do_not_fit_and_missing_keys():
    model = tiny_model()
    theirs = to_authors_state_dict(model.state_dict())
    wrong = dict(theirs)
    wrong[VM + "final_conv.weight"] = torch.zeros(30, 8, 1, 1)
    with pytest.raises(DataError, match=r"vmunet.final_conv.weight' has shape \(30, 8, 1, 1\) but the model's "
                       r"'decoder.final_conv.weight' is \(4, 8, 1, 1\)"):
        from_authors_state_dict(wrong, reference=model)
    partial = {k: v for k, v in theirs.items() if "ln2" not in k}
    with pytest.raises(DataError, match="missing"):
        from_authors_state_dict(partial, reference=model)


def test_converter_end_to_end(tmp_path):
    model = tiny_model(seed=3)
    src = tmp_path / "epoch_9_best_SSIM_0.61.pth"
    torch.save(to_authors_state_dict(model.state_dict()), src)  # what their script saves
    out = convert_authors_checkpoint(src, tmp_path / "model.pt", channels=CHANNELS, norm_stats=NORM,
                                     **{k: v for k, v in TINY.items()})
    loaded, meta = load_checkpoint(out)
    assert meta["channels"] == CHANNELS and meta["norm_stats"] == NORM
    assert meta["extra"]["ConvertedFrom"] == src.name
    x = torch.rand(2, 4, 6, 32)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert expected.abs().max() > 1e-3  # not the zero-initialised output layer
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)

    # A DistributedDataParallel model's "module." prefix, and a dict holding the state dict.
    torch.save({"state_dict": {"module." + k: v for k, v in
                               to_authors_state_dict(model.state_dict()).items()}}, src)
    again, _ = load_checkpoint(convert_authors_checkpoint(
        src, tmp_path / "again.pt", channels=CHANNELS, norm_stats=NORM, **TINY))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                  loaded.state_dict().values()))


def test_converter_refusals(tmp_path):
    model = tiny_model()
    src = tmp_path / "latest.pth"
    torch.save(to_authors_state_dict(model.state_dict()), src)
    kwargs = dict(channels=CHANNELS, norm_stats=NORM, **TINY)
    with pytest.raises(UsageError, match="min < max"):
        convert_authors_checkpoint(src, tmp_path / "m.pt", **{**kwargs, "norm_stats": {"min": 1, "max": 1}})
    with pytest.raises(UsageError, match="5 channel names for 6"):
        convert_authors_checkpoint(src, tmp_path / "m.pt", **{**kwargs, "channels": CHANNELS[:5]})
    with pytest.raises(UsageError, match="64 x 64"):
        convert_authors_checkpoint(src, tmp_path / "m.pt", **{**kwargs, "out_shape": (4, 32, 32)})
    with pytest.raises(DataError, match="latest.pth: .*has shape"):  # their --fmri_channel differs
        convert_authors_checkpoint(src, tmp_path / "m.pt", **{**kwargs, "out_shape": (5, 64, 64)})
    with pytest.raises(MissingInputError):
        convert_authors_checkpoint(tmp_path / "absent.pth", tmp_path / "m.pt", **kwargs)

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"encoder.initial_conv.0.weight": Payload()}, protocol=2))
    with pytest.raises(DataError, match="evil.pth: not a readable PyTorch state dict"):
        convert_authors_checkpoint(evil, tmp_path / "m.pt", **kwargs)
    assert not marker.exists() and not (tmp_path / "m.pt").exists()
    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(DataError, match=r"notes.pth: not a readable PyTorch state dict \(the safe "
                                        r"loader refused it: not a PyTorch file \(neither a zip "
                                        r"archive nor a pickle\)\)$"):
        convert_authors_checkpoint(tmp_path / "notes.pth", tmp_path / "m.pt", **kwargs)


def test_command_line(tmp_path, capsys):
    model = tiny_model(seed=4)
    src = tmp_path / "latest.pth"
    torch.save(to_authors_state_dict(model.state_dict()), src)
    dst = tmp_path / "model.pt"
    args = [str(src), str(dst), "--channels", *CHANNELS, "--freq-bins", "32",
            "--out-shape", "4", "64", "64", "--context", "4", "--model-config", "tiny"]
    assert main(args) == 64  # no --input-min/--input-max
    err = capsys.readouterr().err
    assert err.startswith("spec2vol-convert-authors: error: ") and err.count("\n") == 1
    assert "--input-min" in err
    assert main(args + ["--input-min", "0", "--input-max", "nan"]) == 64
    assert "finite" in capsys.readouterr().err
    assert not dst.exists()

    assert main(args + ["--input-min", "-3.5", "--input-max", "12.25"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {dst}")
    loaded, meta = load_checkpoint(dst)
    assert meta["norm_stats"] == NORM and meta["channels"] == CHANNELS
    x = torch.rand(1, 4, 6, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), rtol=0, atol=1e-6)

    assert main(args + ["--input-min", "0", "--input-max", "1"]) == 64  # DST exists
    assert "--overwrite" in capsys.readouterr().err
    wrong = list(args)
    wrong[wrong.index("--out-shape") + 1] = "5"  # D = their --fmri_channel, not the file's
    assert main(wrong + ["--input-min", "0", "--input-max", "1", "--overwrite"]) == 65
    err = capsys.readouterr().err
    assert "latest.pth:" in err and "shape" in err and err.count("\n") == 1
    assert main([str(tmp_path / "absent.pth"), str(dst), "--channels", "A", "--freq-bins", "32",
                 "--out-shape", "4", "64", "64", "--input-min", "0", "--input-max", "1",
                 "--overwrite"]) == 66
