"""Volume timing from the trigger train (spec2vol_bids.triggers): right or refused."""

from __future__ import annotations

import logging
from pathlib import Path

import mne
import numpy as np
import pytest

from spec2vol_bids.errors import DataError, UsageError
from spec2vol_bids.markers import marker_series
from spec2vol_bids.trains import find_trains
from spec2vol_bids.triggers import volume_timing

SFREQ = 500.0
TR = 2.0
PERIOD = 1000  # samples per TR


def raw_with_markers(*series, sfreq=SFREQ, n_times=40000, first_samp=0):
    """A RawArray whose annotations carry, for each (samples, description), those markers."""
    info = mne.create_info(["Cz", "Pz"], sfreq, "eeg")
    raw = mne.io.RawArray(np.zeros((2, n_times)), info, first_samp=first_samp, verbose=False)
    raw.set_meas_date(1_500_000_000)
    onsets, names = [], []
    for samples, description in series:
        onsets += list(np.asarray(samples, dtype=float))
        names += [description] * len(samples)
    # With a measurement date, annotation onsets count from it, i.e. from sample 0 before
    # first_samp (as in FIF files cut from a longer recording).
    raw.set_annotations(mne.Annotations((np.asarray(onsets) + first_samp) / sfreq, 0.0, names,
                                        orig_time=raw.info["meas_date"]))
    raw._filenames = [Path("sim_eeg.fif")]
    return raw


def timing_of(raw, n_volumes=30, **kwargs):
    return volume_timing(raw, TR, n_volumes=n_volumes, discard=2, context=4, **kwargs)


@pytest.mark.parametrize("description", ["Response/R128", "Scanner/Scan Start", "Volume",
                                         "Response/V", "T"])
def test_a_clean_train_gives_one_window_per_trigger(description):
    onsets = 1237 + np.arange(30) * PERIOD
    timing = timing_of(raw_with_markers((onsets, description)))
    assert timing.marker == description
    np.testing.assert_array_equal(timing.starts, onsets)
    assert round(timing.t0 * SFREQ) == 1237 and timing.window_samples == PERIOD
    meta = timing.sidecar()["VolumeTiming"]
    assert meta["TriggersObserved"] == 30 and meta["FilledVolumes"] == []
    assert meta["StrayMarkersSeconds"] == [] and meta["ClockDriftPPM"] == 0


def test_first_samp_does_not_shift_the_train():
    raw = raw_with_markers((777 + np.arange(30) * PERIOD, "Response/R128"), first_samp=12345)
    assert timing_of(raw).starts[0] == 777


def test_slice_markers_are_grouped_per_volume():
    # 20 slices per 2 s volume, back to back (as NODDI) ...
    slices = 333 + np.arange(30 * 20) * 50
    timing = timing_of(raw_with_markers((slices, "Scanner/s ")))
    np.testing.assert_array_equal(timing.starts, 333 + np.arange(30) * PERIOD)
    assert timing.sidecar()["VolumeTiming"]["SliceMarkersGroupedPerVolume"]
    # ... and with a pause after each volume's slices.
    slices = (333 + np.arange(30)[:, None] * PERIOD + np.arange(10) * 40).ravel()
    timing = timing_of(raw_with_markers((slices, "Scanner/s")))
    np.testing.assert_array_equal(timing.starts, 333 + np.arange(30) * PERIOD)


def test_a_stray_trigger_before_the_train_is_dropped_not_taken_as_t0():
    """A previous scan's last R128 in the same recording: the old code took it as t0."""
    train = 5000 + np.arange(30) * PERIOD
    timing = timing_of(raw_with_markers((np.r_[1234, train], "Response/R128")))
    np.testing.assert_array_equal(timing.starts, train)
    assert timing.sidecar()["VolumeTiming"]["StrayMarkersSeconds"] == [1234 / SFREQ]


