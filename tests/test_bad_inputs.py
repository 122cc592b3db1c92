"""Every bad input is answered with an exit code and one line naming the culprit.

Each case damages a private copy of a small simulated dataset in one way and runs the BIDS-App
as a user would (``python -m spec2vol_bids`` in a subprocess). It asserts the exit code, a single
``spec2vol: error:`` line naming the file or option, no traceback, and that OUTPUT_DIR holds no
temporary file, no file that fails to load and no output of the failing run.
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import GROUP_OPTIONS, PARTICIPANT_OPTIONS, assert_clean_failure, partial_files, run_spec2vol, unreadable_outputs

from spec2vol_bids.errors import DataError

def eeg_file(bids: Path, subject: str = "01", ext: str = ".vhdr") -> Path:
    return bids / f"sub-{subject}" / "eeg" / f"sub-{subject}_task-rest_eeg{ext}"


def bold_file(bids: Path, subject: str = "01", ext: str = ".nii.gz") -> Path:
    return bids / f"sub-{subject}" / "func" / f"sub-{subject}_task-rest_bold{ext}"


def spectrogram(out: Path, subject: str = "01") -> Path:
    return out / f"sub-{subject}" / "eeg" / f"sub-{subject}_task-rest_desc-spec2vol_spectrogram.npy"


def target(out: Path, subject: str = "01") -> Path:
    return out / f"sub-{subject}" / "func" / f"sub-{subject}_task-rest_desc-target_bold.nii.gz"


def synth(out: Path, subject: str = "01") -> Path:
    return out / f"sub-{subject}" / "func" / f"sub-{subject}_task-rest_desc-synth_bold.nii.gz"


def participant(bids: Path, out: Path, *extra, label: str = "01"):
    """The participant level for one participant, with the options that fit the simulation."""
    return run_spec2vol(bids, out, "participant", "--participant-label", label, *PARTICIPANT_OPTIONS, *extra)


def snapshot(root: Path) -> dict:
    """Every file under ``root`` with its size and modification time."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- BrainVision helpers --------------------------------------------------------------------

def vhdr_entries(vhdr: Path) -> dict:
    text = vhdr.read_text(encoding="utf-8")
    return dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.M))


def set_vhdr_entry(vhdr: Path, key: str, value: str) -> None:
    text = vhdr.read_text(encoding="utf-8")
    text, n = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
    assert n == 1
    vhdr.write_text(text, encoding="utf-8")


def eeg_samples(vhdr: Path) -> np.memmap:
    """The multiplexed float32 samples of a simulated recording, writable in place."""
    entries = vhdr_entries(vhdr)
    assert entries["BinaryFormat"] == "IEEE_FLOAT_32" and entries["DataOrientation"] == "MULTIPLEXED"
    n_channels = int(entries["NumberOfChannels"])
    data_file = vhdr.parent / entries["DataFile"]
    return np.memmap(data_file, dtype="<f4", mode="r+").reshape(-1, n_channels)


def channel_index(vhdr: Path, name: str) -> int:
    entries = vhdr_entries(vhdr)
    return next(int(k[2:]) - 1 for k, v in entries.items() if k.startswith("Ch") and v.split(",")[0] == name)


# -- the dataset and its place --------------------------------------------------------------

def test_bids_dir_missing(tmp_path):
    out = tmp_path / "out"
    proc = run_spec2vol(tmp_path / "nowhere", out, "participant")
    assert_clean_failure(proc, 66, "BIDS_DIR", "nowhere")
    assert not out.exists()


def test_bids_dir_is_a_file(tmp_path):
    bids = tmp_path / "dataset.zip"
    bids.write_bytes(b"PK\x03\x04")
    proc = run_spec2vol(bids, tmp_path / "out", "participant")
    assert_clean_failure(proc, 66, "BIDS_DIR", "dataset.zip")
    assert not (tmp_path / "out").exists()


def test_no_dataset_description(simulated_bids, tmp_path):
    (simulated_bids / "dataset_description.json").unlink()
    proc = participant(simulated_bids, tmp_path / "out")
    assert_clean_failure(proc, 16, "dataset_description.json", str(simulated_bids))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", [".", "sub-01/spec2vol", "derivatives"])
def test_output_dir_in_the_raw_tree(simulated_bids, where):
    before = snapshot(simulated_bids)
    out = (simulated_bids / where)
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 64, "OUTPUT_DIR")
    assert snapshot(simulated_bids) == before


def test_an_eeg_only_run_is_not_written_beside_a_bold_target_of_its_name(simulated_bids,
                                                                         participant_outputs):
    """Another dataset (here: this one with sub-01's BOLD removed) into an OUTPUT_DIR that holds
    a run of the same name: its spectrogram would be paired with the other's target."""
    shutil.rmtree(simulated_bids / "sub-01" / "func")
    before = snapshot(participant_outputs)
    proc = participant(simulated_bids, participant_outputs, "--skip-bids-validation")
    assert_clean_failure(proc, 64, "sub-01_task-rest_desc-target_bold.nii.gz",
                         "give this dataset its own OUTPUT_DIR")
    assert snapshot(participant_outputs) == before
    proc = participant(simulated_bids, participant_outputs.parent / "own", "--skip-bids-validation")
    assert proc.returncode == 0, proc.stderr


