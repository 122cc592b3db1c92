"""A run's EEG → its spectrogram derivative (``*_desc-spec2vol_spectrogram.npy`` + sidecar).

From a recording: read it, choose and order the EEG channels, time the volumes from the trigger
train (:mod:`spec2vol_bids.triggers`), compute the TR-window spectrogram and its QC figures.
From an earlier spec2vol output (``--eeg-derivatives``): check it against the options first
(:func:`check_spectrogram_inputs`; nothing is written when one does not fit), then copy it with
its sidecar; the raw EEG is never read.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from spec2vol_bids.derivatives import atomic_path, read_json, read_spectrogram, write_json
from spec2vol_bids.errors import DataError, UsageError
from spec2vol_bids.naming import SPACE_ENTITIES, build_name, run_dir, source_path, source_uri
from spec2vol_bids.participant.freshness import (input_hash, is_done, recording_files,
                                                 recording_fingerprint, related_files)
from spec2vol_bids.participant.result import RunResult

LOGGER = logging.getLogger(__name__)

#: The options that change what a run's spectrogram contains (and so its input hash).
EEG_OPTIONS = ("volume_marker", "eeg_offset", "first_volume_trigger", "fmax", "discard_volumes",
               "context")


def eeg_entities(pair) -> dict:
    """The run's entities without those of a space: the EEG is in no image space."""
    return {k: v for k, v in pair.entities.items() if k not in SPACE_ENTITIES}


def spectrogram_path(pair, output_dir: Path) -> Path:
    return run_dir(output_dir, pair.entities, "eeg") / build_name(
        eeg_entities(pair), "spectrogram", ".npy", desc="spec2vol")


def _sources(pair) -> list[Path]:
    """The files a run's EEG is read from: the recording's (for BrainVision the data and marker
    files its header names, wherever they lie) and the sidecars that apply to it."""
    return [*recording_files(pair.eeg),
            *(p for p in (pair.channels_tsv, pair.events_tsv) if p is not None)]


def _inputs(pair) -> list[Path]:
    """Every file the EEG of a run is read from, for its input hash: its sources, the files
    beside the recording with its entities, and the inherited sidecars."""
    files = related_files(pair.eeg) + list(pair.eeg_sidecars) + _sources(pair)
    return [p for p in files if p.is_file()]


def _remember(result: RunResult, npy: Path, meta: dict) -> None:
    result.spectrogram = str(npy)
    result.n_windows, result.channels = meta["NumberOfWindows"], meta["Channels"]
    result.dropped_channels = meta.get("DroppedChannels", [])
    result.marker, result.t0 = meta.get("VolumeMarker"), meta.get("VolumeOnsetSeconds")


