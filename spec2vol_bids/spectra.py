"""TR-window amplitude spectrograms of an EEG recording (docs/design.md, "Preprocessing").

Volume ``v``'s EEG window is the ``W = round(TR·fs)`` samples from its start ``t_v``: the
sample of its own scanner trigger (:mod:`spec2vol_bids.triggers`), or, with ``--eeg-offset``,
``t_v = round(t0·fs) + round(v·TR·fs)`` (rounding half up, :func:`window_starts`), so that for a
non-integer ``TR·fs`` consecutive windows overlap or skip by at most one sample instead of
drifting. ``S[v, c, f] = |rfft(window)|[f + 1]`` for ``f < F`` (DC dropped), then z-scored
across channels for every (window, bin).

The FFT runs in float64 and only its output is stored as float32. A float32 FFT takes about
half the time (0.22 instead of 0.40 CPU s for a 64-channel, 5 kHz, 474 s run) but its error is
relative to the whole window's energy, which the low frequencies of EEG dominate (removing the
window's mean does not help), so the weakest bins come out 4–8e-6 off after the z-score, too
close to the 1e-5 the exactness test allows, and further off on recordings with slow drifts.

The recording is streamed in small blocks of whole windows (``preload=False``): each block is
read, transposed to (channels, windows, samples) float64, transformed with one batched real
FFT and reduced to the ``F`` kept bins. Blocks are small (a few MB) so that the transposition
and the FFT run in the CPU cache, and their buffers are reused, as allocating them anew costs
page faults: for that run this takes 0.38 CPU s where 64 MiB chunks took 0.75 s. Blocks are
spread over ``OMP_NUM_THREADS`` threads (numpy and scipy.fft release the GIL), each block
writing its own windows of the output, so the result does not depend on the thread count.
Memory stays at a few blocks whatever the length of the run. BrainVision INT_16 / INT_32 /
IEEE_FLOAT_32 files are read straight from the data file, and each channel's calibration
(resolution × unit, as mne applies it) multiplies the kept amplitudes rather than every
sample — the FFT is linear. Other formats go through :meth:`mne.io.Raw.get_data`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft

from spec2vol_bids.errors import DataError

logger = logging.getLogger(__name__)

# Samples (file channels × time) per block: 2**19 float64 values, 4 MiB, about the CPU's
# cache. A 64-channel 5 kHz window (409 600 samples) makes one block on its own.
_BLOCK_VALUES = 2**19
# Samples per transposed tile of a multiplexed block: source and destination in L1/L2.
_TILE = 256
# A window's kept bins at most this fraction of its DC bin: possibly constant (see _amplitudes).
_QUIET = 1e-9
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
        top = available * sfreq / window
        if fmax > top:
            raise DataError(f"--fmax {fmax:g} Hz is above the {top:.1f} Hz that a {window}-sample "
                            f"TR window at {sfreq:g} Hz holds; lower --fmax")
        n_bins = int(np.floor(fmax * window / sfreq + 1e-9))
        if n_bins < 1:
            raise DataError(f"--fmax {fmax:g} Hz keeps no frequency bin (bin width "
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
    starts,
    tr: float,
    freq_bins: int = 249,
    fmax: float | None = None,
    chunk_windows: int | None = None,
    zscore: bool = True,
):
    """Amplitude spectrogram of each TR window, z-scored across channels.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The recording; it is read in blocks, never loaded whole.
    picks : list of str | list of int
        The channels, in the order wanted on the channel axis.
    starts : array-like of int
        The first sample of each window, increasing (one per volume: its trigger, see
        :mod:`spec2vol_bids.triggers`, or :func:`window_starts`); the last window must end
        inside the recording.
    tr : float
        Repetition time, seconds; the window length is ``round(tr · sfreq)`` samples.
    freq_bins : int
        Number of FFT bins kept above DC (default 249, as the authors).
    fmax : float | None
        Keep the bins up to ``fmax`` Hz instead of ``freq_bins``.
    chunk_windows : int | None
        Windows transformed at once; by default as many as fit in 4 MiB of float64 samples
        (at least one).
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
    starts = np.asarray(starts, dtype=np.int64)
    if len(starts) < 1 or starts[0] < 0 or starts[-1] + window > raw.n_times \
            or np.any(np.diff(starts) <= 0):
        raise DataError(
            f"{len(starts)} TR windows need increasing starts within the recording's "
            f"{raw.n_times} samples (first {starts[0] if len(starts) else None}, last ending at "
            f"{int(starts[-1]) + window if len(starts) else None})",
            path=path,
        )
    with _window_reader(raw, idx, window) as (read, n_rows):
        if chunk_windows is None:
            chunk_windows = max(1, _BLOCK_VALUES // (n_rows * window))
        amplitude, finite, quiet = _amplitudes(read, starts, n_bins, len(idx), chunk_windows)
        if not finite.all():
            raise DataError(f"NaN or infinite EEG samples in channel(s) "
                            f"{', '.join(np.asarray(names)[~finite][:5])}; mark them bad in "
                            "channels.tsv to leave them out", path=path)
        flat = quiet.copy()
        if quiet.any():  # rare: confirm on the samples
            flat[quiet] = _constant_channels(read, starts, chunk_windows, quiet)
    if flat.any():
        logger.warning("%s: flat channel(s) left out: %s", path, ", ".join(np.asarray(names)[flat]))
        amplitude[:, flat] = 0
    if zscore:
        zscore_channels(amplitude, exclude=flat)
    return amplitude, freqs


def _amplitudes(read, starts, n_bins, n_channels, chunk_windows):
    """|rfft| bins 1..n_bins of every window, block by block on ``OMP_NUM_THREADS`` threads.

    Returns
    -------
    amplitude : ndarray, shape (windows, channels, bins), float32
        The amplitudes, in volts.
    finite : ndarray of bool, shape (channels,)
        Whether every amplitude of the channel is finite. A NaN or infinite sample makes every
        bin of its window NaN or infinite, so this finds them without a pass over the samples.
    quiet : ndarray of bool, shape (channels,)
        Whether no kept bin of the channel exceeds 1e-9 of its window's DC bin, in any window.
        A channel that is constant over a window has AC bins at rounding level (about 1e-14 of
        DC; exactly 0 when the constant is 0), so every flat channel is quiet; a quiet channel
        still has to be checked on its samples (:func:`_constant_channels`).
    """
    amplitude = np.empty((len(starts), n_channels, n_bins), dtype=np.float32)

    def transform(a):
        block = starts[a:a + chunk_windows]
        windows, rows, scale = read(block)  # (rows, windows, samples) float64
        spectrum = scipy.fft.rfft(windows, axis=-1, workers=1)
        kept = np.abs(spectrum[rows, :, 1:n_bins + 1])
        dc = np.abs(spectrum[rows, :, 0])
        quiet = np.all(kept.max(axis=-1) <= _QUIET * dc, axis=1)
        kept *= scale
        amplitude[a:a + len(block)] = kept.transpose(1, 0, 2)
        return np.isfinite(kept).all(axis=(1, 2)), quiet

    blocks = range(0, len(starts), chunk_windows)
    workers = min(fft_workers(), len(blocks))
    if workers > 1:
        with ThreadPoolExecutor(workers, thread_name_prefix="spec2vol-fft") as pool:
            results = list(pool.map(transform, blocks))
    else:
        results = [transform(a) for a in blocks]
    finite = np.all([r[0] for r in results], axis=0)
    quiet = np.all([r[1] for r in results], axis=0)
    return amplitude, finite, quiet


def _constant_channels(read, starts, chunk_windows, which):
    """Whether each channel selected by the mask ``which`` has one value over every window."""
    low = np.full(int(which.sum()), np.inf)
    high = np.full(int(which.sum()), -np.inf)
    for a in range(0, len(starts), chunk_windows):
        windows, rows, _ = read(starts[a:a + chunk_windows])
        samples = windows[rows[which]]
        np.minimum(low, samples.min(axis=(1, 2)), out=low)
        np.maximum(high, samples.max(axis=(1, 2)), out=high)
    return low == high


def fft_workers() -> int:
    """Threads for FFTs: the command line's ``--omp-nthreads`` (exported as OMP_NUM_THREADS),
    else every CPU."""
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
    # One window block at a time keeps the float64 temporaries in the cache.
    step = max(1, _BLOCK_VALUES // (spec.shape[1] * spec.shape[2]))
    rows = slice(None) if keep.all() else keep  # a slice spares copies through fancy indexing
    for a in range(0, spec.shape[0], step):
        block = spec[a:a + step, rows].astype(np.float64)
        block -= block.mean(axis=1, keepdims=True)
        std = np.sqrt(np.mean(np.square(block), axis=1, keepdims=True))
        spec[a:a + step, rows] = np.divide(block, std, out=np.zeros_like(block), where=std > 0)
    spec[:, ~keep] = 0
    return spec


def select_channels(spec: np.ndarray, index) -> np.ndarray:
    """The channels ``index`` of a (windows, channels, bins) spectrogram z-scored across
    channels, as a float32 copy, z-scored again across them when they are fewer than the
    spectrogram's.

    The participant level z-scores across every channel of the recording; a model that reads
    fewer must not see its input move with the channels it leaves out. A z-score is blind to
    the affine map the first one applied to each (window, bin), so the result is the z-score of
    the selected channels' amplitudes. Flat channels (all zeros) stay out of the statistics.
    """
    if isinstance(index, slice):
        return np.array(spec, dtype=np.float32)
    chosen = np.array(spec[:, index], dtype=np.float32)
    if len(index) < spec.shape[1]:
        zscore_channels(chosen, exclude=flat_channels(chosen))
    return chosen


def flat_channels(spec: np.ndarray) -> np.ndarray:
    """Boolean mask of the channels :func:`tr_spectrogram` found flat (all-zero rows)."""
    return ~np.any(spec, axis=(0, 2))


@contextlib.contextmanager
def _window_reader(raw, idx, window):
    """Yield ``(read, n_rows)``: ``read(starts) -> (windows, rows, scale)`` reads TR windows.

    ``windows`` is float64, shape (n_rows, len(starts), window): the samples of the windows
    starting at ``starts`` (consecutive window starts, in samples from the first sample).
    ``windows[rows]`` are the channels ``idx`` in that order, and ``scale`` (shape
    (len(idx), 1, 1)) turns them into volts; the FFT is linear, so it is applied to the few
    kept amplitudes, not the samples. ``read`` is safe to call from several threads; the
    ``windows`` it returns may be a buffer it reuses at the thread's next call.
    """
    direct = _brainvision_reader(raw, idx, window)
    if direct is not None:
        with direct as reader:
            yield reader
        return
    ones = np.ones((len(idx), 1, 1))
    rows = np.arange(len(idx))
    offsets = np.arange(window)
    lock = threading.Lock()  # mne's readers are not meant to be used from several threads

    def read(starts):
        first = int(starts[0])
        with lock:
            data = raw.get_data(picks=idx, start=first, stop=int(starts[-1]) + window)
        return data[:, (starts - first)[:, None] + offsets], rows, ones

    yield read, len(idx)


def _brainvision_reader(raw, idx, window):
    """A context manager like :func:`_window_reader`'s that reads BrainVision binary data
    straight from the file, or ``None`` if not possible.

    This reproduces mne's own reader for the plain case (one binary file, no projector or
    compensation pending): sample ``s`` of channel ``c`` is the stored value at file position
    ``(first_samp + s, read_picks[c])`` times ``raw._cals[c]`` (resolution × unit).
    Samples are read with ``os.preadv`` into buffers each thread reuses: allocating a few MB
    per block costs page faults that took longer than the FFT, and reading rather than memory
    mapping keeps the file's pages out of this process's resident memory. Multiplexed files
    are read a block at a time, every channel (the rows are chosen after the FFT, where a
    window is reduced to its few kept bins), and transposed 256 samples at a time, which keeps
    source and destination in the cache. tests/test_spectra.py checks the result against
    ``raw.get_data``.
    """
    if type(raw).__name__ != "RawBrainVision" or raw.preload or len(raw.filenames) != 1:
        return None
    if not hasattr(os, "preadv"):  # Windows: through mne's reader
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
    file_channels = np.asarray(raw._read_picks[0])[idx]
    scale = raw._cals[idx].astype(np.float64)[:, None, None]
    first_samp = int(raw._first_samps[0])
    multiplexed = extras["order"] == "F"
    n_rows = n_file_channels if multiplexed else len(idx)
    rows = file_channels if multiplexed else np.arange(len(idx))
    local = threading.local()

    def buffer(name, shape, kind):
        """This thread's buffer ``name`` of dtype ``kind``, grown to hold ``shape``; a view
        of that shape."""
        size = int(np.prod(shape))
        held = getattr(local, name, None)
        if held is None or held.size < size:
            held = np.empty(size, kind)
            setattr(local, name, held)
        return held[:size].reshape(shape)

    @contextlib.contextmanager
    def opened():
        fd = os.open(raw.filenames[0], os.O_RDONLY)
        try:
            def pread(out, offset):
                if os.preadv(fd, [out], offset) != out.nbytes:
                    raise DataError("the EEG data file is shorter than its header says",
                                    path=raw.filenames[0])

            def read(starts):
                first = int(starts[0])
                n = int(starts[-1]) + window - first
                windows = buffer("windows", (n_rows, len(starts), window), np.float64)
                if multiplexed:  # samples in rows: one contiguous read per block
                    samples = buffer("samples", (n, n_file_channels), dtype)
                    pread(samples, (first_samp + first) * n_file_channels * dtype.itemsize)
                    for j, offset in enumerate(starts - first):
                        # 256 samples at a time: 20% faster than whole windows.
                        for a in range(0, window, _TILE):
                            stop = min(a + _TILE, window)
                            windows[:, j, a:stop] = samples[offset + a:offset + stop].T
                else:  # vectorised: one read per channel
                    samples = buffer("samples", (n,), dtype)
                    offsets = (starts - first)[:, None] + np.arange(window)
                    for row, channel in enumerate(file_channels):
                        pread(samples, (channel * n_file_samples + first_samp + first)
                              * dtype.itemsize)
                        windows[row] = samples[offsets]
                return windows, rows, scale

            yield read, n_rows
        finally:
            os.close(fd)

    return opened()