def test_another_datasets_runs_are_not_written_into_an_output_dir(simulated_bids, participant_outputs,
                                                                 tmp_path):
    """OUTPUT_DIR holds the derivatives of the simulated dataset. A copy of that dataset at
    another path goes on (nothing to redo); a dataset of another Name, whose sub-01 would replace
    this one's, is refused before anything is written."""
    copy = shutil.copytree(simulated_bids, tmp_path / "elsewhere" / "bids")
    proc = participant(copy, participant_outputs, "--skip-bids-validation")
    assert proc.returncode == 0, proc.stderr
    assert "spectrogram up to date, skipped" in proc.stderr
    description = simulated_bids / "dataset_description.json"
    meta = json.loads(description.read_text())
    own = meta["Name"]
    description.write_text(json.dumps({**meta, "Name": "Another EEG-fMRI study"}))
    before = snapshot(participant_outputs)
    proc = participant(simulated_bids, participant_outputs, "--skip-bids-validation")
    assert_clean_failure(proc, 64, f'the dataset "{own}", BIDS_DIR is "Another EEG-fMRI study"',
                         "give each dataset its own OUTPUT_DIR")
    assert snapshot(participant_outputs) == before


def test_output_dir_not_writable(simulated_bids, tmp_path):
    # root ignores permissions, so use a path that nobody can create: one below a regular file
    (tmp_path / "plain-file").write_text("not a folder")
    out = tmp_path / "plain-file" / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 73, "plain-file")


def test_work_dir_that_cannot_be_made(simulated_bids, tmp_path):
    """Below a file or where nothing can be created (/proc), before any work (73, as for
    OUTPUT_DIR); nothing is left behind by the check."""
    (tmp_path / "plain-file").write_text("not a folder")
    out = tmp_path / "out"
    proc = participant(simulated_bids, out, "-w", tmp_path / "plain-file" / "work")
    assert_clean_failure(proc, 73, "cannot create the work folder in", "plain-file (it is a file)",
                         out_dir=out)
    proc_dir = Path("/", "proc", "spec2vol-work")  # where nothing can be created, even by root
    proc = participant(simulated_bids, out, "-w", proc_dir)
    assert_clean_failure(proc, 73, str(proc_dir), f"cannot create the work folder in {proc_dir.parent}",
                         out_dir=out)
    assert not out.exists() and not list(tmp_path.rglob(".spec2vol-probe-*"))


def test_participant_label_not_in_dataset(simulated_bids, tmp_path):
    proc = participant(simulated_bids, tmp_path / "out", label="09")
    assert_clean_failure(proc, 18, "09", out_dir=tmp_path / "out")
    assert not list((tmp_path / "out").glob("sub-*"))


@pytest.mark.parametrize("label", ["../01", "01/../02", "sub-01/eeg", "..", "01\\02"])
def test_label_with_path_separator(simulated_bids, tmp_path, label):
    proc = participant(simulated_bids, tmp_path / "out", label=label)
    assert_clean_failure(proc, 64, "--participant-label")
    assert not (tmp_path / "out").exists()


def test_unknown_option_in_config_file(simulated_bids, tmp_path):
    config = tmp_path / "spec2vol.toml"
    config.write_text('participant-label = ["01"]\nlearning-rate-warmup = 3\n', encoding="utf-8")
    proc = run_spec2vol(simulated_bids, tmp_path / "out", "participant", "--config-file", config)
    assert_clean_failure(proc, 64, "learning-rate-warmup", str(config))
    assert not (tmp_path / "out").exists()


# -- EEG ------------------------------------------------------------------------------------

def test_brainvision_data_file_missing(simulated_bids, tmp_path):
    eeg_file(simulated_bids, ext=".eeg").unlink()
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 66, eeg_file(simulated_bids).name, "DataFile", out_dir=out)
    assert not spectrogram(out).exists()


@pytest.mark.parametrize("broken", [("DataFile",), ("DataFile", "MarkerFile")])
def test_brainvision_wrong_file_names_are_recovered(simulated_bids, participant_outputs_source,
                                                    tmp_path, broken):
    """ds002158/NATVIEW: the header names a data (and marker) file that does not exist. The
    corrected header keeps both files, so the run equals the intact one, markers and all."""
    vhdr = eeg_file(simulated_bids)
    for key in broken:
        set_vhdr_entry(vhdr, key, f"recording-renamed{'.eeg' if key == 'DataFile' else '.vmrk'}")
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "recording-renamed.eeg" in line]
    assert warning and "WARNING" in warning[0] and eeg_file(simulated_bids, ext=".eeg").name in warning[0]
    intact = spectrogram(participant_outputs_source)
    np.testing.assert_array_equal(np.load(spectrogram(out)), np.load(intact))
    got, want = (json.loads(p.with_suffix(".json").read_text()) for p in (spectrogram(out), intact))
    assert got["VolumeMarker"] == want["VolumeMarker"] == "Response/R128"
    assert got["VolumeOnsetsSeconds"] == want["VolumeOnsetsSeconds"]
    assert vhdr.read_text(encoding="utf-8").count("recording-renamed.eeg") == 1  # input untouched


