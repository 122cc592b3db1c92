"""Public simultaneous EEG-fMRI datasets as they are (tests/data/public, see FACTS.md there).

For each dataset the real sidecars, channels.tsv, events.tsv and (where the mirror has them)
marker files are used as they are; the data are synthesised at the real channel counts and
sampling rates (tests/public_data.py). Every expected value below is worked out by hand from
the real files, as the comments show, and each spectrogram is checked against a plain loop
over the raw file (one FFT per channel and window at the hand-worked trigger samples).
"""

from __future__ import annotations

import json
from pathlib import Path

import mne
import numpy as np
import pytest
from conftest import run_spec2vol
from public_data import (
    channel_names,
    copy_public,
    fill_eeg,
    sparse_size,
    write_brainvision_header,
    write_edf,
    write_markers,
    write_public_bold,
)

from spec2vol_bids.eeg import read_eeg
from spec2vol_bids.errors import DataError
from spec2vol_bids.triggers import volume_timing

SHORT = ("--skip-bids-validation", "--discard-volumes", "2", "--context", "4", "--omp-nthreads", "1")


def loop_spectrogram(raw_path, channels, starts, window, n_bins):
    """The reference: read the whole file with mne, one numpy FFT per channel and window,
    z-scored across channels per (window, bin)."""
    data = mne.io.read_raw(raw_path, preload=True, verbose="error").get_data(picks=channels)
    out = np.empty((len(starts), len(channels), n_bins))
    for v, start in enumerate(starts):
        out[v] = np.abs(np.fft.rfft(data[:, start:start + window], axis=1))[:, 1:n_bins + 1]
    out -= out.mean(axis=1, keepdims=True)
    out /= out.std(axis=1, keepdims=True)
    return out


def check_spectrogram(out: Path, stem: str, raw_path: Path, starts, window):
    npy = next(out.rglob(f"{stem}_desc-spec2vol_spectrogram.npy"))
    meta = json.loads(npy.with_suffix(".json").read_text())
    spec = np.load(npy)
    ref = loop_spectrogram(raw_path, meta["Channels"], starts, window, spec.shape[2])
    assert spec.shape == ref.shape
    assert np.abs(spec - ref).max() <= 1e-5 * np.abs(ref).max()
    return meta


# -- NATVIEW (NEMAR nm000254): real BrainVision marker files -------------------------------

NATVIEW_EXCLUDED = {"ECG", "EOGL", "EOGU"}  # channels.tsv: ECG (#32), EOG (#63, #64)


def _natview_run(root: Path, subject: str, stem: str, *, seconds, volumes, grid=None):
    eeg = root / f"sub-{subject}" / "ses-01" / "eeg"
    vmrk = eeg / f"{stem}_eeg.vmrk"
    data_file = next(line.split("=", 1)[1].strip() for line in vmrk.read_text().splitlines()
                     if line.startswith("DataFile="))
    vhdr = write_brainvision_header(eeg / f"{stem}_eeg.vhdr", channel_names(eeg / f"{stem}_channels.tsv"),
                                    sfreq=5000.0, resolution=0.1, data_file=data_file)
    duration = json.loads((eeg / f"{stem}_eeg.json").read_text())["RecordingDuration"]
    fill_eeg(vhdr, seconds=seconds, full_seconds=duration)
    write_public_bold(root, "nm000254", f"sub-{subject}/ses-01/func/{stem}_bold.nii.gz", volumes, 2.1,
                      grid=grid)
    return vhdr


@pytest.fixture(scope="module")
def natview(tmp_path_factory):
    root = copy_public("nm000254", tmp_path_factory.mktemp("natview") / "nm000254")
    # 45 s of each run: R128 at 1-based positions 39456 + 10500 k (rest) -> 0-based 39455, ...;
    # 18 of them lie before sample 225000, so the shortened scan has 18 volumes.
    _natview_run(root, "01", "sub-01_ses-01_task-rest", seconds=45, volumes=18)
    # dme run-02: R128 at 35207, 45708 (one sample late), 56207, ...: 19 before sample 225000
    _natview_run(root, "01", "sub-01_ses-01_task-dme_run-02", seconds=45, volumes=19)
    # full length, never read (sparse): sub-16's broken train, sub-12 without any R128;
    # the BIOPAC scanner-trigger log counts 98 and 288 volumes
    _natview_run(root, "16", "sub-16_ses-01_task-checker", seconds=None, volumes=98, grid=(8, 8, 4))
    _natview_run(root, "12", "sub-12_ses-01_task-rest", seconds=None, volumes=288, grid=(8, 8, 4))
    return root