def test_a_relay_pulse_inside_and_a_duplicate_are_strays():
    train = 700 + np.arange(30) * PERIOD
    markers = np.r_[train, train[10] + 60, train[20] + 3]
    timing = timing_of(raw_with_markers((markers, "Response/R128")))
    np.testing.assert_array_equal(timing.starts, train)
    assert len(timing.sidecar()["VolumeTiming"]["StrayMarkersSeconds"]) == 2


def test_missing_triggers_are_filled_where_the_gap_is_whole_trs():
    train = 900 + np.arange(30) * PERIOD
    kept = np.delete(train, [5, 17, 18, 19])
    timing = timing_of(raw_with_markers((kept, "Response/R128")))
    np.testing.assert_array_equal(timing.starts, train)
    meta = timing.sidecar()["VolumeTiming"]
    assert meta["FilledVolumes"] == [5, 17, 18, 19] and meta["TriggersObserved"] == 26


def test_windows_follow_each_trigger_so_drift_does_not_accumulate():
    # The EEG clock runs 500 ppm fast against the scanner's: over 30 volumes the triggers
    # drift 14.5 samples away from t0 + v * TR.
    true = np.floor(250 + np.arange(30) * PERIOD * (1 + 500e-6) + 0.5).astype(int)
    timing = timing_of(raw_with_markers((np.delete(true, 12), "Response/R128")))
    assert np.abs(timing.starts - true).max() <= 1  # the filled one within a sample
    np.testing.assert_array_equal(np.delete(timing.starts, 12), np.delete(true, 12))
    assert timing.drift_ppm == pytest.approx(500, abs=30)


def test_a_train_that_does_not_fit_the_volume_count_is_refused():
    """The ds002725 situation: a train that starts ~28 volumes late (with a gap)."""
    late = 28 * PERIOD + np.arange(342) * PERIOD
    raw = raw_with_markers((np.delete(late, np.arange(5, 68)), "trigger"), n_times=400 * PERIOD)
    with pytest.raises(DataError) as err:
        timing_of(raw, n_volumes=370)
    message = str(err.value)
    assert err.value.code == 65 and "sim_eeg.fif" in message and "\n" not in message
    assert "no trigger train fits the 370 BOLD volumes" in message
    assert "'trigger' (EEG file) 279 markers" in message and "342 triggers (63 filled" in message
    assert "--volume-marker" in message and "--first-volume-trigger" in message
    assert "--eeg-offset" in message


def test_dummy_scan_triggers_need_first_volume_trigger():
    train = 500 + np.arange(32) * PERIOD  # two dummy scans triggered, then 30 volumes
    raw = raw_with_markers((train, "Response/R128"))
    with pytest.raises(DataError, match="32 triggers"):
        timing_of(raw)
    timing = timing_of(raw, first_trigger=3)
    np.testing.assert_array_equal(timing.starts, train[2:])
    assert timing.sidecar()["VolumeTiming"]["FirstVolumeTrigger"] == 3


def test_irregular_gap_splits_the_train():
    """ds002725 sub-03: 7 triggers, a gap of 93.78 TRs, then the scan's own train."""
    first = 1000 + np.arange(7) * PERIOD
    second = first[-1] + 93_783 + np.arange(40) * PERIOD
    raw = raw_with_markers((np.r_[first, second], "trigger"), n_times=150_000)
    timing = timing_of(raw, n_volumes=40)  # the second train is the scan
    np.testing.assert_array_equal(timing.starts, second)
    assert len(timing.sidecar()["VolumeTiming"]["StrayMarkersSeconds"]) == 7
    with pytest.raises(DataError, match="no trigger train fits the 47 BOLD volumes"):
        timing_of(raw, n_volumes=47)  # both together only across an irregular gap


