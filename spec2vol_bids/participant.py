"""The participant level: run pairs → EEG spectrograms and BOLD targets → derivatives.

For every selected run this writes the TR-window spectrogram of its EEG and, when the run has
BOLD, the normalised, resampled target series (DESIGN §2, steps 1–7), then per participant the
pairing inventory, QC figures and the HTML report. With ``--model`` it also synthesises BOLD from
the EEG of every run, EEG-only participants included.

Chaining: when ``--eeg-derivatives`` is a spec2vol output dataset, its spectrograms are the runs'
EEG. They are checked against the options first (nothing is written when one does not fit),
then copied with their sidecars; the raw EEG is never read, so a lab can synthesise from another
run's outputs with a model trained elsewhere.

Re-running with the same inputs and options skips runs whose outputs are complete: each sidecar
records a hash of the inputs' names, sizes and modification times and of the options.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from spec2vol_bids import __version__
from spec2vol_bids.derivatives import (
    atomic_path,
    bids_name,
    init_output_dataset,
    read_json,
    run_dir,
    write_json,
    write_nifti,
    write_text,
)
from spec2vol_bids.errors import DataError, MissingInputError, UsageError

LOGGER = logging.getLogger(__name__)

#: The options that change what a run's derivatives contain (and so its input hash).
EEG_OPTIONS = ("volume_marker", "eeg_offset", "first_volume_trigger", "freq_bins", "fmax",
               "discard_volumes", "context")
BOLD_OPTIONS = ("target_grid",)
#: --freq-bins when not given (the authors' bin count)
DEFAULT_FREQ_BINS = 249
#: What a spectrogram sidecar must hold to be reused
_SPECTROGRAM_KEYS = ("SamplingFrequency", "RepetitionTime", "FrequencyBinsHz", "Channels",
                     "NumberOfWindows", "VolumeOnsetSeconds")


@dataclass
class RunResult:
    """What processing one run produced, for the inventory, the report and the log."""

    label: str
    entities: dict
    eeg: str | None = None
    bold: str | None = None
    spectrogram: str | None = None
    target: str | None = None
    synth: str | None = None
    n_windows: int | None = None
    n_volumes: int | None = None
    channels: list = field(default_factory=list)
    dropped_channels: list = field(default_factory=list)
    marker: str | None = None
    t0: float | None = None
    skipped: bool = False


def input_hash(paths: list[Path], options: dict) -> str:
    """A hash of the inputs (name, size, modification time) and the options that shape outputs."""
    h = hashlib.sha256()
    h.update(f"spec2vol {__version__}".encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    for path in sorted(set(paths)):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _related_files(path: Path) -> list[Path]:
    """The data file and its sidecars: every file beside it sharing the run's entity prefix."""
    stem = path.name.split("_")
    prefix = "_".join(stem[:-1])
    return [p for p in path.parent.iterdir() if p.is_file() and p.name.startswith(prefix + "_")]


def _eeg_sources(pair) -> list[Path]:
    """The files a run's EEG is read from: the recording and the sidecars that apply to it."""
    return [pair.eeg, *(p for p in (pair.channels_tsv, pair.events_tsv) if p is not None)]


def _eeg_inputs(pair) -> list[Path]:
    """Every file the EEG of a run is read from, for its input hash: the recording's own
    files, the inherited sidecars and, for BrainVision, the data and marker files its header
    names (wherever they lie)."""
    from spec2vol_bids import eeg as eeg_mod

    files = _related_files(pair.eeg) + list(pair.eeg_sidecars) + _eeg_sources(pair)
    if pair.eeg.suffix.lower() == ".vhdr":
        files += eeg_mod.brainvision_files(pair.eeg)
    return [p for p in files if p.is_file()]


def _is_done(sidecar: Path, data: Path, digest: str) -> bool:
    """Whether a run's output is up to date: made from the same inputs and options (its
    sidecar's hash) and still intact (readable, of the shape its sidecar gives), so a damaged
    or truncated output is recomputed rather than trusted."""
    if not (sidecar.exists() and data.exists()):
        return False
    try:
        meta = read_json(sidecar)
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("InputHash") != digest:
        return False
    intact = _intact_spectrogram if data.suffix == ".npy" else _intact_target
    if intact(data, meta):
        return True
    LOGGER.warning("%s: damaged (unreadable or not the shape its sidecar gives); recomputing", data)
    return False


