"""Write a whole simulated dataset: :func:`simulate_dataset` and the raw dataset's own files.

Subjects, sessions and runs are simulated one after the other into a hidden folder beside the
output, which is renamed into place when complete. Every random draw comes from a generator
keyed by purpose, subject, session and run, so a dataset's first subject does not depend on
how many others there are.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spec2vol_bids import __version__
from spec2vol_bids.derivatives import write_json, write_text
from spec2vol_bids.errors import OutputError, output_error
from spec2vol_bids.naming import build_name, run_dir, run_label
from spec2vol_bids.simulate.bold import load_template, subject_anatomy, write_bold_run
from spec2vol_bids.simulate.eeg_writers import GENERATOR, eeg_run, write_eeg_run
from spec2vol_bids.simulate.latent import channel_names, latent_timecourses, source_table, volume_truth
from spec2vol_bids.simulate.options import Options, check_options
from spec2vol_bids.simulate.truth import write_maps, write_run_truth, write_truth_files

_STREAM_ANATOMY, _STREAM_LATENT, _STREAM_EEG, _STREAM_BACKGROUND, _STREAM_SENSOR, _STREAM_BOLD = range(1, 7)
_BASE_DATE = datetime.datetime(2021, 3, 1, 9, 0, 0, tzinfo=datetime.timezone.utc)
_KINDS = {"eeg+bold": "EEG and BOLD", "eeg": "EEG only", "bold": "BOLD only"}


def simulate_dataset(
    out_dir: str | Path, *, subjects: int = 4, sessions: int = 0, runs: int = 1, task: str = "rest",
    volumes: int = 150, tr: float = 2.0, sfreq: float = 250.0, channels: int = 64,
    grid: tuple[int, int, int] = (64, 64, 32), eeg_format: str = "vhdr", volume_marker: str = "R128",
    eeg_only_subjects: int = 0, bold_only_subjects: int = 0, sources: int = 6,
    eeg_offset: float | None = None, eeg_dtype: str = "float32", seed: int = 0, coupling: str = "linear",
    hrf_delay: float = 0.0, overwrite: bool = False, progress=None,
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
    coupling : {'linear', 'u-shaped'}
        How a source's EEG amplitude drives its BOLD regressor (:func:`~.latent.coupling_drive`):
        linearly, or through ``|log a_k − E log a_k|``, a positive control for models that can
        learn a nonlinear relation.
    hrf_delay : float
        Seconds by which the BOLD response comes later than SPM's canonical HRF (−2 to 4; its
        peak at 5 + ``hrf_delay`` s): data whose response is not the one a model assumes.
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
    opts = check_options(
        subjects=subjects, sessions=sessions, runs=runs, task=task, volumes=volumes, tr=tr, sfreq=sfreq,
        channels=channels, grid=grid, eeg_format=eeg_format, volume_marker=volume_marker,
        eeg_only_subjects=eeg_only_subjects, bold_only_subjects=bold_only_subjects, sources=sources,
        eeg_offset=eeg_offset, eeg_dtype=eeg_dtype, seed=seed, coupling=coupling,
        hrf_delay=hrf_delay,
    )
    out_dir = Path(out_dir)
    _build_in_place(out_dir, _check_output(out_dir, overwrite), opts, progress or (lambda line: None))
    return out_dir


def _build_in_place(out_dir: Path, replace: bool, opts: Options, progress) -> None:
    """Build the dataset beside ``out_dir`` and rename it into place; OS errors become
    :class:`OutputError` (74 for a full disk, else 73)."""
    target = out_dir.absolute()
    # No ".<name>" pattern: mne-bids takes any path containing ".ds" for a CTF recording.
    partial = target.parent / f".partial-{os.getpid()}-{target.name}"
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _build(partial, opts, progress)
        if replace:
            shutil.rmtree(target)
        elif target.exists():
            target.rmdir()
        os.replace(partial, target)
    except OSError as exc:
        raise output_error(exc, "the dataset", out_dir) from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _check_output(out_dir: Path, overwrite: bool) -> bool:
    """Refuse a non-empty ``out_dir`` unless ``overwrite`` and it is one of our datasets.

    Returns whether an existing dataset is to be replaced.
    """
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


# ------------------------------------------------------------------------------------------
# subjects and runs


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator per purpose, subject, session and run.

    Keying the streams (rather than drawing from one generator in loop order) keeps subject 1
    identical whatever the number of subjects, sessions or runs.
    """
    return np.random.default_rng([seed, *keys])