def test_no_markers_is_refused_unless_the_offset_is_given():
    raw = raw_with_markers()
    with pytest.raises(DataError, match="hold no markers") as err:
        timing_of(raw)
    assert "--eeg-offset SECONDS (0 when the EEG starts with the first volume)" in str(err.value)
    timing = timing_of(raw, offset=0.0)
    assert timing.t0 == 0 and timing.marker is None and timing.train is None
    np.testing.assert_array_equal(timing.starts, np.arange(30) * PERIOD)
    timing = timing_of(raw, offset=0.5)
    assert timing.starts[0] == 250 and timing.sidecar()["VolumeTiming"]["Method"].startswith("--eeg-offset")


def test_an_offset_that_contradicts_a_fitting_train_is_refused():
    """R128 fit the 30 volumes from 1 s: --eeg-offset 0 says otherwise, and one of the two is
    wrong. An offset on the train, or a train that does not fit, leaves the offset alone."""
    volumes = 500 + np.arange(30) * PERIOD
    raw = raw_with_markers((volumes, "Response/R128"))
    with pytest.raises(UsageError, match=r"--eeg-offset 0 s differs from the volume triggers, "
                                         r"'Response/R128' \(EEG file\) from 1\.000 s"):
        timing_of(raw, offset=0.0)
    np.testing.assert_array_equal(timing_of(raw, offset=1.0).starts, volumes)
    assert timing_of(raw, offset=0.0, n_volumes=25).t0 == 0  # 30 triggers do not fit 25 volumes


def test_two_fitting_trains_must_agree():
    volumes = 400 + np.arange(30) * PERIOD
    relay = volumes + 78  # 0.156 s later, as ds002725's relayed pulse
    raw = raw_with_markers((volumes, "Response/R128"), (relay, "Response/R 47"))
    with pytest.raises(DataError, match="two trigger trains fit the 30 volumes but disagree by up to "
                                        "0.156 s") as err:
        timing_of(raw)
    assert "--volume-marker" in str(err.value)
    assert timing_of(raw, marker="R 47").starts[0] == 478
    # trains that agree (a copy of the markers, a marker one sample later) are one train
    raw = raw_with_markers((volumes, "Response/R128"), (volumes + 1, "Scanner/Volume"))
    timing = timing_of(raw)
    assert timing.marker == "Response/R128" and timing.starts[0] == 400


def test_a_stimulus_locked_to_the_volumes_is_not_taken_for_them():
    """BrainVision stimulus markers (presentation software) every TR, 0.3 s after each volume:
    alone they would fit, and every window would start 0.3 s late. Beside the scanner's R128
    they are not a second train to disagree with; alone they count only when named."""
    volumes = 400 + np.arange(30) * PERIOD
    stimulus = (volumes + 150, "Stimulus/S  5")
    timing = timing_of(raw_with_markers((volumes, "Response/R128"), stimulus))
    assert timing.marker == "Response/R128" and timing.starts[0] == 400
    raw = raw_with_markers(stimulus)
    with pytest.raises(DataError, match=r"'Stimulus/S 5' \(EEG file\) would fit, but stimulus "
                                        r"markers mark the volumes only when --volume-marker names them$"):
        timing_of(raw)
    np.testing.assert_array_equal(timing_of(raw, marker="S 5").starts, volumes + 150)
    converted = raw_with_markers((volumes + 150, "S  5"))  # EEGLAB/EDF: the port's name is lost
    with pytest.raises(DataError, match=r"'S 5' \(EEG file\) would fit, but stimulus markers"):
        timing_of(converted)
    assert timing_of(converted, marker="S 5").starts[0] == volumes[0] + 150
    assert timing_of(raw_with_markers((volumes, "R128"), (volumes + 150, "S  5"))).marker == "R128"


