"""Find the EEG recordings of a BIDS dataset and pair each with its BOLD run.

A *run* is identified by subject, session, task, acquisition and run index. Each EEG recording
(``.vhdr``, ``.edf``, ``.bdf``, ``.set`` or ``.fif``, from the raw tree or from an EEG derivative
folder) is paired with the BOLD run carrying the same entities. An EEG derivative folder may also
be a spec2vol output dataset: its ``*_desc-spec2vol_spectrogram.npy`` then stand for the EEG of
their runs, and a spec2vol output given as BOLD derivatives yields its ``*_desc-target_bold``
series, so that one spec2vol run can feed the next. EEG without BOLD is kept (it can
still be synthesised); BOLD without EEG is left out with a note. Everything that could not be
paired is explained in the notes :func:`find_run_pairs` returns, one line each.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from spec2vol_bids.bids.filters import FOREIGN_QUERIES, QUERIES, check_filters, matches, same_value
from spec2vol_bids.bids.metadata import inherited_sidecars
from spec2vol_bids.bids.runs import RunPair
from spec2vol_bids.bids.spaces import NATIVE, format_space, is_spec2vol_dataset, parse_space
from spec2vol_bids.bids.validation import existing_dir
from spec2vol_bids.errors import DataError, MissingInputError, NothingSelectedError, UsageError, one_line
from spec2vol_bids.naming import RUN_ENTITIES, clean_labels, parse_name, relative_path, run_key

EEG_EXTENSIONS = (".vhdr", ".edf", ".bdf", ".set", ".fif")  # order = preference when ambiguous
BOLD_EXTENSIONS = (".nii.gz", ".nii")
_SPLIT_RE = re.compile(r"_split-(\d+)_")


def file_entities(path: str | Path) -> dict:
    """A data file's entities (:func:`~spec2vol_bids.naming.parse_name`) and its datatype
    folder (``eeg``, ``func``), as filters and pairing use them."""
    path = Path(path)
    return {**parse_name(path), "datatype": path.parent.name}


@dataclass
class _File:
    """A data file found in a dataset, with its parsed entities."""

    path: Path
    root: Path
    entities: dict
    derivative: bool = False

    @property
    def key(self) -> tuple:
        return run_key(self.entities)

    def describe(self) -> str:
        where = relative_path(self.path, self.root)
        return f"EEG derivatives {where}" if self.derivative else where


def find_run_pairs(
    bids_dir: str | Path,
    *,
    participant_labels: Iterable[str] | str | None = None,
    session_labels: Iterable[str] | str | None = None,
    task: Iterable[str] | str | None = None,
    bids_filters: Mapping[str, Mapping] | None = None,
    eeg_derivatives: str | Path | None = None,
    bold_derivatives: Iterable[str | Path] | str | Path | None = None,
    bold_space: str | None = None,
) -> tuple[list[RunPair], list[str]]:
    """Find the selected EEG recordings and pair each with its BOLD run.

    Parameters
    ----------
    bids_dir : str | Path
        The raw BIDS dataset (indexed with pybids; read only).
    participant_labels, session_labels : iterable of str | str | None
        Keep these participants / sessions (``sub-``/``ses-`` prefix optional).
    task : iterable of str | str | None
        Keep these tasks.
    bids_filters : mapping | None
        fMRIPrep-style filters (see :func:`load_bids_filters`); ``"eeg"`` applies to the EEG
        recordings, ``"bold"`` to the BOLD series. A run whose BOLD series is filtered out is
        dropped, not turned into an EEG-only run.
    eeg_derivatives : str | Path | None
        A folder of processed EEG laid out like a BIDS dataset (``sub-*/[ses-*/]eeg/``), with or
        without its own ``dataset_description.json``. Its recordings, or else its spec2vol
        spectrograms (``*_desc-spec2vol_spectrogram.npy``, when it is a spec2vol output), replace
        the raw EEG of the same runs; runs it lacks keep their raw EEG (with a note).
    bold_derivatives : path or iterable of paths | None
        BIDS derivative datasets of preprocessed BOLD, such as fMRIPrep's
        (``*_space-<space>[_res-<r>]_desc-preproc_bold.nii.gz``, with its
        ``*_desc-brain_mask.nii.gz``), or spec2vol output datasets (recognised by ``GeneratedBy``
        in their ``dataset_description.json``), whose ``*_desc-target_bold.nii.gz`` are taken.
        When given, their BOLD replaces the raw BOLD: runs they lack become EEG-only (with a
        note), so that every target lies in one space.
    bold_space : str | None
        The space to take, in fMRIPrep's ``--output-spaces`` syntax
        (``MNI152NLin2009cAsym:res-2``); needed when the derivatives hold several.

    Returns
    -------
    pairs : list of RunPair
        Sorted by subject, session, task, acquisition and run. EEG-only runs have ``bold=None``.
    notes : list of str
        One line per file or run that was left out or chosen among several, and why.

    Raises
    ------
    UsageError (64)
        A label is not a plain BIDS label (a path separator, ``..``, ``_``, ...), the filters
        are malformed, ``bold_space`` is given without ``bold_derivatives``, a BOLD derivative
        folder holds no preprocessed series, or they lie in several spaces and ``bold_space``
        does not choose one of them.
    MissingInputError (66)
        BIDS_DIR or ``eeg_derivatives`` is not a readable folder.
    NothingSelectedError (18)
        A participant, session or task label is not in the dataset, or no EEG recording is left
        after selection.
    """
    bids_dir = existing_dir(bids_dir, "BIDS_DIR")
    subjects = clean_labels(participant_labels, "sub", "participant")
    sessions = clean_labels(session_labels, "ses", "session")
    tasks = clean_labels(task, "task", "task")
    filters = dict(bids_filters or {})
    check_filters(filters, "bids_filters")
    notes = [f"bids filter query {q!r} does not concern spec2vol; ignored"
             for q in filters if q in FOREIGN_QUERIES]

    raw_eeg, bold, raw_subjects, raw_sessions = _index(bids_dir, derivative=False)
    deriv_eeg, deriv_subjects, deriv_sessions = [], set(), set()
    if eeg_derivatives is not None:
        deriv_root = existing_dir(eeg_derivatives, "the EEG derivative folder")
        deriv_eeg, _, deriv_subjects, deriv_sessions = _index(deriv_root, derivative=True)
    if isinstance(bold_derivatives, (str, os.PathLike)):
        bold_derivatives = [bold_derivatives]
    bold_derivatives = list(bold_derivatives or [])
    if bold_space is not None and not bold_derivatives:
        raise UsageError(f"--bold-space {bold_space} chooses among the spaces of preprocessed BOLD "
                         "in --bold-derivatives; give --bold-derivatives (e.g. fMRIPrep's output "
                         "folder), or leave out --bold-space to use the raw BOLD")
    if bold_derivatives:
        bold = _preproc_bold(bold_derivatives, bold_space, filters.get("bold") or {})

    _require_known(subjects, raw_subjects | deriv_subjects, "participant label", bids_dir)
    _require_known(sessions, raw_sessions | deriv_sessions, "session label", bids_dir)
    _require_known(tasks, {f.entities.get("task") for f in raw_eeg + deriv_eeg + bold} - {None},
                   "task", bids_dir)

    def selected(f: _File) -> bool:
        ent = f.entities
        return ((not subjects or ent.get("subject") in subjects)
                and (not sessions or ent.get("session") in sessions)
                and (not tasks or ent.get("task") in tasks))

    raw_eeg, deriv_eeg, bold = ([f for f in group if selected(f)]
                                for group in (raw_eeg, deriv_eeg, bold))
    for f in raw_eeg + deriv_eeg + bold:
        if f.entities.get("task") is None:
            notes.append(f"{f.describe()}: no task- entity in the file name; left out")
    raw_eeg, deriv_eeg, bold = ([f for f in group if f.entities.get("task") is not None]
                                for group in (raw_eeg, deriv_eeg, bold))

    eeg_query, bold_query = filters.get("eeg") or {}, filters.get("bold") or {}
    filtered_bold = [f for f in bold if not matches(f.entities, bold_query)]
    bold = [f for f in bold if matches(f.entities, bold_query)]
    raw_eeg = [f for f in raw_eeg if matches(f.entities, eeg_query)]
    deriv_eeg = [f for f in deriv_eeg if matches(f.entities, eeg_query)]

    eeg = _prefer_derivatives(raw_eeg, deriv_eeg, notes) if eeg_derivatives is not None else raw_eeg
    eeg_runs = _one_per_run(eeg, "EEG", EEG_EXTENSIONS, notes)
    bold_runs = _one_per_run(bold, "BOLD", BOLD_EXTENSIONS, notes)
    matched = _match(eeg_runs, bold_runs, notes)

    pairs = []
    for key, e in sorted(eeg_runs.items(), key=lambda item: _sort_key(item[0])):
        b = matched.get(key)
        if b is None and any(_compatible(e.entities, f.entities) for f in filtered_bold):
            notes.append(f"{e.describe()}: its BOLD run is excluded by the bids filter; "
                         "run left out")
            continue
        pairs.append(_make_pair(e, b, bids_dir, derivative_bold=bool(bold_derivatives)))
    used = {id(b) for b in matched.values()}
    for key, b in sorted(bold_runs.items(), key=lambda item: _sort_key(item[0])):
        if id(b) not in used:
            notes.append(f"{b.describe()}: BOLD without EEG; ignored")
    for label in subjects:
        if not any(p.subject == label for p in pairs):
            notes.append(f"sub-{label}: no EEG recording selected")
    if not pairs:
        raise NothingSelectedError(_nothing_selected(subjects, sessions, tasks, filters, notes),
                                   path=bids_dir)
    return pairs, notes


def _index(root: Path, *, derivative: bool,
           bold_desc: str | None = None) -> tuple[list[_File], list[_File], set, set]:
    """Index ``root`` with pybids; return its EEG files, BOLD files, subjects and sessions.

    A derivative folder yields BOLD only with ``bold_desc``: its ``desc-<bold_desc>`` series;
    its EEG files include spec2vol spectrograms.
    """
    from bids import BIDSLayout, BIDSLayoutIndexer

    config = ["bids", "derivatives"] if derivative else ["bids"]
    try:
        with warnings.catch_warnings():
            # pybids warns about a missing dataset_description.json in derivative folders,
            # which are allowed to lack one here.
            warnings.simplefilter("ignore")
            layout = BIDSLayout(root, validate=False, config=config,
                                indexer=BIDSLayoutIndexer(validate=False, index_metadata=False))
    except PermissionError as exc:
        raise MissingInputError(f"cannot read the dataset ({one_line(exc)})", path=root) from exc
    except Exception as exc:  # pybids raises plain ValueError/BIDSError on unusable trees
        raise DataError(f"pybids cannot index this folder ({one_line(exc)})", path=root) from exc

    def files(suffix: str, datatype: str, extensions, **query) -> list[_File]:
        # file names, not BIDSFile objects: building those is most of pybids' query time
        found = layout.get(suffix=suffix, datatype=datatype, extension=list(extensions),
                           return_type="filename", **query)
        return [_File(Path(f), root, file_entities(f), derivative) for f in sorted(found)]

    eeg = files("eeg", "eeg", EEG_EXTENSIONS)
    if derivative:
        eeg += files("spectrogram", "eeg", [".npy"], desc="spec2vol")
    if bold_desc is not None:
        bold = files("bold", "func", BOLD_EXTENSIONS, desc=bold_desc)
        for f in bold:  # described by their path, not as EEG derivatives
            f.derivative = False
    else:
        bold = [] if derivative else files("bold", "func", BOLD_EXTENSIONS)
    # from the folder names: pybids' get_subjects() builds every file object and is slow
    subjects = {p.name[4:] for p in root.glob("sub-*") if p.is_dir()}
    sessions = {p.name[4:] for p in root.glob("sub-*/ses-*") if p.is_dir()}
    return eeg, bold, subjects, sessions


def _preproc_bold(roots, bold_space: str | None, bold_query: Mapping) -> list[_File]:
    """The preprocessed BOLD of the derivative datasets, in the one space chosen: the
    ``desc-target`` series of spec2vol datasets, the ``desc-preproc`` ones of others. The
    space is chosen among the series the ``bold`` filter keeps.

    Raises
    ------
    UsageError (64)
        A folder holds no such series, or the series lie in several spaces and ``bold_space``
        does not choose one.
    """
    found: list[_File] = []
    for root in roots:
        root = existing_dir(root, "the BOLD derivative folder")
        desc = "target" if is_spec2vol_dataset(root) else "preproc"
        _, bold, _, _ = _index(root, derivative=True, bold_desc=desc)
        if not bold:
            # every run would be EEG only: the user asked for preprocessed BOLD
            older = (" (fMRIPrep before 1.2 named them *_bold_space-<space>_preproc.nii.gz, "
                     "which is not read: rerun a current fMRIPrep)" if desc == "preproc" else "")
            raise UsageError(f"--bold-derivatives {root} holds no *_desc-{desc}_bold.nii[.gz]"
                             f"{older}; give the folder of the preprocessed BOLD")
        found += bold

    def space_of(f: _File) -> tuple:
        res, cohort = (_str_or_none(f.entities.get(k)) for k in ("res", "cohort"))
        return (_str_or_none(f.entities.get("space")),
                None if res is None else (res.lstrip("0") or "0"), cohort)

    spaces = sorted({space_of(f) for f in found if matches(f.entities, bold_query)}, key=str)
    listed = ", ".join(format_space(*s) for s in spaces) or "none"
    if bold_space is None:
        if len(spaces) > 1:
            raise UsageError(f"the BOLD derivatives hold several spaces ({listed}); choose one with "
                             "--bold-space SPACE[:cohort-N][:res-N]")
        return found
    name, res, cohort = parse_space(bold_space)
    chosen = [s for s in spaces if (s[0] == name or (s[0] is None and name == NATIVE))
              and (res is None or s[1] == res) and (cohort is None or s[2] == cohort)]
    if not chosen:
        raise UsageError(f"--bold-space {bold_space}: no preprocessed BOLD in that space; the BOLD "
                         f"derivatives hold {listed}")
    if len(chosen) > 1:
        missing = [f":{key}-N" for key, given in (("cohort", cohort), ("res", res)) if given is None]
        raise UsageError(f"--bold-space {bold_space}: it matches "
                         f"{', '.join(format_space(*s) for s in chosen)}; add {' or '.join(missing)}")
    return [f for f in found if space_of(f) == chosen[0]]


def _prefer_derivatives(raw: list[_File], deriv: list[_File], notes: list[str]) -> list[_File]:
    """Derivative EEG replaces raw EEG run by run; runs without derivative EEG stay raw."""
    deriv_keys = {f.key for f in deriv}
    kept_raw = [f for f in raw if f.key not in deriv_keys]
    for f in kept_raw:
        notes.append(f"{f.describe()}: no recording of this run in the EEG derivative folder; "
                     "using the raw EEG")
    return deriv + kept_raw


def _one_per_run(files: list[_File], kind: str, extensions, notes: list[str]) -> dict:
    """Keep one file per run key; explain the choice when there were several (two recordings
    of one run are refused: 65)."""
    by_key: dict[tuple, list[_File]] = {}
    for f in files:
        by_key.setdefault(f.key, []).append(f)
    chosen = {}
    for key, group in by_key.items():
        # fif recordings split in several files are read from the first piece (mne follows the
        # chain), so the later pieces are not rival recordings.
        group = [f for f in group if _split_index(f.path) in (None, 1)] or group[:1]
        group.sort(key=lambda f: (_extension_rank(f.path, extensions), str(f.path)))
        recordings = [f for f in group if _extension_rank(f.path, extensions) < len(extensions)]
        if len({f.path.name for f in recordings}) < len(recordings):
            # one file name in two folders: two derivative datasets of the same runs
            raise DataError(f"{kind} of this run is in {len(recordings)} folders "
                            f"({', '.join(sorted(str(f.root) for f in recordings))}); give only one "
                            "of them", path=recordings[0].path)
        if len(recordings) > 1:
            # two recordings of one run (EEG in two formats, BOLD of several echoes): their
            # channels, rates, markers or contrast differ, and which one is meant is the user's
            # to say
            raise DataError(f"{len(recordings)} {kind} files of one run "
                            f"({', '.join(f.path.name for f in recordings)}); select one with "
                            f"--bids-filter-file (e.g. {_filter_example(kind, recordings)})",
                            path=recordings[0].path)
        if len(group) > 1:
            others = ", ".join(f.path.name for f in group[1:])
            notes.append(f"{group[0].describe()}: {len(group)} {kind} files for this run; using "
                         f"this one, not {others} (select with --bids-filter-file)")
        chosen[key] = group[0]
    return chosen


def _match(eeg_runs: dict, bold_runs: dict, notes: list[str]) -> dict:
    """Map EEG run keys to their BOLD file: same entities, else the one unambiguous candidate.

    BIDS lets a file leave out ``run-`` (or ``acq-``) when there is only one, so an EEG file
    without a run index may belong to the one BOLD run of its session that has one; that is
    accepted when it is the only candidate either way, and noted.
    """
    matched = {key: bold_runs[key] for key in eeg_runs if key in bold_runs}
    free_eeg = {k: e for k, e in eeg_runs.items() if k not in matched}
    free_bold = {k: b for k, b in bold_runs.items() if k not in matched}
    for key, e in free_eeg.items():
        candidates = [b for b in free_bold.values() if _compatible(e.entities, b.entities)]
        if len(candidates) == 1:
            b = candidates[0]
            rivals = [o for o in free_eeg.values() if _compatible(o.entities, b.entities)]
            if len(rivals) == 1:
                matched[key] = b
                notes.append(f"{e.describe()}: paired with {b.path.name}, whose run/acq "
                             "entities differ only by being left out")
                continue
        if len(candidates) > 1:
            names = ", ".join(sorted(b.path.name for b in candidates))
            notes.append(f"{e.describe()}: several BOLD runs could match ({names}); kept as an "
                         "EEG-only run (add run-/acq- entities to pair it)")
    return matched


def _compatible(a: Mapping, b: Mapping) -> bool:
    """Same subject/session/task, and acquisition/run equal or left out on one side."""
    if any(a.get(k) != b.get(k) for k in ("subject", "session", "task")):
        return False
    for name in ("acquisition", "run"):
        x, y = a.get(name), b.get(name)
        if x is not None and y is not None and not same_value(name, x, y):
            return False
    return True


def _make_pair(e: _File, b: _File | None, bids_dir: Path, *,
               derivative_bold: bool = False) -> RunPair:
    ent = e.entities
    run_entities = {k: ent.get(k) for k in RUN_ENTITIES}
    bold_entities = dict(b.entities) if b else {**run_entities, "datatype": "func"}
    bold_sidecars = inherited_sidecars(bids_dir, bold_entities, "bold", ".json")
    space = cohort = res = mask = None
    if derivative_bold and b is not None:
        # the raw sidecars first, the derivative's last: its RepetitionTime wins
        raw_entities = {**{k: b.entities.get(k) for k in RUN_ENTITIES}, "datatype": "func"}
        bold_sidecars = (inherited_sidecars(bids_dir, raw_entities, "bold", ".json")
                         + inherited_sidecars(b.root, bold_entities, "bold", ".json"))
        space, cohort, res = (_str_or_none(b.entities.get(k)) for k in ("space", "cohort", "res"))
        mask = _brain_mask_of(b.path)
    return RunPair(
        subject=str(ent["subject"]),
        session=_str_or_none(ent.get("session")),
        task=str(ent["task"]),
        acquisition=_str_or_none(ent.get("acquisition")),
        run=_str_or_none(ent.get("run")),
        eeg=e.path,
        bold=b.path if b else None,
        bids_root=e.root,
        eeg_from_derivatives=e.derivative,
        eeg_sidecars=tuple(inherited_sidecars(e.root, ent, "eeg", ".json")),
        bold_sidecars=tuple(bold_sidecars),
        channels_tsv=_last(inherited_sidecars(e.root, ent, "channels", ".tsv")),
        events_tsv=_last(inherited_sidecars(e.root, ent, "events", ".tsv")),
        space=space,
        cohort=cohort,
        res=res,
        bold_mask=mask,
    )


def _brain_mask_of(bold: Path) -> Path | None:
    """The ``*_desc-brain_mask`` beside a ``*_desc-<preproc|target>_bold`` file, if any."""
    for desc in ("preproc", "target"):
        for ext in BOLD_EXTENSIONS:
            if bold.name.endswith(f"_desc-{desc}_bold{ext}"):
                stem = bold.name[: -len(f"_desc-{desc}_bold{ext}")]
                for mask_ext in BOLD_EXTENSIONS:
                    mask = bold.with_name(f"{stem}_desc-brain_mask{mask_ext}")
                    if mask.is_file():
                        return mask
    return None


def _require_known(labels: list[str], available: set, what: str, bids_dir: Path) -> None:
    missing = [label for label in labels if label not in available]
    if missing:
        have = f"available: {', '.join(sorted(available))}" if available else "it has none"
        raise NothingSelectedError(f"{what} {', '.join(missing)} not found in BIDS_DIR; {have}",
                                   path=bids_dir)


def _nothing_selected(subjects, sessions, tasks, filters, notes) -> str:
    chosen = [f"participants {' '.join(subjects)}" if subjects else "",
              f"sessions {' '.join(sessions)}" if sessions else "",
              f"tasks {' '.join(tasks)}" if tasks else "",
              "--bids-filter-file" if any(filters.get(q) for q in QUERIES) else ""]
    chosen = [c for c in chosen if c]
    why = f" with {', '.join(chosen)}" if chosen else ""
    reason = ""
    if notes:
        more = f"; {len(notes) - 1} more note(s)" if len(notes) > 1 else ""
        reason = f" ({notes[0]}{more})"
    return (f"no EEG recording ({', '.join(EEG_EXTENSIONS)}) selected{why}{reason}; "
            "check the labels and filters, or --eeg-derivatives")


def _split_index(path: Path) -> int | None:
    match = _SPLIT_RE.search(path.name)
    return int(match.group(1)) if match else None


def _filter_example(kind: str, files: list[_File]) -> str:
    """A ``--bids-filter-file`` content that selects the second of ``files``."""
    query = "eeg" if kind == "EEG" else "bold"
    first, second = files[0].entities, files[1].entities
    differing = [k for k in second if k not in ("suffix", "extension") and second[k] != first.get(k)]
    if differing:
        return json.dumps({query: {differing[0]: second[differing[0]]}})
    return json.dumps({query: {"extension": files[1].path.name.split(".", 1)[1]}})


def _extension_rank(path: Path, extensions) -> int:
    name = path.name.lower()
    return next((i for i, ext in enumerate(extensions) if name.endswith(ext)), len(extensions))


def _sort_key(key: tuple) -> tuple:
    return tuple((v is not None, str(v) if not isinstance(v, int) else f"{v:09d}") for v in key)


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)


def _last(items: list[Path]) -> Path | None:
    return items[-1] if items else None


