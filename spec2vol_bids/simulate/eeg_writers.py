"""The simulated EEG: one run's samples, block by block, and the files they are written to.

A run's EEG is the latent sources' oscillations (:mod:`.latent`) seen through their scalp
topographies, plus 1/f background activity, amplifier noise, 50 Hz line noise and an ECG
channel. It is written natively as BrainVision, BDF, EDF or EEGLAB, read back with mne and
copied into the dataset by mne-bids.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from spec2vol_bids import __version__
from spec2vol_bids.simulate.latent import electrode_positions

GENERATOR = "spec2vol-simulate"

REFERENCE, GROUND = "FCz", "AFz"
ECG_CHANNEL = "ECG"
LINE_FREQ = 50.0

VOLUME_MARKERS = ("R128", "Scan Start", "none")
EEG_FORMATS = {"vhdr": ".vhdr", "edf": ".edf", "bdf": ".bdf", "set": ".set"}
EEG_DTYPES = ("float32", "int16")

_BACKGROUND_SOURCES = 12
_BACKGROUND_PSD_10HZ = 1.0  # µV²/Hz of the 1/f background at 10 Hz
_SENSOR_PSD = 0.005  # µV²/Hz of white amplifier noise
_INT16_RESOLUTION = 0.1  # µV per bit, as BrainAmp amplifiers in their ±3.2 mV range
_BDF_PHYSICAL = (-262144.0, 262143.0)  # µV, BioSemi's range (31.25 nV per bit)


# ------------------------------------------------------------------------------------------
# samples


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
class EEGRun:
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
            block = np.empty((n_eeg + 1, n))
            block[:n_eeg] = self.topographies @ self._oscillations(t)
            background, zi = signal.sosfilt(self.pink, self.rng_background.standard_normal((n, zi.shape[1])).T, zi=zi)
            block[:n_eeg] += self.mixing @ background
            block[:n_eeg] += white_sd * self.rng_sensor.standard_normal((n, n_eeg)).T
            block[n_eeg] = self.ecg_uv * _ecg_waveform(t, self.beats)
            if np.any(self.line_uv):
                block += self.line_uv[:, None] * np.sin(2 * np.pi * LINE_FREQ * t + self.line_phase[:, None])
            yield block

    def _oscillations(self, t: np.ndarray) -> np.ndarray:
        """The sources' oscillations (sources × samples, µV at the topography peaks) at ``t``."""
        osc = np.empty((self.source_uv.size, t.size))
        for k, uv in enumerate(self.source_uv):
            osc[k] = np.interp(t, self.times, self.amplitude[k])
            osc[k] *= np.cos(np.interp(t, self.times, self.phase[k]))
            osc[k] *= uv
        return osc


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


def eeg_run(rngs, *, sfreq, n_times, duration, ch_names, sources, topographies, latent) -> EEGRun:
    """One run's EEG generator.

    Parameters
    ----------
    rngs : tuple of numpy.random.Generator
        The run's generators for its fixed draws (background fields, line noise, heart), its
        1/f background and its amplifier noise.
    sfreq : float
        Sampling rate (Hz).
    n_times : int
        Samples in the recording.
    duration : float
        Length of the recording (s), which the heartbeats must cover.
    ch_names : list of str
        The EEG channels (the ECG channel comes after them).
    sources : list of Source
    topographies : ndarray, shape (channels, sources)
    latent : tuple of ndarray
        ``times, amplitude, phase`` from :func:`~.latent.latent_timecourses`.

    Returns
    -------
    EEGRun
    """
    rng, rng_background, rng_sensor = rngs
    times, amplitude, phase = latent
    mixing = _smooth_fields(rng, electrode_positions(ch_names), _BACKGROUND_SOURCES)
    # unit mean variance per channel, so that the background PSD is the nominal one on average
    mixing /= np.sqrt((mixing**2).sum(axis=1).mean())
    has_line = LINE_FREQ < 0.45 * sfreq
    line_uv = rng.uniform(0.5, 3.0, len(ch_names) + 1) * has_line
    return EEGRun(
        sfreq=sfreq,
        n_times=n_times,
        topographies=topographies,
        source_uv=np.array([s.eeg_uv for s in sources]),
        times=times,
        amplitude=amplitude,
        phase=phase,
        mixing=mixing,
        pink=_pink_sos(sfreq),
        line_uv=line_uv,
        line_phase=rng.uniform(0, 2 * np.pi, len(ch_names) + 1),
        beats=_heartbeats(rng, duration + 4.0),
        ecg_uv=rng.uniform(600.0, 1200.0),
        rng_background=rng_background,
        rng_sensor=rng_sensor,
    )