@pytest.mark.parametrize("key", ["MarkerFile", "DataFile"])
def test_a_header_naming_another_recordings_file_beside_its_own(simulated_bids,
                                                                 participant_outputs_source,
                                                                 tmp_path, key):
    """sub-01's header names a file copied in from sub-02 (a header pasted from another run):
    its volume markers or samples would be another recording's. A copy of the run's own file
    under the other name is no such doubt."""
    vhdr = eeg_file(simulated_bids)
    ext = ".vmrk" if key == "MarkerFile" else ".eeg"
    foreign = vhdr.with_name(f"recording-renamed{ext}")
    shutil.copyfile(eeg_file(simulated_bids, "02", ext), foreign)
    set_vhdr_entry(vhdr, key, foreign.name)
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, vhdr.name, f"the header names {key}={foreign.name}, but "
                         f"{eeg_file(simulated_bids, ext=ext).name}, with the header's own name",
                         f"correct {key}= in the header", out_dir=out)
    shutil.copyfile(eeg_file(simulated_bids, ext=ext), foreign)
    proc = participant(simulated_bids, out)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(spectrogram(out)), np.load(spectrogram(participant_outputs_source)))
    sources = json.loads(spectrogram(out).with_suffix(".json").read_text())["Sources"]
    assert f"bids:raw:sub-01/eeg/{foreign.name}" in sources


def test_eeg_truncated_mid_sample(simulated_bids, tmp_path):
    data = eeg_file(simulated_bids, ext=".eeg")
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size - 6)
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, data.name, "truncated", out_dir=out)
    assert not spectrogram(out).exists()


def test_eeg_shorter_than_the_volumes(simulated_bids, tmp_path):
    # keep 2 s before the first volume and 5 TR windows: discard 2 + context 4 + 1 = 7 are needed
    vhdr = eeg_file(simulated_bids)
    n_channels = int(vhdr_entries(vhdr)["NumberOfChannels"])
    keep = int((2.0 + 5 * 2.0) * 250)
    data = eeg_file(simulated_bids, ext=".eeg")
    with open(data, "r+b") as fh:
        fh.truncate(keep * n_channels * 4)
    set_vhdr_entry(vhdr, "DataPoints", str(keep))
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    # 6 of 20 triggers recorded: an early stop, a late start or a pause look alike
    assert_clean_failure(proc, 65, "sub-01_task-rest_eeg.vhdr", "no trigger train fits the 20 BOLD "
                         "volumes", out_dir=out)
    proc = participant(simulated_bids, out, "--first-volume-trigger", "1")
    assert_clean_failure(proc, 65, "sub-01_task-rest_eeg.vhdr", "covers 5 TR windows", "fewer than "
                         "the 7 needed", out_dir=out)
    assert not spectrogram(out).exists()


def test_bold_series_too_short_is_named(simulated_bids, tmp_path):
    bold = bold_file(simulated_bids)
    img = nib.load(bold)
    nib.Nifti1Image(np.asarray(img.dataobj)[..., :2], img.affine, img.header).to_filename(bold)
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, bold.name, "the BOLD series has 2 volumes, fewer than the 7",
                         out_dir=out)
    assert not list(out.glob("sub-01/**/*_desc-*"))


def test_real_raw_eeg_shorter_than_its_bold_series(filled_noddi_source, tmp_path):
    """The NODDI layout's real headers: 10 s of raw 5 kHz EEG, no volume markers, 300 volumes."""
    out = tmp_path / "out"
    proc = run_spec2vol(filled_noddi_source, out, "participant", "--participant-label", "32",
                        "--skip-bids-validation", "--omp-nthreads", "1")
    assert_clean_failure(proc, 65, "sub-32_task-rest_eeg.", "no trigger train fits the 300 BOLD "
                         "volumes", out_dir=out)
    assert "SyncStatus" in proc.stderr  # what was found instead
    assert not list(out.glob("sub-32/eeg/*"))
    # told that the EEG starts with the first volume, it is too short for the series
    proc = run_spec2vol(filled_noddi_source, out, "participant", "--participant-label", "32",
                        "--skip-bids-validation", "--omp-nthreads", "1", "--eeg-offset", "0")
    assert_clean_failure(proc, 65, "sub-32_task-rest_eeg.", "covers", out_dir=out)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_eeg(simulated_bids, tmp_path, value):
    vhdr = eeg_file(simulated_bids)
    samples = eeg_samples(vhdr)
    samples[3000:3010, channel_index(vhdr, "C4")] = value
    samples.flush()
    del samples
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, "sub-01_task-rest_eeg.", "NaN or infinite", out_dir=out)
    assert not spectrogram(out).exists()


def test_flat_channel_is_dropped_with_a_warning(simulated_bids, tmp_path):
    vhdr = eeg_file(simulated_bids)
    samples = eeg_samples(vhdr)
    samples[:, channel_index(vhdr, "C3")] = 12.5
    samples.flush()
    del samples
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert any("WARNING" in line and "flat" in line and "C3" in line for line in proc.stderr.splitlines())
    sidecar = json.loads(spectrogram(out).with_suffix(".json").read_text())
    assert "C3" not in sidecar["Channels"] and len(sidecar["Channels"]) == 15
    assert "C3" in sidecar["DroppedChannels"]
    spec = np.load(spectrogram(out))
    assert spec.shape == (20, 15, 16) and np.isfinite(spec).all()


