"""Lazy, memory-mapped EEG→BOLD pairs over the participant-level derivatives.

A training sample ``j`` of a run pairs the spectrogram windows ``[j - context, j)`` with the
target volume ``j`` (see ``docs/interfaces.md``). Consecutive samples share 19 of their 20
windows, so materialising every ``(context, C, F)`` input would multiply the spectrogram data by
the context length; instead each run's spectrogram is memory-mapped and a sample is sliced from
it on demand. Targets are stored as compressed NIfTI, which cannot be memory-mapped, so each is
cached once as an uncompressed ``(V, D, H, W)`` float32 array in the work directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
import torch

from spec2vol_bids.config import CONTEXT, NORMALISATIONS, Participant
from spec2vol_bids.derivatives import atomic_path, content_digest, read_spectrogram
from spec2vol_bids.errors import DataError, NothingSelectedError
from spec2vol_bids.naming import (RUN_ENTITIES, SPACE_ENTITIES, SPECTROGRAM_SUFFIX, TARGET_SUFFIX,
                                  parse_name, run_key, sidecar_path)
from spec2vol_bids.spectra import select_channels

logger = logging.getLogger(__name__)

#: mapped bytes read before a dataset drops its memory maps: pages of a mapping count in the
#: process's resident set until it is unmapped, although the OS keeps them in its page cache
MAP_RECYCLE_BYTES = 128 * 1024**2


@dataclasses.dataclass(frozen=True)
class Run:
    """One run's participant-level derivatives.

    ``n_volumes`` is the number of paired volumes (EEG windows and BOLD volumes both present),
    or the number of EEG windows for a run without BOLD.
    """

    entities: dict
    spectrogram: Path
    meta: dict
    target: Path | None
    n_volumes: int

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def channels(self) -> list[str]:
        return list(self.meta["Channels"])

    @property
    def discard(self) -> int:
        return int(self.meta.get("DiscardVolumes", Participant.discard_volumes))

    @property
    def context(self) -> int:
        return int(self.meta.get("Context", CONTEXT))

    @property
    def first_sample(self) -> int:
        """Index (in source volumes) of the first volume that has a full context."""
        return self.discard + self.context

    @property
    def sample_volumes(self) -> np.ndarray:
        """Source volume indices of this run's samples."""
        return np.arange(self.first_sample, max(self.first_sample, self.n_volumes))

    @property
    def name(self) -> str:
        return self.spectrogram.name[: -len(SPECTROGRAM_SUFFIX)]


def find_runs(out_dir: str | Path, *, participant_label: Sequence[str] | None = None,
              session_label: Sequence[str] | str | None = None,
              task: Sequence[str] | str | None = None) -> list[Run]:
    """Find the runs with a spectrogram under ``out_dir`` and pair each with its target.

    Parameters
    ----------
    out_dir : path
        The spec2vol derivative dataset (OUTPUT_DIR).
    participant_label, session_label, task : str | list of str | None
        Keep only these (labels without their ``sub-``/``ses-`` prefix).

    Returns
    -------
    runs : list of Run
        Sorted by entities; ``target`` is ``None`` for runs without BOLD.
    """
    out_dir = Path(out_dir)
    wanted = {"subject": _as_set(participant_label, "sub-"), "session": _as_set(session_label, "ses-"),
              "task": _as_set(task, "task-")}
    targets = {}
    for path in sorted(out_dir.glob(f"sub-*/**/func/*{TARGET_SUFFIX}")):
        key = run_key(parse_name(path.name))
        if key in targets:
            raise DataError(f"two targets for one run ({targets[key].name} and {path.name}); "
                            "remove one", path=path.parent)
        targets[key] = path
    runs = []
    for path in sorted(out_dir.glob(f"sub-*/**/eeg/*{SPECTROGRAM_SUFFIX}")):
        entities = {k: v for k, v in parse_name(path.name).items() if k in RUN_ENTITIES}
        if any(sel is not None and entities.get(k) not in sel for k, sel in wanted.items()):
            continue
        meta = read_spectrogram(path, finite=True)[1]
        n_windows = int(meta["NumberOfWindows"])
        target = targets.get(run_key(entities))
        n_volumes = n_windows
        if target is not None:
            n_volumes = min(n_windows, int(nib.load(target).shape[3]))
        runs.append(Run(entities, path, meta, target, n_volumes))
    return runs


def _as_set(value, prefix: str) -> set | None:
    if value is None or (not isinstance(value, str) and len(value) == 0):
        return None
    values = [value] if isinstance(value, str) else value
    return {v[len(prefix):] if v.startswith(prefix) else v for v in values}