def process_eeg(pair, config, tr: float, n_volumes: int | None, result: RunResult) -> None:
    """Spectrogram of one run's EEG, written as ``.npy`` + JSON sidecar (skipped when done)."""
    from spec2vol_bids import eeg, spectra, triggers

    settings = config.participant
    npy = spectrogram_path(pair, config.inputs.output_dir)
    sidecar = npy.with_suffix(".json")
    freq_bins = settings.spectrogram_bins()
    options = {k: getattr(settings, k) for k in EEG_OPTIONS} | {
        "freq_bins": freq_bins, "tr": tr, "n_volumes": n_volumes}
    digest = input_hash(_inputs(pair), options)
    if is_done(sidecar, npy, digest):
        _remember(result, npy, read_json(sidecar))
        result.skipped = True
        LOGGER.info("%s: spectrogram up to date, skipped", pair.label)
        return
    raw = eeg.read_eeg(pair.eeg, work_dir=config.execution.work_dir / "eeg" / pair.label)
    _check_sampling_frequency(pair, float(raw.info["sfreq"]))
    channels = eeg.canonical_channel_order(eeg.eeg_channels(raw, pair.channels_tsv))
    timing = triggers.volume_timing(
        raw, tr, n_volumes=n_volumes, events_tsv=pair.events_tsv, marker=settings.volume_marker,
        offset=settings.eeg_offset, first_trigger=settings.first_volume_trigger,
        discard=settings.discard_volumes, context=settings.context, source=pair.eeg)
    _check_header_tr(pair, tr, confirmed=timing.train is not None)
    if settings.model_path is not None:
        _check_model_bins(pair, freq_bins, tr, float(raw.info["sfreq"]))
    try:
        spec, freqs = spectra.tr_spectrogram(raw, channels, starts=timing.starts, tr=tr,
                                             freq_bins=freq_bins, fmax=settings.fmax)
    except DataError as exc:  # the bins this recording's rate cannot give: name the recording
        if exc.path is not None:
            raise
        raise DataError(exc.reason, path=pair.eeg) from exc
    eeg.check_native_rates(pair.eeg, channels, float(freqs[-1]), float(raw.info["sfreq"]))
    spec, channels, flat = eeg.drop_flat_channels(spec, channels, source=pair.eeg)
    fs = float(raw.info["sfreq"])
    # Figures and array first, sidecar last: the sidecar's hash marks the run as done.
    _qc_figures(pair, config.inputs.output_dir, timing, spec, freqs, channels)
    with atomic_path(npy) as tmp:
        np.save(tmp, spec.astype(np.float32, copy=False))
    meta = {
        "Description": "TR-window EEG amplitude spectra, z-scored across channels per window and bin",
        "SamplingFrequency": fs, "RepetitionTime": tr, "WindowSamples": int(round(tr * fs)),
        "FrequencyBinsHz": [float(f) for f in freqs], "Channels": channels,
        "DroppedChannels": sorted(set(raw.ch_names) - set(channels)), "FlatChannels": flat,
        **timing.sidecar(), "NumberOfWindows": int(spec.shape[0]),
        "DiscardVolumes": settings.discard_volumes, "Context": settings.context,
        "Sources": [source_uri(p, config.inputs.bids_dir) for p in _sources(pair)],
        # kept by every spectrogram reused from this one, to tell its recording from another
        "Recording": source_uri(pair.eeg, config.inputs.bids_dir),
        "RecordingFingerprint": recording_fingerprint(pair.eeg),
        "InputHash": digest,
    }
    write_json(sidecar, meta)
    _remember(result, npy, meta)
    LOGGER.info("%s: %d windows x %d channels x %d bins (t0 %.3f s, marker %s)", pair.label,
                *spec.shape, timing.t0, timing.marker or "none")


def _check_sampling_frequency(pair, sfreq: float) -> None:
    """The recording's header and its ``_eeg.json`` must give one sampling rate: every window's
    length in samples and every frequency bin rest on it, and nothing tells which is right."""
    from spec2vol_bids.bids.metadata import stated

    value, sidecar = stated(pair.eeg_sidecars, "SamplingFrequency") or (None, None)
    if (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            and not np.isclose(float(value), sfreq, rtol=1e-3)):
        raise DataError(f"the recording's header gives {sfreq:g} Hz but {sidecar.name} says "
                        f"SamplingFrequency {value:g} Hz; correct the wrong one", path=pair.eeg)


def _check_model_bins(pair, freq_bins: int, tr: float, sfreq: float) -> None:
    """A model reads the bins it was trained on (k / TR Hz, k = 1..F): a recording too slow to
    hold them cannot be given to it, whatever the options."""
    window = int(np.floor(tr * sfreq + 0.5))
    if freq_bins is not None and freq_bins > window // 2:
        raise DataError(f"the model reads {freq_bins} frequency bins, up to {freq_bins / tr:g} Hz, "
                        f"but this recording at {sfreq:g} Hz holds {window // 2} (up to "
                        f"{sfreq / 2:g} Hz); apply a model trained with at most {window // 2} bins "
                        f"(--freq-bins {window // 2}, or --fmax {sfreq / 2:g})", path=pair.eeg)


def _check_header_tr(pair, tr: float, *, confirmed: bool) -> None:
    """A NIfTI header that gives another TR than the sidecar is refused unless the volume
    markers have ``confirmed`` the sidecar's (their period, see :mod:`spec2vol_bids.triggers`):
    without them nothing in the EEG tells which is right, and every window after the first
    depends on it."""
    from spec2vol_bids.bids.metadata import header_repetition_time

    header = header_repetition_time(pair)
    if header is None or np.isclose(header, tr, rtol=1e-3):
        return
    if confirmed:
        LOGGER.info("%s: the NIfTI header says TR %g s, the sidecar %g s; the volume markers "
                    "confirm the sidecar's", pair.label, header, tr)
    else:
        raise DataError(f"the BOLD sidecar's RepetitionTime is {tr:g} s but the NIfTI header says "
                        f"{header:g} s (pixdim[4]), and without volume markers nothing in the EEG "
                        "tells which is right; correct the wrong one", path=pair.bold)


