"""Tests of synthesis from a stored model: NIfTI layout, coverage and channel matching."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from test_data import AFFINE, CHANNELS, CONTEXT, DISCARD, GRID, TR, write_derivatives

from spec2vol_bids import synthesize
from spec2vol_bids.eeg import standard_montage
from spec2vol_bids.errors import DataError
from spec2vol_bids.models import build_model, load_checkpoint, save_checkpoint

N_VOLUMES = 50


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("spec2vol", eeg_channels=len(CHANNELS), freq_bins=16,
                        out_shape=(GRID[2], GRID[0], GRID[1]), size="tiny")
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, model, model_name="spec2vol", channels=CHANNELS,
                    norm_stats={"min": -4.0, "max": 4.0},
                    extra={"Fold": "final", "TargetAffine": AFFINE.tolist(), "RepetitionTime": TR})
    return path


def _spec(out, subject):
    return next(out.glob(f"sub-{subject}/eeg/*_spectrogram.npy"))


def test_synthesised_nifti_layout_and_coverage(tmp_path, model_path):
    out = write_derivatives(tmp_path / "out", subjects=("01",), n_volumes=N_VOLUMES)
    target = next(out.glob("sub-01/func/*_desc-target_bold.nii.gz"))
    synth = out / "sub-01" / "func" / "sub-01_task-rest_desc-synth_bold.nii.gz"
    synthesize.synthesize_from_checkpoint(model_path, _spec(out, "01"), synth, target=target,
                                          sources=["bids:raw:sub-01/eeg/sub-01_task-rest_eeg.vhdr"])
    img = nib.load(synth)
    n = N_VOLUMES - DISCARD - CONTEXT
    assert img.shape == GRID + (n,)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, nib.load(target).affine)
    assert img.header.get_zooms()[3] == pytest.approx(TR)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    sidecar = json.loads(synth.with_name(synth.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["RepetitionTime"] == TR
    assert sidecar["SourceVolumes"] == [DISCARD + CONTEXT, N_VOLUMES - 1]
    assert sidecar["SkullStripped"] is False and sidecar["Model"] == "spec2vol"
    assert sidecar["Sources"][0] == "bids::sub-01/eeg/sub-01_task-rest_desc-spec2vol_spectrogram.npy"
    # volume k of the series is the model's output for source volume 26 + k
    model, _ = load_checkpoint(model_path)
    spec = np.load(_spec(out, "01"))
    x = torch.from_numpy((spec[10 - CONTEXT + 26:36] + 4) / 8).float()[None]
    with torch.no_grad():
        expected = model(x)[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(img.get_fdata()[..., 10], expected, rtol=1e-4, atol=1e-5)
    assert not list(synth.parent.glob(".*"))


def test_eeg_only_subject_uses_the_model_grid(tmp_path, model_path, caplog):
    out = write_derivatives(tmp_path / "out", subjects=("07",), n_volumes=40, bold=False)
    synth = tmp_path / "synth_bold.nii.gz"
    synthesize.synthesize_from_checkpoint(model_path, _spec(out, "07"), synth)
    img = nib.load(synth)
    assert img.shape == GRID + (40 - DISCARD - CONTEXT,)
    np.testing.assert_allclose(img.affine, AFFINE)
    sidecar = json.loads(synth.with_name("synth_bold.json").read_text())
    assert sidecar["SpatialReference"] == ("the target grid of a training run (the model does not "
                                           "record which)")
    # training runs whose scanner-space grids lie apart: the placement is one run's head position
    model, meta = load_checkpoint(model_path)
    spread = tmp_path / "spread.pt"
    save_checkpoint(spread, model, model_name="spec2vol", channels=CHANNELS,
                    norm_stats=meta["norm_stats"],
                    extra={**meta["extra"], "TargetAffineFrom": "sub-01_task-rest",
                           "TargetGridSpreadMm": 12.5})
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids"):
        synthesize.synthesize_from_checkpoint(spread, _spec(out, "07"), synth)
    placed = json.loads(synth.with_name("synth_bold.json").read_text())["SpatialReference"]
    assert placed.startswith("the target grid of the training run sub-01_task-rest; the training "
                             "runs' grids lie up to 12.5 mm from it")
    assert placed in caplog.text


@pytest.mark.parametrize("trained_on", ["Study B", "Study A"])
def test_in_sample_only_within_the_dataset_the_model_was_fitted_on(tmp_path, model_path, caplog,
                                                                   trained_on):
    """sub-01 of study B is not sub-01 of study A: the labels say "in-sample" only when the
    model records that it was fitted on this very dataset."""
    out = write_derivatives(tmp_path / "out", subjects=("01",), n_volumes=40, bold=False)
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "spec2vol derivatives of Study B", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    model, meta = load_checkpoint(model_path)
    fitted = tmp_path / "fitted.pt"
    save_checkpoint(fitted, model, model_name="spec2vol", channels=CHANNELS, norm_stats=meta["norm_stats"],
                    extra={**meta["extra"], "TrainSubjects": ["01", "02"], "TrainingDataset": trained_on})
    synth = tmp_path / "synth_bold.nii.gz"
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids"):
        synthesize.synthesize_from_checkpoint(fitted, _spec(out, "01"), synth)
    sidecar = json.loads(synth.with_name("synth_bold.json").read_text())
    assert sidecar["ModelFittedOnSubjects"] == ["01", "02"] and sidecar["ModelTrainingDataset"] == trained_on
    warned = 'sub-01 is one of the subjects the model was fitted on, in this dataset ("Study B")'
    assert (warned in caplog.text) == (trained_on == "Study B")


def test_three_missing_channels_are_interpolated(tmp_path, model_path, caplog):
    dropped = ["C3", "Pz", "F8"]
    kept = [c for c in CHANNELS if c not in dropped]
    out = write_derivatives(tmp_path / "out", subjects=("02",), n_volumes=40, bold=False,
                            channels=kept[::-1])
    synth = tmp_path / "synth_bold.nii.gz"
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids"):
        synthesize.synthesize_from_checkpoint(model_path, _spec(out, "02"), synth)
    assert "interpolating 3 missing EEG channel(s)" in caplog.text
    assert all(name in caplog.text for name in dropped)
    sidecar = json.loads(synth.with_name("synth_bold.json").read_text())
    assert sidecar["InterpolatedChannels"] == ["F8", "C3", "Pz"]  # in the model's order
    data = nib.load(synth).get_fdata()
    assert data.shape == GRID + (40 - DISCARD - CONTEXT,) and np.isfinite(data).all()


def test_more_than_a_fifth_missing_is_refused(tmp_path, model_path):
    kept = CHANNELS[5:]  # 5 of 20 missing
    out = write_derivatives(tmp_path / "out", subjects=("03",), n_volumes=40, bold=False, channels=kept)
    with pytest.raises(DataError, match="5 of the model's 20 EEG channels are missing.*Fp1") as err:
        synthesize.synthesize_from_checkpoint(model_path, _spec(out, "03"), tmp_path / "x_bold.nii.gz")
    assert err.value.code == 65
    assert not (tmp_path / "x_bold.nii.gz").exists()


def test_a_run_of_another_tr_is_refused(tmp_path, model_path):
    """Same bin count, but bin k is k / TR Hz and the context spans context · TR s."""
    out = write_derivatives(tmp_path / "out", subjects=("04",), n_volumes=40, bold=False)
    sidecar = _spec(out, "04").with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "RepetitionTime": 1.5 * TR}))
    with pytest.raises(DataError, match=f"TR {TR:g} s but .* has {1.5 * TR:g} s windows") as err:
        synthesize.synthesize_from_checkpoint(model_path, _spec(out, "04"), tmp_path / "x_bold.nii.gz")
    assert err.value.code == 65
    assert not (tmp_path / "x_bold.nii.gz").exists()


def test_interpolation_recovers_a_smooth_scalp_field():
    rng = np.random.default_rng(0)
    montage = standard_montage()
    pos = montage.get_positions()["ch_pos"]
    xyz = np.array([pos[c] for c in CHANNELS]) * 10
    # each (window, bin) is a smooth (linear) field over the scalp, z-scored across channels
    field = np.einsum("vfk,ck->vcf", rng.normal(size=(30, 8, 3)), xyz)
    field = (field - field.mean(axis=1, keepdims=True)) / field.std(axis=1, keepdims=True)
    dropped = ["C3", "Pz", "F8"]
    kept = [c for c in CHANNELS if c not in dropped]
    filled = synthesize.match_channels(field[:, [CHANNELS.index(c) for c in kept]], kept, CHANNELS)
    for name in dropped:
        k = CHANNELS.index(name)
        assert np.corrcoef(filled[:, k].ravel(), field[:, k].ravel())[0, 1] > 0.98
    np.testing.assert_allclose(filled.mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(filled.std(axis=1), 1, atol=1e-5)
    # channels present in another order (and in other case) are reordered exactly
    order = rng.permutation(len(CHANNELS))
    names = [CHANNELS[i].upper() for i in order]
    np.testing.assert_array_equal(synthesize.match_channels(field[:, order], names, CHANNELS),
                                  field.astype(np.float32))
    with pytest.raises(DataError, match="not on the standard 10-05 montage"):
        synthesize.match_channels(field[:, 1:], CHANNELS[1:], ["Bip1"] + CHANNELS[1:])


def test_old_names_of_the_same_sites_are_the_models_channels(tmp_path, model_path, caplog):
    """T3/T4/T5/T6 (10-20) are the sites the 10-10 system calls T7/T8/P7/P8: a recording that
    uses them gives the model's channels as they are, not interpolated ones."""
    field = np.random.default_rng(1).normal(size=(30, len(CHANNELS), 8))
    field = ((field - field.mean(axis=1, keepdims=True)) / field.std(axis=1, keepdims=True))
    old = {"T7": "T3", "T8": "T4", "P7": "T5", "P8": "T6"}
    names = [old.get(c, c) for c in CHANNELS]
    np.testing.assert_array_equal(synthesize.match_channels(field, names, CHANNELS),
                                  field.astype(np.float32))
    # a recording with the model's names written otherwise ("Fp1-REF"): told so
    with pytest.raises(DataError, match=r"20 of the model's 20 .* the recording names them "
                                        r"otherwise \(EEG Fp1-REF, EEG Fp2-REF, EEG F7-REF, ...\)"):
        synthesize.match_channels(field, [f"EEG {c}-REF" for c in CHANNELS], CHANNELS)
    # through a run's spectrogram: no interpolation, and the sidecar says which names were used
    out = write_derivatives(tmp_path / "out", subjects=("02",), n_volumes=40, bold=False)
    sidecar_path = _spec(out, "02").with_suffix(".json")
    meta = json.loads(sidecar_path.read_text())
    sidecar_path.write_text(json.dumps({**meta, "Channels": [old.get(c, c) for c in meta["Channels"]]}))
    synth = tmp_path / "synth_bold.nii.gz"
    with caplog.at_level(logging.INFO, logger="spec2vol_bids"):
        synthesize.synthesize_from_checkpoint(model_path, _spec(out, "02"), synth)
    assert "interpolating" not in caplog.text
    sidecar = json.loads(synth.with_name("synth_bold.json").read_text())
    assert sidecar["InterpolatedChannels"] == [] and sidecar["ChannelsFoundAs"] == old