def test_trains_of_different_lengths_are_refused_without_bold():
    """Without BOLD nothing else counts the volumes: a train that stops early (in the .vmrk)
    beside one that goes on (in events.tsv) would shorten the run without a word."""
    volumes = 400 + np.arange(30) * PERIOD
    raw = raw_with_markers((volumes[:15], "Response/R128"), (volumes, "Scanner/Volume"))
    with pytest.raises(DataError, match=r"count different volumes \('Response/R128' \(EEG file\): "
                                        r"15 from 0.800 s, 'Scanner/Volume' \(EEG file\): 30 from "
                                        r"0.800 s\); choose one with --volume-marker"):
        timing_of(raw, n_volumes=None)
    assert timing_of(raw, n_volumes=None, marker="Volume").n_volumes == 30


@pytest.mark.parametrize("name", ["beep", "V", "trial_type=V"])
def test_without_bold_only_scanner_markers_time_the_volumes(name):
    """EEG without BOLD: nothing counts the volumes, so any regular stimulus series would fit
    (a tone every TR in one block; "V" for a visual stimulus). Only names that mean a scanner
    volume count, unless --volume-marker names the series; --eeg-offset is then not
    contradicted by it, and it gives no TR."""
    from spec2vol_bids.triggers import marker_repetition_time

    stimuli = 3000 + np.arange(20) * PERIOD
    raw = raw_with_markers((stimuli, name))
    with pytest.raises(DataError, match=rf"'{name}' \(EEG file\) would fit, but without BOLD only "
                                        r"scanner volume markers \(R128, Scan Start, Volume\) time"):
        timing_of(raw, n_volumes=None)
    np.testing.assert_array_equal(timing_of(raw, n_volumes=None, marker=name).starts, stimuli)
    assert timing_of(raw, n_volumes=None, offset=0.0).starts[0] == 0
    assert marker_repetition_time(raw) is None
    assert marker_repetition_time(raw_with_markers((stimuli, "Response/R128"))) == TR
    scanner = raw_with_markers((stimuli, "Response/R128"), (stimuli + 150, name))
    np.testing.assert_array_equal(timing_of(scanner, n_volumes=None).starts, stimuli)
    np.testing.assert_array_equal(timing_of(raw, n_volumes=20).starts, stimuli)  # BOLD counts


def test_two_scans_in_one_recording_without_bold():
    """10 then 45 R128 (two scans) and no BOLD: which scan is meant is the user's to say, and
    --first-volume-trigger counts along the series, so K = 11 is the second scan's first."""
    first, second = 1000 + np.arange(10) * PERIOD, 15650 + np.arange(45) * PERIOD
    raw = raw_with_markers((np.r_[first, second], "Response/R128"), n_times=70000)
    with pytest.raises(DataError, match=r"'Response/R128' \(EEG file\) holds 2 trigger trains \(scans\)"
                                        r".*--first-volume-trigger K, counted along the series' "
                                        r"trains: 1 for the one from 2.000 s; 11 for the one from "
                                        r"31.300 s$"):
        timing_of(raw, n_volumes=None)
    timing = timing_of(raw, n_volumes=None, first_trigger=11)
    np.testing.assert_array_equal(timing.starts, second)
    meta = timing.sidecar()["VolumeTiming"]
    assert (meta["FirstVolumeTrigger"], meta["FirstVolumeTriggerInSeries"]) == (1, 11)
    np.testing.assert_array_equal(timing_of(raw, n_volumes=None, first_trigger=1).starts, first)
    np.testing.assert_array_equal(timing_of(raw, n_volumes=None, first_trigger=13).starts, second[2:])
    np.testing.assert_array_equal(timing_of(raw, n_volumes=45).starts, second)  # BOLD counts
    # two scans of one length fit alike, with BOLD or without: K picks one there too
    twice = raw_with_markers((np.r_[first, first + 30373], "Response/R128"), n_times=70000)
    for n_volumes, fit in ((None, "and this run has no BOLD"), (10, "that each fit the 10 BOLD volumes")):
        with pytest.raises(DataError, match=rf"holds 2 trigger trains \(scans\) {fit} .* 1 for the one "
                                            r"from 2.000 s; 11 for the one from 62.746 s$"):
            timing_of(twice, n_volumes=n_volumes)
    assert timing_of(twice, n_volumes=10, first_trigger=11).starts[0] == first[0] + 30373