@dataclass(frozen=True)
class _Plan:
    """What every run of a dataset shares."""

    root: Path
    truth: Path
    opts: Options
    ch_names: list
    sources: list
    topographies: np.ndarray
    onsets: np.ndarray  # s, EEG clock
    n_times: int  # EEG samples per run
    markers: list  # (sample, description) per volume


def _build(root: Path, opts: Options, progress) -> None:
    ch_names = channel_names(opts.channels)
    sources, topographies = source_table(opts.sources, ch_names)
    truth = root / "derivatives" / "simulation"
    _write_dataset_files(root, opts)
    write_truth_files(truth, _parameters(opts), sources, ch_names, topographies, _generated_by())
    template = load_template(opts.grid) if opts.eeg_only_subjects < opts.subjects else None
    onsets = opts.eeg_offset + np.arange(opts.volumes) * opts.tr
    marker_samples = np.rint(onsets * opts.sfreq).astype(int)
    markers = [] if opts.volume_marker == "none" else [(int(s), opts.volume_marker) for s in marker_samples]
    plan = _Plan(root, truth, opts, ch_names, sources, topographies, onsets,
                 int(round(opts.eeg_duration * opts.sfreq)), markers)
    width = max(2, len(str(opts.subjects)))
    participants, scans = [], {}
    for i in range(1, opts.subjects + 1):
        label = f"{i:0{width}d}"
        participants.append(_participant(_rng(opts.seed, _STREAM_ANATOMY, i), label, opts.kind(i)))
        _write_subject(plan, i, label, template, scans, progress)
    _write_participants(root, participants)
    for path, rows in scans.items():
        lines = ["filename\tacq_time"] + [f"{f}\t{d.strftime('%Y-%m-%dT%H:%M:%S')}" for f, d in rows]
        write_text(path, "\n".join(lines) + "\n")


def _write_subject(plan: _Plan, i: int, label: str, template, scans: dict, progress) -> None:
    """Subject ``i``'s runs; their rows of the scans files are added to ``scans``."""
    opts = plan.opts
    kind = opts.kind(i)
    anatomy = None
    if "bold" in kind:
        anatomy = subject_anatomy(_rng(opts.seed, _STREAM_ANATOMY, i, 1), template, opts.grid, plan.sources)
        write_maps(plan.truth, label, anatomy, opts.grid, plan.sources)
    sessions = [None] if opts.sessions == 0 else [str(j) for j in range(1, opts.sessions + 1)]
    run_labels = [None] if opts.runs == 1 else [str(r) for r in range(1, opts.runs + 1)]
    for j, session in enumerate(sessions):
        for r, run in enumerate(run_labels):
            entities = {"subject": label, "session": session, "task": opts.task, "run": run}
            scan_rows = scans.setdefault(_scans_path(plan.root, entities), [])
            scan_rows += _write_run(plan, entities, (i, j, r), kind, anatomy)
            progress(f"{run_label(entities)}: {_KINDS[kind]}")


