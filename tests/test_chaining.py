"""Chaining BIDS-Apps: a spec2vol output dataset as the next run's ``--eeg-derivatives`` and
``--bold-derivatives``, with a model trained elsewhere, and the options that cannot apply to it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import (
    GROUP_OPTIONS,
    PARTICIPANT_OPTIONS,
    assert_clean_failure,
    run_spec2vol,
)

from spec2vol_bids.bids.pairing import find_run_pairs
from spec2vol_bids.errors import UsageError

SUBJECTS = ("01", "02", "03")
#: PARTICIPANT_OPTIONS without --freq-bins: the reused spectrograms fix the frequency axis
CHAIN_OPTIONS = ("--discard-volumes", "2", "--context", "4", "--omp-nthreads", "1",
                 "--skip-bids-validation")


def _spectrogram(out: Path, sub: str, ext: str = ".npy") -> Path:
    return out / f"sub-{sub}" / "eeg" / f"sub-{sub}_task-rest_desc-spec2vol_spectrogram{ext}"


def _func(out: Path, sub: str, desc: str) -> Path:
    return out / f"sub-{sub}" / "func" / f"sub-{sub}_task-rest_desc-{desc}_bold.nii.gz"


@pytest.fixture(scope="module")
def model(simulated_bids_source, participant_outputs_source, tmp_path_factory) -> Path:
    """A final model trained elsewhere: a tiny group run (1 epoch) on a copy of the outputs."""
    elsewhere = Path(shutil.copytree(participant_outputs_source,
                                     tmp_path_factory.mktemp("elsewhere") / "out"))
    proc = run_spec2vol(simulated_bids_source, elsewhere, "group", *GROUP_OPTIONS,
                        "--epochs", "1", "--split", "fixed", "--test-subjects", "03",
                        "--skip-bids-validation")
    assert proc.returncode == 0, proc.stderr
    return elsewhere / "models" / "final" / "model.pt"


@pytest.fixture()
def emptied_bids(simulated_bids_source, tmp_path) -> Path:
    """The simulated dataset with every raw EEG sample and BOLD voxel gone (headers, markers and
    sidecars kept): whatever reads them fails."""
    bids = Path(shutil.copytree(simulated_bids_source, tmp_path / "bids"))
    emptied = [*bids.glob("sub-*/eeg/*_eeg.eeg"), *bids.glob("sub-*/func/*_bold.nii.gz")]
    assert len(emptied) == 2 * len(SUBJECTS)
    for path in emptied:
        path.write_bytes(b"")
    return bids


def test_spec2vol_outputs_are_recognised(simulated_bids_source, participant_outputs_source,
                                         tmp_path):
    out1 = participant_outputs_source
    pairs, _ = find_run_pairs(simulated_bids_source, eeg_derivatives=out1, bold_derivatives=out1)
    assert [p.subject for p in pairs] == list(SUBJECTS)
    for pair in pairs:
        assert pair.eeg_is_spectrogram and pair.eeg == _spectrogram(out1, pair.subject)
        assert pair.bold == _func(out1, pair.subject, "target") and pair.bold_mask is None
    # desc-target BOLD of a dataset spec2vol did not write is not taken as preprocessed BOLD
    other = Path(shutil.copytree(out1, tmp_path / "other"))
    description = json.loads((other / "dataset_description.json").read_text())
    description["GeneratedBy"] = [{"Name": "another-pipeline"}]
    (other / "dataset_description.json").write_text(json.dumps(description))
    with pytest.raises(UsageError, match=r"--bold-derivatives .*other holds no "
                                         r"\*_desc-preproc_bold.nii\[.gz\] \(fMRIPrep before 1.2"):
        find_run_pairs(simulated_bids_source, bold_derivatives=other)


def test_chained_run_synthesises_without_raw_data(emptied_bids, participant_outputs_source,
                                                  model, tmp_path):
    out1, out2 = participant_outputs_source, tmp_path / "out2"
    proc = run_spec2vol(emptied_bids, out2, "participant", *CHAIN_OPTIONS,
                        "--eeg-derivatives", out1, "--bold-derivatives", out1, "--model", model)
    assert proc.returncode == 0, proc.stderr
    for sub in SUBJECTS:
        np.testing.assert_array_equal(np.load(_spectrogram(out2, sub)), np.load(_spectrogram(out1, sub)))
        before, after = (json.loads(_spectrogram(o, sub, ".json").read_text()) for o in (out1, out2))
        for key in ("SamplingFrequency", "RepetitionTime", "FrequencyBinsHz", "Channels",
                    "VolumeOnsetSeconds", "VolumeMarker", "NumberOfWindows"):
            assert after[key] == before[key]
        assert after["Sources"] == [str(_spectrogram(out1, sub).resolve())]
        assert (out2 / f"sub-{sub}" / "figures" / f"sub-{sub}_task-rest_desc-alignment_qc.svg").is_file()

        target1, target2 = nib.load(_func(out1, sub, "target")), nib.load(_func(out2, sub, "target"))
        assert target2.shape == target1.shape == (32, 32, 8, 20)
        np.testing.assert_allclose(target2.get_fdata(), target1.get_fdata(), atol=1e-5)
        np.testing.assert_allclose(target2.affine, target1.affine)

        synth = nib.load(_func(out2, sub, "synth"))
        assert synth.shape == (32, 32, 8, 20 - 2 - 4)  # volumes after discard + context
        np.testing.assert_allclose(synth.affine, target1.affine)
        assert synth.header.get_zooms()[3] == pytest.approx(2.0)
        meta = json.loads(_func(out2, sub, "synth").with_suffix("").with_suffix(".json").read_text())
        assert meta["RepetitionTime"] == 2.0 and meta["SourceVolumes"] == [6, 19]
        assert str(model) in meta["Sources"]
        assert sub in meta["ModelFittedOnSubjects"]  # the final model saw every subject
        assert meta["ModelTrainingDataset"] == json.loads(
            (emptied_bids / "dataset_description.json").read_text())["Name"]
        assert f"sub-{sub} is one of the subjects the model was fitted on, in this dataset" in proc.stderr
        assert meta["SubjectInModelTraining"] is True
        # the report says so too, and that this folder's synthesis is not scored
        report = (out2 / f"sub-{sub}.html").read_text()
        assert "Applied model" in report and "in-sample: the model was fitted on this subject" in report
        assert "not scored: participant --model synthesises without scoring" in report
        assert "run the group level" not in report
        assert "paired" in (out2 / f"sub-{sub}" / f"sub-{sub}_runs.tsv").read_text()

    group = ("group", *GROUP_OPTIONS, "--epochs", "1", "--no-final", "--folds", "02",
             "--skip-bids-validation")
    # the group level would write sub-02's held-out series over the one --model made
    proc = run_spec2vol(emptied_bids, out2, *group)
    assert proc.returncode == 64 and "synthesised for this run by participant --model" in proc.stderr
    for path in (_func(out2, "02", "synth"), _func(out2, "02", "synth").with_suffix("").with_suffix(".json")):
        path.rename(tmp_path / path.name)
    proc = run_spec2vol(emptied_bids, out2, *group)
    assert proc.returncode == 0, proc.stderr
    assert nib.load(_func(out2, "02", "synth")).shape == (32, 32, 8, 14)
    assert "sub-02" in (out2 / "models" / "fold-02" / "metrics.tsv").read_text()
    # with group outputs beside them (models, synthesised series, maps), the same inputs are found
    pairs, _ = find_run_pairs(emptied_bids, eeg_derivatives=out2, bold_derivatives=out2)
    assert [(p.eeg, p.bold) for p in pairs] == [
        (_spectrogram(out2, sub), _func(out2, sub, "target")) for sub in SUBJECTS]


@pytest.mark.parametrize("options, code, needles", [
    (("--freq-bins", "32"), 64, ["--freq-bins 32 asks for 32 bins up to 16 Hz",
                                 "has 16 bins up to 8 Hz", "cannot be recomputed"]),
    (("--fmax", "4"), 64, ["--fmax 4 asks for 8 bins"]),
    (("--volume-marker", "Volume"), 64, ["--volume-marker Volume differs", "Response/R128"]),
    (("--eeg-offset", "0"), 64, ["--eeg-offset 0 differs from the volume onset", "(2 s)"]),
    (("--discard-volumes", "10", "--context", "10"), 65, ["20 TR windows, fewer than"]),
])
def test_options_the_spectrograms_cannot_meet(emptied_bids, participant_outputs_source, tmp_path,
                                              options, code, needles):
    out2 = tmp_path / "out2"
    proc = run_spec2vol(emptied_bids, out2, "participant", *CHAIN_OPTIONS, *options,
                        "--eeg-derivatives", participant_outputs_source)
    line = assert_clean_failure(proc, code, *needles)
    assert "desc-spec2vol_spectrogram.npy" in line
    assert not out2.exists()  # refused before anything was written


def _edit_spectrogram(out: Path, sub: str, change) -> None:
    """Apply ``change(spec, meta) -> (spec, meta)`` to a run's spectrogram and its sidecar."""
    npy, sidecar = _spectrogram(out, sub), _spectrogram(out, sub, ".json")
    spec, meta = change(np.load(npy), json.loads(sidecar.read_text()))
    np.save(npy, spec)
    sidecar.write_text(json.dumps(meta))


