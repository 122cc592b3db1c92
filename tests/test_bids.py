"""Run discovery, pairing, selection and input checks (spec2vol_bids.bids)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import mne
import nibabel as nib
import numpy as np
import pybv
import pytest

from fixture_data import copy_filled_fixture, fixture_source, read_vhdr
from spec2vol_bids.bids import filters, metadata, pairing, runs, validation
from spec2vol_bids.errors import (
    DataError,
    MissingInputError,
    NothingSelectedError,
    UsageError,
    ValidationError,
)


@pytest.fixture(scope="session")
def noddi(tmp_path_factory) -> Path:
    """A filled copy of the eeg_rest_fmri fixture, shared by the tests that only read it."""
    return copy_filled_fixture(tmp_path_factory.mktemp("fixture") / "eeg_rest_fmri")


# --------------------------------------------------------------------------------------------
# Small hand-built datasets


def _description(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}), encoding="utf-8")


def _stem(sub, ses=None, task="rest", acq=None, run=None) -> str:
    parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + [f"task-{task}"]
    parts += ([f"acq-{acq}"] if acq else []) + ([f"run-{run}"] if run else [])
    return "_".join(parts)


def _folder(root: Path, sub, ses, datatype) -> Path:
    folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / datatype
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_eeg(root: Path, sub, ses=None, task="rest", acq=None, run=None, *, fmt="vhdr",
              extra="", sidecar=True) -> Path:
    """A tiny real EEG recording (2 channels, 1 s at 100 Hz) named by the entities."""
    folder = _folder(root, sub, ses, "eeg")
    stem = _stem(sub, ses, task, acq, run) + extra
    data = np.random.default_rng(0).standard_normal((2, 100)) * 1e-5
    if fmt == "vhdr":
        pybv.write_brainvision(data=data, sfreq=100.0, ch_names=["Fz", "Cz"],
                               fname_base=f"{stem}_eeg", folder_out=folder, overwrite=True)
        path = folder / f"{stem}_eeg.vhdr"
    else:
        raw = mne.io.RawArray(data, mne.create_info(["Fz", "Cz"], 100.0, "eeg"), verbose="error")
        path = folder / f"{stem}_eeg.{fmt}"
        if fmt == "fif":
            raw.save(path, overwrite=True, verbose="error")
        else:
            mne.export.export_raw(path, raw, fmt="edf" if fmt == "edf" else "eeglab",
                                  overwrite=True, verbose="error")
    if sidecar:
        (folder / f"{stem}_eeg.json").write_text(
            json.dumps({"TaskName": task, "SamplingFrequency": 100}), encoding="utf-8")
    return path


def write_bold(root: Path, sub, ses=None, task="rest", acq=None, run=None, *, tr=2.0,
               unit="sec", sidecar_tr: float | None = None) -> Path:
    """A tiny real BOLD series (4x4x3, 5 volumes) with ``tr`` in pixdim[4]."""
    folder = _folder(root, sub, ses, "func")
    stem = _stem(sub, ses, task, acq, run)
    img = nib.Nifti1Image(np.ones((4, 4, 3, 5), np.int16), np.diag([3.0, 3.0, 4.0, 1.0]))
    img.header.set_xyzt_units("mm", unit)
    img.header.set_zooms((3.0, 3.0, 4.0, tr))
    path = folder / f"{stem}_bold.nii.gz"
    img.to_filename(path)
    if sidecar_tr is not None:
        (folder / f"{stem}_bold.json").write_text(
            json.dumps({"TaskName": task, "RepetitionTime": sidecar_tr}), encoding="utf-8")
    return path


@pytest.fixture()
def study(tmp_path) -> Path:
    """Sessions and runs (sub-01), EEG only (sub-02), BOLD only (sub-03), one run (sub-04)."""
    root = tmp_path / "study"
    _description(root)
    (root / "task-rest_bold.json").write_text(
        json.dumps({"TaskName": "rest", "RepetitionTime": 2.0}), encoding="utf-8")
    for ses in ("1", "2"):
        for run in ("1", "2"):
            write_eeg(root, "01", ses, run=run)
            write_bold(root, "01", ses, run=run)
    write_eeg(root, "02", "1", run="1")
    write_bold(root, "03", "1", run="1")
    write_eeg(root, "04", "1", run="1")
    write_bold(root, "04", "1", run="1")
    return root


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# The filled NODDI fixture


def test_filled_fixture_matches_its_headers(noddi):
    src = fixture_source()
    for rel in ["sub-32/eeg/sub-32_task-rest_eeg.vhdr", "sub-32/eeg/sub-32_task-rest_eeg.vmrk",
                "derivatives/sub-35/eeg/sub-35_task-rest_eeg.vhdr", "task-rest_bold.json"]:
        assert (noddi / rel).read_bytes() == (src / rel).read_bytes()  # real files untouched
    for vhdr in noddi.rglob("*.vhdr"):
        hdr = read_vhdr(vhdr)
        bytes_per_sample = {"INT_16": 2, "IEEE_FLOAT_32": 4}[hdr["format"]]
        size = hdr["data_file"].stat().st_size
        if hdr["n_points"] is not None:  # derivative exports announce their length
            assert size == hdr["n_channels"] * hdr["n_points"] * bytes_per_sample
        else:
            assert size == hdr["n_channels"] * 10 * 5000 * bytes_per_sample
    # sub-35's export is VECTORIZED: mne must still see a 10 Hz rhythm, not scrambled samples
    raw = mne.io.read_raw_brainvision(
        noddi / "derivatives/sub-35/eeg/sub-35_task-rest_eeg.vhdr", verbose="error")
    assert raw.info["sfreq"] == 250.0 and raw.n_times == 197235 and len(raw.ch_names) == 64
    seg = raw.get_data(picks=[0], start=0, stop=2500)[0]
    freqs = np.fft.rfftfreq(seg.size, 1 / 250.0)
    assert freqs[1 + np.argmax(np.abs(np.fft.rfft(seg))[1:])] == pytest.approx(10.0)
    bold = nib.load(noddi / "sub-32/func/sub-32_task-rest_bold.nii.gz")
    assert bold.shape == (64, 64, 30, 300)
    assert bold.header.get_zooms()[3] == pytest.approx(2.16)
    for nii in noddi.rglob("*.nii.gz"):
        assert nib.load(nii).header.get_data_shape()  # every image opens


def test_fixture_pairs_raw_eeg_by_default(noddi):
    pairs, notes = pairing.find_run_pairs(noddi)
    assert notes == []
    assert [p.label for p in pairs] == [f"sub-{s}_task-rest" for s in ("32", "35", "36")]
    for p in pairs:
        assert p.eeg == noddi / f"sub-{p.subject}" / "eeg" / f"sub-{p.subject}_task-rest_eeg.vhdr"
        func = noddi / f"sub-{p.subject}" / "func"
        assert p.bold == func / f"sub-{p.subject}_task-rest_bold.nii.gz"
        assert p.bids_root == noddi and not p.eeg_from_derivatives
        assert p.eeg_json == noddi / "task-rest_eeg.json"  # inherited from the top level
        assert p.bold_json == noddi / "task-rest_bold.json"
        assert p.entities == {"subject": p.subject, "task": "rest"}
        assert metadata.repetition_time(p) == pytest.approx(2.16)
        assert len(metadata.bold_metadata(p)["SliceTiming"]) == 30


def test_fixture_pairs_derivative_eeg(noddi):
    before = _tree_digest(noddi)
    pairs, notes = pairing.find_run_pairs(noddi, eeg_derivatives=noddi / "derivatives")
    assert notes == []
    assert len(pairs) == 3
    for p in pairs:
        assert p.eeg == (noddi / "derivatives" / f"sub-{p.subject}" / "eeg"
                         / f"sub-{p.subject}_task-rest_eeg.vhdr")
        assert p.eeg_from_derivatives and p.bids_root == noddi / "derivatives"
        assert p.eeg_json is None  # the raw 5 kHz sidecar does not describe the 250 Hz export
        assert p.bold.parent == noddi / f"sub-{p.subject}" / "func"
    table = runs.format_pair_table(pairs)
    assert table.count("derivatives") == 3 and "3 runs: 3 with BOLD, 0 EEG only" in table
    assert _tree_digest(noddi) == before  # nothing written into the input (no description made)


def test_validate_good_fixture_with_both_validators(noddi):
    node = validation.validate_bids_dir(noddi)
    assert ("node" in node) == bool(shutil.which("bids-validator"))
    assert "no errors" in node
    summary = validation.validate_bids_dir(noddi, validator="python")
    assert "45 files, no errors" in summary  # derivatives/ is not checked


# --------------------------------------------------------------------------------------------
# Pairing


def test_pairing_sessions_runs_eeg_only_and_bold_only(study):
    pairs, notes = pairing.find_run_pairs(study)
    labels = [p.label for p in pairs]
    assert labels == [
        "sub-01_ses-1_task-rest_run-1", "sub-01_ses-1_task-rest_run-2",
        "sub-01_ses-2_task-rest_run-1", "sub-01_ses-2_task-rest_run-2",
        "sub-02_ses-1_task-rest_run-1", "sub-04_ses-1_task-rest_run-1",
    ]
    by_label = {p.label: p for p in pairs}
    for p in pairs:
        if p.subject != "02":
            assert p.bold.name == f"{p.label}_bold.nii.gz" and p.eeg.name == f"{p.label}_eeg.vhdr"
    eeg_only = by_label["sub-02_ses-1_task-rest_run-1"]
    assert eeg_only.bold is None and eeg_only.eeg.is_file()
    assert eeg_only.entities == {"subject": "02", "session": "1", "task": "rest", "run": "1"}
    # an EEG-only run still knows the TR its BOLD sidecars would give it
    assert metadata.eeg_repetition_time(eeg_only) == 2.0
    assert len(notes) == 1 and "sub-03_ses-1_task-rest_run-1_bold.nii.gz" in notes[0]
    assert "BOLD without EEG" in notes[0]
    table = runs.format_pair_table(pairs)
    assert "6 runs: 5 with BOLD, 1 EEG only" in table and "- (EEG only)" in table


def test_participant_labels_with_and_without_prefix(study):
    pairs, _ = pairing.find_run_pairs(study, participant_labels=["sub-02", "04", "04"])
    assert sorted({p.subject for p in pairs}) == ["02", "04"]
    assert len(pairs) == 2
    pairs, _ = pairing.find_run_pairs(study, participant_labels="sub-01", session_labels=["ses-2"])
    assert [p.label for p in pairs] == ["sub-01_ses-2_task-rest_run-1",
                                        "sub-01_ses-2_task-rest_run-2"]


def test_participant_without_eeg_gets_a_note(study):
    pairs, notes = pairing.find_run_pairs(study, participant_labels=["03", "04"])
    assert [p.subject for p in pairs] == ["04"]
    assert "sub-03: no EEG recording selected" in notes


@pytest.mark.parametrize("label", ["../01", "sub-01/anat", "..", "01\\x", "0_1", ""])
def test_unsafe_or_malformed_labels_are_usage_errors(study, label):
    with pytest.raises(UsageError) as err:
        pairing.find_run_pairs(study, participant_labels=[label])
    assert err.value.code == 64 and "participant label" in str(err.value)


def test_unknown_labels_select_nothing(study):
    with pytest.raises(NothingSelectedError) as err:
        pairing.find_run_pairs(study, participant_labels=["01", "07"])
    assert err.value.code == 18
    assert "participant label 07 not found in BIDS_DIR; available: 01, 02, 03, 04" in str(err.value)
    with pytest.raises(NothingSelectedError, match="session label 9 not found.*available: 1, 2"):
        pairing.find_run_pairs(study, session_labels="9")
    with pytest.raises(NothingSelectedError, match="task motor not found.*available: rest"):
        pairing.find_run_pairs(study, task="motor")


def test_subject_with_only_bold_selects_nothing(study):
    with pytest.raises(NothingSelectedError) as err:
        pairing.find_run_pairs(study, participant_labels="03")
    assert err.value.code == 18 and "no EEG recording" in str(err.value)
    assert "participants 03" in str(err.value)


def test_run_index_left_out_on_one_side(tmp_path):
    root = tmp_path / "ds"
    _description(root)
    write_eeg(root, "01")  # no run- entity: the only run of the session
    write_bold(root, "01", run="1")
    write_eeg(root, "02")
    write_bold(root, "02", run="1")
    write_bold(root, "02", run="2")
    pairs, notes = pairing.find_run_pairs(root)
    first, second = pairs
    assert first.bold is not None and first.bold.name == "sub-01_task-rest_run-1_bold.nii.gz"
    assert first.run is None and first.label == "sub-01_task-rest"
    assert any("paired with sub-01_task-rest_run-1_bold.nii.gz" in n for n in notes)
    assert second.bold is None  # two BOLD runs could match: not guessed
    assert any("several BOLD runs could match" in n and "sub-02" in n for n in notes)
    assert sum("BOLD without EEG" in n for n in notes) == 2


def test_padded_run_indices_pair(tmp_path):
    root = tmp_path / "ds"
    _description(root)
    write_eeg(root, "01", run="1")
    write_bold(root, "01", run="01")
    pairs, notes = pairing.find_run_pairs(root)
    assert notes == [] and pairs[0].bold.name == "sub-01_task-rest_run-01_bold.nii.gz"
    assert pairs[0].run == "1"


def test_several_eeg_formats_for_one_run(tmp_path):
    root = tmp_path / "ds"
    _description(root)
    write_eeg(root, "01", run="1", fmt="edf")
    write_eeg(root, "01", run="1", fmt="vhdr")
    write_bold(root, "01", run="1")
    write_eeg(root, "02", run="1", fmt="set")
    write_eeg(root, "03", run="1", fmt="fif")
    # two recordings of one run may differ in channels, rate and markers: the user chooses
    with pytest.raises(DataError, match=r"2 EEG files of one run \(sub-01_task-rest_run-1_eeg"
                                        r"\.vhdr, sub-01_task-rest_run-1_eeg\.edf\); select one with "
                                        r'--bids-filter-file \(e\.g\. \{"eeg": \{"extension": "edf"\}\}\)') as err:
        pairing.find_run_pairs(root)
    assert err.value.code == 65
    pairs, notes = pairing.find_run_pairs(root, participant_labels=["02", "03"])
    assert [p.eeg.suffix for p in pairs] == [".set", ".fif"] and notes == []
    for extension in ("edf", "vhdr"):
        pairs, notes = pairing.find_run_pairs(root, participant_labels="01",
                                             bids_filters={"eeg": {"extension": extension}})
        assert pairs[0].eeg.name == f"sub-01_task-rest_run-1_eeg.{extension}" and notes == []


def test_split_fif_is_one_recording(tmp_path):
    root = tmp_path / "ds"
    _description(root)
    first = write_eeg(root, "01", extra="_split-01", fmt="fif", sidecar=False)
    shutil.copyfile(first, first.with_name("sub-01_task-rest_split-02_eeg.fif"))
    write_bold(root, "01")
    pairs, notes = pairing.find_run_pairs(root)
    assert notes == [] and pairs[0].eeg == first and pairs[0].bold is not None


def test_derivative_eeg_replaces_raw_run_by_run(study, tmp_path):
    deriv = tmp_path / "eeg_clean"  # no dataset_description.json, outside BIDS_DIR
    clean = write_eeg(deriv, "01", "1", run="1", extra="_desc-clean", sidecar=False)
    (clean.parent / "sub-01_ses-1_task-rest_run-1_desc-clean_channels.tsv").write_text(
        "name\ttype\tunits\nFz\tEEG\tuV\nCz\tEEG\tuV\n", encoding="utf-8")
    before = _tree_digest(deriv)
    pairs, notes = pairing.find_run_pairs(study, participant_labels="01", session_labels="1",
                                         eeg_derivatives=deriv)
    replaced, kept = pairs
    assert replaced.eeg == clean and replaced.eeg_from_derivatives and replaced.bids_root == deriv
    channels = clean.parent / "sub-01_ses-1_task-rest_run-1_desc-clean_channels.tsv"
    assert replaced.channels_tsv == channels
    assert replaced.eeg_json is None  # the raw sidecar describes the raw recording
    assert replaced.bold == study / "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.nii.gz"
    assert kept.eeg.parent == study / "sub-01/ses-1/eeg" and not kept.eeg_from_derivatives
    assert kept.eeg_json == kept.eeg.with_suffix(".json")
    assert any("run-2_eeg.vhdr: no recording of this run in the EEG derivative folder" in n
               for n in notes)
    assert _tree_digest(deriv) == before
    with pytest.raises(MissingInputError) as err:
        pairing.find_run_pairs(study, eeg_derivatives=tmp_path / "missing")
    assert err.value.code == 66 and "missing" in str(err.value)


def test_derivative_spectrograms_stand_for_eeg(study, tmp_path):
    """A spec2vol output as --eeg-derivatives: its spectrograms are the runs' EEG, but a
    recording of the same run in that folder is preferred (it can be processed afresh)."""
    deriv = tmp_path / "spec2vol"
    folder = _folder(deriv, "01", "1", "eeg")
    spectrograms = [folder / f"{_stem('01', '1', run=r)}_desc-spec2vol_spectrogram.npy"
                    for r in ("1", "2")]
    for path in spectrograms:
        np.save(path, np.zeros((3, 2, 4), np.float32))
    clean = write_eeg(deriv, "01", "1", run="1", extra="_desc-clean", sidecar=False)
    pairs, notes = pairing.find_run_pairs(study, participant_labels="01", session_labels="1",
                                         eeg_derivatives=deriv)
    recording, spectrogram = pairs
    assert recording.eeg == clean and not recording.eeg_is_spectrogram
    assert spectrogram.eeg == spectrograms[1] and spectrogram.eeg_is_spectrogram
    assert spectrogram.eeg_from_derivatives and spectrogram.bids_root == deriv
    assert spectrogram.bold == study / "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-2_bold.nii.gz"
    assert spectrogram.eeg_sidecars == () and spectrogram.channels_tsv is None
    assert [n for n in notes if "2 EEG files for this run" in n] == [
        f"EEG derivatives sub-01/ses-1/eeg/{clean.name}: 2 EEG files for this run; using this "
        f"one, not {spectrograms[0].name} (select with --bids-filter-file)"]
    table = runs.format_pair_table(pairs)
    assert f"{spectrograms[1].name}  spectrogram" in table


# --------------------------------------------------------------------------------------------
# Filters


def test_fmriprep_filter_file_selects_the_intended_runs(study, tmp_path):
    filter_file = tmp_path / "filters.json"
    filter_file.write_text(json.dumps({
        "t1w": {"reconstruction": None},  # an fMRIPrep query: accepted, ignored
        "bold": {"session": "1", "run": [1], "acquisition": None},
        "eeg": {"task": "rest"},
    }), encoding="utf-8")
    queries = filters.load_bids_filters(filter_file)
    pairs, notes = pairing.find_run_pairs(study, bids_filters=queries)
    assert [p.label for p in pairs] == ["sub-01_ses-1_task-rest_run-1",
                                        "sub-02_ses-1_task-rest_run-1",
                                        "sub-04_ses-1_task-rest_run-1"]
    assert pairs[1].bold is None  # EEG-only runs have no BOLD to filter out
    assert any("'t1w' does not concern spec2vol" in n for n in notes)
    # EEG of the excluded BOLD runs is dropped with a note, not kept as EEG-only
    dropped = [n for n in notes if "excluded by the bids filter" in n]
    assert len(dropped) == 3 and all("sub-01" in n for n in dropped)


def test_filter_null_means_entity_absent_and_star_present(study):
    pairs, _ = pairing.find_run_pairs(study, bids_filters={"eeg": {"run": "*", "acquisition": None}})
    assert len(pairs) == 6
    with pytest.raises(NothingSelectedError) as err:
        pairing.find_run_pairs(study, bids_filters={"eeg": {"run": None}})
    assert err.value.code == 18 and "--bids-filter-file" in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"bodl": {"run": 1}}', "unknown query 'bodl'"),
    ('{"bold": {"sesion": "1"}}', "unknown entity 'sesion'"),
    ('{"bold": ["run"]}', "must be a JSON object"),
    ('["bold"]', "holds a JSON object"),
    ('{"eeg": {"run": {"a": 1}}}', "a string, a number, null"),
])
def test_bad_filter_files_are_usage_errors(tmp_path, content, message):
    path = tmp_path / "filters.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=message) as err:
        filters.load_bids_filters(path)
    assert err.value.code == 64 and str(path) in str(err.value)


def test_missing_filter_file(tmp_path):
    with pytest.raises(MissingInputError) as err:
        filters.load_bids_filters(tmp_path / "nope.json")
    assert err.value.code == 66


# --------------------------------------------------------------------------------------------
# Repetition time


def test_repetition_time_sources(tmp_path):
    root = tmp_path / "ds"
    _description(root)
    (root / "task-rest_bold.json").write_text(json.dumps({"RepetitionTime": 2.5}))
    write_eeg(root, "01")
    write_bold(root, "01", tr=9.0)  # the sidecar is the BIDS source of truth
    write_eeg(root, "02")
    write_bold(root, "02", sidecar_tr=1.5)  # a subject-level sidecar overrides the top level
    pairs, _ = pairing.find_run_pairs(root)
    assert [metadata.repetition_time(p) for p in pairs] == [2.5, 1.5]
    assert pairs[1].bold_sidecars == (root / "task-rest_bold.json",
                                      pairs[1].bold.with_name("sub-02_task-rest_bold.json"))


def test_repetition_time_from_header_in_ms(tmp_path):
    root = tmp_path / "ds"
    _description(root)
    write_eeg(root, "01")
    write_bold(root, "01", tr=2160.0, unit="msec")
    pair = pairing.find_run_pairs(root)[0][0]
    assert pair.bold_sidecars == ()
    assert metadata.repetition_time(pair) == pytest.approx(2.16)
    assert metadata.eeg_repetition_time(pair) is None


def test_repetition_time_missing_everywhere(tmp_path):
    root = tmp_path / "ds"
    _description(root)
    write_eeg(root, "01")
    bold = write_bold(root, "01", tr=0.0)
    pair = pairing.find_run_pairs(root)[0][0]
    with pytest.raises(DataError) as err:
        metadata.repetition_time(pair)
    assert err.value.code == 65 and str(bold) in str(err.value)
    assert "sub-01_task-rest_bold.json" in str(err.value)


def test_repetition_time_bad_sidecar_value(tmp_path):
    root = tmp_path / "ds"
    _description(root)
    write_eeg(root, "01")
    write_bold(root, "01", sidecar_tr=-2)
    pair = pairing.find_run_pairs(root)[0][0]
    with pytest.raises(DataError, match="positive number") as err:
        metadata.repetition_time(pair)
    assert "sub-01_task-rest_bold.json" in str(err.value)


# --------------------------------------------------------------------------------------------
# BIDS_DIR and OUTPUT_DIR checks


def test_check_bids_dir(tmp_path):
    with pytest.raises(MissingInputError) as err:
        validation.check_bids_dir(tmp_path / "absent")
    assert err.value.code == 66 and "does not exist" in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MissingInputError, match="not a folder"):
        validation.validate_bids_dir(tmp_path / "file")
    (tmp_path / "nodesc" / "sub-01").mkdir(parents=True)
    with pytest.raises(ValidationError) as err:
        validation.validate_bids_dir(tmp_path / "nodesc")
    assert err.value.code == 16 and "dataset_description.json" in str(err.value)
    (tmp_path / "nodesc" / "dataset_description.json").write_text("[1, 2")
    with pytest.raises(ValidationError, match="cannot read dataset_description.json"):
        validation.check_bids_dir(tmp_path / "nodesc")
    with pytest.raises(MissingInputError):
        pairing.find_run_pairs(tmp_path / "absent")


@pytest.mark.parametrize("validator", ["auto", "python"])
def test_validation_of_a_broken_dataset(noddi, tmp_path, validator):
    root = tmp_path / "broken"
    shutil.copytree(noddi, root, copy_function=os.link)  # links: nothing here is modified
    (root / "sub-35" / "func" / "sub-35_task-rest_bolds.json").write_text("{}")
    with pytest.raises(ValidationError) as err:
        validation.validate_bids_dir(root, validator=validator)
    message = str(err.value)
    assert err.value.code == 16 and "sub-35/func/sub-35_task-rest_bolds.json" in message
    assert "--skip-bids-validation" in message and "\n" not in message
    # only the selected participants' files are validated ...
    summary = validation.validate_bids_dir(root, participant_labels=["sub-32"], validator=validator)
    assert "no errors" in summary
    assert ("node" in summary) == (validator == "auto" and bool(shutil.which("bids-validator")))
    # ... and .bidsignore is honoured
    (root / ".bidsignore").write_text("*_bolds.json\n")
    assert "no errors" in validation.validate_bids_dir(root, validator=validator)


def test_python_validator_honours_bidsignore_folders(tmp_path):
    root = tmp_path / "ds"
    _description(root)
    write_eeg(root, "01")
    (root / "sub-01" / "extra").mkdir()
    (root / "sub-01" / "extra" / "notes.txt").write_text("x")
    (root / "code").mkdir()
    (root / "code" / "script.py").write_text("x")
    with pytest.raises(ValidationError, match="sub-01/extra/notes.txt"):
        validation.validate_bids_dir(root, validator="python")
    (root / ".bidsignore").write_text("# ours\nextra/\n")
    assert "no errors" in validation.validate_bids_dir(root, validator="python")


def test_check_output_dir(tmp_path):
    bids = tmp_path / "bids"
    _description(bids)
    (bids / "sub-01").mkdir()
    ok = validation.check_output_dir(bids, bids / "derivatives" / "spec2vol")
    assert ok == (bids / "derivatives" / "spec2vol").resolve()
    assert validation.check_output_dir(bids, tmp_path / "out") == (tmp_path / "out").resolve()
    link = tmp_path / "sneaky"
    link.symlink_to(bids / "sub-01")
    for out, why in [(bids, "is BIDS_DIR"), (bids / "sub-01" / "out", "inside the raw tree"),
                     (bids / "derivatives", "derivatives itself"), (tmp_path, "contains BIDS_DIR"),
                     (link / "out", "inside the raw tree"), (bids / "out" / "..", "is BIDS_DIR")]:
        with pytest.raises(UsageError, match=why) as err:
            validation.check_output_dir(bids, out)
        assert err.value.code == 64
        assert "derivatives/spec2vol" in str(err.value)  # the suggestion


def test_discovery_is_fast_and_read_only(study):
    before = _tree_digest(study)
    start = time.perf_counter()
    pairing.find_run_pairs(study)
    assert time.perf_counter() - start < 5.0
    assert _tree_digest(study) == before
    assert sorted(os.listdir(study)) == ["dataset_description.json", "sub-01", "sub-02", "sub-03",
                                         "sub-04", "task-rest_bold.json"]