def test_marker_and_offset_options():
    raw = raw_with_markers((400 + np.arange(30) * PERIOD, "Stimulus/S  5"), ([50], "Response/R128"))
    assert timing_of(raw, marker="S 5").starts[0] == 400
    assert timing_of(raw, marker="stimulus/s  5").marker == "Stimulus/S  5"
    assert timing_of(raw, marker="eeg:S 5").starts[0] == 400
    with pytest.raises(DataError, match="no marker 'events:S 5'"):
        timing_of(raw, marker="events:S 5")
    with pytest.raises(DataError, match="no marker 'R99'"):
        timing_of(raw, marker="R99")
    with pytest.raises(UsageError):
        timing_of(raw, marker="S 5", offset=1.0)
    with pytest.raises(UsageError, match="outside the recording"):
        timing_of(raw, offset=100.0)


def test_mismatched_tr_is_refused_with_what_was_found():
    raw = raw_with_markers((100 + np.arange(30) * PERIOD, "Response/R128"))
    with pytest.raises(DataError, match=r"at RepetitionTime 2.05 s .*'Response/R128' \(EEG file\) "
                                        r"30 markers, every 2.000 s") as err:
        volume_timing(raw, 2.05, n_volumes=30, discard=2, context=4)
    assert err.value.code == 65
    # within 1 % the train is found, and the TR refused for what it is
    with pytest.raises(DataError, match=r"come every 2\.000000 s but RepetitionTime says 2\.015 s "
                                        r"\(-7444 ppm"):
        volume_timing(raw, 2.015, n_volumes=30, discard=2, context=4)


def test_coverage_truncates_then_refuses(caplog):
    # the recording stopped after 35 of 40 volumes: which volumes its 35 triggers are cannot be
    # read from them (a late start or lost first triggers look the same), so the user says it
    raw = raw_with_markers((1000 + np.arange(40) * PERIOD, "Response/R128"), n_times=35500)
    with pytest.raises(DataError, match="or the recording stopped before the scan"):
        timing_of(raw, n_volumes=40)
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids.triggers"):
        timing = timing_of(raw, n_volumes=40, first_trigger=1)
    assert timing.n_volumes == 34  # (35500 - 1000) // 1000 full windows; later markers cut off
    assert "covers 34 of 40 volumes" in caplog.text
    # Without a BOLD series (synthesis from EEG alone): one volume per trigger.
    assert timing_of(raw, n_volumes=None).n_volumes == 34
    short = raw_with_markers((1000 + np.arange(6) * PERIOD, "Response/R128"), n_times=7500)
    with pytest.raises(DataError, match="fewer than the 7 needed"):
        timing_of(short, n_volumes=6)


def test_events_tsv_labels_are_candidates(tmp_path):
    """Numeric trial_type codes (ds002725): the scanner pulse is code 10."""
    raw = raw_with_markers(n_times=40000)
    volumes = 300 + np.arange(30) * PERIOD
    lines = ["onset\tduration\ttrial_type"]
    events = [(s / SFREQ, "10") for s in volumes] + [(s / SFREQ + 0.4, "265") for s in volumes[::3]]
    lines += [f"{o:.3f}\t0.001\t{t}" for o, t in sorted(events)]
    tsv = tmp_path / "sub-01_task-x_events.tsv"
    tsv.write_text("\n".join(lines) + "\n")
    names = {s.name: len(s.samples) for s in marker_series(raw, tsv)}
    assert names == {"trial_type=10": 30, "trial_type=265": 10}
    timing = timing_of(raw, events_tsv=tsv)
    assert timing.marker == "trial_type=10"
    np.testing.assert_array_equal(timing.starts, volumes)
    assert timing.sidecar()["VolumeTiming"]["MarkerSource"] == "events.tsv"
    assert timing_of(raw, events_tsv=tsv, marker="events:10").starts[0] == 300