def test_model_channels_and_bins_against_spectrograms(emptied_bids, participant_outputs, model,
                                                      tmp_path):
    # one of the model's 16 channels missing: interpolated by name on the standard montage,
    # which needs no electrode positions from the recording
    _edit_spectrogram(participant_outputs, "02", lambda spec, meta: (
        np.delete(spec, meta["Channels"].index("O2"), axis=1),
        meta | {"Channels": [c for c in meta["Channels"] if c != "O2"]}))
    out2 = tmp_path / "out2"
    proc = run_spec2vol(emptied_bids, out2, "participant", *CHAIN_OPTIONS, "--participant-label",
                        "02", "--eeg-derivatives", participant_outputs, "--bold-derivatives",
                        participant_outputs, "--model", model)
    assert proc.returncode == 0, proc.stderr
    assert "interpolating 1 missing EEG channel(s) with spherical splines: O2" in proc.stderr
    assert nib.load(_func(out2, "02", "synth")).shape == (32, 32, 8, 14)

    # the model's frequency axis cannot be made from a spectrogram with fewer bins
    _edit_spectrogram(participant_outputs, "03", lambda spec, meta: (
        spec[..., :8], meta | {"FrequencyBinsHz": meta["FrequencyBinsHz"][:8]}))
    out3 = tmp_path / "out3"
    proc = run_spec2vol(emptied_bids, out3, "participant", *CHAIN_OPTIONS,
                        "--eeg-derivatives", participant_outputs, "--model", model)
    assert_clean_failure(proc, 65, "sub-03_task-rest_desc-spec2vol_spectrogram.npy",
                         "the model was trained on 16 frequency bins but", "has 8 bins up to 4 Hz")
    assert not out3.exists()