def test_marker_spacing_disagrees_with_repetition_time(simulated_bids, tmp_path):
    # volume markers every 2.2 s, in the .vmrk and in events.tsv, for a RepetitionTime of 2.0 s
    vmrk = eeg_file(simulated_bids, ext=".vmrk")
    lines = vmrk.read_text(encoding="utf-8").splitlines()
    k = 0
    for i, line in enumerate(lines):
        if re.match(r"Mk\d+=Response,R128,", line):
            fields = line.split(",")
            fields[2] = str(501 + k * 550)
            lines[i], k = ",".join(fields), k + 1
    assert k == 20
    vmrk.write_text("\n".join(lines) + "\n", encoding="utf-8")
    events = eeg_file(simulated_bids, ext=".tsv").with_name("sub-01_task-rest_events.tsv")
    rows = events.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 21 and rows[0].split("\t")[0] == "onset"
    rows[1:] = [f"{2.0 + k * 2.2:.3f}\t0.004\tResponse/R128\t1\t{500 + k * 550}" for k in range(20)]
    events.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, "sub-01_task-rest_eeg.", "RepetitionTime", out_dir=out)
    assert not spectrogram(out).exists()


# -- BOLD -----------------------------------------------------------------------------------

@pytest.mark.parametrize("nprocs", ["1", "2"])
def test_a_refused_run_does_not_stop_the_others(simulated_bids, tmp_path, nprocs):
    """sub-01's BOLD is cut short after a first run: sub-01 is refused and leaves nothing, not
    even the derivatives of its BOLD as it was, which the group level would train on; sub-02
    is reported and kept as it was; the exit code and the line are sub-01's, with how many
    runs are done."""
    out = tmp_path / "out"
    args = (simulated_bids, out, "participant", "--participant-label", "01", "02",
            *PARTICIPANT_OPTIONS, "--nprocs", nprocs)
    assert run_spec2vol(*args).returncode == 0
    kept = {p: p.stat().st_mtime_ns for p in (spectrogram(out, "02"), target(out, "02"))}
    bold = bold_file(simulated_bids)
    img = nib.load(bold)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., :5], img.affine, img.header), bold)
    proc = run_spec2vol(*args)
    assert_clean_failure(proc, 65, "the BOLD series has 5 volumes", "1 of 2 runs are done",
                         "--participant-label", out_dir=out)
    assert not spectrogram(out).exists() and not target(out).exists()
    assert not list((out / "sub-01").rglob("sub-01_task-rest_desc-*"))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (out / "sub-02.html").is_file()
    inventory = (out / "sub-01" / "sub-01_runs.tsv").read_text()
    assert "\trefused\t" in inventory and "5 volumes" in inventory


def test_two_echoes_of_one_run_are_a_choice_for_the_user(simulated_bids, tmp_path):
    """Two echoes of sub-01's BOLD: which one is paired changes the science, so the user says it
    (a filter file)."""
    bold = bold_file(simulated_bids)
    for echo in ("1", "2"):
        shutil.copyfile(bold, bold.with_name(f"sub-01_task-rest_echo-{echo}_bold.nii.gz"))
    bold.unlink()
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, "2 BOLD files of one run (sub-01_task-rest_echo-1_bold.nii.gz, "
                         "sub-01_task-rest_echo-2_bold.nii.gz)", '{"bold": {"echo": "2"}}', out_dir=out)
    filters = tmp_path / "filters.json"
    filters.write_text('{"bold": {"echo": "2"}}')
    proc = participant(simulated_bids, out, "--bids-filter-file", filters)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in (out / "sub-01" / "sub-01_runs.tsv").read_text().splitlines()]
    assert len(rows) == 2 and rows[1][3] == "paired"
    assert rows[1][2].endswith("sub-01_task-rest_echo-2_bold.nii.gz")


def test_zero_byte_nifti(simulated_bids, tmp_path):
    bold_file(simulated_bids).write_bytes(b"")
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, bold_file(simulated_bids).name, "empty", out_dir=out)
    assert not target(out).exists() and not spectrogram(out).exists()


@pytest.mark.parametrize("damage", ["not-gzip", "mid-stream"])
def test_corrupt_gzip(simulated_bids, tmp_path, damage):
    bold = bold_file(simulated_bids)
    raw = bytearray(bold.read_bytes())
    if damage == "not-gzip":
        raw = bytearray(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8)
    else:  # the header decompresses, the volumes do not
        middle = len(raw) // 2
        raw[middle:middle + 4096] = bytes(4096)
    bold.write_bytes(bytes(raw))
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, bold.name, out_dir=out)
    assert not target(out).exists()


def test_three_dimensional_bold(simulated_bids, tmp_path):
    bold = bold_file(simulated_bids)
    img = nib.load(bold)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj[..., 0]), img.affine, img.header), bold)
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, bold.name, "4-D", out_dir=out)
    assert not target(out).exists()


def set_header_tr(bids: Path, tr: float) -> Path:
    """sub-01's BOLD series with ``tr`` in its NIfTI header's pixdim[4]; returns its path."""
    bold = bold_file(bids)
    img = nib.load(bold)
    header = img.header.copy()
    header["pixdim"][4] = tr
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, header), bold)
    return bold


def test_repetition_time_missing_from_sidecar_and_header(simulated_bids, tmp_path):
    sidecar = bold_file(simulated_bids, ext=".json")
    meta = json.loads(sidecar.read_text())
    del meta["RepetitionTime"]
    sidecar.write_text(json.dumps(meta))
    bold = set_header_tr(simulated_bids, 0)
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, bold.name, "RepetitionTime", out_dir=out)
    assert not target(out).exists()