def _open_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read the spectrogram ({exc}); rerun the participant level",
                        path=path) from exc


def resolve_channels(runs: Sequence[Run], channels: Sequence[str] | None = None) -> list[str]:
    """The EEG channels (names, in order) that every run provides.

    Without ``channels`` all runs must have the same channel list; with it, each run must
    contain every named channel (they are then selected by name).
    """
    if not runs:
        raise NothingSelectedError("no runs to read")
    if channels:
        for run in runs:
            missing = [ch for ch in channels if ch not in run.channels]
            if missing:
                raise DataError(f"run {run.name} lacks channel(s) {', '.join(missing)} named by "
                                "--channels", path=run.spectrogram)
        return list(channels)
    reference = runs[0].channels
    differing = [run.name for run in runs if run.channels != reference]
    if differing:
        shown = ", ".join(differing[:5]) + (" …" if len(differing) > 5 else "")
        raise DataError(f"runs have different EEG channel sets: {runs[0].name} has {len(reference)} "
                        f"channels, but {shown} differ; name a common set with --channels")
    return list(reference)


def channel_index(run: Run, channels: Sequence[str]) -> np.ndarray | slice:
    """Indices of ``channels`` in ``run``'s spectrogram (a plain slice when they coincide)."""
    if list(channels) == run.channels:
        return slice(None)
    position = {name: i for i, name in enumerate(run.channels)}
    return np.array([position[name] for name in channels])


def cache_target(path: str | Path, work_dir: str | Path) -> Path:
    """Cache a target NIfTI as an uncompressed ``(V, D, H, W)`` float32 ``.npy``; return its path.

    The cache key is the source's resolved path, size and modification time, so a rewritten
    target gets a new cache file; the file is written atomically, so concurrent jobs may share
    one work directory.
    """
    path = Path(path)
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = Path(work_dir) / "targets" / f"{path.name[: -len('.nii.gz')]}-{key}.npy"
    if cached.exists():
        return cached
    try:
        data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"cannot read the target ({exc}); rerun the participant level", path=path) from exc
    if data.ndim != 4:
        raise DataError(f"the target is {data.ndim}-D, expected 4-D", path=path)
    # (X, Y, Z, V) -> (V, Z, X, Y): one sample's volume becomes one contiguous (D, H, W) block
    with atomic_path(cached) as tmp:
        np.save(tmp, np.ascontiguousarray(data.transpose(3, 2, 0, 1)))
    return cached




def norm_stats(runs: Iterable[Run], channels: Sequence[str], *, chunk: int = 64,
               kind: str = "minmax") -> dict:
    """EEG scaling statistics over the windows the runs' samples use, read in chunks.

    Sample ``j`` reads windows ``[j - context, j)``, so a run's samples use windows
    ``[discard, n_volumes - 1)``; windows before ``discard`` are never model input.

    ``kind="minmax"`` (the published scaling) gives one (min, max) pair for all inputs;
    ``kind="standard"`` also gives a mean and a standard deviation per (channel, bin), so that
    every input feature varies around 0 instead of sitting on a fixed per-electrode pattern.
    ``kind="run"`` holds no numbers: every run is standardised per (channel, bin) with its own
    statistics when it is read (:func:`run_norm`), training and held-out runs alike, so that
    a subject's EEG offsets (impedances, cap fit) do not pass for signal. It uses a run's EEG
    only, never its BOLD.
    """
    if kind not in NORMALISATIONS:
        raise ValueError(f"unknown EEG normalisation {kind!r}")
    if kind == "run":
        return {"kind": "run"}
    lo, hi = np.inf, -np.inf
    total = total_sq = None
    count = 0
    for run in runs:
        spec = _open_npy(run.spectrogram)
        index = channel_index(run, channels)
        stop = run.n_volumes - 1
        for start in range(run.discard, stop, chunk):
            block = select_channels(spec[start:min(start + chunk, stop)], index)
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
            if kind == "standard":
                block = block.astype(np.float64)
                total = block.sum(0) if total is None else total + block.sum(0)
                total_sq = (block ** 2).sum(0) if total_sq is None else total_sq + (block ** 2).sum(0)
                count += len(block)
        del spec
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DataError("no EEG windows to compute the normalisation from (runs too short for "
                        "discard + context volumes)")
    if hi <= lo:
        raise DataError("the EEG spectrograms are constant; check the participant-level output")
    stats = {"kind": kind, "min": lo, "max": hi}
    if kind == "standard":
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0))
        stats["mean"] = mean.astype(np.float32).tolist()
        stats["std"] = np.where(std > 1e-6, std, 1.0).astype(np.float32).tolist()
    return stats


