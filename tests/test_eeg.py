"""Reading EEG, choosing channels, and finding volume onsets (spec2vol_bids.eeg)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import mne
import numpy as np
import pybv
import pytest

from spec2vol_bids.eeg import (
    canonical_channel_order,
    eeg_channels,
    find_volume_onsets,
    read_eeg,
)
from spec2vol_bids.errors import DataError, MissingInputError, UsageError

from fixture_data import fixture_source

FIXTURE = fixture_source()

CH_NAMES = ["Fz", "Cz", "Pz", "Oz", "C3", "C4", "ECG", "EOG1"]


def write_bv(folder, *, sfreq=250.0, n_times=5000, ch_names=CH_NAMES, events=None,
             fmt="binary_float32", data=None, stem="sub-01_task-rest_eeg", seed=0):
    """Write a BrainVision recording with pybv; ``events``: (sample, type, description) tuples."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(seed).standard_normal((len(ch_names), n_times)) * 1e-5
    pybv_events = None
    if events:
        pybv_events = [{"onset": int(s), "duration": 1, "type": t, "description": d}
                       for s, t, d in events]
    pybv.write_brainvision(data=data, sfreq=sfreq, ch_names=list(ch_names), fname_base=stem,
                           folder_out=str(folder), events=pybv_events, fmt=fmt, overwrite=True)
    return folder / f"{stem}.vhdr"


def raw_with_annotations(onsets, description, *, sfreq=500.0, n_times=40000, first_samp=0):
    """A RawArray whose annotations carry ``description`` at the given samples."""
    info = mne.create_info(["Cz", "Pz"], sfreq, "eeg")
    raw = mne.io.RawArray(np.zeros((2, n_times)), info, first_samp=first_samp, verbose=False)
    raw.set_meas_date(1_500_000_000)
    # With a measurement date, annotation onsets count from it, i.e. from sample 0 before
    # first_samp (as in FIF files cut from a longer recording).
    onsets = np.asarray(onsets, dtype=float)
    raw.set_annotations(mne.Annotations((onsets + first_samp) / sfreq, 0.0,
                                        [description] * len(onsets),
                                        orig_time=raw.info["meas_date"]))
    raw._filenames = [Path("sim_eeg.fif")]
    return raw


# ---- reading -------------------------------------------------------------------------------

def test_read_brainvision_lazily_without_touching_input(tmp_path):
    vhdr = write_bv(tmp_path / "in")
    before = {p.name: p.read_bytes() for p in vhdr.parent.iterdir()}
    raw = read_eeg(vhdr, work_dir=tmp_path / "work")
    assert not raw.preload
    assert raw.ch_names == CH_NAMES and raw.n_times == 5000
    assert {p.name: p.read_bytes() for p in vhdr.parent.iterdir()} == before
    assert not (tmp_path / "work").exists()  # nothing to correct, nothing written


@pytest.mark.parametrize("ext", [".edf", ".fif", ".set"])
def test_read_other_formats(tmp_path, ext):
    info = mne.create_info(["Fz", "Cz", "Pz"], 256.0, "eeg")
    data = np.random.default_rng(1).standard_normal((3, 2560)) * 1e-5
    raw = mne.io.RawArray(data, info, verbose=False)
    path = tmp_path / f"sub-01_eeg{ext if ext != '.fif' else '_raw.fif'}"
    if ext == ".fif":
        raw.save(path, verbose=False)
    else:
        mne.export.export_raw(path, raw, verbose=False)
    got = read_eeg(path, work_dir=tmp_path / "work")
    assert got.ch_names == ["Fz", "Cz", "Pz"]
    assert got.info["sfreq"] == 256.0
    np.testing.assert_allclose(got.get_data(), data, atol=2e-8 if ext == ".edf" else 1e-12)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(MissingInputError) as err:
        read_eeg(tmp_path / "nope.vhdr", work_dir=tmp_path)
    assert err.value.code == 66 and "nope.vhdr" in str(err.value)
    other = tmp_path / "x.xyz"
    other.write_text("hello")
    with pytest.raises(DataError, match="unsupported EEG format"):
        read_eeg(other, work_dir=tmp_path)