def _intact_spectrogram(npy: Path, meta: dict) -> bool:
    try:
        shape = np.load(npy, mmap_mode="r").shape
        return shape == (meta["NumberOfWindows"], len(meta["Channels"]), len(meta["FrequencyBinsHz"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _intact_target(nii: Path, meta: dict) -> bool:
    """The header's shape is the sidecar's and the file holds all of its data: a ``.nii.gz``'s
    gzip trailer records the uncompressed size, which a truncated file does not end with."""
    import nibabel as nib

    try:
        img = nib.load(nii)
        shape = tuple(img.shape)
        if shape != (*meta["TargetGrid"], meta["NumberOfVolumes"]):
            return False
        size = int(img.header.get_data_offset()) + int(np.prod(shape)) * img.get_data_dtype().itemsize
        with open(nii, "rb") as fh:
            if nii.name.endswith(".gz"):
                fh.seek(-4, os.SEEK_END)
                return int.from_bytes(fh.read(4), "little") == size % 2**32
            return os.fstat(fh.fileno()).st_size >= size
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return False


def _relative_source(path: Path, bids_dir: Path) -> str:
    """A BIDS URI for a source file: ``bids:raw:`` inside BIDS_DIR, else its absolute path."""
    try:
        return f"bids:raw:{path.resolve().relative_to(bids_dir.resolve()).as_posix()}"
    except ValueError:
        return str(path.resolve())


def process_eeg(pair, opts: dict, tr: float, n_volumes: int | None, result: RunResult) -> None:
    """Spectrogram of one run's EEG, written as ``.npy`` + JSON sidecar (skipped when done)."""
    from spec2vol_bids import eeg as eeg_mod
    from spec2vol_bids import spectra, triggers

    out = run_dir(opts["output_dir"], pair.entities, "eeg")
    npy = out / bids_name(_eeg_entities(pair), "spectrogram", ".npy", desc="spec2vol")
    sidecar = npy.with_suffix(".json")
    freq_bins = _freq_bins(opts.get("freq_bins"), opts.get("fmax"))
    options = {k: opts.get(k) for k in EEG_OPTIONS} | {"freq_bins": freq_bins, "tr": tr,
                                                       "n_volumes": n_volumes}
    digest = input_hash(_eeg_inputs(pair), options)
    result.spectrogram = str(npy)
    if _is_done(sidecar, npy, digest):
        meta = read_json(sidecar)
        result.skipped = True
        result.n_windows = meta["NumberOfWindows"]
        result.channels = meta["Channels"]
        result.dropped_channels = meta.get("DroppedChannels", [])
        result.marker, result.t0 = meta.get("VolumeMarker"), meta.get("VolumeOnsetSeconds")
        LOGGER.info("%s: spectrogram up to date, skipped", pair.label)
        return

    work = Path(opts["work_dir"]) / "eeg" / pair.label
    raw = eeg_mod.read_eeg(pair.eeg, work_dir=work)
    channels = eeg_mod.canonical_channel_order(eeg_mod.eeg_channels(raw, pair.channels_tsv))
    timing = triggers.volume_timing(
        raw, tr, n_volumes=n_volumes, events_tsv=pair.events_tsv,
        marker=opts.get("volume_marker"), offset=opts.get("eeg_offset"),
        first_trigger=opts.get("first_volume_trigger"),
        discard=opts["discard_volumes"], context=opts["context"], source=pair.eeg,
    )
    spec, freqs = spectra.tr_spectrogram(raw, channels, starts=timing.starts, tr=tr,
                                         freq_bins=freq_bins, fmax=opts.get("fmax"))
    spec, channels, flat = eeg_mod.drop_flat_channels(spec, channels, source=pair.eeg)
    dropped = sorted(set(raw.ch_names) - set(channels))
    fs = float(raw.info["sfreq"])
    # Figures and array first, sidecar last: the sidecar's hash marks the run as done.
    _qc_figures(pair, opts, timing, tr, spec, freqs, channels)
    with atomic_path(npy) as tmp:
        np.save(tmp, spec.astype(np.float32, copy=False))
    write_json(sidecar, {
        "Description": "TR-window EEG amplitude spectra, z-scored across channels per window and bin",
        "SamplingFrequency": fs,
        "RepetitionTime": tr,
        "WindowSamples": int(round(tr * fs)),
        "FrequencyBinsHz": [float(f) for f in freqs],
        "Channels": channels,
        "DroppedChannels": dropped,
        "FlatChannels": flat,
        **timing.sidecar(),
        "NumberOfWindows": int(spec.shape[0]),
        "DiscardVolumes": opts["discard_volumes"],
        "Context": opts["context"],
        "Sources": [_relative_source(p, opts["bids_dir"]) for p in _eeg_sources(pair)],
        "InputHash": digest,
    })
    result.n_windows, result.channels, result.dropped_channels = spec.shape[0], channels, dropped
    result.marker, result.t0 = timing.marker, float(timing.t0)
    LOGGER.info("%s: %d windows x %d channels x %d bins (t0 %.3f s, marker %s)", pair.label,
                *spec.shape, timing.t0, timing.marker or "none")


def reuse_spectrogram(pair, opts: dict, result: RunResult) -> None:
    """Copy a spectrogram a previous spec2vol run wrote (``--eeg-derivatives``) into OUTPUT_DIR.

    The array is copied as it is; its sidecar keeps what describes the data (sampling rate,
    bins, channels, t0, ...) and takes this run's discard/context, sources and input hash. The
    options were checked beforehand by :func:`check_spectrogram_inputs`.
    """
    from spec2vol_bids import report

    out = run_dir(opts["output_dir"], pair.entities, "eeg")
    npy = out / bids_name(_eeg_entities(pair), "spectrogram", ".npy", desc="spec2vol")
    sidecar = npy.with_suffix(".json")
    meta = read_json(pair.eeg.with_suffix(".json"))
    options = {k: opts.get(k) for k in ("discard_volumes", "context")} | {
        "tr": float(meta["RepetitionTime"])}
    digest = input_hash(_related_files(pair.eeg), options)
    result.spectrogram = str(npy)
    result.n_windows, result.channels = meta["NumberOfWindows"], meta["Channels"]
    result.dropped_channels = meta.get("DroppedChannels", [])
    result.marker, result.t0 = meta.get("VolumeMarker"), meta["VolumeOnsetSeconds"]
    if _is_done(sidecar, npy, digest):
        result.skipped = True
        LOGGER.info("%s: spectrogram up to date, skipped", pair.label)
        return
    figures = Path(opts["output_dir"]) / f"sub-{pair.subject}" / "figures"
    # The alignment QC needs the volume markers, which only the run that read the EEG had:
    # its figure is carried over when the source dataset has it.
    name = bids_name(_eeg_entities(pair), "qc", ".svg", desc="alignment")
    alignment = pair.bids_root / f"sub-{pair.subject}" / "figures" / name
    if alignment.is_file():
        with atomic_path(figures / name) as tmp:
            shutil.copyfile(alignment, tmp)
    spec = np.load(pair.eeg, mmap_mode="r")
    report.plot_spectrogram_qc(
        spec, np.asarray(meta["FrequencyBinsHz"]), meta["Channels"],
        figures / bids_name(_eeg_entities(pair), "qc", ".svg", desc="spectrogram"),
        title=f"{pair.label}: EEG spectrogram (from {pair.bids_root.name})",
    )
    with atomic_path(npy) as tmp:
        shutil.copyfile(pair.eeg, tmp)
    write_json(sidecar, meta | {
        "DiscardVolumes": opts["discard_volumes"],
        "Context": opts["context"],
        "Sources": [_relative_source(pair.eeg, opts["bids_dir"])],
        "InputHash": digest,
    })
    LOGGER.info("%s: spectrogram reused from %s (%d windows x %d channels x %d bins)",
                pair.label, pair.eeg, *spec.shape)


def check_spectrogram_inputs(pairs, opts, model_freq_bins: int | None = None) -> None:
    """Check every reused spectrogram against the options before anything is written.

    A spectrogram cannot be recomputed without its EEG, so options that would change it must
    agree with it: ``--freq-bins``/``--fmax`` (when given) with its bins, ``--volume-marker`` and
    ``--eeg-offset`` with its volume onset, the run's TR with its windows, and ``--model``'s
    bins with its bins. Channels are matched to a model by name at synthesis, as for raw EEG
    (missing ones interpolated on the standard 10-05 montage by name, so no electrode positions
    are needed).

    Parameters
    ----------
    pairs : list of RunPair
        The selected runs; those whose EEG is a spectrogram are checked.
    opts : argparse.Namespace
        The participant-level options.
    model_freq_bins : int | None
        The number of frequency bins ``--model`` was trained on.

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
    from spec2vol_bids import layout

    for pair in (p for p in pairs if p.eeg_is_spectrogram):
        if pair.bids_root.resolve() == Path(opts.output_dir).resolve():
            raise UsageError("--eeg-derivatives is OUTPUT_DIR itself: write the new run to "
                             "another OUTPUT_DIR", path=pair.bids_root)
        meta = _spectrogram_meta(pair.eeg)
        # the bins depend on the TR: it is checked first
        run_tr = layout.repetition_time(pair) if pair.bold is not None \
            else layout.eeg_repetition_time(pair)
        if run_tr is not None and not np.isclose(run_tr, meta["RepetitionTime"], rtol=1e-3):
            raise DataError(f"the spectrogram's windows are {meta['RepetitionTime']:g} s long but "
                            f"the run's RepetitionTime is {run_tr:g} s", path=pair.eeg)
        bins = np.asarray(meta["FrequencyBinsHz"], dtype=float)
        described = (f"{pair.eeg.name} has {bins.size} bins up to {bins[-1]:g} Hz"
                     if bins.size else f"{pair.eeg.name} has no frequency bins")
        if _bins_requested(opts):
            wanted = _requested_bins(opts, meta, pair.eeg)
            if wanted.shape != bins.shape or not np.allclose(wanted, bins, rtol=1e-6):
                option = f"--fmax {opts.fmax:g}" if opts.fmax is not None else \
                    f"--freq-bins {opts.freq_bins}"
                raise UsageError(f"{option} asks for {wanted.size} bins up to {wanted[-1]:g} Hz "
                                 f"but the spectrogram {described}; a spectrogram from "
                                 "--eeg-derivatives cannot be recomputed: leave the option out "
                                 "or give the raw EEG", path=pair.eeg)
        fs = float(meta["SamplingFrequency"])
        if opts.volume_marker is not None and opts.volume_marker != meta.get("VolumeMarker"):
            raise UsageError(f"--volume-marker {opts.volume_marker} differs from the marker this "
                             f"spectrogram was aligned to ({meta.get('VolumeMarker') or 'none'}); "
                             "leave it out or give the raw EEG", path=pair.eeg)
        if opts.eeg_offset is not None and \
                abs(opts.eeg_offset - float(meta["VolumeOnsetSeconds"])) > 0.5 / fs + 1e-9:
            raise UsageError(f"--eeg-offset {opts.eeg_offset:g} differs from the volume onset of "
                             f"this spectrogram ({meta['VolumeOnsetSeconds']:g} s); leave it out "
                             "or give the raw EEG", path=pair.eeg)
        needed = opts.discard_volumes + opts.context + 1
        if meta["NumberOfWindows"] < needed:
            raise DataError(f"{meta['NumberOfWindows']} TR windows, fewer than --discard-volumes "
                            f"+ --context + 1 = {needed}", path=pair.eeg)
        if model_freq_bins is not None and model_freq_bins != bins.size:
            raise DataError(f"the model was trained on {model_freq_bins} frequency bins but "
                            f"{described}; give the raw EEG and --freq-bins {model_freq_bins}",
                            path=pair.eeg)


def _spectrogram_meta(npy: Path) -> dict:
    """The sidecar of a spectrogram to reuse, checked against the array's shape."""
    sidecar = npy.with_suffix(".json")
    try:
        meta = read_json(sidecar)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read the spectrogram's sidecar ({exc})", path=sidecar) from exc
    missing = [k for k in _SPECTROGRAM_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"the spectrogram's sidecar lacks {', '.join(missing)}: it was not "
                        "written by spec2vol", path=sidecar)
    try:
        shape = np.load(npy, mmap_mode="r").shape
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the spectrogram ({exc})", path=npy) from exc
    expected = (meta["NumberOfWindows"], len(meta["Channels"]), len(meta["FrequencyBinsHz"]))
    if tuple(shape) != tuple(expected):
        raise DataError(f"the spectrogram's shape {tuple(shape)} does not match its sidecar "
                        f"(windows, channels, bins) {expected}", path=npy)
    return meta


def _freq_bins(freq_bins: int | None, fmax: float | None) -> int | None:
    """The bin count to compute: none with ``--fmax``, else ``--freq-bins`` or the default."""
    return None if fmax is not None else freq_bins or DEFAULT_FREQ_BINS


def _bins_requested(opts) -> bool:
    """Whether the frequency bins were asked for, rather than left at the default."""
    return opts.fmax is not None or opts.freq_bins is not None


def _requested_bins(opts, meta: dict, path: Path) -> np.ndarray:
    """The bin frequencies the options ask for at the spectrogram's TR and sampling rate."""
    from spec2vol_bids import spectra

    try:
        return spectra.frequency_bins(float(meta["RepetitionTime"]), float(meta["SamplingFrequency"]),
                                      freq_bins=_freq_bins(opts.freq_bins, opts.fmax), fmax=opts.fmax)
    except DataError as exc:
        raise UsageError(str(exc), path=path) from exc


def _eeg_entities(pair) -> dict:
    """The run's entities without ``space``/``res``: the EEG is in no image space."""
    return {k: v for k, v in pair.entities.items() if k not in ("space", "res")}


def _qc_figures(pair, opts, timing, tr, spec, freqs, channels) -> None:
    from spec2vol_bids import report

    figures = Path(opts["output_dir"]) / f"sub-{pair.subject}" / "figures"
    report.plot_alignment_qc(
        timing, figures / bids_name(_eeg_entities(pair), "qc", ".svg", desc="alignment"),
        title=f"{pair.label}: volume timing",
    )
    report.plot_spectrogram_qc(
        spec, freqs, channels, figures / bids_name(_eeg_entities(pair), "qc", ".svg", desc="spectrogram"),
        title=f"{pair.label}: EEG spectrogram",
    )


def process_bold(pair, opts: dict, tr: float, result: RunResult) -> None:
    """Normalised, resampled BOLD target of one run as NIfTI + JSON sidecar (skipped when done)."""
    import nibabel as nib

    from spec2vol_bids import bold as bold_mod

    out = run_dir(opts["output_dir"], pair.entities, "func")
    nii = out / bids_name(pair.entities, "bold", ".nii.gz", desc="target")
    sidecar = out / bids_name(pair.entities, "bold", ".json", desc="target")
    options = {k: opts.get(k) for k in BOLD_OPTIONS} | {"tr": tr}
    mask_source = _mask_source(pair)
    digest = input_hash([pair.bold, *pair.bold_sidecars, *([mask_source] if mask_source else [])],
                        options)
    result.target = str(nii)
    if _is_done(sidecar, nii, digest):
        result.n_volumes = read_json(sidecar)["NumberOfVolumes"]
        LOGGER.info("%s: BOLD target up to date, skipped", pair.label)
        return
    img = bold_mod.load_bold(pair.bold)
    # a target a previous spec2vol run wrote is on its model grid already
    native = img.shape[:3] if pair.bold.name.endswith("_desc-target_bold.nii.gz") else None
    grid = tuple(opts["target_grid"] or native or bold_mod.default_target_grid(img.shape[:3]))
    data, affine = bold_mod.bold_targets(img, grid)
    target = nib.Nifti1Image(data, affine)
    target.header.set_xyzt_units("mm", "sec")
    target.header["pixdim"][4] = tr
    # float32 targets hardly compress: stored (level 0) they write in a fifth of the time
    write_nifti(nii, target, compresslevel=0)
    if mask_source is not None:
        _write_mask(mask_source, target, out / bids_name(pair.entities, "mask", ".nii.gz",
                                                              desc="brain"))
    write_json(sidecar, {
        "Description": "Measured BOLD resampled to the target grid (3-D DCT) with every volume "
                       "min-max scaled to [0, 1]: the model's training target",
        "RepetitionTime": tr,
        "SkullStripped": False,
        "TargetGrid": list(grid),
        "OriginalShape": list(img.shape),
        "NumberOfVolumes": int(data.shape[3]),
        "Sources": [_relative_source(p, opts["bids_dir"]) for p in [pair.bold, mask_source] if p],
        "InputHash": digest,
    })
    result.n_volumes = int(data.shape[3])
    LOGGER.info("%s: BOLD target %s -> %s, %d volumes", pair.label, img.shape[:3], grid, data.shape[3])


def _mask_source(pair) -> Path | None:
    """The brain mask of a run's BOLD: the derivative's, else its template's (TemplateFlow)."""
    from spec2vol_bids import layout, templates

    if pair.bold_mask is not None:
        return pair.bold_mask
    if layout.is_template_space(pair.space):
        return templates.template_mask(pair.space, pair.res)
    return None


def fetch_templates(pairs) -> list[Path]:
    """Get the TemplateFlow brain masks the runs need, before any work is done: those of runs
    in template spaces whose derivatives hold none. Nothing else is fetched (the reports' T1w
    background is never downloaded: :func:`spec2vol_bids.templates.local_template_anatomy`).

    Returns
    -------
    paths : list of Path
        The masks, in ``TEMPLATEFLOW_HOME`` (downloaded only when missing).

    Raises
    ------
    MissingInputError (66)
        A mask is missing and cannot be downloaded; the message says how to pre-fetch it.
    """
    from spec2vol_bids import layout, templates

    needed = sorted({(p.space, p.res) for p in pairs if p.bold is not None and p.bold_mask is None
                     and layout.is_template_space(p.space)}, key=str)
    return [templates.template_mask(space, res) for space, res in needed]


def _write_mask(source: Path, target_img, path: Path) -> None:
    """The brain mask on the target grid: copied when the grids agree, else resampled
    (nearest neighbour) to the target's affine and shape."""
    import nibabel as nib
    from nilearn.image import resample_img

    mask = nib.load(source)
    same = (mask.shape[:3] == target_img.shape[:3]
            and np.allclose(mask.affine, target_img.affine, atol=1e-4))
    if not same:
        mask = resample_img(mask, target_affine=target_img.affine,
                            target_shape=target_img.shape[:3], interpolation="nearest",
                            force_resample=True, copy_header=True)
    data = np.asarray(mask.dataobj)[..., 0] if mask.ndim == 4 else np.asarray(mask.dataobj)
    out = nib.Nifti1Image((data > 0).astype(np.uint8), target_img.affine)
    out.header.set_xyzt_units("mm")
    write_nifti(path, out)


def process_run(pair, opts: dict) -> RunResult:
    """Everything the participant level does for one run (top level so processes can run it).

    The EEG comes first: its alignment to the volumes is where a run is most often refused, and
    it needs only the BOLD series' volume count (from its header). A run that fails leaves none
    of the outputs it wrote behind.
    """
    from spec2vol_bids import layout

    result = RunResult(label=pair.label, entities=pair.entities,
                       eeg=str(pair.eeg) if pair.eeg else None,
                       bold=str(pair.bold) if pair.bold else None)
    before = _own_outputs(pair, opts)
    try:
        tr, n_volumes = None, None
        if pair.bold is not None:
            tr = layout.repetition_time(pair)
            n_volumes = _bold_volumes(pair, opts)
        if pair.eeg is not None and pair.eeg_is_spectrogram:
            reuse_spectrogram(pair, opts, result)
        elif pair.eeg is not None:
            if tr is None:
                tr = _eeg_only_tr(pair, opts)
            process_eeg(pair, opts, tr, n_volumes, result)
        if pair.bold is not None:
            process_bold(pair, opts, tr, result)
        if opts.get("model_path") and pair.eeg is not None:
            _synthesize(pair, opts, tr, result)
    except BaseException:
        for path, stamp in _own_outputs(pair, opts).items():
            if before.get(path) != stamp:
                path.unlink(missing_ok=True)
        raise
    return result


def _own_outputs(pair, opts: dict) -> dict[Path, tuple]:
    """The run's files in OUTPUT_DIR (every one is ``<run>_desc-...``), with their identity."""
    folder = Path(opts["output_dir"]) / f"sub-{pair.subject}"
    if not folder.is_dir():
        return {}
    labels = {pair.label, bids_name(_eeg_entities(pair), "x", "")[:-2]}
    found = {}
    for label in labels:
        for path in folder.rglob(f"{label}_desc-*"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                found[path] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def _bold_volumes(pair, opts: dict) -> int:
    """The BOLD series' volume count, from its header; refused when too short to pair."""
    from spec2vol_bids import bold as bold_mod

    n_volumes = int(bold_mod.load_bold(pair.bold).shape[3])
    needed = opts["discard_volumes"] + opts["context"] + 1
    if n_volumes < needed:
        raise DataError(f"the BOLD series has {n_volumes} volumes, fewer than the {needed} a run "
                        f"needs (--discard-volumes {opts['discard_volumes']} + --context "
                        f"{opts['context']} + 1)", path=pair.bold)
    return n_volumes


def _eeg_only_tr(pair, opts: dict) -> float:
    """The TR of a run without BOLD: its sidecar's, else its volume markers', else the model's."""
    from spec2vol_bids import eeg as eeg_mod
    from spec2vol_bids import layout, triggers

    tr = layout.eeg_repetition_time(pair)
    if tr is None:
        raw = eeg_mod.read_eeg(pair.eeg, work_dir=Path(opts["work_dir"]) / "eeg" / pair.label)
        tr = triggers.marker_repetition_time(raw, pair.events_tsv, opts.get("volume_marker"))
    if tr is None and opts.get("model_tr"):
        tr = opts["model_tr"]
    if tr is None:
        raise DataError("this EEG run has no BOLD, no RepetitionTime in its sidecars, no volume "
                        "markers and no model to take one from; add RepetitionTime to its _eeg.json",
                        path=pair.eeg)
    return float(tr)


def _synthesize(pair, opts: dict, tr: float, result: RunResult) -> None:
    from spec2vol_bids import synthesize

    out = run_dir(opts["output_dir"], pair.entities, "func")
    nii = out / bids_name(pair.entities, "bold", ".nii.gz", desc="synth")
    synthesize.synthesize_from_checkpoint(
        opts["model_path"], Path(result.spectrogram), nii,
        target=Path(result.target) if result.target else None, tr=tr,
        sources=[_relative_source(pair.eeg, opts["bids_dir"])],
    )
    result.synth = str(nii)
    LOGGER.info("%s: synthesised BOLD written to %s", pair.label, nii)


def _inventory(out_dir: Path, subject: str, results: list[RunResult], notes: list[str]) -> Path:
    """``sub-<label>/sub-<label>_runs.tsv``: what was found, paired and produced for a participant."""
    lines = ["run\teeg\tbold\tstatus\tnote"]
    for r in results:
        status = "paired" if r.eeg and r.bold else ("eeg-only" if r.eeg else "bold-only")
        note = f"{r.n_windows} windows, {len(r.channels)} channels" if r.n_windows else ""
        if r.skipped:
            note += " (up to date)"
        lines.append("\t".join([r.label, r.eeg or "n/a", r.bold or "n/a", status, note.strip()]))
    for text in notes:
        if f"sub-{subject}" in text:
            lines.append("\t".join(["n/a", "n/a", "n/a", "not paired", text.replace("\t", " ")]))
    return write_text(out_dir / f"sub-{subject}" / f"sub-{subject}_runs.tsv", "\n".join(lines) + "\n")


def _check_model(opts) -> tuple[float | None, int]:
    """Load ``--model`` once before any output is written; return the TR and the number of
    frequency bins it was trained at."""
    from spec2vol_bids.models import load_checkpoint

    if not opts.model_path.is_file():
        raise MissingInputError("model file not found; give the model.pt written by the group "
                                "level (OUTPUT_DIR/models/final/model.pt)", path=opts.model_path)
    _, meta = load_checkpoint(opts.model_path)
    return (meta.get("extra") or {}).get("RepetitionTime"), int(meta["config"]["freq_bins"])


def run_participant(opts) -> int:
    """Run the participant level for the selected participants; return the exit code."""
    from spec2vol_bids import layout, provenance
    from spec2vol_bids.cli import add_log_file

    started = datetime.now(timezone.utc)
    layout.check_output_dir(opts.bids_dir, opts.output_dir)
    layout.check_work_dir(opts.bids_dir, opts.work_dir)
    if not opts.skip_bids_validation:
        layout.validate_bids_dir(opts.bids_dir, participant_labels=opts.participant_label)
    else:
        layout.check_bids_dir(opts.bids_dir)
    filters = layout.load_bids_filters(opts.bids_filter_file) if opts.bids_filter_file else None
    pairs, notes = layout.find_run_pairs(
        opts.bids_dir, participant_labels=opts.participant_label, session_labels=opts.session_label,
        task=opts.task, bids_filters=filters, eeg_derivatives=opts.eeg_derivatives,
        bold_derivatives=getattr(opts, "bold_derivatives", None),
        bold_space=getattr(opts, "bold_space", None),
    )
    model_tr, model_bins = _check_model(opts) if opts.model_path else (None, None)
    check_spectrogram_inputs(pairs, opts, model_bins)
    if model_bins is not None and opts.fmax is None:
        if opts.freq_bins is None:
            opts.freq_bins = model_bins  # spectrograms at the model's bins unless asked otherwise
        elif opts.freq_bins != model_bins:
            raise DataError(f"the model was trained on {model_bins} frequency bins but --freq-bins "
                            f"{opts.freq_bins} was given; leave --freq-bins out to use the "
                            "model's", path=opts.model_path)
    fetch_templates(pairs)
    init_output_dataset(opts.output_dir, opts.bids_dir)
    log_file = add_log_file(opts.output_dir, "participant")
    LOGGER.info("spec2vol %s participant level; log: %s", __version__, log_file)
    LOGGER.info("runs found:\n%s", layout.format_pair_table(pairs))
    for text in notes:
        LOGGER.warning("%s", text)

    run_opts = {k: v for k, v in vars(opts).items() if k != "argv"} | {"model_tr": model_tr}
    pairs = [p for p in pairs if p.eeg is not None or p.bold is not None]
    if opts.nprocs > 1 and len(pairs) > 1:
        with ProcessPoolExecutor(max_workers=min(opts.nprocs, len(pairs))) as pool:
            results = list(pool.map(process_run, pairs, [run_opts] * len(pairs)))
    else:
        results = [process_run(pair, run_opts) for pair in pairs]

    from spec2vol_bids import report

    subjects = sorted({r.entities["subject"] for r in results})
    for subject in subjects:
        _inventory(opts.output_dir, subject, [r for r in results if r.entities["subject"] == subject], notes)
        path = report.write_participant_report(opts.output_dir, subject)
        LOGGER.info("report: %s", path)
    provenance.write_provenance(
        opts.output_dir, level="participant", argv=opts.argv, config=run_opts,
        seeds={"seed": opts.seed}, started=started, finished=datetime.now(timezone.utc),
        stages={"runs": [asdict(r) for r in results]},
    )
    LOGGER.info("participant level done: %d runs of %d participants in %s", len(results),
                len(subjects), opts.output_dir)
    return 0
