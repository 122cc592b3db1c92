"""BIDS file names: the one entity table, name parser and name builder spec2vol uses.

Every module that reads or writes a BIDS name goes through here: :func:`parse_name` for what a
name says, :func:`build_name` and :func:`run_dir` for where an output goes, :func:`run_key` and
:func:`run_label` to tell runs apart, :func:`source_uri` for the ``Sources`` of a sidecar, and
the suffixes of spec2vol's own derivatives.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from spec2vol_bids.errors import UsageError

_LABEL = re.compile(r"^[A-Za-z0-9]+$")

#: The BIDS entities, in the order they appear in a file name: (long name, key in the name).
#: Long names are pybids' (``subject``, ``acquisition``), so filters written for pybids and
#: fMRIPrep use them too.
ENTITIES = (
    ("subject", "sub"), ("session", "ses"), ("sample", "sample"), ("task", "task"),
    ("tracksys", "tracksys"), ("acquisition", "acq"), ("nucleus", "nuc"), ("volume", "voi"),
    ("ceagent", "ce"), ("tracer", "trc"), ("stain", "stain"), ("reconstruction", "rec"),
    ("direction", "dir"), ("run", "run"), ("modality", "mod"), ("echo", "echo"),
    ("flip", "flip"), ("inversion", "inv"), ("mt", "mt"), ("part", "part"),
    ("processing", "proc"), ("hemisphere", "hemi"), ("space", "space"), ("cohort", "cohort"),
    ("split", "split"),
    ("recording", "recording"), ("chunk", "chunk"), ("segmentation", "seg"),
    ("resolution", "res"), ("density", "den"), ("label", "label"), ("description", "desc"),
)
_NAME_OF = {key: name for name, key in ENTITIES}
_KEY_OF = {name: key for name, key in ENTITIES}
# spec2vol names res and desc by their keys (``res``, ``desc``), as fMRIPrep's outputs do
_SHORT = {"resolution": "res", "description": "desc"}
for long_name, short in _SHORT.items():
    _NAME_OF[short] = short
    _KEY_OF[short] = short

#: Every name :func:`parse_name` returns an entity under (filters may use them).
ENTITY_NAMES = frozenset(_NAME_OF.values())

#: The entities that identify a run (EEG and BOLD of a run share them).
RUN_ENTITIES = ("subject", "session", "task", "acquisition", "run")
#: The entities that say which space a BOLD series lies in (a template's cohort among them).
SPACE_ENTITIES = ("space", "cohort", "res")

#: spec2vol's derivatives (a run's name, then these)
SPECTROGRAM_SUFFIX = "_desc-spec2vol_spectrogram.npy"
TARGET_SUFFIX = "_desc-target_bold.nii.gz"
SYNTH_SUFFIX = "_desc-synth_bold.nii.gz"
MASK_SUFFIX = "_desc-brain_mask.nii.gz"
STATMAP_SUFFIX = "_desc-dynamics_statmap.nii.gz"


def parse_name(filename: str | Path) -> dict:
    """What a BIDS file name says: its entities by long name, ``suffix`` and ``extension``.

    >>> parse_name("sub-01_ses-1_task-rest_run-02_desc-target_bold.nii.gz")["run"]
    '02'

    Entities spec2vol writes by key (``res``, ``desc``) are returned under that key; pairs
    whose key is not a BIDS entity are returned under their key as they are.
    """
    name = Path(filename).name
    stem, dot, rest = name.partition(".")
    parts = stem.split("_")
    out: dict = {}
    for part in parts[:-1] if len(parts) > 1 else parts:
        key, sep, value = part.partition("-")
        if sep:
            out[_NAME_OF.get(key, key)] = value
    if len(parts) > 1 and "-" not in parts[-1]:
        out["suffix"] = parts[-1]
    if dot:
        out["extension"] = "." + rest
    return out


def build_name(entities: Mapping[str, str | None], suffix: str, extension: str, **extra: str) -> str:
    """A BIDS file name from entities (long names or keys) in the standard order.

    >>> build_name({"subject": "01", "task": "rest", "run": "1"}, "bold", ".nii.gz", desc="synth")
    'sub-01_task-rest_run-1_desc-synth_bold.nii.gz'
    """
    values = {_NAME_OF.get(k, k): v for k, v in {**entities, **extra}.items() if v not in (None, "")}
    order = [name if name not in _SHORT else _SHORT[name] for name, _ in ENTITIES]
    parts = [f"{_KEY_OF[name]}-{values[name]}" for name in order if name in values]
    return "_".join(parts + [suffix]) + extension


def run_label(entities: Mapping[str, str | None]) -> str:
    """A run's name stem from its entities, e.g. ``sub-01_ses-1_task-rest_run-1``; the
    :data:`SPACE_ENTITIES` are kept when given (a BOLD output's run), ``desc`` is not."""
    kept = {k: v for k, v in entities.items() if _NAME_OF.get(k, k) not in ("desc", "suffix", "extension")}
    return build_name(kept, "", "")[:-1]


def run_key(entities: Mapping[str, str | None]) -> tuple:
    """What makes two files the same run: subject, session, task, acquisition and run, with
    ``run-01`` and ``run-1`` equal."""
    values = {_NAME_OF.get(k, k): v for k, v in entities.items()}

    def value(name):
        v = values.get(name)
        return int(v) if name == "run" and v is not None and str(v).isdigit() else v

    return tuple(value(name) for name in RUN_ENTITIES)


def run_dir(out_dir: str | Path, entities: Mapping[str, str | None], datatype: str) -> Path:
    """``OUT/sub-<s>/[ses-<t>/]<datatype>`` for a run's entities."""
    values = {_NAME_OF.get(k, k): v for k, v in entities.items()}
    path = Path(out_dir) / f"sub-{values['subject']}"
    if values.get("session"):
        path = path / f"ses-{values['session']}"
    return path / datatype


def relative_path(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` (POSIX), or its absolute path when it lies elsewhere."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def dataset_root(path: str | Path) -> Path:
    """The dataset a file of a ``sub-<label>`` folder belongs to: the folder above that one."""
    path = Path(path)
    return next((p.parent for p in path.parents if p.name.startswith("sub-")), path.parent)


def source_uri(path: str | Path, root: str | Path, dataset: str = "raw") -> str:
    """A sidecar's ``Sources`` entry: a BIDS URI ``bids:<dataset>:<relative path>`` for a file
    inside ``root`` (``dataset=""`` names the dataset the sidecar is in), else the file's
    absolute path."""
    relative = relative_path(path, root)
    return relative if relative.startswith("/") else f"bids:{dataset}:{relative}"


def source_path(uri: str, root: str | Path, dataset: str = "raw") -> Path:
    """The file a :func:`source_uri` names: ``bids:<dataset>:<relative path>`` under ``root``,
    else the absolute path it is."""
    prefix = f"bids:{dataset}:"
    return Path(root) / uri.removeprefix(prefix) if uri.startswith(prefix) else Path(uri)


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of a data file: its name with ``.json`` for every extension."""
    path = Path(path)
    return path.with_name(path.name.split(".")[0] + ".json")


def is_label(text: str) -> bool:
    """Whether ``text`` is a BIDS label: letters and digits only."""
    return bool(_LABEL.match(text))


def clean_labels(labels: Iterable[str] | str | None, prefix: str, what: str) -> list[str]:
    """Labels without their ``<prefix>-`` (``sub-01`` or ``01``), in order, without duplicates.

    Raises
    ------
    UsageError (64)
        A label with a path separator or ``..``, or other than letters and digits.
    """
    if labels is None:
        return []
    if isinstance(labels, (str, os.PathLike)):
        labels = [labels]
    cleaned = []
    for raw in labels:
        label = str(raw).strip()
        if "/" in label or "\\" in label or ".." in label:
            raise UsageError(f"{what} label {raw!r} contains a path separator or '..'; give the "
                             "bare label, e.g. 01")
        if label.startswith(f"{prefix}-"):
            label = label[len(prefix) + 1:]
        if not is_label(label):
            raise UsageError(f"{what} label {raw!r} is not a BIDS label (letters and digits "
                             f"only, with or without the {prefix}- prefix)")
        if label not in cleaned:
            cleaned.append(label)
    return cleaned
