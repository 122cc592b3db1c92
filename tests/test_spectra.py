"""TR-window spectrograms (spec2vol_bids.spectra) against a straightforward loop."""

from __future__ import annotations

import logging
from pathlib import Path

import mne
import numpy as np
import pybv
import pytest

from spec2vol_bids.eeg import drop_flat_channels, read_eeg
from spec2vol_bids.errors import DataError
from spec2vol_bids.spectra import flat_channels, frequency_bins, tr_spectrogram, window_starts

CH_NAMES = ["Fp1", "Fz", "Cz", "Pz", "Oz", "C3", "C4", "T7"]


def every_tr(t0, tr, sfreq, n_windows):
    """Window starts one TR apart from t0, as the reference computes them."""
    return [int(np.floor((t0 + v * tr) * sfreq + 0.5)) for v in range(n_windows)]


def loop_spectrogram(data, sfreq, starts, tr, n_bins):
    """The straightforward reference: one numpy FFT per channel and window, in float64."""
    window = int(np.floor(tr * sfreq + 0.5))
    n_windows = len(starts)
    out = np.zeros((n_windows, data.shape[0], n_bins))
    for v, start in enumerate(starts):
        for c in range(data.shape[0]):
            out[v, c] = np.abs(np.fft.rfft(data[c, start:start + window]))[1:n_bins + 1]
    for v in range(n_windows):
        for f in range(n_bins):
            column = out[v, :, f]
            out[v, :, f] = (column - column.mean()) / column.std()
    return out


