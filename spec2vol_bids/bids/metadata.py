"""Sidecar metadata of a run: the JSON files that apply to it and its repetition time.

Sidecars follow the BIDS inheritance principle: from the dataset's root down to the file's own
folder, the file whose entities are all among the data file's applies at each level, the more
specific ones overriding the more general.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

from spec2vol_bids.bids.filters import same_value
from spec2vol_bids.errors import DataError, MissingInputError, one_line
from spec2vol_bids.naming import parse_name


def inherited_sidecars(root: Path, entities: Mapping, suffix: str, extension: str) -> list[Path]:
    """Files ``*_<suffix><extension>`` that apply to a file by the BIDS inheritance principle.

    Levels run from the dataset root down to the file's own folder; at each level the file
    whose entities are all among the target's (the one with most entities, if several) applies.
    """
    subject, session = entities.get("subject"), entities.get("session")
    datatype = entities.get("datatype")
    levels = [root]
    if subject:
        levels.append(levels[-1] / f"sub-{subject}")
        if session:
            levels.append(levels[-1] / f"ses-{session}")
        if datatype:
            levels.append(levels[-1] / datatype)
    found = []
    for level in levels:
        best, best_n = None, -1
        for candidate in sorted(level.glob(f"*{suffix}{extension}")):
            if not (candidate.name == f"{suffix}{extension}"
                    or candidate.name.endswith(f"_{suffix}{extension}")):
                continue
            cand = {k: v for k, v in parse_name(candidate).items()
                    if k not in ("suffix", "extension", "datatype")}
            if all(same_value(k, entities.get(k), v) for k, v in cand.items()) \
                    and len(cand) > best_n:
                best, best_n = candidate, len(cand)
        if best is not None:
            found.append(best)
    return found


def bold_metadata(pair) -> dict:
    """The BOLD sidecar metadata of a run, merged along the inheritance chain.

    Raises
    ------
    DataError (65)
        A sidecar is not a JSON object.
    """
    return merged_json(pair.bold_sidecars)


def repetition_time(pair) -> float:
    """The repetition time (s) of a run's BOLD series.

    Taken from ``RepetitionTime`` in the BOLD sidecars (the BIDS source of truth), else from the
    NIfTI header (``pixdim[4]``, converted from ms or µs by its time unit; unknown units are
    taken as seconds, as nibabel does).

    Raises
    ------
    DataError (65)
        Neither the sidecars nor the header give a positive repetition time, a sidecar value is
        not a positive number, or the NIfTI file cannot be read.
    MissingInputError (66)
        The BOLD file does not exist.
    """
    tr = _sidecar_tr(pair.bold_sidecars)
    if tr is not None:
        return tr
    if pair.bold is None:
        raise DataError("this run has no BOLD series and no *_bold.json with RepetitionTime "
                        "applies to it", path=pair.eeg)
    tr = header_repetition_time(pair)
    if tr is None:
        where = pair.bold_json.name if pair.bold_json else pair.bold.name.replace(
            "".join(pair.bold.suffixes), ".json")
        raise DataError("RepetitionTime is missing from both the BOLD sidecar and the NIfTI "
                        f"header (pixdim[4]); add \"RepetitionTime\" (s) to {where}",
                        path=pair.bold)
    return tr


def eeg_repetition_time(pair) -> float | None:
    """The repetition time (s) an EEG-only run was recorded at, when its sidecars say.

    Looked up in the BOLD sidecars the run would inherit (e.g. a top-level
    ``task-rest_bold.json``), then as ``RepetitionTime`` in its EEG sidecars. ``None`` when
    neither has one.
    """
    tr = _sidecar_tr(pair.bold_sidecars)
    return tr if tr is not None else _sidecar_tr(pair.eeg_sidecars)


def stated(sidecars: Iterable[Path], key: str) -> tuple[object, Path] | None:
    """The value of ``key`` after inheritance, and the sidecar it comes from; None if unset.

    Every sidecar is read, so one that is not a JSON object is refused (65) wherever it lies."""
    metas = [(read_sidecar(path), path) for path in sidecars]
    return next(((meta[key], path) for meta, path in reversed(metas) if key in meta), None)


def _sidecar_tr(sidecars: tuple[Path, ...]) -> float | None:
    found = stated(sidecars, "RepetitionTime")
    if found is None:
        return None
    value, source = found
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise DataError(f"RepetitionTime must be a positive number of seconds, not {value!r}",
                        path=source)
    return float(value)


def header_repetition_time(pair) -> float | None:
    """The repetition time (s) the NIfTI header of a run's BOLD series gives, or None.

    ``pixdim[4]``, converted from ms or µs by its time unit (unknown units are taken as seconds,
    as nibabel does); None for a run without BOLD or a header with no positive value.

    Raises
    ------
    DataError (65)
        The NIfTI file cannot be read.
    MissingInputError (66)
        The BOLD file does not exist.
    """
    from spec2vol_bids import bold

    if pair.bold is None:
        return None
    if not pair.bold.is_file():
        raise MissingInputError("BOLD file not found", path=pair.bold)
    return bold.header_tr(bold.load_bold(pair.bold))


def merged_json(paths: Iterable[Path]) -> dict:
    merged: dict = {}
    for path in paths:
        merged.update(read_sidecar(path))
    return merged


def read_sidecar(path: Path) -> dict:
    """A JSON sidecar, which must hold an object (65 otherwise)."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read the JSON sidecar ({one_line(exc)})", path=path) from exc
    if not isinstance(content, dict):
        raise DataError("a JSON sidecar must hold a JSON object", path=path)
    return content