def test_header_and_sidecar_repetition_times_disagree(simulated_bids, tmp_path):
    """The sidecar says 2 s, pixdim[4] 2.5 s: the volume markers confirm the sidecar's TR; without
    them nothing tells which is right, and every window after the first depends on it."""
    bold = set_header_tr(simulated_bids, 2.5)
    with_markers = tmp_path / "with-markers"
    proc = participant(simulated_bids, with_markers, "-v")
    assert proc.returncode == 0, proc.stderr
    assert "the NIfTI header says TR 2.5 s, the sidecar 2 s" in proc.stderr
    assert json.loads(target(with_markers).with_name(
        target(with_markers).name.replace(".nii.gz", ".json")).read_text())["RepetitionTime"] == 2.0
    assert nib.load(target(with_markers)).header.get_zooms()[3] == 2.0

    vmrk = eeg_file(simulated_bids, ext=".vmrk")
    vmrk.write_text("".join(line for line in vmrk.read_text().splitlines(keepends=True)
                            if "R128" not in line))
    eeg_file(simulated_bids, ext=".vmrk").with_name("sub-01_task-rest_events.tsv").unlink()
    without = tmp_path / "without-markers"
    proc = participant(simulated_bids, without, "--eeg-offset", "2")
    assert_clean_failure(proc, 65, bold.name, "RepetitionTime is 2 s but the NIfTI header says "
                         "2.5 s", out_dir=without)
    assert not list(without.glob("sub-01/**/*_desc-*"))


def test_header_and_sidecar_sampling_frequencies_disagree(simulated_bids, tmp_path):
    """The .vhdr's SamplingInterval says 250 Hz, the _eeg.json 500 Hz: every window's length in
    samples and every bin rest on it, and nothing tells which is right."""
    sidecar = eeg_file(simulated_bids, ext=".json")
    meta = json.loads(sidecar.read_text())
    sfreq = meta["SamplingFrequency"]
    sidecar.write_text(json.dumps({**meta, "SamplingFrequency": 2 * sfreq}))
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    assert_clean_failure(proc, 65, eeg_file(simulated_bids).name, f"the recording's header gives "
                         f"{sfreq:g} Hz but {sidecar.name} says SamplingFrequency {2 * sfreq:g} Hz",
                         out_dir=out)
    assert not list(out.glob("sub-01/**/*_desc-*"))


def test_every_channel_marked_bad(simulated_bids, tmp_path):
    tsv = eeg_file(simulated_bids, ext=".vhdr").with_name("sub-01_task-rest_channels.tsv")
    lines = tsv.read_text().splitlines()
    column = lines[0].split("\t").index("status")
    rows = [line.split("\t") for line in lines[1:]]
    for row in rows:
        row[column] = "bad"
    tsv.write_text("\n".join([lines[0], *("\t".join(row) for row in rows)]) + "\n")
    out = tmp_path / "out"
    proc = participant(simulated_bids, out)
    eeg_rows = sum(row[lines[0].split("\t").index("type")] == "EEG" for row in rows)
    assert 2 <= eeg_rows < len(rows)  # the ECG is no EEG channel, bad or not
    assert_clean_failure(proc, 65, f"no EEG channels left: channels.tsv marks all {eeg_rows} bad",
                         out_dir=out)


def test_more_bins_than_the_recording_holds_names_it(simulated_bids, tmp_path):
    options = list(PARTICIPANT_OPTIONS)
    options[options.index("--freq-bins") + 1] = "4000"
    out = tmp_path / "out"
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01", *options)
    assert_clean_failure(proc, 65, eeg_file(simulated_bids).name, "4000 frequency bins asked for",
                         "lower --freq-bins or --fmax", out_dir=out)


def test_target_grid_the_network_cannot_produce(simulated_bids_source, tmp_path):
    """Targets of 16x16 in-plane are fine for the participant level, not for Spec2VolCAMU-Net."""
    out = tmp_path / "out"
    options = list(PARTICIPANT_OPTIONS)
    options[options.index("--target-grid") + 1:options.index("--target-grid") + 3] = ["16", "16"]
    proc = run_spec2vol(simulated_bids_source, out, "participant", "--participant-label", "01", "02", *options)
    assert proc.returncode == 0, proc.stderr
    proc = run_spec2vol(simulated_bids_source, out, "group", "--model-config", "tiny", "--epochs", "1",
                        "--omp-nthreads", "1", "--no-final", "--participant-label", "01", "02")
    assert proc.returncode in (64, 65), proc.stderr
    assert_clean_failure(proc, proc.returncode, "grid", out_dir=out)
    assert not list(out.glob("models/*/model.pt"))


# -- trained models (participant --model) ----------------------------------------------------

def save_tiny_model(path: Path, channels: list[str], *, freq_bins: int = 16, context: int = 4) -> Path:
    """An untrained tiny Spec2VolCAMU-Net stored as the group level stores its models."""
    from spec2vol_bids.models import build_model, save_checkpoint

    model = build_model("spec2vol", eeg_channels=len(channels), freq_bins=freq_bins,
                        out_shape=(8, 32, 32), context=context, size="tiny")
    extra = {"Fold": "final", "RepetitionTime": 2.0, "Context": context, "DiscardVolumes": 2,
             "TargetShape": [32, 32, 8], "TargetAffine": np.eye(4).tolist()}
    return save_checkpoint(path, model, model_name="spec2vol", channels=channels,
                           norm_stats={"min": -3.0, "max": 3.0}, extra=extra)