def run_norm(run: Run, channels: Sequence[str], norm: dict) -> dict:
    """The statistics ``run``'s inputs are scaled with: ``norm`` itself, or for ``kind="run"``
    the run's own per-(channel, bin) mean and SD over the windows its samples use."""
    if norm.get("kind") != "run":
        return norm
    spec = _open_npy(run.spectrogram)
    windows = select_channels(spec[run.discard:run.n_volumes - 1], channel_index(run, channels))
    if not len(windows):
        raise DataError("no EEG windows to standardise (the run is too short for discard + "
                        "context volumes)", path=run.spectrogram)
    return window_stats(windows)


def window_stats(windows: np.ndarray) -> dict:
    """``kind="standard"`` statistics of ``(n, C, F)`` windows: mean and SD per (channel, bin)."""
    windows = np.asarray(windows, dtype=np.float64)
    std = windows.std(axis=0)
    return {"kind": "standard", "mean": windows.mean(axis=0).astype(np.float32).tolist(),
            "std": np.where(std > 1e-6, std, 1.0).astype(np.float32).tolist()}


def apply_norm(x: np.ndarray, norm: dict) -> np.ndarray:
    """Scale ``(..., C, F)`` EEG inputs with :func:`norm_stats`'s statistics, in place."""
    if norm.get("kind", "minmax") == "standard":
        x -= np.asarray(norm["mean"], dtype=x.dtype)
        x /= np.asarray(norm["std"], dtype=x.dtype)
    else:
        x -= norm["min"]
        x /= norm["max"] - norm["min"]
    return x