def test_spectrograms_of_another_tr_or_into_themselves(emptied_bids, participant_outputs, tmp_path):
    sidecar = _spectrogram(participant_outputs, "02", ".json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(meta | {"RepetitionTime": 2.5}))
    out2 = tmp_path / "out2"
    proc = run_spec2vol(emptied_bids, out2, "participant", *PARTICIPANT_OPTIONS,
                        "--eeg-derivatives", participant_outputs)
    assert_clean_failure(proc, 65, "sub-02_task-rest_desc-spec2vol_spectrogram.npy",
                         "windows are 2.5 s long but the run's RepetitionTime is 2 s")
    assert not out2.exists()

    proc = run_spec2vol(emptied_bids, participant_outputs, "participant", *PARTICIPANT_OPTIONS,
                        "--eeg-derivatives", participant_outputs)
    assert_clean_failure(proc, 64, "--eeg-derivatives is OUTPUT_DIR itself")


@pytest.mark.parametrize("option", ["--eeg-derivatives", "--bold-derivatives"])
def test_spec2vol_outputs_of_another_dataset_are_refused(emptied_bids, participant_outputs_source,
                                                        tmp_path, option):
    """Outputs of the simulated dataset given as derivatives of a dataset of another Name: its
    sub-01 is not theirs. Nothing is written."""
    description = emptied_bids / "dataset_description.json"
    description.write_text(json.dumps({**json.loads(description.read_text()), "Name": "Another study"}))
    out2 = tmp_path / "out2"
    proc = run_spec2vol(emptied_bids, out2, "participant", *PARTICIPANT_OPTIONS,
                        option, participant_outputs_source)
    own = json.loads((participant_outputs_source / "dataset_description.json").read_text())["Name"]
    assert_clean_failure(proc, 64, f'{option} holds the derivatives of the dataset '
                         f'"{own.removeprefix("spec2vol derivatives of ")}", BIDS_DIR is "Another study"',
                         f"give {option} the spec2vol outputs of this dataset")
    assert not out2.exists()


def test_spectrograms_of_another_recording_are_refused(simulated_bids_source, participant_outputs_source,
                                                      tmp_path):
    """The raw EEG of sub-02 is here and is not what the spectrograms were made from (another
    simulation of the same name, or its data since changed): its spectrogram would be paired
    with this BOLD. The other runs' recordings are the ones the spectrograms came from."""
    bids = Path(shutil.copytree(simulated_bids_source, tmp_path / "bids"))
    data = bids / "sub-02" / "eeg" / "sub-02_task-rest_eeg.eeg"
    samples = bytearray(data.read_bytes())
    samples[:4] = bytes(b ^ 0xFF for b in samples[:4])
    data.write_bytes(bytes(samples))
    out2 = tmp_path / "out2"
    proc = run_spec2vol(bids, out2, "participant", *PARTICIPANT_OPTIONS, "--participant-label", "02",
                        "--eeg-derivatives", participant_outputs_source)
    assert_clean_failure(proc, 65, str(_spectrogram(participant_outputs_source, "02")),
                         f"this spectrogram was made from another recording than {bids.resolve() / 'sub-02' / 'eeg'}",
                         "rerun the participant level without --eeg-derivatives")
    assert not list(out2.glob("sub-02/**/*_desc-*"))
    proc = run_spec2vol(bids, out2, "participant", *PARTICIPANT_OPTIONS, "--participant-label", "01",
                        "--eeg-derivatives", participant_outputs_source)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(_spectrogram(out2, "01", ".json").read_text())
    assert meta["Recording"] == "bids:raw:sub-01/eeg/sub-01_task-rest_eeg.vhdr"
    assert meta["RecordingFingerprint"] == json.loads(
        _spectrogram(participant_outputs_source, "01", ".json").read_text())["RecordingFingerprint"]