def _chunk_size(run: EEGRun, multiple: int = 1) -> int:
    """About 2 M samples per block (all channels), a whole number of ``multiple`` samples."""
    per_channel = max(1, 2_000_000 // (run.topographies.shape[0] + 1))
    return max(multiple, per_channel // multiple * multiple)


# ------------------------------------------------------------------------------------------
# native writers: each writes the recording in its own format, streaming where it can


def _write_brainvision(path: Path, run: EEGRun, ch_names, markers, meas_date, dtype):
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


def _bdf_annotations(markers, sfreq: float, n_records: int) -> np.ndarray:
    """The ``BDF Annotations`` signal: records × bytes, a time-keeping TAL plus the record's
    markers, zero-padded to a whole number of 3-byte samples (at least one spare)."""
    onsets = [sample / sfreq for sample, _ in markers]
    tals = []
    for r in range(n_records):
        text = f"+{r}\x14\x14\x00"
        text += "".join(f"+{o:.6f}\x14{d}\x14\x00" for o, (_, d) in zip(onsets, markers) if r <= o < r + 1)
        tals.append(text.encode("utf-8"))
    annot_samples = -(-max(len(t) for t in tals) // 3) + 1
    annot = np.zeros((n_records, 3 * annot_samples), np.uint8)
    for r, tal in enumerate(tals):
        annot[r, : len(tal)] = np.frombuffer(tal, np.uint8)
    return annot


def _bdf_header(labels, meas_date, n_records: int, per_record: int, annot_samples: int,
                digital: tuple[int, int]) -> str:
    """The BDF+C header after its first byte: 1-s records, the last signal the annotations."""
    ns = len(labels)
    phys_lo, phys_hi = _BDF_PHYSICAL

    def field(values, width):
        return "".join(str(v)[:width].ljust(width) for v in values)

    return (
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
        + field([digital[0]] * ns, 8)
        + field([digital[1]] * ns, 8)
        + field(["HP:DC LP:n/a"] * (ns - 1) + [""], 80)
        + field([per_record] * (ns - 1) + [annot_samples], 8)
        + field([""] * ns, 32)
    )


def _write_bdf(path: Path, run: EEGRun, ch_names, markers, meas_date):
    """BDF+C (24-bit, 1-s records) with volume markers in a ``BDF Annotations`` signal.

    No maintained Python writer exists for BDF; the layout is the EDF+ one with 3-byte samples
    and BioSemi's ``0xFF BIOSEMI`` identification.
    """
    per_record = int(run.sfreq)
    n_records = run.n_times // per_record
    annot = _bdf_annotations(markers, run.sfreq, n_records)
    labels = ch_names + [ECG_CHANNEL, "BDF Annotations"]
    phys_lo, phys_hi = _BDF_PHYSICAL
    dig_lo, dig_hi = -(2**23), 2**23 - 1
    header = _bdf_header(labels, meas_date, n_records, per_record, annot.shape[1] // 3, (dig_lo, dig_hi))
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


def _raw_array(run: EEGRun, ch_names, markers, meas_date):
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


def _write_edf(path: Path, run: EEGRun, ch_names, markers, meas_date):
    """EDF+ through mne's exporter (edfio), 16 bits with per-channel physical ranges."""
    import mne

    mne.export.export_raw(path, _raw_array(run, ch_names, markers, meas_date), fmt="edf", verbose=False)


def _write_set(path: Path, run: EEGRun, ch_names, markers, meas_date):
    """EEGLAB ``.set`` through mne's exporter (eeglabio), float32 data inside the ``.set``."""
    import mne

    mne.export.export_raw(path, _raw_array(run, ch_names, markers, meas_date), fmt="eeglab", verbose=False)
    # scipy stamps the MAT-file header with the current time; a fixed text keeps runs with
    # the same seed byte-identical
    with open(path, "r+b") as fh:
        fh.write(f"MATLAB 5.0 MAT-file, written by {GENERATOR}".ljust(116).encode("ascii"))


def _read_native(path: Path):
    from spec2vol_bids.eeg import READERS

    return READERS[path.suffix](path, preload=False, verbose=False)


# ------------------------------------------------------------------------------------------
# into the dataset


def write_eeg_run(root: Path, native_dir: Path, entities: dict, run: EEGRun, ch_names, markers,
                  meas_date, eeg_format: str, eeg_dtype: str) -> Path:
    """Write the native file, read it back with mne and let mne-bids copy it into the dataset.

    Parameters
    ----------
    root : Path
        The dataset being built.
    native_dir : Path
        A scratch folder for the native file, removed afterwards.
    entities : dict
        The run's BIDS entities (long names; ``None`` for absent ones).
    run : EEGRun
    ch_names : list of str
        The EEG channels, without the ECG channel.
    markers : list of (int, str)
        Volume markers: sample (from 0) and description.
    meas_date : datetime.datetime
    eeg_format : {'vhdr', 'edf', 'bdf', 'set'}
    eeg_dtype : {'float32', 'int16'}
        BrainVision sample format (other formats have their own).

    Returns
    -------
    Path
        The EEG file in the dataset.
    """
    from spec2vol_bids.eeg import standard_montage

    native_dir.mkdir(parents=True, exist_ok=True)
    # not "eeg": mne-bids rewrites the header pointers by replacing the base name
    native = native_dir / ("recording" + EEG_FORMATS[eeg_format])
    if eeg_format == "vhdr":
        _write_brainvision(native, run, ch_names, markers, meas_date, eeg_dtype)
    else:
        {"edf": _write_edf, "bdf": _write_bdf, "set": _write_set}[eeg_format](native, run, ch_names, markers, meas_date)
    raw = _read_native(native)
    raw.set_channel_types({ECG_CHANNEL: "ecg"})
    raw.set_montage(standard_montage(), on_missing="ignore")
    raw.set_meas_date(meas_date)
    raw.info["line_freq"] = LINE_FREQ
    path = _write_bids(raw, root, entities, EEG_FORMATS[eeg_format])
    del raw
    shutil.rmtree(native_dir)
    return path


def _write_bids(raw, root: Path, entities: dict, extension: str) -> Path:
    """Copy ``raw`` into the dataset with mne-bids and complete its sidecar; return the file."""
    from mne_bids import BIDSPath, update_sidecar_json, write_raw_bids

    bids_path = BIDSPath(root=root, datatype="eeg", suffix="eeg", extension=extension,
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
    return bids_path.fpath
