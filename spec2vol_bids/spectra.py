"""TR-window amplitude spectrograms of an EEG recording (DESIGN §2, steps 2–3).

Volume ``v`` of a run starts at ``t0 + v·TR``; its EEG window is the ``W = round(TR·fs)``
samples from ``t_v = round(t0·fs) + round(v·TR·fs)`` (rounding half up). When t0 lies on a
sample, as it does whenever it comes from a marker, this is ``round((t0 + v·TR)·fs)``; for a
non-integer ``TR·fs`` consecutive windows then overlap or skip by at most one sample instead of
drifting. ``S[v, c, f] = |rfft(window)|[f + 1]`` for ``f < F`` (DC dropped), then z-scored
across channels for every (window, bin).

The FFT runs in float64 and only its output is stored as float32. A float32 FFT is faster
(about 0.5 s instead of 0.8 s for a 64-channel, 5 kHz, 474 s run) but its error is relative to
the whole window's energy, so the weakest bins of a 1/f spectrum come out a few 1e-5 off, and
the per-bin z-score across channels passes that on undiminished.

The recording is streamed: windows are read a chunk at a time (``preload=False``), transformed
with one batched real FFT per chunk, and reduced to the ``F`` kept bins, so memory stays
at a few chunks whatever the length of the run. BrainVision INT_16 / INT_32 / IEEE_FLOAT_32
files are read straight from the data file (one read per chunk, transposed while converted to
float64), and each channel's calibration (resolution × unit, as mne applies it) multiplies the
kept amplitudes rather than every sample — the FFT is linear. Other formats go through
:meth:`mne.io.Raw.get_data`.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import scipy.fft

from spec2vol_bids.errors import DataError

logger = logging.getLogger(__name__)

# Samples (channels x time) held per chunk: 8 Mi float64 values, 64 MiB.
_CHUNK_VALUES = 8 * 1024**2
_BV_DTYPES = {"short": "<i2", "int": "<i4", "single": "<f4"}


def window_starts(t0: float, tr: float, sfreq: float, n_windows: int) -> np.ndarray:
    """First sample of each TR window: ``round(t0·fs) + round(v·TR·fs)``, rounding half up."""
    t0_sample = np.floor(t0 * sfreq + 0.5)
    steps = np.floor(np.arange(n_windows) * (tr * sfreq) + 0.5)
    return (t0_sample + steps).astype(np.int64)


def frequency_bins(tr: float, sfreq: float, *, freq_bins: int = 249, fmax: float | None = None):
    """Frequencies (Hz) of the kept FFT bins of a TR window: bins 1..F, DC dropped.

    Parameters
    ----------
    tr, sfreq : float
        Repetition time (s) and sampling frequency (Hz).
    freq_bins : int
        F, the number of bins kept (the authors' 249), when ``fmax`` is ``None``.
    fmax : float | None
        Keep every bin up to ``fmax`` Hz instead.

    Returns
    -------
    freqs : ndarray, shape (F,)
        ``k · fs / W`` for k = 1..F, with W = round(TR·fs) samples per window.
    """
    window = int(np.floor(tr * sfreq + 0.5))
    available = window // 2
    if fmax is not None:
        n_bins = int(np.floor(fmax * window / sfreq + 1e-9))
        if n_bins < 1:
            raise DataError(f"--fmax {fmax} Hz keeps no frequency bin (bin width "
                            f"{sfreq / window:.3f} Hz)")
    else:
        n_bins = int(freq_bins)
    if not 1 <= n_bins <= available:
        raise DataError(
            f"{n_bins} frequency bins asked for, but a {window}-sample TR window at {sfreq:g} Hz "
            f"has {available} above DC (up to {available * sfreq / window:.1f} Hz); "
            f"lower --freq-bins or --fmax"
        )
    return np.arange(1, n_bins + 1) * (sfreq / window)


def tr_spectrogram(
    raw,
    picks,
    *,
    t0: float,
    tr: float,
    n_windows: int,
    freq_bins: int = 249,
    fmax: float | None = None,
    chunk_windows: int | None = None,
    zscore: bool = True,
):
    """Amplitude spectrogram of each TR window, z-scored across channels.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The recording; it is read in chunks, never loaded whole.
    picks : list of str | list of int
        The channels, in the order wanted on the channel axis.
    t0 : float
        Onset of the first window, seconds from the first sample.
    tr : float
        Repetition time, seconds; the window length is ``round(tr · sfreq)`` samples.
    n_windows : int
        Number of windows; the last one must end inside the recording.
    freq_bins : int
        Number of FFT bins kept above DC (default 249, as the authors).
    fmax : float | None
        Keep the bins up to ``fmax`` Hz instead of ``freq_bins``.
    chunk_windows : int | None
        Windows transformed at once; by default as many as fit in 64 MiB of float64 samples.
    zscore : bool
        z-score each (window, bin) across channels (mean and population std over channels;
        where all channels are equal the z-score is 0). ``False`` returns amplitudes.

    Returns
    -------
    S : ndarray, shape (n_windows, n_channels, F), float32
        The spectrogram. A channel that is flat over every window (zero variance) gets a row
        of zeros and is left out of the z-score; a warning names it, and
        :func:`flat_channels` finds it.
    freqs : ndarray, shape (F,)
        Frequency of each bin, Hz.

    Raises
    ------
    DataError
        NaN or infinite samples in a window, windows beyond the end of the recording, or more
        bins asked for than the window has.
    """
    path = raw.filenames[0]
    sfreq = float(raw.info["sfreq"])
    names = [raw.ch_names[p] if not isinstance(p, str) else p for p in picks]
    missing = [name for name in names if name not in raw.ch_names]
    if missing:
        raise DataError(f"channels not in the recording: {', '.join(missing)}", path=path)
    idx = np.array([raw.ch_names.index(name) for name in names], dtype=np.int64)
    freqs = frequency_bins(tr, sfreq, freq_bins=freq_bins, fmax=fmax)
    n_bins = len(freqs)
    window = int(np.floor(tr * sfreq + 0.5))
    starts = window_starts(t0, tr, sfreq, n_windows)
    if n_windows < 1 or starts[0] < 0 or starts[-1] + window > raw.n_times:
        raise DataError(
            f"{n_windows} TR windows from t0 = {t0:.3f} s need samples up to "
            f"{int(starts[-1]) + window if n_windows else 0}, but the recording has {raw.n_times}",
            path=path,
        )
    if chunk_windows is None:
        chunk_windows = max(1, _CHUNK_VALUES // (len(idx) * window))
    read = _chunk_reader(raw, idx)

    amplitude = np.empty((n_windows, len(idx), n_bins), dtype=np.float32)
    low = np.full(len(idx), np.inf)
    high = np.full(len(idx), -np.inf)
    for a in range(0, n_windows, chunk_windows):
        chunk = starts[a:a + chunk_windows]
        first = int(chunk[0])
        data, scale = read(first, int(chunk[-1]) + window)  # (channels, samples), float64
        offsets = chunk - first
        if np.all(offsets == np.arange(len(chunk)) * window):
            windows = data[:, : len(chunk) * window].reshape(len(idx), len(chunk), window)
        else:  # non-integer TR·fs: windows one sample apart here and there
            windows = data[:, offsets[:, None] + np.arange(window)]
        # Track each channel's range to find flat channels and non-finite samples without a
        # second pass over the data (min/max propagate NaN).
        np.minimum(low, windows.min(axis=(1, 2)), out=low)
        np.maximum(high, windows.max(axis=(1, 2)), out=high)
        spectrum = scipy.fft.rfft(windows, axis=-1, workers=_fft_workers())
        kept = np.abs(spectrum[..., 1:n_bins + 1]) * np.abs(scale)[:, :, None]
        amplitude[a:a + len(chunk)] = kept.transpose(1, 0, 2)
        del data, windows, spectrum

    bad = ~(np.isfinite(low) & np.isfinite(high))
    if bad.any():
        raise DataError(
            f"NaN or infinite EEG samples in channel(s) {', '.join(np.asarray(names)[bad][:5])}",
            path=path,
        )
    flat = low == high
    if flat.any():
        logger.warning("%s: flat channel(s) left out: %s", path, ", ".join(np.asarray(names)[flat]))
        amplitude[:, flat] = 0
    if zscore:
        zscore_channels(amplitude, exclude=flat)
    return amplitude, freqs


def _fft_workers() -> int:
    """FFT threads: the command line's ``--omp-nthreads`` (exported as OMP_NUM_THREADS)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


def zscore_channels(spec: np.ndarray, *, exclude=None) -> np.ndarray:
    """z-score a (windows, channels, bins) array across channels, in place.

    Mean and population standard deviation (ddof 0) are taken over channels for every
    (window, bin), in float64; a zero standard deviation gives z = 0. Channels in ``exclude``
    (a boolean mask) are left out of the statistics and set to 0.
    """
    keep = np.ones(spec.shape[1], dtype=bool) if exclude is None else ~np.asarray(exclude)
    if not keep.any():
        spec[:] = 0
        return spec
    # One window block at a time keeps the float64 temporaries small.
    step = max(1, _CHUNK_VALUES // (spec.shape[1] * spec.shape[2]))
    for a in range(0, spec.shape[0], step):
        block = spec[a:a + step, keep].astype(np.float64)
        mean = block.mean(axis=1, keepdims=True)
        std = block.std(axis=1, keepdims=True)
        z = np.divide(block - mean, std, out=np.zeros_like(block), where=std > 0)
        spec[a:a + step, keep] = z
    spec[:, ~keep] = 0
    return spec


def flat_channels(spec: np.ndarray) -> np.ndarray:
    """Boolean mask of the channels :func:`tr_spectrogram` found flat (all-zero rows)."""
    return ~np.any(spec, axis=(0, 2))


def _chunk_reader(raw, idx):
    """``read(start, stop) -> (x, scale)``: float64 samples (len(idx), stop - start) of ``raw``
    and the per-channel factor (shape (len(idx), 1)) that turns them into volts.

    The FFT is linear, so the factor is applied to the few kept amplitudes, not the samples.
    """
    direct = _brainvision_reader(raw, idx)
    if direct is not None:
        return direct
    ones = np.ones((len(idx), 1))

    def read(start, stop):
        return raw.get_data(picks=idx, start=start, stop=stop), ones

    return read


def _brainvision_reader(raw, idx):
    """Read BrainVision binary data straight from the file, or ``None`` if not possible.

    This reproduces mne's own reader for the plain case (one binary file, no projector or
    compensation pending): sample ``s`` of channel ``c`` is the stored value at file position
    ``(first_samp + s, read_picks[c])`` times ``raw._cals[c]`` (resolution × unit).
    Reading with ``np.fromfile`` rather than a memory map keeps the file's pages out of this
    process's resident memory. tests/test_spectra.py checks the result against
    ``raw.get_data``.
    """
    if type(raw).__name__ != "RawBrainVision" or raw.preload or len(raw.filenames) != 1:
        return None
    extras = raw._raw_extras[0]
    fmt = extras.get("fmt")
    if not isinstance(fmt, str) or fmt not in _BV_DTYPES:
        return None  # ASCII BrainVision
    if raw._projector is not None or raw._comp is not None:
        return None
    dtype = np.dtype(_BV_DTYPES[fmt])
    n_file_channels = int(extras["orig_nchan"])
    n_file_samples = int(extras["n_samples"])
    multiplexed = extras["order"] == "F"
    filename = raw.filenames[0]
    file_channels = np.asarray(raw._read_picks[0])[idx]
    every_channel = np.array_equal(file_channels, np.arange(n_file_channels))
    scale = raw._cals[idx].astype(np.float64)[:, None]
    first = int(raw._first_samps[0])

    def read(start, stop):
        n = stop - start
        if multiplexed:  # samples in rows: one contiguous read
            rows = np.fromfile(filename, dtype=dtype, count=n * n_file_channels,
                               offset=(first + start) * n_file_channels * dtype.itemsize)
            # Transpose while converting (one pass), then keep the wanted rows.
            block = np.empty((n_file_channels, n))
            np.copyto(block, rows.reshape(n, n_file_channels).T)
            return (block if every_channel else block[file_channels]), scale
        block = np.empty((len(idx), n))  # vectorised: one read per channel
        for row, channel in enumerate(file_channels):
            block[row] = np.fromfile(
                filename, dtype=dtype, count=n,
                offset=(channel * n_file_samples + first + start) * dtype.itemsize)
        return block, scale

    return read