def test_natview_runs_follow_their_own_triggers(natview, tmp_path):
    out = tmp_path / "out"
    proc = run_spec2vol(natview, out, "participant", "--participant-label", "01", *SHORT)
    assert proc.returncode == 0, proc.stderr
    eeg = natview / "sub-01" / "ses-01" / "eeg"
    expected = set(channel_names(eeg / "sub-01_ses-01_task-rest_channels.tsv")) - NATVIEW_EXCLUDED
    assert len(expected) == 61

    # rest: 18 triggers 10500 samples apart from 39455; the 18th window would end at
    # 39455 + 18 * 10500 = 228455 > 225000 samples, so 17 windows
    starts = 39455 + 10500 * np.arange(17)
    meta = check_spectrogram(out, "sub-01_ses-01_task-rest", eeg / "sub-01_ses-01_task-rest_eeg.vhdr",
                             starts, 10500)
    assert meta["VolumeMarker"] == "Response/R128" and meta["VolumeOnsetSeconds"] == 7.891
    assert meta["NumberOfWindows"] == 17 and set(meta["Channels"]) == expected
    assert set(meta["DroppedChannels"]) == NATVIEW_EXCLUDED
    timing = meta["VolumeTiming"]
    assert timing["MarkerSource"] == "EEG file" and timing["FilledVolumes"] == []
    # NEMAR's events.tsv counts onsets from the "S  1" marker and clips them at 0: its R128
    # rows are a train too, but 7.9 s early and of another length, so it does not fit
    shifted = next(c for c in timing["Candidates"] if c["Marker"] == "marker_code=R128")
    assert shifted["Source"] == "events.tsv" and not any(t["Fits"] for t in shifted["Trains"])

    # dme run-02: each window starts at its own trigger, the second one sample late
    starts = np.array([35206, 45707, 56206, 66706]), 35206 + 10500 * np.arange(4, 18)
    starts = np.concatenate(starts)
    meta = check_spectrogram(out, "sub-01_ses-01_task-dme_run-02",
                             eeg / "sub-01_ses-01_task-dme_run-02_eeg.vhdr", starts, 10500)
    assert meta["NumberOfWindows"] == 18
    assert meta["VolumeOnsetsSeconds"][:3] == [7.0412, 9.1414, 11.2412]


def test_natview_events_tsv_is_not_taken_for_a_train_the_eeg_file_puts_elsewhere(natview):
    """The real rest run, its first 45 s: 18 R128 in the .vmrk from 7.891 s. events.tsv's R128
    rows (onsets counted from "S  1" and clipped at 0) make a train of 21 from 2.055 s, which
    fits a BOLD series of 21 volumes where the EEG file's does not (as 288 and 287 do at full
    length), 7.9 s early: its first trigger is the .vmrk's second. Its own sample column says
    where the markers really are."""
    eeg = natview / "sub-01" / "ses-01" / "eeg"
    vhdr = eeg / "sub-01_ses-01_task-rest_eeg.vhdr"
    raw = read_eeg(vhdr, work_dir=natview.parent / "work-287")
    with pytest.raises(DataError, match=r"'marker_code=R128' \(events.tsv\) fits the volumes, but "
                                        r"its onsets disagree with its sample column by up to 7\.9"):
        volume_timing(raw, 2.1, n_volumes=21, events_tsv=eeg / "sub-01_ses-01_task-rest_events.tsv",
                      discard=6, context=2, source=vhdr)
    # told to use the EEG file's train and where the scan starts in it, the windows follow it
    timing = volume_timing(raw, 2.1, n_volumes=21, marker="eeg:R128", first_trigger=1,
                           discard=6, context=2, source=vhdr)
    np.testing.assert_array_equal(timing.starts, 39455 + 10500 * np.arange(17))


def test_natview_broken_and_missing_trains_are_refused(natview):
    eeg = natview / "sub-16" / "ses-01" / "eeg"
    vhdr = eeg / "sub-16_ses-01_task-checker_eeg.vhdr"
    assert sparse_size(vhdr.with_suffix(".eeg"))[1] < 1e6  # 165 MB announced, none on disk
    raw = read_eeg(vhdr, work_dir=natview.parent / "work")
    # 28 R128 from 850285 (1-based): 850284 + 10500 k for k = 0..36 except 9 + 1 missing
    # ones, and one stray 17 samples after a trigger; the BOLD series has 98 volumes
    with pytest.raises(DataError) as err:
        volume_timing(raw, 2.1, n_volumes=98, events_tsv=eeg / "sub-16_ses-01_task-checker_events.tsv",
                      discard=6, context=20, source=vhdr)
    message = str(err.value)
    assert err.value.code == 65 and vhdr.name in message
    assert "no trigger train fits the 98 BOLD volumes" in message
    assert ("'Response/R128' (EEG file) 28 markers, every 2.100 s: a regular train of 37 triggers "
            "(10 filled, 1 off the train) from 170.057 s") in message

    eeg = natview / "sub-12" / "ses-01" / "eeg"
    raw = read_eeg(eeg / "sub-12_ses-01_task-rest_eeg.vhdr", work_dir=natview.parent / "work")
    with pytest.raises(DataError, match="no trigger train fits the 288 BOLD volumes") as err:
        volume_timing(raw, 2.1, n_volumes=288, discard=6, context=20)
    # what was found instead: the stimulus and sync markers (messages are one line with single
    # spaces: "S  5" reads "S 5")
    assert "'Stimulus/S 5' (EEG file) 601 markers, every 1.000 s" in str(err.value)
    assert "'SyncStatus/Sync On' (EEG file) 313 markers, median interval 2.000 s" in str(err.value)