def _qc_figures(pair, output_dir: Path, timing, spec, freqs, channels) -> None:
    from spec2vol_bids import report

    figures = Path(output_dir) / f"sub-{pair.subject}" / "figures"
    report.plot_alignment_qc(
        timing, figures / build_name(eeg_entities(pair), "qc", ".svg", desc="alignment"),
        title=f"{pair.label}: volume timing")
    report.plot_spectrogram_qc(
        spec, freqs, channels, figures / build_name(eeg_entities(pair), "qc", ".svg", desc="spectrogram"),
        title=f"{pair.label}: EEG spectrogram")


def reuse_spectrogram(pair, config, result: RunResult) -> None:
    """Copy a spectrogram a previous spec2vol run wrote (``--eeg-derivatives``) into OUTPUT_DIR.

    The array is copied as it is; its sidecar keeps what describes the data (sampling rate,
    bins, channels, t0, ...) and takes this run's discard/context, sources and input hash. The
    options were checked beforehand by :func:`check_spectrogram_inputs`.
    """
    from spec2vol_bids import report

    settings, output_dir = config.participant, config.inputs.output_dir
    npy = spectrogram_path(pair, output_dir)
    sidecar = npy.with_suffix(".json")
    spec, meta = read_spectrogram(pair.eeg)
    _check_same_recording(pair, meta, config.inputs.bids_dir)
    options = {"discard_volumes": settings.discard_volumes, "context": settings.context,
               "tr": float(meta["RepetitionTime"])}
    digest = input_hash(related_files(pair.eeg), options)
    _remember(result, npy, meta)
    if is_done(sidecar, npy, digest):
        result.skipped = True
        LOGGER.info("%s: spectrogram up to date, skipped", pair.label)
        return
    figures = Path(output_dir) / f"sub-{pair.subject}" / "figures"
    # The alignment QC needs the volume markers, which only the run that read the EEG had:
    # its figure is carried over when the source dataset has it.
    name = build_name(eeg_entities(pair), "qc", ".svg", desc="alignment")
    alignment = pair.bids_root / f"sub-{pair.subject}" / "figures" / name
    if alignment.is_file():
        with atomic_path(figures / name) as tmp:
            shutil.copyfile(alignment, tmp)
    report.plot_spectrogram_qc(
        spec, np.asarray(meta["FrequencyBinsHz"]), meta["Channels"],
        figures / build_name(eeg_entities(pair), "qc", ".svg", desc="spectrogram"),
        title=f"{pair.label}: EEG spectrogram (from {pair.bids_root.name})")
    with atomic_path(npy) as tmp:
        shutil.copyfile(pair.eeg, tmp)
    write_json(sidecar, meta | {
        "DiscardVolumes": settings.discard_volumes, "Context": settings.context,
        "Sources": [source_uri(pair.eeg, config.inputs.bids_dir)], "InputHash": digest})
    LOGGER.info("%s: spectrogram reused from %s (%d windows x %d channels x %d bins)",
                pair.label, pair.eeg, *spec.shape)


def _check_same_recording(pair, meta: dict, bids_dir: Path) -> None:
    """A spectrogram reused from an earlier OUTPUT_DIR was made from this run's recording as it
    is now, where that recording is here to compare: a spectrogram of another dataset's run of
    the same name, or of the recording before its markers were corrected, would be paired with
    this run's BOLD.

    Raises
    ------
    DataError (65)
        Naming the spectrogram and the recording.
    """
    recorded, source = meta.get("RecordingFingerprint"), meta.get("Recording")
    if not (recorded and isinstance(source, str)):
        return
    recording = source_path(source, bids_dir)
    current = recording_fingerprint(recording) if recording.is_file() else None
    if current is not None and current != recorded:
        raise DataError(f"this spectrogram was made from another recording than {recording} as it "
                        "is now (another dataset's run of the same name, or the recording since "
                        "changed): rerun the participant level without --eeg-derivatives, or give "
                        "the spec2vol outputs of this recording", path=pair.eeg)