@pytest.fixture()
def model_channels(participant_outputs_source) -> list[str]:
    return json.loads(spectrogram(participant_outputs_source).with_suffix(".json").read_text())["Channels"]


def test_good_model_synthesises(simulated_bids, participant_outputs, model_channels, tmp_path):
    """The control of the model cases below: a sound model file synthesises BOLD (exit 0)."""
    model = save_tiny_model(tmp_path / "model.pt", model_channels)
    proc = participant(simulated_bids, participant_outputs, "--model", model)
    assert proc.returncode == 0, proc.stderr
    assert nib.load(synth(participant_outputs)).shape == (32, 32, 8, 20 - 6)
    assert partial_files(participant_outputs) == []


def test_a_model_reading_more_bins_than_the_recording_holds(simulated_bids, tmp_path,
                                                            model_channels):
    """The model's bins decide (--freq-bins would be refused beside --model): the advice names
    the model to apply, not an option the model overrides."""
    model = save_tiny_model(tmp_path / "model.pt", model_channels, freq_bins=300)
    options = list(PARTICIPANT_OPTIONS)
    del options[options.index("--freq-bins"):options.index("--freq-bins") + 2]
    out = tmp_path / "out"
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01", *options,
                        "--model", model)
    assert_clean_failure(proc, 65, eeg_file(simulated_bids).name, "the model reads 300 frequency "
                         "bins, up to 150 Hz, but this recording at 250 Hz holds 250 (up to 125 Hz); "
                         "apply a model trained with at most 250 bins (--freq-bins 250, or --fmax 125)",
                         out_dir=out)


def test_other_bins_than_the_models_are_refused(simulated_bids, tmp_path, model_channels):
    """The model was trained on 16 bins: --freq-bins 8 beside it is two choices that disagree
    (64, as for --context and --target-grid below), refused before any work."""
    model = save_tiny_model(tmp_path / "model.pt", model_channels)
    options = list(PARTICIPANT_OPTIONS)
    options[options.index("--freq-bins") + 1] = "8"
    out = tmp_path / "out"
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01", *options,
                        "--model", model)
    assert_clean_failure(proc, 64, "was trained on 16 frequency bins but --freq-bins 8 was given; "
                         "leave --freq-bins out to use the model's", out_dir=out)
    assert not list(out.glob("sub-01/**/*_desc-*"))


def test_too_many_model_channels_missing(simulated_bids, participant_outputs, model_channels, tmp_path):
    # the model knows 5 channels the recording lacks: 5 of 21 (24 %) are missing
    extra = ["Fz", "Pz", "Oz", "FC1", "FC2"]
    assert not set(extra) & set(model_channels)
    model = save_tiny_model(tmp_path / "model.pt", model_channels + extra)
    proc = participant(simulated_bids, participant_outputs, "--model", model)
    assert_clean_failure(proc, 65, f"{eeg_file(simulated_bids)}: 5 of the model's 21 EEG channels "
                         "are missing (Fz, Pz, Oz, FC1, FC2)", "apply a model trained on this "
                         "recording's channels", out_dir=participant_outputs)
    assert not synth(participant_outputs).exists()
    # a model refused at synthesis leaves the run's derivatives as they were
    assert spectrogram(participant_outputs).is_file() and target(participant_outputs).is_file()
    # into a new OUTPUT_DIR the run's new files go with it: the message names the recording,
    # not the spectrogram it removed
    fresh = tmp_path / "fresh"
    proc = participant(simulated_bids, fresh, "--model", model)
    assert_clean_failure(proc, 65, f"{eeg_file(simulated_bids)}: 5 of the model's 21", out_dir=fresh)
    assert not spectrogram(fresh).exists()


def test_a_series_from_a_recording_since_changed_goes_with_its_refusal(
        simulated_bids, participant_outputs, model_channels, tmp_path):
    """A series synthesised earlier, then the recording changes (5 channels marked bad) and the
    model is refused for them: the run's spectrogram was rewritten from the changed recording,
    so the earlier series, made from what is gone, goes with the run's other derivatives."""
    model = save_tiny_model(tmp_path / "model.pt", model_channels)
    proc = participant(simulated_bids, participant_outputs, "--model", model)
    assert proc.returncode == 0 and synth(participant_outputs).is_file(), proc.stderr
    tsv = eeg_file(simulated_bids, ext=".vhdr").with_name("sub-01_task-rest_channels.tsv")
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    for row in rows[:5]:
        row[header.index("status")] = "bad"
    tsv.write_text("\n".join([lines[0], *("\t".join(row) for row in rows)]) + "\n")
    proc = participant(simulated_bids, participant_outputs, "--model", model)
    assert_clean_failure(proc, 65, "5 of the model's", out_dir=participant_outputs)
    assert "refused; its earlier derivatives are removed" in proc.stderr
    left = sorted(p.name for p in participant_outputs.glob("sub-01/*/sub-01_task-rest_*"))
    assert left == [], left