def test_natview_refused_run_leaves_nothing_behind(natview, tmp_path):
    out = tmp_path / "out"
    proc = run_spec2vol(natview, out, "participant", "--participant-label", "16", *SHORT)
    assert proc.returncode == 65, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("spec2vol: error: ")
    assert not list(out.glob("sub-16/**/*_desc-*"))


# -- Daly et al. (OpenNeuro ds002725): EDF, scanner pulses as numeric trial_type codes ------

DALY = "sub-01_task-genMusic01"


def _daly(root: Path, *, seconds, signal_seconds, volumes, grid=None) -> Path:
    eeg = root / "sub-01" / "eeg"
    channels = channel_names(eeg / f"{DALY}_channels.tsv")
    edf = write_edf(eeg / f"{DALY}_eeg.edf", channels, sfreq=1000.0, seconds=seconds,
                    signal_seconds=signal_seconds)
    write_public_bold(root, "ds002725", f"sub-01/func/{DALY}_bold.nii.gz", volumes, 2.0, grid=grid)
    return edf


def test_daly_numeric_codes_fit_or_refuse_by_the_volume_count(tmp_path):
    """The BOLD series' length is not public (its NIfTI is in git-annex): with the count the one
    complete train gives, that train is used; with one volume fewer the run is refused."""
    root = copy_public("ds002725", tmp_path / "ds002725")
    # full length (742 one-second EDF records of 46 signals, 68 MB, sparse)
    edf = _daly(root, seconds=742, signal_seconds=None, volumes=371, grid=(8, 8, 4))
    assert sparse_size(edf)[0] == 256 * 47 + 742 * 46 * 1000 * 2
    raw = read_eeg(edf, work_dir=tmp_path / "work")
    events = root / "sub-01" / "eeg" / f"{DALY}_events.tsv"

    def timing(n_volumes, **kwargs):
        return volume_timing(raw, 2.0, n_volumes=n_volumes, events_tsv=events, discard=6,
                             context=20, **kwargs)

    # code 47 (TTL relayed by the paradigm): a stray at 0.041 s, then 371 pulses every 2 s from
    # 0.161 s to 740.161 s; the last window would end at 742.161 s, after the 742 s recording
    got = timing(371)
    assert got.marker == "trial_type=47" and got.t0 == 0.161 and got.n_volumes == 370
    assert got.sidecar()["VolumeTiming"]["StrayMarkersSeconds"] == [0.041]
    # code 10 (the scanner's TTL): 279 pulses from 56.005 s to 736.005 s with one gap of
    # 126 s (63 TR, 62 pulses missing): a train of 341, starting 28 volumes late
    with pytest.raises(DataError) as err:
        timing(371, marker="10")
    assert ("no trigger train fits the 371 BOLD volumes at RepetitionTime 2 s (found "
            "'trial_type=10' (events.tsv) 279 markers, every 2.000 s: a regular train of 341 "
            "triggers (62 filled) from 56.005 s)") in str(err.value)
    # one volume fewer: which trigger is extra is not in the data; refused, then resolved
    with pytest.raises(DataError, match="a regular train of 371 triggers .1 off the train. from "
                                        "0.161 s"):
        timing(370)
    assert timing(370, first_trigger=1).n_volumes == 370


