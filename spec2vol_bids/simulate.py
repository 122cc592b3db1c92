"""Simulate simultaneous EEG-fMRI BIDS datasets whose EEG genuinely predicts the BOLD signal.

The generative model follows how the EEG-fMRI literature links the two signals. ``K`` latent
sources are shared by all subjects. Source ``k`` has

* a slowly varying, positive amplitude ``a_k(t)`` (log-normal low-pass noise, specific to each
  subject and run);
* an EEG signature: a smooth scalp topography times an oscillation in its own frequency band
  whose envelope is ``a_k(t)``;
* a smooth BOLD map inside the brain, through which ``a_k`` convolved with the canonical
  haemodynamic response changes the BOLD signal by a few percent.

The EEG adds 1/f background activity, amplifier noise, 50 Hz line noise and an ECG channel; the
BOLD is the MNI152 template (bundled with nilearn) resampled to the EPI grid with a per-subject
intensity, contrast and head position, modulated by the sources, plus slow drifts, a global
signal and thermal noise. Files are written through mne-bids and nibabel; the ground truth goes
to ``derivatives/simulation/``.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, signal, special

from spec2vol_bids import __version__
from spec2vol_bids.derivatives import bids_name, run_dir, write_json, write_text
from spec2vol_bids.errors import EX_CANTCREAT, EX_IOERR, OutputError, Spec2VolError, UsageError

GENERATOR = "spec2vol-simulate"

# BrainCap MR 64 order (as in the NODDI recordings, ECG moved to the end): the 10-20 electrodes
# first, then the 10-10 ones; FCz is the reference and AFz the ground, so neither is recorded.
_CAP_ORDER = (
    "Fp1 Fp2 F3 F4 C3 C4 P3 P4 O1 O2 F7 F8 T7 T8 P7 P8 Fz Cz Pz Oz FC1 FC2 CP1 CP2 FC5 FC6 CP5 "
    "CP6 TP9 TP10 POz F1 F2 C1 C2 P1 P2 AF3 AF4 FC3 FC4 CP3 CP4 PO3 PO4 F5 F6 C5 C6 P5 P6 AF7 "
    "AF8 FT7 FT8 TP7 TP8 PO7 PO8 FT9 FT10 Fpz CPz Iz"
).split()
_UNRECORDED = {"FCz", "AFz", "T3", "T4", "T5", "T6", "M1", "M2", "A1", "A2"}
REFERENCE, GROUND = "FCz", "AFz"
ECG_CHANNEL = "ECG"
LINE_FREQ = 50.0

VOLUME_MARKERS = ("R128", "Scan Start", "none")
EEG_FORMATS = {"vhdr": ".vhdr", "edf": ".edf", "bdf": ".bdf", "set": ".set"}


@dataclass(frozen=True)
class _Source:
    band_name: str
    band: tuple[float, float]  # Hz
    eeg_uv: float  # oscillation amplitude (µV) at the topography peak when a_k = 1
    electrode: str  # centre of the scalp topography
    mni: tuple[float, float, float]  # centre of the BOLD map (MNI mm)
    bold_change: float  # signed fractional BOLD change at the map centre per unit regressor


# Pairings loosely follow the EEG-fMRI literature (frontal theta with medial prefrontal cortex,
# occipital alpha anticorrelated with visual cortex, sensorimotor beta, ...); what matters for
# the simulation is that bands, topographies and maps are distinct.
_SOURCES = (
    _Source("theta", (4.0, 7.0), 18.0, "Fz", (0.0, 45.0, 20.0), 0.04),
    _Source("alpha", (8.0, 12.0), 15.0, "Oz", (0.0, -88.0, 6.0), -0.04),
    _Source("beta-low", (13.0, 20.0), 8.0, "C3", (-38.0, -24.0, 58.0), 0.04),
    _Source("beta-high", (20.0, 30.0), 7.0, "C4", (38.0, -24.0, 58.0), 0.04),
    _Source("gamma-low", (30.0, 45.0), 6.0, "T7", (-52.0, -22.0, 8.0), 0.04),
    _Source("gamma-high", (55.0, 80.0), 5.0, "T8", (52.0, -22.0, 8.0), 0.04),
    _Source("delta", (1.5, 3.5), 30.0, "Pz", (0.0, -60.0, 40.0), 0.04),
    _Source("gamma-very-high", (80.0, 110.0), 4.0, "F4", (42.0, 36.0, 24.0), 0.04),
)
MAX_SOURCES = len(_SOURCES)

_COARSE_RATE = 10.0  # Hz; sampling rate of a_k(t), which varies far more slowly
_HISTORY = 40.0  # s of a_k before the EEG starts, so the first volumes see a full HRF
_AMPLITUDE_CUTOFF = 0.08  # Hz; a_k fluctuates on the time scale BOLD can follow
_AMPLITUDE_LOG_SD = 0.5
_TOPOGRAPHY_WIDTH = 0.045  # m, on a head of ~0.1 m radius
_MAP_WIDTH = 25.0  # mm (Gaussian sigma of the BOLD maps: regional, covering much of the cortex)
_BACKGROUND_SOURCES = 12
_BACKGROUND_PSD_10HZ = 1.0  # µV²/Hz of the 1/f background at 10 Hz
_SENSOR_PSD = 0.005  # µV²/Hz of white amplifier noise
_BOLD_NOISE = 0.01  # thermal noise sd, relative to the subject's intensity scale
_INT16_RESOLUTION = 0.1  # µV per bit, as BrainAmp amplifiers in their ±3.2 mV range
_BDF_PHYSICAL = (-262144.0, 262143.0)  # µV, BioSemi's range (31.25 nV per bit)
_BASE_DATE = datetime.datetime(2021, 3, 1, 9, 0, 0, tzinfo=datetime.timezone.utc)


def channel_names(n_channels: int) -> list[str]:
    """The first ``n_channels`` EEG electrode names in the simulator's cap order.

    The first 64 follow the BrainCap MR 64 layout (10-20 positions first); beyond 64 the
    remaining 10-05 positions follow in the order of the standard montage.
    """
    names = list(_CAP_ORDER)
    names += [n for n in _montage().ch_names if n not in names and n not in _UNRECORDED]
    if not 1 <= n_channels <= len(names):
        raise UsageError(f"--channels must be between 1 and {len(names)} (got {n_channels})")
    return names[:n_channels]


def _montage():
    import mne

    # mne >= 1.13 renamed standard_1005 to colin27_1005 (same positions)
    kind = "colin27_1005" if "colin27_1005" in mne.channels.get_builtin_montages() else "standard_1005"
    return mne.channels.make_standard_montage(kind)


# ------------------------------------------------------------------------------------------
# latent sources


def _source_table(n_sources: int, ch_names: list[str]) -> tuple[list[_Source], np.ndarray]:
    """The sources and their topographies (channels × sources; 1 at each source's centre electrode)."""
    positions = _montage().get_positions()["ch_pos"]
    sources = list(_SOURCES[:n_sources])
    xyz = np.array([positions[name] for name in ch_names])
    centres = np.array([positions[s.electrode] for s in sources])
    dist2 = ((xyz[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    return sources, np.exp(-dist2 / (2 * _TOPOGRAPHY_WIDTH**2))


def _lowpass_noise(rng: np.random.Generator, shape: tuple[int, int], cutoff: float) -> np.ndarray:
    """Standardised low-pass Gaussian noise along the last axis, sampled at ``_COARSE_RATE``."""
    sos = signal.butter(2, cutoff, fs=_COARSE_RATE, output="sos")
    z = signal.sosfiltfilt(sos, rng.standard_normal(shape), axis=-1)
    z -= z.mean(axis=-1, keepdims=True)
    return z / z.std(axis=-1, keepdims=True)


def _latent_timecourses(rng, sources, duration):
    """Amplitudes a_k and oscillation phases on a coarse grid from ``-_HISTORY`` to ``duration``.

    Returns the grid times (s, EEG clock), amplitudes and phases (sources × grid). The carrier
    frequency wanders smoothly inside each band; the phase is its running integral, so linear
    interpolation of the phase between grid points is exact for a piecewise-constant frequency.
    """
    n = int(np.ceil((duration + _HISTORY) * _COARSE_RATE)) + 2
    times = -_HISTORY + np.arange(n) / _COARSE_RATE
    k = len(sources)
    z = _lowpass_noise(rng, (k, n), _AMPLITUDE_CUTOFF)
    amplitude = np.exp(_AMPLITUDE_LOG_SD * z - _AMPLITUDE_LOG_SD**2 / 2)
    lo, hi = np.array([s.band for s in sources]).T
    wander = np.tanh(_lowpass_noise(rng, (k, n), 0.5))
    freq = (lo + hi)[:, None] / 2 + 0.4 * (hi - lo)[:, None] * wander
    phase = np.zeros((k, n))
    phase[:, 1:] = np.cumsum(freq[:, :-1], axis=1) * (2 * np.pi / _COARSE_RATE)
    phase += rng.uniform(0, 2 * np.pi, (k, 1))
    return times, amplitude, phase


def _hrf() -> np.ndarray:
    """SPM's canonical double-gamma haemodynamic response at ``_COARSE_RATE``, unit sum."""
    t = np.arange(0.0, 32.0, 1 / _COARSE_RATE)

    def gamma_pdf(shape):
        return np.exp((shape - 1) * np.log(np.maximum(t, 1e-12)) - t - special.gammaln(shape))

    h = gamma_pdf(6.0) - gamma_pdf(16.0) / 6.0
    return h / h.sum()


def _volume_truth(times, amplitude, onsets, tr):
    """Per-volume mean amplitude over each TR window and standardised HRF regressors.

    The regressor of volume v is (a_k ⊛ HRF) at the middle of its acquisition.
    """
    convolved = np.array([np.convolve(a, _hrf())[: a.size] for a in amplitude])
    regressors = np.array([np.interp(onsets + tr / 2, times, c) for c in convolved])
    regressors -= regressors.mean(axis=1, keepdims=True)
    regressors /= np.maximum(regressors.std(axis=1, keepdims=True), 1e-12)
    # exact window means from the integral of the linearly interpolated amplitude
    cumulative = np.concatenate(
        [np.zeros((amplitude.shape[0], 1)), np.cumsum((amplitude[:, 1:] + amplitude[:, :-1]) / 2, axis=1)],
        axis=1,
    ) / _COARSE_RATE
    means = np.array([(np.interp(onsets + tr, times, c) - np.interp(onsets, times, c)) / tr for c in cumulative])
    return means, regressors


# ------------------------------------------------------------------------------------------
# EEG


def _pink_sos(sfreq: float) -> np.ndarray:
    """A filter turning unit white noise into 1/f noise of ``_BACKGROUND_PSD_10HZ`` at 10 Hz.

    Alternating real poles and zeros, two of each per decade from 0.3 Hz to near Nyquist, give
    the -10 dB/decade slope over the whole band whatever the sampling rate.
    """
    f_top = 0.45 * sfreq
    poles = 0.3 * 10 ** (np.arange(0, 2 * np.log10(f_top / 0.3)) / 2)
    zeros = poles * 10**0.25
    z, p, k = signal.bilinear_zpk(-2 * np.pi * zeros, -2 * np.pi * poles, np.prod(poles / zeros), sfreq)
    sos = signal.zpk2sos(z, p, k)
    _, h10 = signal.sosfreqz(sos, worN=[10.0], fs=sfreq)
    # one-sided PSD of unit-variance white noise is 2 / sfreq
    sos[0, :3] *= np.sqrt(_BACKGROUND_PSD_10HZ * sfreq / 2) / np.abs(h10[0])
    return sos


def _smooth_fields(rng, xyz, n_fields):
    """Random smooth scalp fields (channels × fields) with random signs and widths."""
    centres = xyz[rng.integers(0, len(xyz), n_fields)]
    widths = rng.uniform(0.03, 0.08, n_fields)
    signs = rng.choice([-1.0, 1.0], n_fields)
    dist2 = ((xyz[:, None, :] - centres[None]) ** 2).sum(-1)
    return signs * np.exp(-dist2 / (2 * widths**2))


@dataclass
class _EEGRun:
    """Everything needed to generate one run's EEG, chunk by chunk, deterministically."""

    sfreq: float
    n_times: int
    topographies: np.ndarray  # channels × sources
    source_uv: np.ndarray  # sources
    times: np.ndarray  # coarse grid
    amplitude: np.ndarray
    phase: np.ndarray
    mixing: np.ndarray  # channels × background sources
    pink: np.ndarray  # sos
    line_uv: np.ndarray  # channels + ECG
    line_phase: np.ndarray
    beats: np.ndarray  # R-peak times (s)
    ecg_uv: float
    rng_background: np.random.Generator
    rng_sensor: np.random.Generator

    def chunks(self, size: int):
        """Yield (channels + ECG) × samples blocks in µV; the result does not depend on ``size``.

        Each noise stream has its own generator drawn sample-major, and the 1/f filter carries
        its state across blocks, so any block size gives the same samples.
        """
        zi = np.zeros((self.pink.shape[0], self.mixing.shape[1], 2))
        white_sd = np.sqrt(_SENSOR_PSD * self.sfreq / 2)
        n_eeg = self.topographies.shape[0]
        for start in range(0, self.n_times, size):
            n = min(size, self.n_times - start)
            t = (start + np.arange(n)) / self.sfreq
            osc = np.empty((self.source_uv.size, n))
            for k, uv in enumerate(self.source_uv):
                osc[k] = np.interp(t, self.times, self.amplitude[k])
                osc[k] *= np.cos(np.interp(t, self.times, self.phase[k]))
                osc[k] *= uv
            block = np.empty((n_eeg + 1, n))
            block[:n_eeg] = self.topographies @ osc
            background, zi = signal.sosfilt(self.pink, self.rng_background.standard_normal((n, zi.shape[1])).T, zi=zi)
            block[:n_eeg] += self.mixing @ background
            block[:n_eeg] += white_sd * self.rng_sensor.standard_normal((n, n_eeg)).T
            block[n_eeg] = self.ecg_uv * _ecg_waveform(t, self.beats)
            if np.any(self.line_uv):
                block += self.line_uv[:, None] * np.sin(2 * np.pi * LINE_FREQ * t + self.line_phase[:, None])
            yield block


_ECG_WAVES = (  # (offset, width) as fractions of the RR interval, amplitude relative to R
    (-0.20, 0.025, 0.12),  # P
    (-0.03, 0.010, -0.12),  # Q
    (0.00, 0.012, 1.00),  # R
    (0.035, 0.012, -0.25),  # S
    (0.30, 0.050, 0.30),  # T
)


def _ecg_waveform(t, beats):
    """A sum-of-Gaussians PQRST complex around each R peak, scaled by the RR interval."""
    rr = np.diff(beats, append=beats[-1] + (beats[-1] - beats[-2]))
    nxt = np.clip(np.searchsorted(beats, t), 1, beats.size - 1)
    out = np.zeros_like(t)
    for j in (nxt - 1, nxt):
        rel = (t - beats[j]) / rr[j]
        for offset, width, amp in _ECG_WAVES:
            out += amp * np.exp(-((rel - offset) ** 2) / (2 * width**2))
    return out


def _heartbeats(rng, duration):
    """R-peak times covering the recording: 55-80 bpm with 4 % beat-to-beat variability."""
    rr_mean = 60.0 / rng.uniform(55, 80)
    n = int(duration / (rr_mean * 0.8)) + 4
    rr = rr_mean * (1 + 0.04 * rng.standard_normal(n))
    return -2 * rr_mean + np.cumsum(rr)


# -- native writers: each writes the recording in its own format, streaming where it can --------


def _write_brainvision(path: Path, run: _EEGRun, ch_names, markers, meas_date, dtype):
    """BrainVision (``.vhdr``/``.vmrk``/``.eeg``) written block by block, multiplexed."""
    int16 = dtype == "int16"
    resolution = _INT16_RESOLUTION if int16 else 1.0
    with open(path.with_suffix(".eeg"), "wb") as fh:
        for block in run.chunks(_chunk_size(run)):
            if int16:
                block = np.clip(np.rint(block / resolution), -32768, 32767).astype("<i2")
            else:
                block = block.astype("<f4")
            np.ascontiguousarray(block.T).tofile(fh)
    channels = "\n".join(f"Ch{i}={name},,{resolution:g},µV" for i, name in enumerate(ch_names + [ECG_CHANNEL], 1))
    path.write_text(
        "Brain Vision Data Exchange Header File Version 2.0\n"
        f"; Data written by {GENERATOR} {__version__}\n\n"
        "[Common Infos]\nCodepage=UTF-8\n"
        f"DataFile={path.with_suffix('.eeg').name}\nMarkerFile={path.with_suffix('.vmrk').name}\n"
        "DataFormat=BINARY\nDataOrientation=MULTIPLEXED\nDataType=TIMEDOMAIN\n"
        f"NumberOfChannels={len(ch_names) + 1}\nDataPoints={run.n_times}\n"
        f"SamplingInterval={1e6 / run.sfreq:.10g}\n\n"
        f"[Binary Infos]\nBinaryFormat={'INT_16' if int16 else 'IEEE_FLOAT_32'}\n\n"
        "[Channel Infos]\n; Each entry: Ch<Channel number>=<Name>,<Reference channel name>,"
        '<Resolution in "Unit">,<Unit>\n'
        f"{channels}\n",
        encoding="utf-8",
    )
    stamp = meas_date.strftime("%Y%m%d%H%M%S") + "000000"
    lines = [f"Mk1=New Segment,,1,1,0,{stamp}"]
    mtype = {"R128": "Response", "Scan Start": "Scanner"}
    for i, (sample, desc) in enumerate(markers, 2):
        lines.append(f"Mk{i}={mtype[desc]},{desc},{sample + 1},1,0")
    path.with_suffix(".vmrk").write_text(
        "Brain Vision Data Exchange Marker File, Version 2.0\n\n"
        f"[Common Infos]\nCodepage=UTF-8\nDataFile={path.with_suffix('.eeg').name}\n\n"
        "[Marker Infos]\n; Each entry: Mk<Marker number>=<Type>,<Description>,<Position in data "
        "points>,<Size in data points>,<Channel number (0 = marker is related to all channels)>\n"
        + "\n".join(lines)
        + "\n",
        encoding="utf-8",
    )


def _write_bdf(path: Path, run: _EEGRun, ch_names, markers, meas_date):
    """BDF+C (24-bit, 1-s records) with volume markers in a ``BDF Annotations`` signal.

    No maintained Python writer exists for BDF; the layout is the EDF+ one with 3-byte samples
    and BioSemi's ``0xFF BIOSEMI`` identification.
    """
    per_record = int(run.sfreq)
    n_records = run.n_times // per_record
    onsets = [sample / run.sfreq for sample, _ in markers]
    tals = []
    for r in range(n_records):
        text = f"+{r}\x14\x14\x00"
        text += "".join(f"+{o:.6f}\x14{d}\x14\x00" for o, (_, d) in zip(onsets, markers) if r <= o < r + 1)
        tals.append(text.encode("utf-8"))
    annot_samples = -(-max(len(t) for t in tals) // 3) + 1
    annot = np.zeros((n_records, 3 * annot_samples), np.uint8)
    for r, tal in enumerate(tals):
        annot[r, : len(tal)] = np.frombuffer(tal, np.uint8)

    labels = ch_names + [ECG_CHANNEL, "BDF Annotations"]
    ns = len(labels)
    phys_lo, phys_hi = _BDF_PHYSICAL
    dig_lo, dig_hi = -(2**23), 2**23 - 1

    def field(values, width):
        return "".join(str(v)[:width].ljust(width) for v in values)

    header = (
        "BIOSEMI".ljust(7)
        + "X X X X".ljust(80)
        + f"Startdate {meas_date.strftime('%d-%b-%Y').upper()} X X {GENERATOR}".ljust(80)
        + meas_date.strftime("%d.%m.%y")
        + meas_date.strftime("%H.%M.%S")
        + str(256 * (ns + 1)).ljust(8)
        + "BDF+C".ljust(44)
        + str(n_records).ljust(8)
        + "1".ljust(8)
        + str(ns).ljust(4)
        + field(labels, 16)
        + field(["AgAgCl electrode"] * (ns - 1) + [""], 80)
        + field(["uV"] * (ns - 1) + [""], 8)
        + field([f"{phys_lo:g}"] * (ns - 1) + ["-1"], 8)
        + field([f"{phys_hi:g}"] * (ns - 1) + ["1"], 8)
        + field([dig_lo] * ns, 8)
        + field([dig_hi] * ns, 8)
        + field(["HP:DC LP:n/a"] * (ns - 1) + [""], 80)
        + field([per_record] * (ns - 1) + [annot_samples], 8)
        + field([""] * ns, 32)
    )
    gain = (dig_hi - dig_lo) / (phys_hi - phys_lo)
    record = 0
    with open(path, "wb") as fh:
        fh.write(b"\xff" + header.encode("ascii"))
        for block in run.chunks(_chunk_size(run, per_record)):
            n_rec = block.shape[1] // per_record
            digital = np.clip(np.rint((block - phys_lo) * gain + dig_lo), dig_lo, dig_hi).astype("<i4")
            # records × signals × samples, each sample the 3 low bytes of the little-endian int32
            digital = digital.reshape(len(labels) - 1, n_rec, per_record).transpose(1, 0, 2)
            packed = digital[..., None].view(np.uint8)[..., :3].reshape(n_rec, -1)
            np.concatenate([packed, annot[record : record + n_rec]], axis=1).tofile(fh)
            record += n_rec


def _raw_array(run: _EEGRun, ch_names, markers, meas_date):
    """The whole recording as an in-memory ``mne.io.RawArray`` (for the EDF and EEGLAB exports)."""
    import mne

    data = np.hstack(list(run.chunks(_chunk_size(run))))
    info = mne.create_info(ch_names + [ECG_CHANNEL], run.sfreq, ["eeg"] * len(ch_names) + ["ecg"])
    raw = mne.io.RawArray(data * 1e-6, info, verbose=False)
    raw.set_meas_date(meas_date)
    raw.set_annotations(
        mne.Annotations([s / run.sfreq for s, _ in markers], [0.0] * len(markers), [d for _, d in markers])
    )
    return raw


def _write_edf(path: Path, run: _EEGRun, ch_names, markers, meas_date):
    """EDF+ through mne's exporter (edfio), 16 bits with per-channel physical ranges."""
    import mne

    mne.export.export_raw(path, _raw_array(run, ch_names, markers, meas_date), fmt="edf", verbose=False)


def _write_set(path: Path, run: _EEGRun, ch_names, markers, meas_date):
    """EEGLAB ``.set`` through mne's exporter (eeglabio), float32 data inside the ``.set``."""
    import mne

    mne.export.export_raw(path, _raw_array(run, ch_names, markers, meas_date), fmt="eeglab", verbose=False)
    # scipy stamps the MAT-file header with the current time; a fixed text keeps runs with
    # the same seed byte-identical
    with open(path, "r+b") as fh:
        fh.write(f"MATLAB 5.0 MAT-file, written by {GENERATOR}".ljust(116).encode("ascii"))


def _chunk_size(run: _EEGRun, multiple: int = 1) -> int:
    """About 2 M samples per block (all channels), a whole number of ``multiple`` samples."""
    per_channel = max(1, 2_000_000 // (run.topographies.shape[0] + 1))
    return max(multiple, per_channel // multiple * multiple)


def _read_native(path: Path):
    import mne

    readers = {
        ".vhdr": mne.io.read_raw_brainvision,
        ".edf": mne.io.read_raw_edf,
        ".bdf": mne.io.read_raw_bdf,
        ".set": mne.io.read_raw_eeglab,
    }
    return readers[path.suffix](path, preload=False, verbose=False)


def _write_eeg_run(root: Path, native_dir: Path, entities: dict, run: _EEGRun, ch_names, markers,
                   meas_date, eeg_format: str, eeg_dtype: str) -> Path:
    """Write the native file, read it back with mne and let mne-bids copy it into the dataset."""
    from mne_bids import BIDSPath, update_sidecar_json, write_raw_bids

    native_dir.mkdir(parents=True, exist_ok=True)
    # not "eeg": mne-bids rewrites the header pointers by replacing the base name
    native = native_dir / ("recording" + EEG_FORMATS[eeg_format])
    if eeg_format == "vhdr":
        _write_brainvision(native, run, ch_names, markers, meas_date, eeg_dtype)
    else:
        {"edf": _write_edf, "bdf": _write_bdf, "set": _write_set}[eeg_format](native, run, ch_names, markers, meas_date)
    raw = _read_native(native)
    raw.set_channel_types({ECG_CHANNEL: "ecg"})
    raw.set_montage(_montage(), on_missing="ignore")
    raw.set_meas_date(meas_date)
    raw.info["line_freq"] = LINE_FREQ
    bids_path = BIDSPath(root=root, datatype="eeg", suffix="eeg", extension=EEG_FORMATS[eeg_format],
                         **{k: v for k, v in entities.items() if v is not None})
    with warnings.catch_warnings():
        # mne-bids warns about things a simulation leaves unknown on purpose (e.g. age)
        warnings.simplefilter("ignore")
        write_raw_bids(raw, bids_path, overwrite=True, verbose=False)
    update_sidecar_json(
        bids_path.copy().update(extension=".json"),
        {
            "TaskDescription": "Simulated resting state with EEG recorded inside the MRI scanner",
            "EEGReference": REFERENCE,
            "EEGGround": GROUND,
            "EEGPlacementScheme": "10-05",
            "CapManufacturer": "Brain Products",
            "CapManufacturersModelName": "BrainCap MR (simulated)",
        },
        verbose=False,
    )
    del raw
    shutil.rmtree(native_dir)
    return bids_path.fpath


# ------------------------------------------------------------------------------------------
# BOLD


def grid_affine(grid: tuple[int, int, int]) -> np.ndarray:
    """The EPI voxel-to-MNI affine: 220 mm square field of view, 144 mm slab, RAS axes."""
    shape = np.asarray(grid, float)
    zooms = np.array([220.0 / max(grid[:2])] * 2 + [144.0 / grid[2]])
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = np.array([0.0, -18.0, 18.0]) - zooms * (shape - 1) / 2
    return affine


def _template(grid):
    """The MNI152 T1 template and brain mask (bundled with nilearn), blurred to the EPI voxel size."""
    from nilearn import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = datasets.load_mni152_template(resolution=2)
        mask = datasets.load_mni152_brain_mask(resolution=2)
    zooms = np.abs(np.diag(grid_affine(grid))[:3])
    sigma = zooms / 2.355 / np.asarray(img.header.get_zooms()[:3])
    data = ndimage.gaussian_filter(np.asarray(img.dataobj, float), sigma)
    soft = ndimage.gaussian_filter(np.asarray(mask.dataobj, float), sigma)
    return data / data.max(), soft, img.affine


@dataclass
class _Anatomy:
    """One subject's EPI-grid anatomy and source maps."""

    image: np.ndarray  # (X, Y, Z) mean intensity
    mask: np.ndarray  # bool (X, Y, Z)
    maps: np.ndarray  # (X, Y, Z, K) signed fractional BOLD change per unit regressor
    scale: float  # intensity scale, the reference of noise and drifts
    shift: np.ndarray  # head position (mm)


def _subject_anatomy(rng, template, grid, sources) -> _Anatomy:
    data, soft, t_affine = template
    shift = np.clip(rng.normal(0.0, 2.0, 3), -4.0, 4.0)
    scale = rng.uniform(600.0, 1000.0)
    contrast = rng.uniform(0.8, 1.25)
    affine = grid_affine(grid)
    ijk = np.indices(grid, dtype=float).reshape(3, -1)
    # MNI coordinates of each EPI voxel in the subject's (shifted) head
    mni = affine[:3, :3] @ ijk + affine[:3, 3:] - shift[:, None]
    tvox = np.linalg.solve(t_affine[:3, :3], mni - t_affine[:3, 3:])
    anat = ndimage.map_coordinates(data, tvox, order=1, cval=0.0).reshape(grid)
    brain = np.clip(ndimage.map_coordinates(soft, tvox, order=1, cval=0.0).reshape(grid), 0.0, 1.0)
    maps = np.empty((*grid, len(sources)), np.float32)
    for k, s in enumerate(sources):
        d2 = ((mni - np.asarray(s.mni)[:, None]) ** 2).sum(0).reshape(grid)
        maps[..., k] = s.bold_change * np.exp(-d2 / (2 * _MAP_WIDTH**2)) * brain
    return _Anatomy(scale * np.maximum(anat, 0.0) ** contrast, brain > 0.5, maps, scale, shift)


def _write_bold_run(path: Path, rng, anatomy: _Anatomy, regressors, tr, task):
    """Write the 4-D BOLD series (int16, TR in pixdim[4]) and its sidecar."""
    import nibabel as nib

    grid = anatomy.image.shape
    n_vol = regressors.shape[1]
    # voxels in F order (x fastest), the order of the NIfTI file, so that the output array's
    # 2-D view below is a plain reshape
    image = anatomy.image.ravel(order="F").astype(np.float32)
    inside = np.flatnonzero(image > 0)
    image = image[inside]
    maps = np.ascontiguousarray(anatomy.maps.reshape(-1, anatomy.maps.shape[-1], order="F")[inside].T)
    # slow scanner drifts with a smooth spatial profile, and a global signal
    ijk = (np.indices(grid, dtype=np.float32).reshape(3, -1, order="F").T / np.asarray(grid) - 0.5)[inside]
    drift_lin = 0.01 * rng.standard_normal() + ijk @ (0.01 * rng.standard_normal(3)).astype(np.float32)
    drift_quad = 0.005 * rng.standard_normal() + ijk @ (0.005 * rng.standard_normal(3)).astype(np.float32)
    global_signal = 0.004 * _global_signal(rng, n_vol, tr)
    tau = np.linspace(-1.0, 1.0, n_vol)
    noise_sd = np.float32(_BOLD_NOISE * anatomy.scale)
    out = np.empty((*grid, n_vol), np.int16, order="F")
    flat = out.reshape(-1, n_vol, order="F")
    step = max(1, 4_000_000 // flat.shape[0])
    for v0 in range(0, n_vol, step):
        v = slice(v0, min(v0 + step, n_vol))
        col = np.s_[:, None]
        modulation = regressors[:, v].T.astype(np.float32) @ maps  # volumes × voxels inside
        modulation += (1.0 + global_signal[v]).astype(np.float32)[col]
        modulation += tau[v].astype(np.float32)[col] * drift_lin
        modulation += (tau[v] ** 2 - 1 / 3).astype(np.float32)[col] * drift_quad
        modulation *= image
        # volume after volume from the generator, so the block size does not change the data
        volumes = rng.standard_normal((modulation.shape[0], flat.shape[0]), dtype=np.float32)
        volumes *= noise_sd
        volumes[:, inside] += modulation
        # magnitude images: the noise floor outside the head is Rician, never negative
        np.abs(volumes, out=volumes)
        np.rint(volumes, out=volumes)
        np.minimum(volumes, 32767, out=volumes)
        flat[:, v] = volumes.T
    img = nib.Nifti1Image(out, grid_affine(grid))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((*img.header.get_zooms()[:3], float(tr)))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    write_json(
        path.with_name(path.name.replace(".nii.gz", ".json")),
        {
            "TaskName": task,
            "RepetitionTime": float(tr),
            "EchoTime": 0.03,
            "MagneticFieldStrength": 3,
            "SkullStripped": False,
            "TaskDescription": "Simulated resting state; EEG was recorded simultaneously",
        },
    )


def _global_signal(rng, n_vol, tr):
    """A standardised global BOLD fluctuation below 0.1 Hz, one value per volume."""
    cutoff = min(0.1, 0.4 / tr)
    sos = signal.butter(2, cutoff, fs=1.0 / tr, output="sos")
    z = signal.sosfiltfilt(sos, rng.standard_normal(n_vol + 60))[30:-30]
    return (z - z.mean()) / max(z.std(), 1e-12)


# ------------------------------------------------------------------------------------------
# dataset


_STREAM_ANATOMY, _STREAM_LATENT, _STREAM_EEG, _STREAM_BACKGROUND, _STREAM_SENSOR, _STREAM_BOLD = range(1, 7)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator per purpose, subject, session and run.

    Keying the streams (rather than drawing from one generator in loop order) keeps subject 1
    identical whatever the number of subjects, sessions or runs.
    """
    return np.random.default_rng([seed, *keys])


@dataclass(frozen=True)
class _Options:
    subjects: int
    sessions: int
    runs: int
    task: str
    volumes: int
    tr: float
    sfreq: float
    channels: int
    grid: tuple[int, int, int]
    eeg_format: str
    volume_marker: str
    eeg_only_subjects: int
    bold_only_subjects: int
    sources: int
    eeg_offset: float
    eeg_dtype: str
    seed: int

    @property
    def eeg_duration(self) -> int:
        """Whole seconds of EEG: the offset, every volume and at least one TR of tail."""
        return int(np.ceil(self.eeg_offset + (self.volumes + 1) * self.tr - 1e-9))

    def kind(self, subject: int) -> str:
        """``eeg+bold``, ``eeg`` or ``bold``: EEG-only and BOLD-only subjects come last."""
        if subject > self.subjects - self.bold_only_subjects:
            return "bold"
        if subject > self.subjects - self.bold_only_subjects - self.eeg_only_subjects:
            return "eeg"
        return "eeg+bold"


def _check_options(**opts) -> _Options:
    """Validate simulation options; every problem is a :class:`UsageError` naming the option."""

    def integer(name, low):
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be an integer >= {low} (got {value!r})")
        return int(value)

    def positive(name):
        value = opts[name]
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = float("nan")
        if not np.isfinite(value) or value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number (got {opts[name]!r})")
        return value

    subjects = integer("subjects", 1)
    sessions = integer("sessions", 0)
    runs = integer("runs", 1)
    volumes = integer("volumes", 1)
    channels = integer("channels", 1)
    n_sources = integer("sources", 1)
    eeg_only = integer("eeg_only_subjects", 0)
    bold_only = integer("bold_only_subjects", 0)
    seed = integer("seed", 0)
    tr, sfreq = positive("tr"), positive("sfreq")
    task = str(opts["task"])
    if not task.isalnum() or not task.isascii():
        raise UsageError(f"--task must be a BIDS label (letters and digits only; got {task!r})")
    try:
        grid = tuple(int(g) for g in opts["grid"])
    except (TypeError, ValueError):
        grid = ()
    if len(grid) != 3 or min(grid) < 4:
        raise UsageError(f"--grid needs three integers >= 4 (got {opts['grid']!r})")
    if opts["eeg_format"] not in EEG_FORMATS:
        raise UsageError(f"--eeg-format must be one of {', '.join(EEG_FORMATS)} (got {opts['eeg_format']!r})")
    if opts["volume_marker"] not in VOLUME_MARKERS:
        raise UsageError(f"--volume-marker must be one of R128, 'Scan Start', none (got {opts['volume_marker']!r})")
    if opts["eeg_dtype"] not in ("float32", "int16"):
        raise UsageError(f"--eeg-dtype must be float32 or int16 (got {opts['eeg_dtype']!r})")
    if opts["eeg_dtype"] == "int16" and opts["eeg_format"] != "vhdr":
        raise UsageError("--eeg-dtype int16 applies to --eeg-format vhdr only (EDF is 16-bit and BDF 24-bit)")
    if eeg_only + bold_only > subjects:
        raise UsageError(
            f"--eeg-only-subjects plus --bold-only-subjects ({eeg_only + bold_only}) exceed --subjects ({subjects})"
        )
    if n_sources > MAX_SOURCES:
        raise UsageError(f"--sources must be at most {MAX_SOURCES} (got {n_sources})")
    top = max(s.band[1] for s in _SOURCES[:n_sources])
    if top >= 0.45 * sfreq:
        raise UsageError(
            f"--sfreq {sfreq:g} is too low for {n_sources} sources (their bands reach {top:g} Hz); "
            f"use --sfreq > {top / 0.45:.0f} or fewer --sources"
        )
    if tr * sfreq < 2:
        raise UsageError(f"--tr {tr:g} s is shorter than two EEG samples at --sfreq {sfreq:g}")
    if opts["eeg_format"] in ("edf", "bdf") and sfreq != int(sfreq):
        raise UsageError(f"--eeg-format {opts['eeg_format']} needs an integer --sfreq (got {sfreq:g})")
    offset = opts["eeg_offset"]
    if offset is None:
        # without markers the EEG can only be aligned by starting it with the first volume
        offset = 0.0 if opts["volume_marker"] == "none" else 2.0
    try:
        offset = float(offset)
    except (TypeError, ValueError):
        offset = float("nan")
    if not np.isfinite(offset) or offset < 0:
        raise UsageError(f"--eeg-offset must be a number of seconds >= 0 (got {opts['eeg_offset']!r})")
    channel_names(channels)
    return _Options(subjects, sessions, runs, task, volumes, tr, sfreq, channels, grid, opts["eeg_format"],
                    opts["volume_marker"], eeg_only, bold_only, n_sources, offset, opts["eeg_dtype"], seed)


def simulate_dataset(
    out_dir: str | Path,
    *,
    subjects: int = 4,
    sessions: int = 0,
    runs: int = 1,
    task: str = "rest",
    volumes: int = 150,
    tr: float = 2.0,
    sfreq: float = 250.0,
    channels: int = 64,
    grid: tuple[int, int, int] = (64, 64, 32),
    eeg_format: str = "vhdr",
    volume_marker: str = "R128",
    eeg_only_subjects: int = 0,
    bold_only_subjects: int = 0,
    sources: int = 6,
    eeg_offset: float | None = None,
    eeg_dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
    progress=None,
) -> Path:
    """Write a simultaneous EEG-fMRI BIDS dataset with a known EEG→BOLD coupling.

    Parameters
    ----------
    out_dir : path-like
        The dataset folder; it must not exist or be empty (see ``overwrite``).
    subjects, sessions, runs : int
        Numbers of subjects (``sub-01``…), sessions (0: no ``ses-`` level; otherwise ``ses-1``…)
        and runs per session (the ``run-`` entity appears when there are several).
    task : str
        The task label.
    volumes : int
        BOLD volumes per run.
    tr : float
        Repetition time (s).
    sfreq : float
        EEG sampling rate (Hz).
    channels : int
        EEG channels (10-20/10-05 names in cap order, see :func:`channel_names`); one ECG
        channel is added.
    grid : tuple of int
        The BOLD voxel grid (X, Y, Z).
    eeg_format : {'vhdr', 'edf', 'bdf', 'set'}
        The EEG file format.
    volume_marker : {'R128', 'Scan Start', 'none'}
        One marker per volume as BrainAmp (``Response/R128`` in BrainVision files), the NODDI
        study (``Scanner/Scan Start``) or none at all.
    eeg_only_subjects, bold_only_subjects : int
        How many of the last subjects have only EEG, or only BOLD.
    sources : int
        Number of latent sources (at most 8).
    eeg_offset : float | None
        Seconds of EEG before the first volume (where the first marker is). ``None``: 2 s, or
        0 s with ``volume_marker='none'`` so that the EEG starts with the first volume.
    eeg_dtype : {'float32', 'int16'}
        Sample format of BrainVision files; ``int16`` stores 0.1 µV steps, as BrainAmp.
    seed : int
        The same seed gives byte-identical files.
    overwrite : bool
        Replace ``out_dir`` if it holds a dataset written by this simulator.
    progress : callable | None
        Called with one line of text per run written.

    Returns
    -------
    Path
        ``out_dir``. The dataset is built in a hidden sibling folder and renamed into place, so
        an interrupted simulation leaves nothing under ``out_dir``.
    """
    opts = _check_options(
        subjects=subjects, sessions=sessions, runs=runs, task=task, volumes=volumes, tr=tr, sfreq=sfreq,
        channels=channels, grid=grid, eeg_format=eeg_format, volume_marker=volume_marker,
        eeg_only_subjects=eeg_only_subjects, bold_only_subjects=bold_only_subjects, sources=sources,
        eeg_offset=eeg_offset, eeg_dtype=eeg_dtype, seed=seed,
    )
    out_dir = Path(out_dir)
    replace = _check_output(out_dir, overwrite)
    target = out_dir.absolute()
    # No ".<name>" pattern: mne-bids takes any path containing ".ds" for a CTF recording.
    partial = target.parent / f".partial-{os.getpid()}-{target.name}"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _build(partial, opts, progress or (lambda line: None))
        if replace:
            shutil.rmtree(target)
        elif target.exists():
            target.rmdir()
        os.replace(partial, target)
    except OSError as exc:
        code = EX_IOERR if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else EX_CANTCREAT
        raise OutputError(f"cannot write the dataset ({exc.strerror or exc})", path=out_dir, code=code) from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out_dir


def _check_output(out_dir: Path, overwrite: bool) -> bool:
    """Refuse a non-empty ``out_dir`` unless ``overwrite`` and it is one of our datasets."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise OutputError("exists and is not a folder; choose another OUT_DIR", path=out_dir)
    if not any(out_dir.iterdir()):
        return False
    if not overwrite:
        raise OutputError("exists and is not empty; choose a new OUT_DIR or pass --overwrite", path=out_dir)
    try:
        generated = json.loads((out_dir / "dataset_description.json").read_text())["GeneratedBy"]
        ours = any(g.get("Name") == GENERATOR for g in generated)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ours = False
    if not ours:
        raise OutputError(
            f"is not a dataset written by {GENERATOR}; --overwrite only replaces those, so remove it yourself",
            path=out_dir,
        )
    return True


def _build(root: Path, opts: _Options, progress) -> None:
    ch_names = channel_names(opts.channels)
    sources, topographies = _source_table(opts.sources, ch_names)
    truth = root / "derivatives" / "simulation"
    _write_dataset_files(root, truth, opts, sources, ch_names, topographies)
    template = _template(opts.grid) if opts.eeg_only_subjects < opts.subjects else None
    width = max(2, len(str(opts.subjects)))
    sessions = [None] if opts.sessions == 0 else [str(j) for j in range(1, opts.sessions + 1)]
    run_labels = [None] if opts.runs == 1 else [str(r) for r in range(1, opts.runs + 1)]
    onsets = opts.eeg_offset + np.arange(opts.volumes) * opts.tr
    n_times = int(round(opts.eeg_duration * opts.sfreq))
    marker_samples = np.rint(onsets * opts.sfreq).astype(int)
    markers = [] if opts.volume_marker == "none" else [(int(s), opts.volume_marker) for s in marker_samples]
    participants, scans = [], {}
    for i in range(1, opts.subjects + 1):
        label = f"{i:0{width}d}"
        kind = opts.kind(i)
        participants.append(_participant(_rng(opts.seed, _STREAM_ANATOMY, i), label, kind))
        anatomy = None
        if "bold" in kind:
            anatomy = _subject_anatomy(_rng(opts.seed, _STREAM_ANATOMY, i, 1), template, opts.grid, sources)
            _write_maps(truth, label, anatomy, opts.grid, sources)
        for j, session in enumerate(sessions):
            for r, run in enumerate(run_labels):
                entities = {"subject": label, "session": session, "task": opts.task, "run": run}
                keys = (i, j, r)
                meas_date = _BASE_DATE + datetime.timedelta(days=i + 28 * j, minutes=15 * r)
                times, amplitude, phase = _latent_timecourses(
                    _rng(opts.seed, _STREAM_LATENT, *keys), sources, opts.eeg_duration
                )
                means, regressors = _volume_truth(times, amplitude, onsets, opts.tr)
                _write_run_truth(truth, entities, sources, times, amplitude, onsets, means, regressors, opts)
                scan_rows = scans.setdefault(_scans_path(root, entities), [])
                if "eeg" in kind:
                    run_eeg = _eeg_run(opts, keys, ch_names, sources, topographies, times, amplitude, phase, n_times)
                    path = _write_eeg_run(root, root / ".native", entities, run_eeg, ch_names, markers, meas_date,
                                          opts.eeg_format, opts.eeg_dtype)
                    scan_rows.append((f"eeg/{path.name}", meas_date))
                if anatomy is not None:
                    name = bids_name(entities, "bold", ".nii.gz")
                    _write_bold_run(run_dir(root, entities, "func") / name, _rng(opts.seed, _STREAM_BOLD, *keys),
                                    anatomy, regressors, opts.tr, opts.task)
                    scan_rows.append((f"func/{name}", meas_date + datetime.timedelta(seconds=opts.eeg_offset)))
                progress(f"{bids_name(entities, '', '').rstrip('_')}: "
                         + {"eeg+bold": "EEG and BOLD", "eeg": "EEG only", "bold": "BOLD only"}[kind])
    _write_participants(root, participants)
    for path, rows in scans.items():
        lines = ["filename\tacq_time"] + [f"{f}\t{d.strftime('%Y-%m-%dT%H:%M:%S')}" for f, d in rows]
        write_text(path, "\n".join(lines) + "\n")


def _scans_path(root: Path, entities: dict) -> Path:
    folder = run_dir(root, entities, "eeg").parent
    return folder / bids_name({"subject": entities["subject"], "session": entities["session"]}, "scans", ".tsv")


def _eeg_run(opts, keys, ch_names, sources, topographies, times, amplitude, phase, n_times) -> _EEGRun:
    rng = _rng(opts.seed, _STREAM_EEG, *keys)
    positions = _montage().get_positions()["ch_pos"]
    xyz = np.array([positions[n] for n in ch_names])
    mixing = _smooth_fields(rng, xyz, _BACKGROUND_SOURCES)
    # unit mean variance per channel, so that the background PSD is the nominal one on average
    mixing /= np.sqrt((mixing**2).sum(axis=1).mean())
    has_line = LINE_FREQ < 0.45 * opts.sfreq
    line_uv = rng.uniform(0.5, 3.0, len(ch_names) + 1) * has_line
    return _EEGRun(
        sfreq=opts.sfreq,
        n_times=n_times,
        topographies=topographies,
        source_uv=np.array([s.eeg_uv for s in sources]),
        times=times,
        amplitude=amplitude,
        phase=phase,
        mixing=mixing,
        pink=_pink_sos(opts.sfreq),
        line_uv=line_uv,
        line_phase=rng.uniform(0, 2 * np.pi, len(ch_names) + 1),
        beats=_heartbeats(rng, opts.eeg_duration + 4.0),
        ecg_uv=rng.uniform(600.0, 1200.0),
        rng_background=_rng(opts.seed, _STREAM_BACKGROUND, *keys),
        rng_sensor=_rng(opts.seed, _STREAM_SENSOR, *keys),
    )


def _participant(rng, label, kind) -> dict:
    return {
        "participant_id": f"sub-{label}",
        "age": int(rng.integers(20, 41)),
        "sex": str(rng.choice(["F", "M"])),
        "handedness": "R",
        "recordings": kind,
    }


def _write_participants(root: Path, participants: list[dict]) -> None:
    columns = list(participants[0])
    lines = ["\t".join(columns)] + ["\t".join(str(p[c]) for c in columns) for p in participants]
    write_text(root / "participants.tsv", "\n".join(lines) + "\n")
    write_json(
        root / "participants.json",
        {
            "participant_id": {"Description": "Unique participant identifier"},
            "age": {"Description": "Age of the participant", "Units": "year"},
            "sex": {"Description": "Sex of the participant", "Levels": {"F": "female", "M": "male"}},
            "handedness": {"Description": "Handedness of the participant", "Levels": {"R": "right"}},
            "recordings": {
                "Description": "Which recordings the simulation made for this participant",
                "Levels": {"eeg+bold": "simultaneous EEG and BOLD", "eeg": "EEG only", "bold": "BOLD only"},
            },
        },
    )


def _generated_by() -> list[dict]:
    return [{"Name": GENERATOR, "Version": __version__, "CodeURL": "https://github.com/spec2vol/spec2vol"}]


def _write_dataset_files(root, truth, opts: _Options, sources, ch_names, topographies) -> None:
    """Top-level files of the raw dataset and of the ground-truth derivative."""
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.__dict__.items()}
    write_json(
        root / "dataset_description.json",
        {
            "Name": "spec2vol simulated simultaneous EEG-fMRI",
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": [GENERATOR],
            "GeneratedBy": _generated_by(),
        },
    )
    write_text(root / "README", _readme(opts))
    write_json(
        truth / "dataset_description.json",
        {
            "Name": "Ground truth of the spec2vol simulation",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": _generated_by(),
        },
    )
    write_json(
        truth / "sources.json",
        {
            "Parameters": params,
            "Sources": [
                {
                    "Name": f"source-{k}",
                    "Band": s.band_name,
                    "FrequencyBand": list(s.band),
                    "EEGAmplitude": s.eeg_uv,
                    "EEGAmplitudeUnits": "µV at the topography peak for a_k = 1",
                    "TopographyCentre": s.electrode,
                    "MapCentreMNI": list(s.mni),
                    "MapSigma": _MAP_WIDTH,
                    "BOLDChange": s.bold_change,
                }
                for k, s in enumerate(sources, 1)
            ],
            "Amplitude": "a_k = exp(0.5 z - 0.125), z standardised Gaussian noise low-passed at 0.08 Hz "
                         "(mean 1); subject- and run-specific",
            "HRF": "SPM canonical double gamma (peaks at 6 s and 16 s, ratio 1/6); the regressor of a "
                   "volume is (a_k * HRF) at the middle of its acquisition, standardised per run",
            "BOLD": "anatomy * (1 + sum_k map_k * regressor_k + global + drift) + thermal noise (magnitude)",
            "EEG": "sum_k topography_k * EEGAmplitude_k * a_k(t) * cos(phase_k(t)) + 1/f background "
                   "+ white amplifier noise + 50 Hz line noise; ECG channel separate",
        },
    )
    header = "name\t" + "\t".join(f"source-{k}" for k in range(1, len(sources) + 1))
    rows = [name + "\t" + "\t".join(f"{w:.6f}" for w in row) for name, row in zip(ch_names, topographies)]
    write_text(truth / "topographies.tsv", "\n".join([header] + rows) + "\n")


def _readme(opts: _Options) -> str:
    grid = " ".join(map(str, opts.grid))
    return (
        "# spec2vol simulated simultaneous EEG-fMRI dataset\n\n"
        f"Written by {GENERATOR} {__version__}. Every signal is synthetic; nothing was recorded.\n\n"
        f"{opts.subjects} subjects, {opts.sessions or 'no'} sessions, {opts.runs} run(s) of task '{opts.task}': "
        f"{opts.volumes} BOLD volumes (TR {opts.tr:g} s, grid {grid}) and EEG ({opts.channels} channels + ECG, "
        f"{opts.sfreq:g} Hz, {opts.eeg_format}) starting {opts.eeg_offset:g} s before the first volume; "
        f"volume markers: {opts.volume_marker}"
        + (" (the EEG starts with the first volume: process it with --eeg-offset 0)"
           if opts.volume_marker == "none" else "") + ".\n\n"
        f"{opts.sources} latent sources drive both signals: each has a slowly varying amplitude that sets "
        "the power of an EEG oscillation (its own frequency band and scalp topography) and, convolved "
        "with the canonical HRF, modulates the BOLD signal in a blob-shaped map. The ground truth "
        "(amplitudes, regressors, maps, topographies) is in derivatives/simulation/.\n\n"
        "Regenerate with:\n\n"
        f"    {GENERATOR} OUT_DIR --subjects {opts.subjects} --sessions {opts.sessions} --runs {opts.runs} "
        f"--task {opts.task} --volumes {opts.volumes} --tr {opts.tr:g} --sfreq {opts.sfreq:g} "
        f"--channels {opts.channels} --grid {grid} --eeg-format {opts.eeg_format} "
        f"--volume-marker '{opts.volume_marker}' --eeg-only-subjects {opts.eeg_only_subjects} "
        f"--bold-only-subjects {opts.bold_only_subjects} --sources {opts.sources} "
        f"--eeg-offset {opts.eeg_offset:g} --eeg-dtype {opts.eeg_dtype} --seed {opts.seed}\n"
    )


def _write_maps(truth: Path, label: str, anatomy: _Anatomy, grid, sources) -> None:
    import nibabel as nib

    folder = truth / f"sub-{label}" / "func"
    folder.mkdir(parents=True, exist_ok=True)
    affine = grid_affine(grid)
    maps = nib.Nifti1Image(anatomy.maps, affine)
    maps.header.set_xyzt_units("mm")
    nib.save(maps, folder / f"sub-{label}_desc-sources_map.nii.gz")
    write_json(
        folder / f"sub-{label}_desc-sources_map.json",
        {
            "Description": "Signed fractional BOLD change per unit regressor, one volume per source",
            "Sources": [f"source-{k}" for k in range(1, len(sources) + 1)],
            "HeadShift": anatomy.shift,
        },
    )
    nib.save(nib.Nifti1Image(anatomy.mask.astype(np.uint8), affine), folder / f"sub-{label}_desc-brain_mask.nii.gz")


def _write_run_truth(truth, entities, sources, times, amplitude, onsets, means, regressors, opts) -> None:
    names = [f"source-{k}" for k in range(1, len(sources) + 1)]
    eeg_dir = run_dir(truth, entities, "eeg")
    eeg_dir.mkdir(parents=True, exist_ok=True)
    name = bids_name(entities, "timeseries", ".tsv", desc="amplitudes")
    _write_table(eeg_dir / name, ["time"] + names, np.vstack([times, amplitude]).T)
    write_json(
        eeg_dir / name.replace(".tsv", ".json"),
        {
            "Description": "Latent source amplitudes a_k(t) on the EEG clock (0 = first EEG sample); "
                           "negative times precede the recording and feed the HRF of the first volumes",
            "SamplingFrequency": _COARSE_RATE,
            "StartTime": float(times[0]),
        },
    )
    func_dir = run_dir(truth, entities, "func")
    func_dir.mkdir(parents=True, exist_ok=True)
    name = bids_name(entities, "timeseries", ".tsv", desc="volumes")
    columns = ["onset"] + [f"amplitude_{n}" for n in names] + [f"regressor_{n}" for n in names]
    _write_table(func_dir / name, columns, np.vstack([onsets, means, regressors]).T)
    write_json(
        func_dir / name.replace(".tsv", ".json"),
        {
            "onset": {"Description": "Start of the volume on the EEG clock", "Units": "s"},
            "amplitude": "amplitude_<source>: mean a_k over the volume's TR window [onset, onset + TR)",
            "regressor": "regressor_<source>: (a_k * HRF) at onset + TR/2, standardised over the run",
            "RepetitionTime": opts.tr,
        },
    )


def _write_table(path: Path, columns, values) -> None:
    lines = ["\t".join(columns)] + ["\t".join(f"{x:.6g}" for x in row) for row in values]
    write_text(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 64, no usage dump
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=GENERATOR,
        description="Write a simulated simultaneous EEG-fMRI BIDS dataset whose EEG predicts its BOLD "
                    "signal, with the ground truth under derivatives/simulation/.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="the dataset folder to create")
    p.add_argument("--subjects", type=int, default=4, help="number of subjects (default 4)")
    p.add_argument("--sessions", type=int, default=0, help="sessions per subject; 0: no ses- level (default 0)")
    p.add_argument("--runs", type=int, default=1, help="runs per session (default 1)")
    p.add_argument("--task", default="rest", help="task label (default rest)")
    p.add_argument("--volumes", type=int, default=150, help="BOLD volumes per run (default 150)")
    p.add_argument("--tr", type=float, default=2.0, help="repetition time in s (default 2.0)")
    p.add_argument("--sfreq", type=float, default=250.0, help="EEG sampling rate in Hz (default 250)")
    p.add_argument("--channels", type=int, default=64, help="EEG channels, plus one ECG (default 64)")
    p.add_argument("--grid", type=int, nargs=3, default=(64, 64, 32), metavar=("X", "Y", "Z"),
                   help="BOLD grid (default 64 64 32)")
    p.add_argument("--eeg-format", choices=list(EEG_FORMATS), default="vhdr", help="EEG file format (default vhdr)")
    p.add_argument("--volume-marker", choices=VOLUME_MARKERS, default="R128",
                   help="volume marker in the EEG: R128 (BrainAmp), 'Scan Start' (NODDI) or none (default R128)")
    p.add_argument("--eeg-only-subjects", type=int, default=0, help="subjects with EEG but no BOLD (default 0)")
    p.add_argument("--bold-only-subjects", type=int, default=0, help="subjects with BOLD but no EEG (default 0)")
    p.add_argument("--sources", type=int, default=6, help=f"latent sources, 1 to {MAX_SOURCES} (default 6)")
    p.add_argument("--eeg-offset", type=float, default=None,
                   help="seconds of EEG before the first volume (default 2, or 0 with --volume-marker none)")
    p.add_argument("--eeg-dtype", choices=["float32", "int16"], default="float32",
                   help="BrainVision sample format; int16 stores 0.1 µV steps (default float32)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds a dataset written by this command")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``spec2vol-simulate``; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
        start = time.perf_counter()
        opts = {k: v for k, v in vars(args).items() if k not in ("out_dir", "overwrite")}
        out = simulate_dataset(args.out_dir, overwrite=args.overwrite, progress=print, **opts)
    except Spec2VolError as exc:
        print(f"{GENERATOR}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{GENERATOR}: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"Simulated dataset written to {out.resolve()} in {time.perf_counter() - start:.1f} s "
          f"(ground truth in {out.resolve() / 'derivatives' / 'simulation'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