def _write_run(plan: _Plan, entities: dict, keys: tuple[int, int, int], kind: str, anatomy) -> list:
    """One run's ground truth, EEG and BOLD; returns its rows of the scans file."""
    opts = plan.opts
    i, j, r = keys
    meas_date = _BASE_DATE + datetime.timedelta(days=i + 28 * j, minutes=15 * r)
    latent = latent_timecourses(_rng(opts.seed, _STREAM_LATENT, *keys), plan.sources, opts.eeg_duration)
    times, amplitude, _ = latent
    means, regressors = volume_truth(times, amplitude, plan.onsets, opts.tr, opts.coupling, opts.hrf_delay)
    write_run_truth(plan.truth, entities, plan.sources, times, amplitude, plan.onsets, means, regressors, opts.tr)
    rows = []
    if "eeg" in kind:
        rngs = tuple(_rng(opts.seed, stream, *keys) for stream in (_STREAM_EEG, _STREAM_BACKGROUND, _STREAM_SENSOR))
        run = eeg_run(rngs, sfreq=opts.sfreq, n_times=plan.n_times, duration=opts.eeg_duration,
                      ch_names=plan.ch_names, sources=plan.sources, topographies=plan.topographies, latent=latent)
        path = write_eeg_run(plan.root, plan.root / ".native", entities, run, plan.ch_names, plan.markers,
                             meas_date, opts.eeg_format, opts.eeg_dtype)
        rows.append((f"eeg/{path.name}", meas_date))
    if anatomy is not None:
        name = build_name(entities, "bold", ".nii.gz")
        write_bold_run(run_dir(plan.root, entities, "func") / name, _rng(opts.seed, _STREAM_BOLD, *keys),
                       anatomy, regressors, opts.tr, opts.task)
        rows.append((f"func/{name}", meas_date + datetime.timedelta(seconds=opts.eeg_offset)))
    return rows


def _scans_path(root: Path, entities: dict) -> Path:
    folder = run_dir(root, entities, "eeg").parent
    return folder / build_name({"subject": entities["subject"], "session": entities["session"]}, "scans", ".tsv")


# ------------------------------------------------------------------------------------------
# the raw dataset's own files


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


def _parameters(opts: Options) -> dict:
    """The options as JSON values, for the ground truth's ``sources.json``."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.__dict__.items()}


def _write_dataset_files(root: Path, opts: Options) -> None:
    """The raw dataset's description and README."""
    write_json(
        root / "dataset_description.json",
        {
            "Name": _name(opts),
            "BIDSVersion": "1.9.0",
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": [GENERATOR],
            "GeneratedBy": _generated_by(),
        },
    )
    write_text(root / "README", _readme(opts))


def _name(opts: Options) -> str:
    """A Name of its own for every seed and settings: spec2vol tells datasets apart by Name (an
    OUTPUT_DIR holds one dataset's derivatives), and two simulations are two datasets."""
    import hashlib

    settings = json.dumps(_parameters(opts), sort_keys=True, default=str)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
    return f"spec2vol simulated simultaneous EEG-fMRI (seed {opts.seed}, settings {digest})"


def _readme(opts: Options) -> str:
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
        f"with the canonical HRF{f' delayed by {opts.hrf_delay:g} s' if opts.hrf_delay else ''}, modulates "
        "the BOLD signal in a blob-shaped map"
        + (" (here through |log amplitude − its mean|, a u-shaped coupling: a positive control for "
           "nonlinear models, not a physiological claim)" if opts.coupling == "u-shaped" else "")
        + ". The ground truth "
        "(amplitudes, regressors, maps, topographies) is in derivatives/simulation/.\n\n"
        "Regenerate with:\n\n"
        f"    {GENERATOR} OUT_DIR --subjects {opts.subjects} --sessions {opts.sessions} --runs {opts.runs} "
        f"--task {opts.task} --volumes {opts.volumes} --tr {opts.tr:g} --sfreq {opts.sfreq:g} "
        f"--channels {opts.channels} --grid {grid} --eeg-format {opts.eeg_format} "
        f"--volume-marker '{opts.volume_marker}' --eeg-only-subjects {opts.eeg_only_subjects} "
        f"--bold-only-subjects {opts.bold_only_subjects} --sources {opts.sources} "
        f"--eeg-offset {opts.eeg_offset:g} --eeg-dtype {opts.eeg_dtype} --seed {opts.seed} "
        f"--coupling {opts.coupling} --hrf-delay {opts.hrf_delay:g}\n"
    )