def test_truncated_and_short_brainvision_data(tmp_path):
    vhdr = write_bv(tmp_path)
    eeg_file = vhdr.with_suffix(".eeg")
    full = eeg_file.read_bytes()
    # pybv writes no DataPoints=; add it as Recorder does, so a short file can be detected.
    text = vhdr.read_text().replace("[Common Infos]\n", "[Common Infos]\nDataPoints=5000\n")
    vhdr.write_text(text)
    eeg_file.write_bytes(full[: len(full) - 3])  # cut mid-sample
    with pytest.raises(DataError, match="truncated") as err:
        read_eeg(vhdr, work_dir=tmp_path / "work")
    assert err.value.code == 65 and eeg_file.name in str(err.value)
    eeg_file.write_bytes(full[: len(full) // 2])  # whole samples, fewer than announced
    with pytest.raises(DataError, match="announces 5000"):
        read_eeg(vhdr, work_dir=tmp_path / "work")
    eeg_file.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_eeg(vhdr, work_dir=tmp_path / "work")


def test_corrupt_header_is_a_data_error(tmp_path):
    vhdr = write_bv(tmp_path)
    vhdr.write_text(vhdr.read_text().replace("SamplingInterval=4000", "SamplingInterval=abc"))
    with pytest.raises(DataError) as err:
        read_eeg(vhdr, work_dir=tmp_path / "work")
    assert err.value.code == 65 and vhdr.name in str(err.value)
    assert "\n" not in str(err.value)


def test_broken_datafile_entry_recoverable(tmp_path, caplog):
    """ds002158: the header names a data/marker file that does not exist."""
    vhdr = write_bv(tmp_path / "in", events=[(100, "Response", 128)])
    stem = vhdr.stem
    vhdr.with_suffix(".eeg").rename(vhdr.with_suffix(".dat"))
    vhdr.with_suffix(".vmrk").rename(vhdr.parent / "renamed.vmrk")
    shutil.copy(vhdr.parent / "renamed.vmrk", vhdr.with_suffix(".vmrk"))
    (vhdr.parent / "renamed.vmrk").unlink()
    text = vhdr.read_text()
    text = text.replace(f"DataFile={stem}.eeg", "DataFile=original_name.eeg")
    text = text.replace(f"MarkerFile={stem}.vmrk", "MarkerFile=original_name.vmrk")
    vhdr.write_text(text)
    before = {p.name: p.read_bytes() for p in vhdr.parent.iterdir()}
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids.eeg"):
        raw = read_eeg(vhdr, work_dir=tmp_path / "work")
    assert "original_name.eeg does not exist" in caplog.text
    assert raw.n_times == 5000 and len(raw.ch_names) == len(CH_NAMES)
    assert "Response/R128" in raw.annotations.description
    assert (tmp_path / "work" / vhdr.name).is_file()
    assert {p.name: p.read_bytes() for p in vhdr.parent.iterdir()} == before


def test_broken_datafile_entry_unrecoverable(tmp_path):
    vhdr = write_bv(tmp_path)
    stem = vhdr.stem
    shutil.copy(vhdr.with_suffix(".eeg"), vhdr.with_suffix(".dat"))  # two candidates
    vhdr.write_text(vhdr.read_text().replace(f"DataFile={stem}.eeg", "DataFile=gone.eeg"))
    with pytest.raises(DataError, match="DataFile=gone.eeg") as err:
        read_eeg(vhdr, work_dir=tmp_path / "work")
    assert err.value.code == 65 and vhdr.name in str(err.value)
    vhdr.with_suffix(".eeg").unlink()
    vhdr.with_suffix(".dat").unlink()  # no candidate at all
    with pytest.raises(DataError, match="candidates: none"):
        read_eeg(vhdr, work_dir=tmp_path / "work")


def test_read_through_mne_bids(tmp_path):
    import mne_bids

    info = mne.create_info(["Fz", "Cz", "Pz", "HR"], 250.0, "eeg")
    raw = mne.io.RawArray(np.random.default_rng(2).standard_normal((4, 5000)) * 1e-5, info,
                          verbose=False)
    raw.set_channel_types({"HR": "ecg"})
    raw.info["line_freq"] = 50
    bids_path = mne_bids.BIDSPath(subject="01", task="rest", datatype="eeg", root=tmp_path / "bids")
    mne_bids.write_raw_bids(raw, bids_path, format="BrainVision", allow_preload=True,
                            verbose=False)
    vhdr = bids_path.copy().update(suffix="eeg", extension=".vhdr").fpath
    got = read_eeg(vhdr, work_dir=tmp_path / "work", bids_root=tmp_path / "bids")
    assert got.get_channel_types() == ["eeg", "eeg", "eeg", "ecg"]  # from channels.tsv
    assert eeg_channels(got) == ["Fz", "Cz", "Pz"]
    tsv = vhdr.parent / "sub-01_task-rest_channels.tsv"
    assert eeg_channels(read_eeg(vhdr, work_dir=tmp_path / "work"), tsv) == ["Fz", "Cz", "Pz"]


def test_unreadable_sidecars_fall_back_to_mne(tmp_path, caplog):
    root = tmp_path / "bids"
    vhdr = write_bv(root / "sub-01" / "eeg", ch_names=["Fz", "Cz", "Pz"])
    (vhdr.parent / "sub-01_task-rest_eeg.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids.eeg"):
        raw = read_eeg(vhdr, work_dir=tmp_path / "work", bids_root=root)
    assert raw.ch_names == ["Fz", "Cz", "Pz"]
    assert caplog.text.count("mne-bids could not read the sidecars") == 1
    # A broken recording is a data error, with no word about its sidecars.
    caplog.clear()
    vhdr.write_text(vhdr.read_text().replace("SamplingInterval=4000", "SamplingInterval=abc"))
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids.eeg"):
        with pytest.raises(DataError) as err:
            read_eeg(vhdr, work_dir=tmp_path / "work", bids_root=root)
    assert err.value.code == 65 and vhdr.name in str(err.value)
    assert "sidecars" not in caplog.text


# ---- channels ------------------------------------------------------------------------------

def test_eeg_channels_by_name_and_by_tsv(tmp_path):
    vhdr = write_bv(tmp_path, ch_names=["Fz", "ECG", "Cz", "HEOG", "VEOG", "EMG1", "EKG", "Pz"])
    raw = read_eeg(vhdr, work_dir=tmp_path / "work")
    assert set(raw.get_channel_types()) == {"eeg"}  # the header types everything EEG
    assert eeg_channels(raw) == ["Fz", "Cz", "Pz"]
    tsv = tmp_path / "channels.tsv"
    rows = [("Fz", "EEG"), ("ECG", "ECG"), ("Cz", "EEG"), ("HEOG", "HEOG"), ("VEOG", "VEOG"),
            ("EMG1", "EMG"), ("EKG", "MISC"), ("Pz", "TRIG")]
    tsv.write_text("name\ttype\tunits\n" + "".join(f"{n}\t{t}\tV\n" for n, t in rows))
    assert eeg_channels(raw, tsv) == ["Fz", "Cz"]


def test_canonical_channel_order():
    names = ["oz", "Cz", "XYZ", "Fp1", "C3", "abc", "Fpz", "T7"]
    order = canonical_channel_order(names)
    assert order == ["Fp1", "Fpz", "T7", "C3", "Cz", "oz", "abc", "XYZ"]
    # Same set, any input order: same result.
    assert canonical_channel_order(list(reversed(names))) == order


# ---- alignment -----------------------------------------------------------------------------

@pytest.mark.parametrize("description", ["Response/R128", "Scanner/Scan Start", "Volume",
                                         "Stimulus/V", "T"])
def test_volume_markers_recover_t0(description):
    sfreq, tr, t0 = 500.0, 2.0, 1237
    onsets = t0 + np.arange(30) * 1000
    raw = raw_with_annotations(onsets, description, sfreq=sfreq)
    timing = find_volume_onsets(raw, tr, n_volumes=30)
    assert round(timing.t0 * sfreq) == t0
    assert timing.marker == description
    assert timing.n_volumes == 30 and timing.window_samples == 1000
    np.testing.assert_allclose(timing.onsets * sfreq, onsets)


def test_first_samp_does_not_shift_t0():
    raw = raw_with_annotations(777 + np.arange(30) * 1000, "Response/R128", first_samp=12345)
    assert round(find_volume_onsets(raw, 2.0, n_volumes=30).t0 * 500) == 777


def test_slice_markers_grouped_per_volume():
    # 20 slices per 2 s volume, back to back (as NODDI) ...
    t0 = 333
    slices = t0 + np.arange(30 * 20) * 50
    raw = raw_with_annotations(slices, "Scanner/s ")
    timing = find_volume_onsets(raw, 2.0, n_volumes=30)
    assert round(timing.t0 * 500) == t0 and len(timing.onsets) == 30
    # ... and with a pause after each volume's slices.
    slices = (t0 + np.arange(30)[:, None] * 1000 + np.arange(10) * 40).ravel()
    timing = find_volume_onsets(raw_with_annotations(slices, "Scanner/s"), 2.0, n_volumes=30)
    assert round(timing.t0 * 500) == t0 and len(timing.onsets) == 30


def test_marker_and_offset_overrides(caplog):
    raw = raw_with_annotations(400 + np.arange(30) * 1000, "Stimulus/S  5")
    raw.set_annotations(raw.annotations + mne.Annotations([0.1], 0, ["Response/R128"],
                                                         orig_time=raw.info["meas_date"]))
    timing = find_volume_onsets(raw, 2.0, n_volumes=30, marker="S 5")
    assert round(timing.t0 * 500) == 400 and timing.marker == "Stimulus/S  5"
    timing = find_volume_onsets(raw, 2.0, n_volumes=30, marker="stimulus/s  5")
    assert round(timing.t0 * 500) == 400
    timing = find_volume_onsets(raw, 2.0, n_volumes=30, offset=0.5)
    assert timing.t0 == 0.5 and timing.marker is None and len(timing.onsets) == 0
    with pytest.raises(DataError, match="no marker 'R99'"):
        find_volume_onsets(raw, 2.0, n_volumes=30, marker="R99")
    with pytest.raises(UsageError):
        find_volume_onsets(raw, 2.0, n_volumes=30, marker="S 5", offset=1.0)


def test_no_markers_means_sample_zero(caplog):
    raw = raw_with_annotations([], "x")
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids.eeg"):
        timing = find_volume_onsets(raw, 2.0, n_volumes=30)
    assert timing.t0 == 0 and timing.marker is None
    assert "no volume markers" in caplog.text


def test_mismatched_tr_is_refused():
    raw = raw_with_annotations(100 + np.arange(30) * 1000, "Response/R128")
    with pytest.raises(DataError, match="RepetitionTime is 2.05") as err:
        find_volume_onsets(raw, 2.05, n_volumes=30)
    assert err.value.code == 65 and "sim_eeg.fif" in str(err.value)
    find_volume_onsets(raw, 2.015, n_volumes=30)  # within 1 %


def test_coverage_truncates_then_refuses(caplog):
    raw = raw_with_annotations(1000 + np.arange(34) * 1000, "Response/R128", n_times=35500)
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids.eeg"):
        timing = find_volume_onsets(raw, 2.0, n_volumes=40)
    assert timing.n_volumes == 34  # (35500 - 1000) // 1000 full windows
    assert "covers 34 of 40" in caplog.text
    # Without a BOLD series (synthesis from EEG alone): every full window after t0.
    assert find_volume_onsets(raw, 2.0, n_volumes=None).n_volumes == 34
    short = raw_with_annotations(1000 + np.arange(26) * 1000, "Response/R128", n_times=27500)
    with pytest.raises(DataError, match="fewer than the 27 needed"):
        find_volume_onsets(short, 2.0, n_volumes=40)


def test_noddi_fixture_header(tmp_path):
    """The real NODDI derivative header: 63 EEG channels, 299 windows for sub-32."""
    src = FIXTURE / "derivatives" / "sub-32" / "eeg"
    for name in ("sub-32_task-rest_eeg.vhdr", "sub-32_task-rest_eeg.vmrk"):
        shutil.copy(src / name, tmp_path / name)
    rng = np.random.default_rng(3)
    rng.standard_normal(64 * 162023, dtype=np.float32).tofile(tmp_path / "sub-32_task-rest_eeg.dat")
    raw = read_eeg(tmp_path / "sub-32_task-rest_eeg.vhdr", work_dir=tmp_path / "work")
    assert raw.n_times == 162023 and raw.info["sfreq"] == 250
    channels = eeg_channels(raw)
    assert len(channels) == 63 and "ECG" not in channels
    timing = find_volume_onsets(raw, 2.16, n_volumes=300)
    assert timing.marker == "Scanner/Scan Start"
    assert round(timing.t0 * 250) == 36  # Mk3 at 1-based point 37
    assert timing.n_volumes == 299 and timing.window_samples == 540
    last_end = 36 + 299 * 540 + 540
    assert last_end - raw.n_times == 13