def _events_tsv(path: Path, onsets_s, value: str = "R128", sample_rate: float | None = None) -> Path:
    header = "onset\tduration\ttrial_type" + ("\tsample" if sample_rate else "")
    rows = [f"{o:.4f}\t0.001\t{value}" + (f"\t{int(round(o * sample_rate))}" if sample_rate else "")
            for o in onsets_s]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_an_events_tsv_train_elsewhere_than_the_eeg_files_is_refused(tmp_path):
    """The EEG file's 31 R128 do not fit the 30 volumes; events.tsv's 30 do. Where they lie on the
    EEG file's triggers they are those triggers (its last one is extra); 2.6 s earlier (onsets
    counted from another marker, as in NATVIEW's events.tsv) nothing says which source is right,
    whatever events.tsv calls them."""
    eeg = 1300 + np.arange(31) * PERIOD
    raw = raw_with_markers((eeg, "Response/R128"))
    same = _events_tsv(tmp_path / "same_events.tsv", eeg[:30] / SFREQ)
    np.testing.assert_array_equal(timing_of(raw, events_tsv=same).starts, eeg[:30])
    for name in ("R128", "volume"):
        shifted = _events_tsv(tmp_path / f"{name}_events.tsv", (eeg[:30] - 1300) / SFREQ, name)
        with pytest.raises(DataError, match=rf"'trial_type={name}' \(events.tsv\) fits the volumes "
                                            r"from 0\.000 s, but 'Response/R128' "
                                            r"\(EEG file\) holds a train at the TR elsewhere \(31 "
                                            r"triggers from 2\.600 s\)"):
            timing_of(raw, events_tsv=shifted)
    # told which, the EEG file's train is used from its first trigger
    timing = timing_of(raw, events_tsv=shifted, marker="eeg:R128", first_trigger=1)
    np.testing.assert_array_equal(timing.starts, eeg[:30])