def test_daly_run_through_the_participant_level(tmp_path):
    root = copy_public("ds002725", tmp_path / "ds002725")
    # 120 s of EDF: code 47 at 161 + 2000 k samples, k = 0..59 (60 volumes); the 60th window
    # would end at 120161 > 120000: 59 windows
    edf = _daly(root, seconds=120, signal_seconds=120, volumes=60)
    out = tmp_path / "out"
    proc = run_spec2vol(root, out, "participant", *SHORT, "--freq-bins", "100")
    assert proc.returncode == 0, proc.stderr
    meta = check_spectrogram(out, DALY, edf, 161 + 2000 * np.arange(59), 2000)
    # channels.tsv: 31 rows of type EEG (its EEGChannelCount says 30), ECG and 14 rows of
    # behavioural signals typed "reponse", "response" or "stimuli"
    eeg_rows = [line.split("\t") for line in (root / "sub-01" / "eeg" / f"{DALY}_channels.tsv")
                .read_text().splitlines()[1:] if line.split("\t")[1] == "EEG"]
    assert len(eeg_rows) == 31 and set(meta["Channels"]) == {row[0] for row in eeg_rows}
    assert meta["VolumeMarker"] == "trial_type=47" and meta["VolumeOnsetSeconds"] == 0.161


# -- Lioi et al. XP1 / XP2 (OpenNeuro ds002336, ds002338) --------------------------------------

def _lioi(root: Path, name: str, subject: str, stem: str, *, tr, first, seconds, volumes) -> Path:
    """The run's header and markers are in git-annex only: a Recorder header with the real
    channels (channels.tsv order) and R128 every TR from sample ``first``."""
    eeg = root / f"sub-{subject}" / "eeg"
    eeg.mkdir(parents=True, exist_ok=True)
    task = stem.split("task-")[1].split("_")[0]
    channels = channel_names(root / f"task-{task}_channels.tsv")
    vhdr = write_brainvision_header(eeg / f"{stem}_eeg.vhdr", channels, sfreq=5000.0, resolution=0.5)
    step = int(tr * 5000)
    triggers = [first + k * step for k in range(volumes)]
    write_markers(vhdr.with_suffix(".vmrk"), vhdr.with_suffix(".eeg").name, triggers,
                  extra=[(first + 10000, "Stimulus", "S 99")])
    fill_eeg(vhdr, seconds=seconds, full_seconds=seconds)
    write_public_bold(root, name, f"sub-{subject}/func/{stem}_bold.nii.gz", volumes, tr, grid=(32, 32, 8))
    return vhdr


def test_lioi_xp1_quoted_space_separated_channels(tmp_path):
    root = copy_public("ds002336", tmp_path / "ds002336")
    # 40 s: R128 from sample 12345 every 10000: 19 before sample 200000; 18 whole windows
    vhdr = _lioi(root, "ds002336", "xp101", "sub-xp101_task-motorloc", tr=2.0, first=12345,
                 seconds=40, volumes=19)
    out = tmp_path / "out"
    proc = run_spec2vol(root, out, "participant", *SHORT, "-v")
    assert proc.returncode == 0, proc.stderr
    assert "not tab-separated" in proc.stderr and "quoted" in proc.stderr
    meta = check_spectrogram(out, "sub-xp101_task-motorloc", vhdr, 12345 + 10000 * np.arange(18), 10000)
    # 64 rows: ECG is row 32 ('ECG’ with a typographic closing quote); 63 EEG channels
    assert len(meta["Channels"]) == 63 and "ECG" not in meta["Channels"]
    assert meta["DroppedChannels"] == ["ECG"]


def test_lioi_xp2_one_second_tr_and_an_annex_pointer_header(tmp_path):
    root = copy_public("ds002338", tmp_path / "ds002338")
    # TR 1 s: R128 every 5000 samples from 7000; 30 s -> 29 triggers, 28 whole windows
    vhdr = _lioi(root, "ds002338", "xp201", "sub-xp201_task-MIpre", tr=1.0, first=7000,
                 seconds=30, volumes=29)
    out = tmp_path / "out"
    proc = run_spec2vol(root, out, "participant", "--participant-label", "xp201", *SHORT)
    assert proc.returncode == 0, proc.stderr
    meta = check_spectrogram(out, "sub-xp201_task-MIpre", vhdr, 7000 + 5000 * np.arange(28), 5000)
    assert meta["RepetitionTime"] == 1 and meta["VolumeOnsetSeconds"] == 1.4
    # sub-xp210's header is, in git, a 66-byte annex pointer: named as such, exit 66
    write_public_bold(root, "ds002338", "sub-xp210/func/sub-xp210_task-MIpre_bold.nii.gz", 30, 1.0,
                      grid=(8, 8, 4))
    proc = run_spec2vol(root, tmp_path / "out2", "participant", "--participant-label", "xp210", *SHORT)
    assert proc.returncode == 66, proc.stderr
    assert "sub-xp210_task-MIpre_eeg.vhdr: EEG file is a git-annex pointer file" in proc.stderr
    assert not list((tmp_path / "out2").glob("sub-xp210/**/*_desc-*"))