def check_spectrogram_inputs(pairs, config, model_freq_bins: int | None = None) -> None:
    """Check every reused spectrogram against the options before anything is written.

    A spectrogram cannot be recomputed without its EEG, so options that would change it must
    agree with it: ``--freq-bins``/``--fmax`` (when given) with its bins, ``--volume-marker`` and
    ``--eeg-offset`` with its volume onset, the run's TR with its windows, and ``--model``'s
    bins with its bins. Channels are matched to a model by name at synthesis, as for raw EEG.

    Raises
    ------
    UsageError (64)
        The EEG derivatives are OUTPUT_DIR itself, or an option asks for a spectrogram other
        than the one given.
    DataError (65)
        A spectrogram or its sidecar is unreadable or inconsistent, its TR differs from the
        run's, it has too few windows for ``--discard-volumes`` + ``--context``, or the model
        was trained on another number of bins.
    """
    for pair in (p for p in pairs if p.eeg_is_spectrogram):
        if pair.bids_root.resolve() == config.inputs.output_dir.resolve():
            raise UsageError("--eeg-derivatives is OUTPUT_DIR itself: write the new run to "
                             "another OUTPUT_DIR", path=pair.bids_root)
        _, meta = read_spectrogram(pair.eeg)
        _check_tr(pair, meta)
        bins = np.asarray(meta["FrequencyBinsHz"], dtype=float)
        described = (f"{pair.eeg.name} has {bins.size} bins up to {bins[-1]:g} Hz"
                     if bins.size else f"{pair.eeg.name} has no frequency bins")
        _check_bins(pair, config.participant, meta, bins, described)
        _check_alignment_options(pair, config.participant, meta)
        if model_freq_bins is not None and model_freq_bins != bins.size:
            raise DataError(f"the model was trained on {model_freq_bins} frequency bins but "
                            f"{described}; give the raw EEG and --freq-bins {model_freq_bins}",
                            path=pair.eeg)


def _check_tr(pair, meta: dict) -> None:
    from spec2vol_bids.bids.metadata import eeg_repetition_time, repetition_time

    run_tr = repetition_time(pair) if pair.bold is not None else eeg_repetition_time(pair)
    if run_tr is not None and not np.isclose(run_tr, meta["RepetitionTime"], rtol=1e-3):
        raise DataError(f"the spectrogram's windows are {meta['RepetitionTime']:g} s long but "
                        f"the run's RepetitionTime is {run_tr:g} s", path=pair.eeg)


def _check_bins(pair, settings, meta: dict, bins: np.ndarray, described: str) -> None:
    from spec2vol_bids import spectra

    if not settings.bins_requested:
        return
    try:
        wanted = spectra.frequency_bins(float(meta["RepetitionTime"]), float(meta["SamplingFrequency"]),
                                        freq_bins=settings.spectrogram_bins(), fmax=settings.fmax)
    except DataError as exc:
        raise UsageError(str(exc), path=pair.eeg) from exc
    if wanted.shape != bins.shape or not np.allclose(wanted, bins, rtol=1e-6):
        option = f"--fmax {settings.fmax:g}" if settings.fmax is not None else \
            f"--freq-bins {settings.freq_bins}"
        raise UsageError(f"{option} asks for {wanted.size} bins up to {wanted[-1]:g} Hz but the "
                         f"spectrogram {described}; a spectrogram from --eeg-derivatives cannot "
                         "be recomputed: leave the option out or give the raw EEG", path=pair.eeg)


def _check_alignment_options(pair, settings, meta: dict) -> None:
    fs = float(meta["SamplingFrequency"])
    if settings.volume_marker is not None and settings.volume_marker != meta.get("VolumeMarker"):
        raise UsageError(f"--volume-marker {settings.volume_marker} differs from the marker this "
                         f"spectrogram was aligned to ({meta.get('VolumeMarker') or 'none'}); "
                         "leave it out or give the raw EEG", path=pair.eeg)
    if settings.eeg_offset is not None and \
            abs(settings.eeg_offset - float(meta["VolumeOnsetSeconds"])) > 0.5 / fs + 1e-9:
        raise UsageError(f"--eeg-offset {settings.eeg_offset:g} differs from the volume onset of "
                         f"this spectrogram ({meta['VolumeOnsetSeconds']:g} s); leave it out "
                         "or give the raw EEG", path=pair.eeg)
    needed = settings.discard_volumes + settings.context + 1
    if meta["NumberOfWindows"] < needed:
        raise DataError(f"{meta['NumberOfWindows']} TR windows, fewer than --discard-volumes "
                        f"+ --context + 1 = {needed}", path=pair.eeg)
