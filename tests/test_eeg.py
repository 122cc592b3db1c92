"""Reading EEG, choosing channels, and finding volume onsets (spec2vol_bids.eeg)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mne
import numpy as np
import pybv
import pytest

from conftest import PARTICIPANT_OPTIONS, assert_clean_failure, run_spec2vol

from spec2vol_bids.eeg import _edf_channel_rates, canonical_channel_order, eeg_channels, read_eeg
from spec2vol_bids.errors import DataError, MissingInputError
from spec2vol_bids.triggers import volume_timing

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
    with pytest.raises(MissingInputError, match="no data file with the header's name lies beside "
                                                "it; put the recording's data file there") as err:
        read_eeg(vhdr, work_dir=tmp_path / "work")
    assert err.value.code == 66


def test_reads_a_dataset_mne_bids_wrote_without_touching_it(tmp_path):
    """Channel types come from the dataset's channels.tsv, read by spec2vol: mne-bids is not
    used to read (it takes lock files inside the dataset), so the dataset stays as it was."""
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
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "bids").rglob("*"))
    got = read_eeg(vhdr, work_dir=tmp_path / "work")
    tsv = vhdr.parent / "sub-01_task-rest_channels.tsv"
    assert eeg_channels(got) == ["Fz", "Cz", "Pz", "HR"]  # the header types HR as EEG ...
    assert eeg_channels(got, tsv) == ["Fz", "Cz", "Pz"]  # ... channels.tsv says ECG
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "bids").rglob("*")) == before


def test_channels_tsv_as_public_datasets_write_it(tmp_path, caplog):
    """XP1/XP2 (ds002336/ds002338): space-separated, quoted names, a typographic quote."""
    names = ["Fp1", "Fp2", "ECG", "Cz"]
    raw = read_eeg(write_bv(tmp_path, ch_names=names), work_dir=tmp_path / "work")
    tsv = tmp_path / "channels.tsv"
    tsv.write_bytes("name   type   units\n'Fp1'   EEG   microV\n'Fp2'   EEG   microV\n"
                    "'ECG\u2019   ECG   microV\n'Cz'   EEG   microV\n".encode())
    with caplog.at_level(logging.WARNING):
        assert eeg_channels(raw, tsv) == ["Fp1", "Fp2", "Cz"]
    assert "not tab-separated" in caplog.text and "quoted" in caplog.text
    # latin-1 with a byte-order-mark-free header and CRLF: read, with a warning
    tsv.write_bytes("name\ttype\tdescription\r\nFp1\tEEG\tfrontal \xe9\r\nFp2\tEEG\t\r\n"
                    "ECG\tECG\t\r\nCz\tBAD\t\r\n".encode("latin-1"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert eeg_channels(raw, tsv) == ["Fp1", "Fp2"]
    assert "not UTF-8" in caplog.text
    # a byte-order mark and a channel marked bad
    tsv.write_bytes(b"\xef\xbb\xbfname\ttype\tstatus\nFp1\tEEG\tgood\nFp2\tEEG\tbad\n"
                    b"ECG\tECG\tgood\nCz\tEEG\tgood\n")
    assert eeg_channels(raw, tsv) == ["Fp1", "Cz"]


@pytest.mark.parametrize("content", ["nothing useful\n", "name\tunits\nFp1\tV\n",
                                     "name\ttype\nFp1\tEEG\nXX\tEEG\n", ""])
def test_unusable_channels_tsv_is_set_aside_for_the_eeg_file(tmp_path, caplog, content):
    raw = read_eeg(write_bv(tmp_path, ch_names=["Fp1", "ECG", "Cz"]), work_dir=tmp_path / "work")
    tsv = tmp_path / "channels.tsv"
    tsv.write_text(content)
    with caplog.at_level(logging.WARNING):
        assert eeg_channels(raw, tsv) == ["Fp1", "Cz"]  # the file's types, ECG by its name
    assert "taken from the EEG file instead" in caplog.text and tsv.name in caplog.text


def test_one_line_causes_for_broken_recordings(tmp_path):
    vhdr = write_bv(tmp_path / "dup", ch_names=["Fp1", "Fp2", "Cz"])
    vhdr.write_text(vhdr.read_text().replace("Ch2=Fp2,", "Ch2=Fp1,"))  # pybv refuses to write it
    with pytest.raises(DataError, match=r"duplicate channel names \(Fp1\)") as err:
        read_eeg(vhdr, work_dir=tmp_path / "work")
    assert err.value.code == 65 and vhdr.name in str(err.value)
    raw = read_eeg(write_bv(tmp_path / "one", ch_names=["Cz", "ECG"]), work_dir=tmp_path / "work")
    with pytest.raises(DataError, match=r"single EEG channel \(Cz\)"):
        eeg_channels(raw)
    vhdr = write_bv(tmp_path / "rate")
    vhdr.write_text(vhdr.read_text().replace("SamplingInterval=4000", "SamplingInterval=4"))
    with pytest.raises(DataError, match="250000 Hz is implausible"):
        read_eeg(vhdr, work_dir=tmp_path / "work")


def test_annex_pointers_are_named_as_such(tmp_path):
    """ds002338 sub-xp210: a header that is an unlocked git-annex pointer file; and a
    DataLad clone whose content was never fetched (a dangling link into .git/annex)."""
    real = FIXTURE.parent / "public" / "ds002338" / "sub-xp210" / "eeg" / "sub-xp210_task-MIpre_eeg.vhdr"
    pointer = tmp_path / real.name
    shutil.copyfile(real, pointer)
    with pytest.raises(MissingInputError, match="git-annex pointer file") as err:
        read_eeg(pointer, work_dir=tmp_path / "work")
    assert err.value.code == 66 and "datalad get" in str(err.value)
    link = tmp_path / "sub-01_task-rest_eeg.vhdr"
    link.symlink_to("../.git/annex/objects/Xy/Zw/MD5E-s11812--a2fa.vhdr/MD5E-s11812--a2fa.vhdr")
    with pytest.raises(MissingInputError, match="git-annex link"):
        read_eeg(link, work_dir=tmp_path / "work")
    # a real header whose data and marker files were not fetched: named as such, not as a
    # missing data file, nor read without its volume markers
    vhdr = write_bv(tmp_path / "clone")
    data = vhdr.with_suffix(".eeg")
    data.rename(tmp_path / "fetched.eeg")
    data.symlink_to("../.git/annex/objects/Ab/Cd/MD5E-s4000--ab.eeg/MD5E-s4000--ab.eeg")
    with pytest.raises(MissingInputError, match="the BrainVision data file is a git-annex link"):
        read_eeg(vhdr, work_dir=tmp_path / "work")
    data.unlink()
    (tmp_path / "fetched.eeg").rename(data)
    shutil.copyfile(real, vhdr.with_suffix(".vmrk"))  # a pointer file, as ds002338's
    with pytest.raises(MissingInputError, match="the BrainVision marker file is a git-annex pointer"):
        read_eeg(vhdr, work_dir=tmp_path / "work")
    # random bytes where the markers should be: the marker file is named, not a decode error
    vhdr.with_suffix(".vmrk").write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(DataError, match=r"_eeg.vmrk: not a BrainVision marker file") as err:
        read_eeg(vhdr, work_dir=tmp_path / "work")
    assert err.value.code == 65


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
    timing = volume_timing(raw, 2.16, n_volumes=300, discard=6, context=20)
    # Scan Start, the slice markers grouped per volume (30 per 540 samples) and the one-off
    # "Scanner Start" are candidates; the first two fit the 300 volumes and agree exactly.
    assert timing.marker == "Scanner/Scan Start"
    fitting = [c["Marker"] for c in timing.candidates if any(t["Fits"] for t in c["Trains"])]
    assert sorted(fitting) == ["Scanner/Scan Start", "Scanner/s"]
    assert round(timing.t0 * 250) == 36  # Mk3 at 1-based point 37
    assert timing.n_volumes == 299 and timing.window_samples == 540
    np.testing.assert_array_equal(timing.starts, 36 + 540 * np.arange(299))
    last_end = 36 + 299 * 540 + 540
    assert last_end - raw.n_times == 13


def test_channels_tsv_with_an_extra_row_still_decides(tmp_path, caplog):
    raw = read_eeg(write_bv(tmp_path, ch_names=["Fp1", "C3", "Cz", "CW1"]), work_dir=tmp_path / "work")
    tsv = tmp_path / "channels.tsv"
    tsv.write_text("name\ttype\tstatus\nFp1\tEEG\tgood\nC3\tEEG\tbad\nCz\tEEG\tgood\n"
                   "CW1\tMISC\tgood\nTRIG\tTRIG\tgood\n")
    with caplog.at_level(logging.WARNING):
        assert eeg_channels(raw, tsv) == ["Fp1", "Cz"]  # C3 bad, CW1 not EEG
    assert "rows for channel(s) the recording lacks, ignored: TRIG" in caplog.text
    # a channel without a row: the file's types decide, the bad mark still holds
    tsv.write_text("name\ttype\tstatus\nFp1\tEEG\tgood\nC3\tEEG\tbad\nCz\tEEG\tgood\n")
    assert eeg_channels(raw, tsv) == ["Fp1", "Cz", "CW1"]


# ---- channels stored at their own rate (EDF/BDF) -----------------------------------------------

def _as_edf_with_a_slow_channel(bids: Path, slow: str) -> Path:
    """Replace sub-01's BrainVision run by an EDF of the same signals and markers in which
    channel ``slow`` is stored at half the rate, as EDF allows (mne upsamples it on reading)."""
    import edfio

    vhdr = bids / "sub-01" / "eeg" / "sub-01_task-rest_eeg.vhdr"
    raw = mne.io.read_raw_brainvision(vhdr, preload=True, verbose=False)
    fs = raw.info["sfreq"]
    raw.crop(0, (raw.n_times // int(fs)) - 1 / fs)  # whole one-second data records
    signals = []
    for name, values in zip(raw.ch_names, raw.get_data() * 1e6):
        step = 2 if name == slow else 1
        signals.append(edfio.EdfSignal(values[::step], sampling_frequency=fs / step, label=name,
                                       physical_dimension="uV"))
    markers = [edfio.EdfAnnotation(onset, None, text) for onset, text
               in zip(raw.annotations.onset, raw.annotations.description)]
    edf = vhdr.with_suffix(".edf")
    edfio.Edf(signals, annotations=markers).write(edf)
    for suffix in (".vhdr", ".vmrk", ".eeg"):
        vhdr.with_suffix(suffix).unlink()
    return edf


def test_edf_channel_rates_agree_with_mne(simulated_bids):
    edf = _as_edf_with_a_slow_channel(simulated_bids, "C3")
    raw = mne.io.read_raw_edf(edf, verbose=False)
    seconds = raw._raw_extras[0]["record_length"][0]
    expected = {name: n / seconds for name, n in zip(raw.ch_names, raw._raw_extras[0]["n_samps"])}
    rates = _edf_channel_rates(edf)
    assert {name: rates[name] for name in raw.ch_names} == expected
    assert expected["C3"] == raw.info["sfreq"] / 2 and expected["C4"] == raw.info["sfreq"]


def test_bins_above_a_slow_channels_nyquist_are_refused(simulated_bids, tmp_path):
    """Above half its own rate an upsampled channel holds nothing: bins there are refused, and
    an --fmax below it is accepted with the channel kept."""
    edf = _as_edf_with_a_slow_channel(simulated_bids, "C3")
    fs = mne.io.read_raw_edf(edf, verbose=False).info["sfreq"]
    options = list(PARTICIPANT_OPTIONS)
    options[options.index("--freq-bins"):options.index("--freq-bins") + 2] = ["--fmax", f"{fs / 2 - 5:g}"]
    out = tmp_path / "out"
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01", *options)
    assert_clean_failure(proc, 65, edf.name, f"C3 ({fs / 2:g} Hz), recorded below the file's {fs:g} Hz, holds",
                         f"give --fmax {fs / 4:g} or lower", out_dir=out)
    options[options.index("--fmax") + 1] = f"{fs / 4:g}"
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01", *options)
    assert proc.returncode == 0, proc.stderr
    sidecar = next(out.glob("sub-01/eeg/*_spectrogram.json"))
    assert "C3" in json.loads(sidecar.read_text())["Channels"]