def test_events_tsv_onsets_that_disagree_with_its_sample_column(tmp_path):
    """The onsets place the triggers, the sample column is another record of them. At another
    rate than the EEG's (a resampled derivative, 1000 Hz here) they still agree; 0.5 s apart,
    one of them is wrong."""
    volumes = 400 + np.arange(30) * PERIOD
    raw = raw_with_markers(n_times=40000)
    consistent = _events_tsv(tmp_path / "a_events.tsv", volumes / SFREQ, sample_rate=1000.0)
    np.testing.assert_array_equal(timing_of(raw, events_tsv=consistent).starts, volumes)
    shifted = tmp_path / "b_events.tsv"
    lines = consistent.read_text().splitlines()
    shifted.write_text("\n".join([lines[0]] + [
        "\t".join([*row.split("\t")[:3], str(int(row.split("\t")[3]) + 500)]) for row in lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"'trial_type=R128' \(events.tsv\) fits the volumes, but its "
                                        r"onsets disagree with its sample column by up to 0\.500 s"):
        timing_of(raw, events_tsv=shifted)


def test_events_tsv_onsets_that_are_not_numbers(tmp_path, caplog):
    """Decimal commas in some rows: the train of the others fits, with the garbled ones filled
    in as if lost; in every row, the file holds no onsets at all."""
    volumes = 400 + np.arange(30) * PERIOD
    raw = raw_with_markers(n_times=40000)
    tsv = _events_tsv(tmp_path / "a_events.tsv", volumes / SFREQ)
    lines = tsv.read_text().splitlines()
    comma = [line.replace(".", ",", 1) for line in lines]
    tsv.write_text("\n".join(lines[:5] + comma[5:8] + lines[8:]) + "\n")
    with pytest.raises(DataError, match=r"fits the volumes, but 3 of its onsets are not numbers "
                                        r"\(line 6: '8,8000'\)"):
        timing_of(raw, events_tsv=tsv)
    tsv.write_text("\n".join(comma[:1] + comma[1:]) + "\n")
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids.markers"):
        assert marker_series(raw, tsv) == []
    assert "events.tsv has no onset that is a number of seconds ('0,8000'); set aside" in caplog.text


def test_find_train_needs_a_regular_series():
    heart = np.cumsum(np.random.default_rng(0).normal(420, 40, 80)).astype(int)
    series = marker_series(raw_with_markers((heart, "Pulse Artifact/R"), n_times=40000))[0]
    assert find_trains(series, TR, SFREQ) == []


# -- cases a new user built (docs: none of them may give shifted windows with exit 0) -------

@pytest.mark.parametrize("case", ["first trigger missing", "irregular gap", "paused recording",
                                  "dummies and an early stop", "late start and early stop"])
def test_a_short_train_is_never_taken_for_the_first_volumes(case):
    """Fewer triggers than volumes, with the recording ending just after the last one: without
    --first-volume-trigger these are refused, whatever the tail (each was accepted, shifted by
    1 to 20 volumes, when the recording's end was taken as proof of an early stop)."""
    volumes = 2000 + np.arange(40) * PERIOD
    markers = {
        "first trigger missing": volumes[1:],
        "irregular gap": np.r_[volumes[:19], volumes[19:] + PERIOD // 2],
        "paused recording": np.r_[volumes[:15], volumes[20:] - 4300],
        "dummies and an early stop": np.r_[volumes[0] - 2 * PERIOD, volumes[0] - PERIOD, volumes[:30]],
        "late start and early stop": volumes[5:31] - 5 * PERIOD + 998,
    }[case]
    raw = raw_with_markers((markers, "Response/R128"), n_times=int(markers[-1]) + PERIOD + 500)
    with pytest.raises(DataError, match="no trigger train fits the 40 BOLD volumes"):
        timing_of(raw, n_volumes=40)


def test_two_scans_in_one_series_must_be_told_apart():
    first = 1000 + np.arange(40) * PERIOD
    second = first[-1] + 37_300 + np.arange(40) * PERIOD  # another scan, a non-integer gap later
    raw = raw_with_markers((np.r_[first, second], "Response/R128"), n_times=int(second[-1]) + 3000)
    with pytest.raises(DataError, match=r"holds 2 trigger trains \(scans\) that each fit the 40 BOLD "
                                        r"volumes .*--first-volume-trigger K, counted along the "
                                        r"series' trains: 1 for the one from 2.000 s; 41 for"):
        timing_of(raw, n_volumes=40)
    np.testing.assert_array_equal(timing_of(raw, n_volumes=40, first_trigger=41).starts, second)
    # a 45-volume scan, then the 40 of this run: the one that fits is found, not only the longest
    longer = 1000 + np.arange(45) * PERIOD
    second = longer[-1] + 37_300 + np.arange(40) * PERIOD
    raw = raw_with_markers((np.r_[longer, second], "Response/R128"), n_times=int(second[-1]) + 3000)
    np.testing.assert_array_equal(timing_of(raw, n_volumes=40).starts, second)


def test_slice_markers_from_a_recording_started_mid_volume():
    # back to back, 20 per volume; the recording starts at slice 8 of a volume: where volumes
    # begin is unknown from the slices alone
    slices = np.arange(8, 20 * 42) * 50 - 8 * 50 + 20
    raw = raw_with_markers((slices, "Scanner/s"), n_times=int(slices[-1]) + 2000)
    with pytest.raises(DataError, match="no trigger train fits"):
        timing_of(raw, n_volumes=40, first_trigger=3)
    # with a pause after each volume, the partial first volume is left out of the train
    slices = (500 + np.arange(41)[:, None] * PERIOD + np.arange(10) * 40).ravel()[6:]
    timing = timing_of(raw_with_markers((slices, "Scanner/s"), n_times=45000), n_volumes=40)
    np.testing.assert_array_equal(timing.starts, 500 + np.arange(1, 41) * PERIOD)


def test_back_to_back_slice_markers_lost_at_the_start_are_refused():
    """30 volumes of 20 slices, back to back, the first 3 slice markers lost although the EEG was
    recording: grouping from the first marker would start every volume 3 slices late (0.3 s).
    The markers span 597 slices, not whole volumes, so the grouping is unknown."""
    slices = 1000 + np.arange(30 * 20) * 50
    raw = raw_with_markers((slices[3:], "Scanner/s"))
    with pytest.raises(DataError, match="no trigger train fits the 30 BOLD volumes"):
        timing_of(raw)
    with pytest.raises(DataError, match="slice markers that cannot be grouped into volumes") as err:
        timing_of(raw, marker="Scanner/s")  # named: the advice is not to name it again
    assert "--volume-marker NAME" not in str(err.value) and "--eeg-offset SECONDS" in str(err.value)
    np.testing.assert_array_equal(timing_of(raw_with_markers((slices, "Scanner/s"))).starts,
                                  1000 + np.arange(30) * PERIOD)


def test_a_missing_slice_marker_does_not_lose_the_train():
    slices = 333 + np.arange(40 * 20) * 50
    timing = timing_of(raw_with_markers((np.delete(slices, 417), "Scanner/s"), n_times=42000),
                       n_volumes=40)
    np.testing.assert_array_equal(timing.starts, 333 + np.arange(40) * PERIOD)
    # the first slice of a volume missing: that volume's start is filled from its neighbours
    timing = timing_of(raw_with_markers((np.delete(slices, 400), "Scanner/s"), n_times=42000),
                       n_volumes=40)
    np.testing.assert_array_equal(timing.starts, 333 + np.arange(40) * PERIOD)


def test_stim_channel_codes_are_candidates(tmp_path):
    """BioSemi's Status or FIF's STI 014 carry the scanner pulses as codes on a channel."""
    info = mne.create_info(["Cz", "Pz", "STI 014"], SFREQ, ["eeg", "eeg", "stim"])
    data = np.zeros((3, 40000))
    volumes = 700 + np.arange(30) * PERIOD
    for start in volumes:
        data[2, start:start + 5] = 128
    data[2, 9000:9003] = 3  # a button press
    path = tmp_path / "sub-01_task-x_eeg.fif"
    mne.io.RawArray(data, info, verbose=False).save(path, verbose=False)
    raw = mne.io.read_raw_fif(path, verbose=False)
    timing = timing_of(raw)
    assert timing.marker == "STI 014=128"
    np.testing.assert_array_equal(timing.starts, volumes)


def test_a_repetition_time_that_disagrees_with_the_triggers():
    # 800 ppm: clock drift, within what a real EEG amplifier and scanner show; the windows
    # follow the triggers
    raw = raw_with_markers((100 + np.rint(np.arange(30) * 1000.8).astype(int), "Response/R128"))
    assert timing_of(raw).drift_ppm == pytest.approx(800, abs=50)
    # 0.5 % apart: not drift but a wrong TR, which would set the windows' length and bins
    raw = raw_with_markers((100 + np.rint(np.arange(30) * 1005.0).astype(int), "Response/R128"))
    with pytest.raises(DataError, match=r"come every 2\.010000 s but RepetitionTime says 2 s "
                                        r"\(\+5000 ppm.*correct the BOLD sidecar's RepetitionTime"):
        timing_of(raw)
    raw = raw_with_markers((100 + np.arange(30) * 1020, "Response/R128"))
    with pytest.raises(DataError, match="the BOLD sidecar's RepetitionTime is wrong"):
        timing_of(raw)  # 2 % apart: refused, pointing at the TR