def test_model_weights_do_not_fit_its_configuration(simulated_bids, tmp_path, model_channels):
    import torch

    model = save_tiny_model(tmp_path / "model.pt", model_channels)
    payload = torch.load(model, weights_only=True)
    payload["config"]["width"] = 2 * payload["config"]["width"]
    torch.save(payload, model)
    out = tmp_path / "out"
    proc = participant(simulated_bids, out, "--model", model)
    assert_clean_failure(proc, 65, str(model), out_dir=out)
    assert not synth(out).exists()


def test_model_from_another_preprocessing(simulated_bids, participant_outputs, model_channels, tmp_path):
    # trained on 32 frequency bins and 6 windows of context; these spectrograms have 16 and 4
    model = save_tiny_model(tmp_path / "model.pt", model_channels, freq_bins=32, context=6)
    proc = participant(simulated_bids, participant_outputs, "--model", model)
    assert_clean_failure(proc, 64, "model.pt", out_dir=participant_outputs)
    assert not synth(participant_outputs).exists()


def _without(options: tuple, name: str, values: int = 1) -> tuple:
    """``options`` without the option ``name`` and its ``values`` values."""
    at = options.index(name)
    return options[:at] + options[at + 1 + values:]


def test_model_decides_the_frequency_bins(simulated_bids, model_channels, tmp_path):
    """Without --freq-bins the spectrograms take the model's bins (32 here, not 249)."""
    model = save_tiny_model(tmp_path / "model.pt", model_channels, freq_bins=32)
    out = tmp_path / "out"
    options = _without(PARTICIPANT_OPTIONS, "--freq-bins")
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01", *options,
                        "--model", model)
    assert proc.returncode == 0, proc.stderr
    assert np.load(spectrogram(out)).shape[2] == 32
    assert nib.load(synth(out)).ndim == 4


def test_model_decides_the_context(simulated_bids, model_channels, tmp_path):
    """Without --context the model's own is used, and recorded: 6 windows here, not 4."""
    model = save_tiny_model(tmp_path / "model.pt", model_channels, context=6)
    out = tmp_path / "out"
    options = _without(PARTICIPANT_OPTIONS, "--context")
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01", *options,
                        "--model", model)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(spectrogram(out).with_suffix(".json").read_text())["Context"] == 6
    assert nib.load(synth(out)).shape[3] == 20 - 2 - 6
    side = json.loads(synth(out).with_suffix("").with_suffix(".json").read_text())
    assert side["SourceVolumes"][0] == 2 + 6


def test_another_context_than_the_models_is_refused(simulated_bids, model_channels, tmp_path):
    model = save_tiny_model(tmp_path / "model.pt", model_channels, context=6)
    out = tmp_path / "out"
    proc = participant(simulated_bids, out, "--model", model)  # with --context 4
    assert_clean_failure(proc, 64, "--context 4", "reads 6 TR windows", out_dir=out)
    assert not out.exists() or not list(out.glob("sub-*"))


def test_model_decides_the_target_grid(simulated_bids, model_channels, tmp_path):
    """Without --target-grid the paired run's target is on the model's grid (32x32x8 here), the
    one its synthesised volumes have; another --target-grid is refused before anything is
    written."""
    model = save_tiny_model(tmp_path / "model.pt", model_channels)
    out = tmp_path / "out"
    proc = participant(simulated_bids, out, "--model", model, "--target-grid", "32", "32", "16")
    assert_clean_failure(proc, 64, "--target-grid 32 32 16", "a 32x32x8 grid", out_dir=out)
    assert not out.exists() or not list(out.glob("sub-*"))
    options = _without(PARTICIPANT_OPTIONS, "--target-grid", values=3)
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01", *options,
                        "--model", model)
    assert proc.returncode == 0, proc.stderr
    assert nib.load(target(out)).shape[:3] == nib.load(synth(out)).shape[:3] == (32, 32, 8)


def test_the_group_level_waits_for_every_participant(simulated_bids_source, participant_outputs):
    """A participant job killed before it finished sub-03 (no sub-03_runs.tsv): the folds and
    the final model would be those of the participants that happen to be done."""
    (participant_outputs / "sub-03" / "sub-03_runs.tsv").unlink()
    proc = run_spec2vol(simulated_bids_source, participant_outputs, "group", *GROUP_OPTIONS,
                        "--epochs", "1", "--skip-bids-validation")
    assert_clean_failure(proc, 66, "the participant level has not finished sub-03 of BIDS_DIR (no "
                         "sub-03_runs.tsv): run it for them first, or leave them out with "
                         "--participant-label", out_dir=participant_outputs)
    assert not (participant_outputs / "models").exists()


def test_the_group_level_never_replaces_a_series_participant_model_wrote(simulated_bids, model_channels,
                                                                        tmp_path):
    """sub-01's series came from another model (participant --model): the group level, which
    would write sub-01's held-out synthesis in its place, refuses before training."""
    model = save_tiny_model(tmp_path / "model.pt", model_channels)
    out = tmp_path / "out"
    assert participant(simulated_bids, out, "--model", model).returncode == 0
    assert participant(simulated_bids, out, label="02").returncode == 0
    before = synth(out).read_bytes()
    proc = run_spec2vol(simulated_bids, out, "group", "--model-config", "tiny", "--epochs", "1",
                        "--omp-nthreads", "1", "--no-final", "--participant-label", "01", "02")
    assert_clean_failure(proc, 64, str(synth(out)), "synthesised for this run by participant --model",
                         "move it out of OUTPUT_DIR", out_dir=out)
    assert synth(out).read_bytes() == before
    assert not (out / "models").exists()