def simulated_eeg(n_channels, n_times, sfreq, seed=0):
    """Pink-ish noise plus an alpha rhythm whose amplitude differs by channel, in volts."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_times) / sfreq
    noise = np.cumsum(rng.standard_normal((n_channels, n_times)), axis=1)
    noise -= noise.mean(axis=1, keepdims=True)
    alpha = np.sin(2 * np.pi * 10.3 * t) * rng.uniform(0.5, 2, (n_channels, 1))
    return (0.05 * noise + 5 * alpha + rng.standard_normal((n_channels, n_times))) * 1e-6


def write_bv(folder, data, sfreq, fmt="binary_int16", stem="sub-01_eeg"):
    kwargs = {"resolution": 0.01} if fmt == "binary_int16" else {}
    pybv.write_brainvision(data=data, sfreq=sfreq, ch_names=CH_NAMES[: len(data)],
                           fname_base=stem, folder_out=str(folder), fmt=fmt, overwrite=True,
                           **kwargs)
    return Path(folder) / f"{stem}.vhdr"


def assert_close_to_max(got, ref, tol=1e-5):
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("sfreq,tr", [(250.0, 2.16), (1000.0, 2.0), (5000.0, 1.28)])
def test_matches_loop_brainvision(tmp_path, sfreq, tr):
    n_windows, t0_sample = 9, 37
    n_times = t0_sample + int(round(tr * sfreq)) * n_windows + 11
    data = simulated_eeg(len(CH_NAMES), n_times, sfreq)
    raw = read_eeg(write_bv(tmp_path, data, sfreq), work_dir=tmp_path / "work")
    picks = ["Oz", "Fp1", "Cz", "C3", "T7", "Fz", "Pz", "C4"]  # not file order
    t0 = t0_sample / sfreq
    spec, freqs = tr_spectrogram(raw, picks, starts=every_tr(t0, tr, sfreq, n_windows), tr=tr,
                                 chunk_windows=4)
    ref = loop_spectrogram(raw.get_data(picks=picks), sfreq, every_tr(t0, tr, sfreq, n_windows), tr, 249)
    assert spec.dtype == np.float32
    assert_close_to_max(spec, ref)
    np.testing.assert_allclose(freqs, np.arange(1, 250) / tr, rtol=1e-12)


def test_windows_at_each_trigger_match_the_loop(tmp_path):
    """Windows at per-volume triggers (jittered, one interval a sample long than the others,
    as real trigger trains are): each window starts at its own trigger."""
    sfreq, tr = 1000.0, 2.0
    data = simulated_eeg(len(CH_NAMES), 25000, sfreq, seed=5)
    raw = read_eeg(write_bv(tmp_path, data, sfreq), work_dir=tmp_path / "work")
    starts = 311 + np.arange(11) * 2000 + np.array([0, 1, -1, 0, 2, 0, 0, -2, 1, 0, 3])
    spec, _ = tr_spectrogram(raw, CH_NAMES, starts=starts, tr=tr, chunk_windows=3)
    ref = loop_spectrogram(raw.get_data(picks=CH_NAMES), sfreq, list(starts), tr, 249)
    assert_close_to_max(spec, ref)
    with pytest.raises(DataError, match="increasing starts"):
        tr_spectrogram(raw, CH_NAMES, starts=starts[::-1], tr=tr)


@pytest.mark.parametrize("sfreq,tr", [(250.0, 2.16), (1000.0, 2.0003), (5000.0, 1.28)])
def test_window_starts_every_tr_from_a_sample(sfreq, tr):
    t0 = 37 / sfreq
    np.testing.assert_array_equal(window_starts(t0, tr, sfreq, 50), every_tr(t0, tr, sfreq, 50))


def test_matches_loop_through_mne_reader_and_uneven_windows(tmp_path):
    """A FIF file (mne's get_data path) and TR·fs not an integer (windows gathered)."""
    sfreq, tr, n_windows = 1000.0, 2.0003, 7
    data = simulated_eeg(5, 15000, sfreq, seed=1)
    path = tmp_path / "sub-01_eeg.fif"
    mne.io.RawArray(data, mne.create_info(CH_NAMES[:5], sfreq, "eeg"), verbose=False).save(
        path, verbose=False)
    raw = read_eeg(path, work_dir=tmp_path)
    spec, _ = tr_spectrogram(raw, CH_NAMES[:5], starts=every_tr(0.5, tr, sfreq, n_windows), tr=tr,
                             freq_bins=300, chunk_windows=3)
    ref = loop_spectrogram(data, sfreq, every_tr(0.5, tr, sfreq, n_windows), tr, 300)
    assert_close_to_max(spec, ref)


def read_windows(raw, idx, starts, window):
    """The windows spec2vol's reader gives for ``starts``, in volts, as (channels, windows, samples)."""
    from spec2vol_bids.spectra import _window_reader

    with _window_reader(raw, np.asarray(idx), window) as (read, _):
        windows, rows, scale = read(np.asarray(starts))
        return windows[rows] * scale


def mne_windows(raw, idx, starts, window):
    return np.stack([raw.get_data(picks=idx, start=s, stop=s + window) for s in starts], axis=1)


@pytest.mark.parametrize("fmt", ["binary_int16", "binary_float32"])
def test_direct_reader_equals_mne(tmp_path, fmt):
    """The direct BrainVision reader gives what mne's get_data gives, in both orientations."""
    sfreq = 500.0
    data = simulated_eeg(len(CH_NAMES), 3000, sfreq, seed=2)
    vhdr = write_bv(tmp_path, data, sfreq, fmt=fmt)
    raw = read_eeg(vhdr, work_dir=tmp_path / "w")
    idx = [5, 0, 3]
    starts = [100, 351, 601, 852]  # 250.5-sample steps: windows overlap by one here and there
    for raw_, idx_ in [(raw, idx), (raw, list(range(len(CH_NAMES))))]:
        np.testing.assert_allclose(read_windows(raw_, idx_, starts, 251),
                                   mne_windows(raw_, idx_, starts, 251), rtol=1e-12, atol=0)
    cropped = raw.copy().crop(tmin=1.0).pick(["Cz", "Fz", "T7"])
    np.testing.assert_allclose(read_windows(cropped, [0, 1, 2], [10, 500], 490),
                               mne_windows(cropped, [0, 1, 2], [10, 500], 490), rtol=1e-12, atol=0)

    # The same samples stored channel by channel (VECTORIZED orientation).
    dtype = "<i2" if fmt == "binary_int16" else "<f4"
    values = np.fromfile(vhdr.with_suffix(".eeg"), dtype=dtype).reshape(-1, len(CH_NAMES))
    values.T.copy().tofile(vhdr.with_suffix(".eeg"))
    vhdr.write_text(vhdr.read_text().replace("DataOrientation=MULTIPLEXED",
                                             "DataOrientation=VECTORIZED"))
    raw = read_eeg(vhdr, work_dir=tmp_path / "w")
    np.testing.assert_allclose(read_windows(raw, idx, starts, 251),
                               mne_windows(raw, idx, starts, 251), rtol=1e-12, atol=0)


def test_frequency_bins_and_fmax(tmp_path):
    freqs = frequency_bins(2.0, 250.0, fmax=40.0)
    assert freqs[-1] == 40.0 and len(freqs) == 80
    assert len(frequency_bins(1.28, 5000.0)) == 249
    with pytest.raises(DataError, match="has 160 above DC") as err:
        frequency_bins(1.28, 250.0)  # 320-sample windows: 160 bins only
    assert err.value.code == 65


def test_nan_is_refused(tmp_path):
    data = simulated_eeg(4, 5000, 250.0)
    data[2, 1234] = np.nan
    raw = read_eeg(write_bv(tmp_path, data, 250.0, fmt="binary_float32"), work_dir=tmp_path)
    with pytest.raises(DataError, match="NaN or infinite EEG samples in channel.* Cz") as err:
        tr_spectrogram(raw, CH_NAMES[:4], starts=every_tr(0, 2.0, raw.info["sfreq"], 9), tr=2.0)
    assert err.value.code == 65 and "sub-01_eeg.eeg" in str(err.value)


def test_same_bytes_whatever_the_thread_count(tmp_path, monkeypatch):
    """Blocks go to threads in any order; each writes its own windows, so the bytes agree."""
    sfreq, tr = 1000.0, 2.0
    data = simulated_eeg(len(CH_NAMES), 21000, sfreq, seed=3)
    raw = read_eeg(write_bv(tmp_path, data, sfreq), work_dir=tmp_path / "work")
    results = []
    for threads in ("1", "2", "3", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        spec, _ = tr_spectrogram(raw, CH_NAMES, starts=every_tr(0.25, tr, sfreq, 10), tr=tr,
                                 chunk_windows=2)
        results.append(spec.tobytes())
    assert len(set(results)) == 1
    ref = loop_spectrogram(raw.get_data(picks=CH_NAMES), sfreq, every_tr(0.25, tr, sfreq, 10), tr, 249)
    assert_close_to_max(np.frombuffer(results[0], np.float32).reshape(ref.shape), ref)


def test_file_shrinking_under_the_reader_is_a_data_error(tmp_path):
    vhdr = write_bv(tmp_path, simulated_eeg(3, 5000, 250.0), 250.0)
    raw = read_eeg(vhdr, work_dir=tmp_path / "work")
    with open(vhdr.with_suffix(".eeg"), "r+b") as fh:
        fh.truncate(3 * 2 * 2500)
    with pytest.raises(DataError, match="shorter than its header") as err:
        tr_spectrogram(raw, CH_NAMES[:3], starts=every_tr(0, 2.0, raw.info["sfreq"], 9), tr=2.0)
    assert err.value.code == 65


def test_constant_within_windows_is_not_flat(tmp_path):
    """A channel constant over each window but not over the run has (almost) no spectrum, yet
    is not flat: it stays in the z-score, as in the loop reference."""
    sfreq, tr, window = 250.0, 2.0, 500
    data = simulated_eeg(5, 5000, sfreq, seed=4)
    data[1] = np.repeat(np.linspace(-3e-6, 5e-6, 10), window)
    data[3] = 0.0  # flat at zero: its spectrum is exactly 0
    raw = read_eeg(write_bv(tmp_path, data, sfreq, fmt="binary_float32"), work_dir=tmp_path)
    spec, _ = tr_spectrogram(raw, CH_NAMES[:5], starts=every_tr(0, tr, sfreq, 9), tr=tr, freq_bins=200)
    assert flat_channels(spec).tolist() == [False, False, False, True, False]
    keep = [0, 1, 2, 4]
    ref = loop_spectrogram(raw.get_data()[keep], sfreq, every_tr(0, tr, sfreq, 9), tr, 200)
    assert_close_to_max(spec[:, keep], ref)


def test_flat_channel_left_out(tmp_path, caplog):
    sfreq, tr = 250.0, 2.0
    data = simulated_eeg(6, 5000, sfreq)
    data[3] = 2e-6  # a constant (disconnected) channel
    raw = read_eeg(write_bv(tmp_path, data, sfreq, fmt="binary_float32"), work_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids.spectra"):
        spec, _ = tr_spectrogram(raw, CH_NAMES[:6], starts=every_tr(0, tr, sfreq, 9), tr=tr,
                                 freq_bins=200)
    assert "flat channel(s) left out: Pz" in caplog.text
    assert flat_channels(spec).tolist() == [False, False, False, True, False, False]
    keep = [0, 1, 2, 4, 5]
    ref = loop_spectrogram(raw.get_data()[keep], sfreq, every_tr(0, tr, sfreq, 9), tr, 200)
    assert_close_to_max(spec[:, keep], ref)
    kept, names, flat = drop_flat_channels(spec, CH_NAMES[:6])
    assert flat == ["Pz"] and names == ["Fp1", "Fz", "Cz", "Oz", "C3"]
    np.testing.assert_array_equal(kept, spec[:, keep])
    with pytest.raises(DataError, match="every EEG channel is flat"):
        drop_flat_channels(np.zeros((3, 2, 4), np.float32), ["a", "b"])


def test_windows_beyond_the_recording(tmp_path):
    raw = read_eeg(write_bv(tmp_path, simulated_eeg(3, 5000, 250.0), 250.0), work_dir=tmp_path)
    with pytest.raises(DataError, match="within the recording's 5000 samples"):
        tr_spectrogram(raw, CH_NAMES[:3], starts=every_tr(0.1, 2.0, raw.info["sfreq"], 10), tr=2.0)
