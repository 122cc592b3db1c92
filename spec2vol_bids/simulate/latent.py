"""The latent model that makes the simulated EEG predict the simulated BOLD.

The generative model follows how the EEG-fMRI literature links the two signals. ``K`` latent
sources are shared by all subjects. Source ``k`` has

* a slowly varying, positive amplitude ``a_k(t)`` (log-normal low-pass noise, specific to each
  subject and run);
* an EEG signature: a smooth scalp topography times an oscillation in its own frequency band
  whose envelope is ``a_k(t)``;
* a smooth BOLD map inside the brain, through which ``a_k`` convolved with the canonical
  haemodynamic response changes the BOLD signal by a few percent.

That coupling is linear in the EEG's band amplitudes, so a linear model of the spectrogram is
the right form for it. ``coupling="u-shaped"`` makes the BOLD follow ``|log a_k − E log a_k|``
instead, how far the rhythm strays from its typical level either way: its correlation with
``a_k`` is about 0.3, so a linear model recovers little of it and a model that can bend can
recover much more. It is a positive control for nonlinear learning, not a physiological claim.

This module holds the sources, their time courses, the HRF, the per-volume ground truth, the
scalp topographies on the simulated cap and the BOLD maps; :mod:`.eeg_writers` and
:mod:`.bold` turn them into recordings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal, special

from spec2vol_bids.errors import UsageError

# BrainCap MR 64 order (as in the NODDI recordings, ECG moved to the end): the 10-20 electrodes
# first, then the 10-10 ones; FCz is the reference and AFz the ground, so neither is recorded.
_CAP_ORDER = (
    "Fp1 Fp2 F3 F4 C3 C4 P3 P4 O1 O2 F7 F8 T7 T8 P7 P8 Fz Cz Pz Oz FC1 FC2 CP1 CP2 FC5 FC6 CP5 "
    "CP6 TP9 TP10 POz F1 F2 C1 C2 P1 P2 AF3 AF4 FC3 FC4 CP3 CP4 PO3 PO4 F5 F6 C5 C6 P5 P6 AF7 "
    "AF8 FT7 FT8 TP7 TP8 PO7 PO8 FT9 FT10 Fpz CPz Iz"
).split()
_UNRECORDED = {"FCz", "AFz", "T3", "T4", "T5", "T6", "M1", "M2", "A1", "A2"}


@dataclass(frozen=True)
class Source:
    """One latent source: its EEG band and topography, and its BOLD map."""

    band_name: str
    band: tuple[float, float]  # Hz
    eeg_uv: float  # oscillation amplitude (µV) at the topography peak when a_k = 1
    electrode: str  # centre of the scalp topography
    mni: tuple[float, float, float]  # centre of the BOLD map (MNI mm)
    bold_change: float  # signed fractional BOLD change at the map centre per unit regressor


# Pairings loosely follow the EEG-fMRI literature (frontal theta with medial prefrontal cortex,
# occipital alpha anticorrelated with visual cortex, sensorimotor beta, ...); what matters for
# the simulation is that bands, topographies and maps are distinct.
SOURCES = (
    Source("theta", (4.0, 7.0), 18.0, "Fz", (0.0, 45.0, 20.0), 0.04),
    Source("alpha", (8.0, 12.0), 15.0, "Oz", (0.0, -88.0, 6.0), -0.04),
    Source("beta-low", (13.0, 20.0), 8.0, "C3", (-38.0, -24.0, 58.0), 0.04),
    Source("beta-high", (20.0, 30.0), 7.0, "C4", (38.0, -24.0, 58.0), 0.04),
    Source("gamma-low", (30.0, 45.0), 6.0, "T7", (-52.0, -22.0, 8.0), 0.04),
    Source("gamma-high", (55.0, 80.0), 5.0, "T8", (52.0, -22.0, 8.0), 0.04),
    Source("delta", (1.5, 3.5), 30.0, "Pz", (0.0, -60.0, 40.0), 0.04),
    Source("gamma-very-high", (80.0, 110.0), 4.0, "F4", (42.0, 36.0, 24.0), 0.04),
)
MAX_SOURCES = len(SOURCES)

COARSE_RATE = 10.0  # Hz; sampling rate of a_k(t), which varies far more slowly
_HISTORY = 40.0  # s of a_k before the EEG starts, so the first volumes see a full HRF
_AMPLITUDE_CUTOFF = 0.08  # Hz; a_k fluctuates on the time scale BOLD can follow
_AMPLITUDE_LOG_SD = 0.5
_TOPOGRAPHY_WIDTH = 0.045  # m, on a head of ~0.1 m radius
#: ``--coupling``: what drives a source's BOLD regressor, as a function of its amplitude a_k
COUPLINGS = ("linear", "u-shaped")
MAP_WIDTH = 25.0  # mm (Gaussian sigma of the BOLD maps: regional, covering much of the cortex)


def channel_names(n_channels: int) -> list[str]:
    """The first ``n_channels`` EEG electrode names in the simulator's cap order.

    The first 64 follow the BrainCap MR 64 layout (10-20 positions first); beyond 64 the
    remaining 10-05 positions follow in the order of the standard montage.

    Raises
    ------
    UsageError
        ``n_channels`` is below 1 or above the number of 10-05 positions.
    """
    names = list(_CAP_ORDER)
    names += [n for n in _standard_montage().ch_names if n not in names and n not in _UNRECORDED]
    if not 1 <= n_channels <= len(names):
        raise UsageError(f"--channels must be between 1 and {len(names)} (got {n_channels})")
    return names[:n_channels]


def electrode_positions(ch_names: list[str]) -> np.ndarray:
    """Positions (m, channels × 3) of electrodes in the standard 10-05 montage."""
    positions = _standard_montage().get_positions()["ch_pos"]
    return np.array([positions[name] for name in ch_names])


def _standard_montage():
    # imported on first use: mne is slow to import, and --help or a usage error need none of it
    from spec2vol_bids.eeg import standard_montage

    return standard_montage()


def source_table(n_sources: int, ch_names: list[str]) -> tuple[list[Source], np.ndarray]:
    """The first ``n_sources`` sources and their scalp topographies.

    Returns
    -------
    sources : list of Source
    topographies : ndarray, shape (channels, sources)
        A Gaussian of the distance to each source's centre electrode (1 at the centre).
    """
    sources = list(SOURCES[:n_sources])
    xyz = electrode_positions(ch_names)
    centres = electrode_positions([s.electrode for s in sources])
    dist2 = ((xyz[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return sources, np.exp(-dist2 / (2 * _TOPOGRAPHY_WIDTH**2))


def _lowpass_noise(rng: np.random.Generator, shape: tuple[int, int], cutoff: float) -> np.ndarray:
    """Standardised low-pass Gaussian noise along the last axis, sampled at ``COARSE_RATE``."""
    sos = signal.butter(2, cutoff, fs=COARSE_RATE, output="sos")
    z = signal.sosfiltfilt(sos, rng.standard_normal(shape), axis=-1)
    z -= z.mean(axis=-1, keepdims=True)
    return z / z.std(axis=-1, keepdims=True)


def latent_timecourses(rng: np.random.Generator, sources: list[Source], duration: float):
    """Amplitudes a_k and oscillation phases on a coarse grid from ``-_HISTORY`` to ``duration``.

    The carrier frequency wanders smoothly inside each band; the phase is its running
    integral, so linear interpolation of the phase between grid points is exact for a
    piecewise-constant frequency.

    Returns
    -------
    times : ndarray
        The grid times (s, EEG clock).
    amplitude, phase : ndarray, shape (sources, grid)
    """
    n = int(np.ceil((duration + _HISTORY) * COARSE_RATE)) + 2
    times = -_HISTORY + np.arange(n) / COARSE_RATE
    k = len(sources)
    z = _lowpass_noise(rng, (k, n), _AMPLITUDE_CUTOFF)
    amplitude = np.exp(_AMPLITUDE_LOG_SD * z - _AMPLITUDE_LOG_SD**2 / 2)
    lo, hi = np.array([s.band for s in sources]).T
    wander = np.tanh(_lowpass_noise(rng, (k, n), 0.5))
    freq = (lo + hi)[:, None] / 2 + 0.4 * (hi - lo)[:, None] * wander
    phase = np.zeros((k, n))
    phase[:, 1:] = np.cumsum(freq[:, :-1], axis=1) * (2 * np.pi / COARSE_RATE)
    phase += rng.uniform(0, 2 * np.pi, (k, 1))
    return times, amplitude, phase


#: ``--hrf-delay``: the lowest and highest delay (s) of the BOLD response after SPM's canonical HRF
HRF_DELAYS = (-2.0, 4.0)


def _hrf(delay: float = 0.0) -> np.ndarray:
    """SPM's canonical double-gamma haemodynamic response at ``COARSE_RATE``, unit sum, ``delay``
    seconds later (peak at 5 + ``delay`` s; a negative delay starts it part-way up its rise)."""
    t = np.arange(0.0, 32.0 + max(delay, 0.0), 1 / COARSE_RATE) - delay

    def gamma_pdf(shape):
        return np.exp((shape - 1) * np.log(np.maximum(t, 1e-12)) - t - special.gammaln(shape))

    h = np.where(t > 0, gamma_pdf(6.0) - gamma_pdf(16.0) / 6.0, 0.0)
    return h / h.sum()


def coupling_drive(amplitude: np.ndarray, coupling: str) -> np.ndarray:
    """What the HRF is convolved with: ``a_k`` (linear) or ``|log a_k − E log a_k|`` (u-shaped)."""
    if coupling == "linear":
        return amplitude
    # log a_k is Gaussian with mean −σ²/2 by construction (latent_timecourses)
    return np.abs(np.log(amplitude) + _AMPLITUDE_LOG_SD**2 / 2)


def volume_truth(times, amplitude, onsets, tr, coupling: str = "linear", hrf_delay: float = 0.0):
    """Per-volume mean amplitude over each TR window and standardised HRF regressors.

    The regressor of volume v is (:func:`coupling_drive` ⊛ HRF) at the middle of its acquisition,
    the HRF ``hrf_delay`` seconds later than SPM's canonical one.

    Returns
    -------
    means, regressors : ndarray, shape (sources, volumes)
    """
    convolved = np.array([np.convolve(a, _hrf(hrf_delay))[: a.size] for a in coupling_drive(amplitude, coupling)])
    regressors = np.array([np.interp(onsets + tr / 2, times, c) for c in convolved])
    regressors -= regressors.mean(axis=1, keepdims=True)
    regressors /= np.maximum(regressors.std(axis=1, keepdims=True), 1e-12)
    # exact window means from the integral of the linearly interpolated amplitude
    cumulative = np.concatenate(
        [np.zeros((amplitude.shape[0], 1)), np.cumsum((amplitude[:, 1:] + amplitude[:, :-1]) / 2, axis=1)],
        axis=1,
    ) / COARSE_RATE
    means = np.array([(np.interp(onsets + tr, times, c) - np.interp(onsets, times, c)) / tr for c in cumulative])
    return means, regressors


def source_maps(mni: np.ndarray, brain: np.ndarray, sources: list[Source]) -> np.ndarray:
    """The sources' BOLD maps: signed fractional change per unit regressor, inside the brain.

    Parameters
    ----------
    mni : ndarray, shape (3, voxels)
        MNI coordinates (mm) of every voxel, in C order of the grid.
    brain : ndarray, shape (X, Y, Z)
        The soft brain mask, from 0 to 1.
    sources : list of Source

    Returns
    -------
    ndarray, shape (X, Y, Z, sources), float32
    """
    grid = brain.shape
    maps = np.empty((*grid, len(sources)), np.float32)
    for k, s in enumerate(sources):
        d2 = ((mni - np.asarray(s.mni)[:, None]) ** 2).sum(0).reshape(grid)
        maps[..., k] = s.bold_change * np.exp(-d2 / (2 * MAP_WIDTH**2)) * brain
    return maps