class _Payload:
    """Unpickling this object runs ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_model_file_that_runs_code_is_never_executed(simulated_bids, tmp_path, writer):
    import torch

    marker = tmp_path / "pwned"
    model = tmp_path / "model.pt"
    payload = {"format": "spec2vol-model", "format_version": 1, "config": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, model)
    else:
        model.write_bytes(pickle.dumps(payload, protocol=2))
    assert not marker.exists()
    out = tmp_path / "out"
    proc = participant(simulated_bids, out, "--model", model)
    assert_clean_failure(proc, 65, str(model), out_dir=out)
    assert not marker.exists()
    assert not out.exists() or not list(out.glob("sub-*"))


def test_unpickling_the_payload_would_create_the_marker(tmp_path):
    """The check above is meaningful: an unsafe load of such a file does run its code."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps({"config": _Payload(marker)}, protocol=2))["config"].close()
    assert marker.exists()


def test_no_partial_files_helper_sees_partial_writes(tmp_path):
    """The 'nothing half-written' checks catch what they look for."""
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "sub-01" / ".x_bold.nii.gz.abc123.tmp.nii.gz").write_bytes(b"")
    with gzip.open(tmp_path / "sub-01" / "x_bold.nii.gz", "wb") as fh:
        fh.write(b"\x00" * 100)
    np.save(tmp_path / "ok.npy", np.zeros(3))
    (tmp_path / "bad.npy").write_bytes(np.load(tmp_path / "ok.npy").tobytes()[:5])
    assert [p.name for p in partial_files(tmp_path)] == [".x_bold.nii.gz.abc123.tmp.nii.gz"]
    assert [line.split(":")[0] for line in unreadable_outputs(tmp_path)] == [
        str(tmp_path / "bad.npy"), str(tmp_path / "sub-01" / "x_bold.nii.gz")]


# -- non-finite numbers: refused where they would enter, never written -----------------------

@pytest.mark.parametrize("damage, needle", [
    ("weights", "the model's weights hold NaN or infinite values"),
    ("norm", "normalisation statistics hold NaN or infinite values"),
    ("channels", "the model file lists no EEG channels"),
])
def test_model_file_with_non_finite_numbers_is_refused(model_channels, tmp_path, damage, needle):
    import torch

    from spec2vol_bids.models import load_checkpoint

    path = save_tiny_model(tmp_path / "model.pt", model_channels)
    payload = torch.load(path, weights_only=True)
    if damage == "weights":
        name = next(iter(payload["state_dict"]))
        payload["state_dict"][name] = payload["state_dict"][name].clone().fill_(float("nan"))
    elif damage == "norm":
        payload["norm_stats"]["max"] = float("inf")
    else:
        payload["channels"] = []
    torch.save(payload, path)
    with pytest.raises(DataError, match=needle) as err:
        load_checkpoint(path)
    assert err.value.code == 65 and str(path) in str(err.value)


def test_synthesis_with_a_nan_model_writes_nothing(simulated_bids, participant_outputs, model_channels,
                                                   tmp_path):
    import torch

    path = save_tiny_model(tmp_path / "model.pt", model_channels)
    payload = torch.load(path, weights_only=True)
    for tensor in payload["state_dict"].values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
    torch.save(payload, path)
    proc = participant(simulated_bids, participant_outputs, "--model", path)
    assert_clean_failure(proc, 65, "model.pt", "NaN or infinite", out_dir=participant_outputs)
    assert not synth(participant_outputs).exists()


def test_nan_in_a_spectrogram_is_refused_by_the_group_level(simulated_bids_source, participant_outputs,
                                                            tmp_path):
    spec_file = spectrogram(participant_outputs, "02")
    spec = np.load(spec_file)
    spec[5, 3, 2] = np.nan
    np.save(spec_file, spec)
    proc = run_spec2vol(simulated_bids_source, participant_outputs, "group", "--model-config", "tiny",
                        "--epochs", "1", "-w", tmp_path / "work")
    assert_clean_failure(proc, 65, spec_file.name, "NaN or infinite values", out_dir=participant_outputs)
    assert not (participant_outputs / "models").exists()


def test_divergence_stops_the_fold_and_keeps_nothing_of_it(simulated_bids_source, participant_outputs,
                                                           tmp_path):
    proc = run_spec2vol(simulated_bids_source, participant_outputs, "group", "--model-config", "tiny",
                        "--batch-size", "4", "--epochs", "2", "--lr", "1e30", "--warmup-steps", "0",
                        "--omp-nthreads", "1", "-w", tmp_path / "work", "--split", "fixed",
                        "--test-subjects", "03", "--no-final")
    line = assert_clean_failure(proc, 65, "fold fixed spec2vol: training diverged in epoch 1",
                                "lower --lr", out_dir=participant_outputs)
    assert "no epoch finished, so no checkpoint is kept" in line
    fold = participant_outputs / "models" / "fold-fixed"
    assert not (fold / "done.json").exists() and not list(fold.rglob("model.pt"))
    assert not list(participant_outputs.rglob("*_desc-synth_bold.nii.gz"))
    assert not (participant_outputs / "group_metrics.tsv").exists()
    assert "Warning" not in proc.stderr and "warn(" not in proc.stderr