class PairedDataset(torch.utils.data.Dataset):
    """Samples ``(x, y)`` of a set of runs, sliced from memory maps on demand.

    Parameters
    ----------
    runs : list of Run
        The runs; they need targets when ``work_dir`` is given.
    channels : list of str
        EEG channels, in model order, selected from each run by name.
    norm : dict
        EEG scaling (:func:`norm_stats`, from training subjects only, or ``kind="run"``).
    work_dir : path | None
        Where targets are cached; ``None`` gives inputs only (``y`` is omitted).

    Notes
    -----
    ``x`` is ``(context, C, F)`` scaled to ``[0, 1]`` with ``norm``; ``y`` is ``(D, H, W)``.
    Memory maps are opened lazily in each process (they are not pickled to DataLoader workers)
    and dropped after :data:`MAP_RECYCLE_BYTES` of reads so that resident memory stays bounded.
    """

    def __init__(self, runs: Sequence[Run], channels: Sequence[str], norm: dict,
                 work_dir: str | Path | None = None):
        self.runs = list(runs)
        self.channels = list(channels)
        self.norm = norm
        self.with_target = work_dir is not None
        if self.with_target:
            missing = [run.name for run in self.runs if run.target is None]
            if missing:
                raise DataError(f"run(s) without a BOLD target cannot be used for training or "
                                f"evaluation: {', '.join(missing)}")
            self._targets = [cache_target(run.target, work_dir) for run in self.runs]
        self._index = [channel_index(run, self.channels) for run in self.runs]
        self._norms = [run_norm(run, self.channels, norm) for run in self.runs]
        counts = [len(run.sample_volumes) for run in self.runs]
        self._run_of = np.repeat(np.arange(len(self.runs)), counts)
        self._volume_of = np.concatenate([run.sample_volumes for run in self.runs] or [np.zeros(0, int)])
        self._maps: dict = {}
        self._mapped_bytes = 0

    def __len__(self) -> int:
        return len(self._run_of)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"], state["_mapped_bytes"] = {}, 0
        return state

    def sample(self, i: int) -> tuple[int, int]:
        """``(run index, source volume index)`` of sample ``i``."""
        return int(self._run_of[i]), int(self._volume_of[i])

    def _map(self, key, path):
        if self._mapped_bytes > MAP_RECYCLE_BYTES:
            self._maps.clear()
            self._mapped_bytes = 0
        if key not in self._maps:
            self._maps[key] = np.load(path, mmap_mode="r")
        return self._maps[key]

    def __getitem__(self, i: int):
        r, j = self.sample(i)
        run = self.runs[r]
        spec = self._map(("x", r), run.spectrogram)
        block = spec[j - run.context:j]
        self._mapped_bytes += block.nbytes
        x = apply_norm(select_channels(block, self._index[r]), self._norms[r])
        if not self.with_target:
            return torch.from_numpy(x)
        volume = self._map(("y", r), self._targets[r])[j]
        self._mapped_bytes += volume.nbytes
        return torch.from_numpy(x), torch.from_numpy(np.array(volume, dtype=np.float32))

    def target_shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of the targets."""
        return tuple(np.load(self._targets[0], mmap_mode="r").shape[1:])

    def freq_bins(self) -> int:
        return int(_open_npy(self.runs[0].spectrogram).shape[2])

    def mean_target(self) -> np.ndarray:
        """Mean target volume over all samples, ``(D, H, W)`` float32 (the mean-volume baseline)."""
        total, count = None, 0
        for r, run in enumerate(self.runs):
            vols = np.load(self._targets[r], mmap_mode="r")
            for start in range(run.first_sample, run.n_volumes, 32):
                part = np.asarray(vols[start:min(start + 32, run.n_volumes)], dtype=np.float64)
                total = part.sum(axis=0) if total is None else total + part.sum(axis=0)
                count += len(part)
            del vols
        if not count:
            raise DataError("no samples to average (runs too short for discard + context volumes)")
        return (total / count).astype(np.float32)


def check_same_preprocessing(runs: Sequence[Run], out_dir: Path) -> None:
    """Refuse runs that one model cannot learn from together.

    Their spectrograms must have one context, one TR (bin k is k / TR Hz and the context spans
    context · TR s) and the same frequency bins, and their targets one grid, one space and one
    source (raw or preprocessed BOLD: a voxel of one is not a voxel of the other);
    participant-level runs with other options into one OUTPUT_DIR would otherwise be mixed.

    Raises
    ------
    DataError (65)
        Naming what differs and the subjects of each value.
    """
    def bins(run):
        hz = run.meta["FrequencyBinsHz"]
        return f"{len(hz)} bins, {hz[0]:g}–{hz[-1]:g} Hz" if len(hz) else "no bins"

    aspects = {"context (TR windows)": lambda run: run.context,
               "repetition time (s)": lambda run: f"{float(run.meta['RepetitionTime']):g}",
               "frequency bins": bins,
               "target grid": lambda run: "x".join(map(str, nib.load(run.target).shape[:3])),
               "target space": lambda run: "_".join(
                   f"{key}-{value}" for key, value in parse_name(run.target.name).items()
                   if key in SPACE_ENTITIES) or "no space entity",
               "BOLD source": _bold_source}
    for aspect, value_of in aspects.items():
        found: dict = {}
        for run in runs:
            found.setdefault(value_of(run), set()).add(f"sub-{run.subject}")
        if len(found) > 1:
            shown = "; ".join(f"{value}: {' '.join(sorted(subjects))}"
                              for value, subjects in found.items())
            raise DataError(f"the runs' derivatives differ in their {aspect} ({shown}); one model "
                            "learns from one preprocessing: rerun the participant level for these "
                            "subjects with the same options (runs of another dataset go to an "
                            "OUTPUT_DIR of their own), or select the subjects that agree "
                            "(--participant-label)", path=out_dir)


def _bold_source(run: Run) -> str:
    """Whether a run's target was made from the raw BOLD or from preprocessed BOLD (its
    sidecar's first source lies in the raw dataset, outside its derivatives, or not)."""
    try:
        sources = json.loads(sidecar_path(run.target).read_text()).get("Sources") or [""]
    except (OSError, ValueError, AttributeError):
        return "unknown"
    first = str(sources[0])
    raw = first.startswith("bids:raw:") and not first.startswith("bids:raw:derivatives/")
    return "raw BOLD" if raw else "preprocessed BOLD"


def run_digest(run: Run) -> str:
    """A digest of a run's participant-level derivatives: their names and sidecars, whose
    ``InputHash`` changes with the raw inputs and the options they were made with, and the
    content of the spectrogram and the target themselves (:func:`content_digest`), which an
    edit outside spec2vol changes without their sidecars."""
    h = hashlib.sha256(f"{run.spectrogram.name}\n{json.dumps(run.meta, sort_keys=True)}\n".encode())
    h.update(content_digest(run.spectrogram))
    if run.target is not None:
        sidecar = sidecar_path(run.target)
        h.update(f"{run.target.name}\n".encode())
        h.update(sidecar.read_bytes() if sidecar.is_file() else b"")
        h.update(content_digest(run.target))
    return h.hexdigest()[:16]


def subjects_of(runs: Iterable[Run]) -> list[str]:
    """Sorted unique subject labels."""
    return sorted({run.subject for run in runs})
