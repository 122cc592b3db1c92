"""Find the EEG recordings of a BIDS dataset and pair each with its BOLD run.

A *run* is identified by subject, session, task, acquisition and run index. Each EEG recording
(``.vhdr``, ``.edf``, ``.bdf``, ``.set`` or ``.fif``, from the raw tree or from an EEG derivative
folder) is paired with the BOLD run carrying the same entities. An EEG derivative folder may also
be a spec2vol output dataset: its ``*_desc-spec2vol_spectrogram.npy`` then stand for the EEG of
their runs, and a spec2vol output given as BOLD derivatives yields its ``*_desc-target_bold``
series, so that one spec2vol run can feed the next. EEG without BOLD is kept (it can
still be synthesised); BOLD without EEG is left out with a note. Everything that could not be
paired is explained in the notes :func:`find_run_pairs` returns, one line each.

This module also checks the inputs before any work starts: :func:`check_bids_dir` and
:func:`validate_bids_dir` for BIDS_DIR, :func:`check_output_dir` for OUTPUT_DIR, and
:func:`load_bids_filters` for fMRIPrep-style ``--bids-filter-file`` JSON.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from spec2vol_bids.derivatives import PIPELINE_NAME
from spec2vol_bids.errors import (
    DataError,
    MissingInputError,
    NothingSelectedError,
    UsageError,
    ValidationError,
)

logger = logging.getLogger(__name__)

EEG_EXTENSIONS = (".vhdr", ".edf", ".bdf", ".set", ".fif")  # order = preference when ambiguous
BOLD_EXTENSIONS = (".nii.gz", ".nii")
#: How spec2vol names a run's spectrogram; such a file in an EEG derivative folder is taken as the
#: run's preprocessed EEG (a recording of the same run in that folder is preferred to it).
SPECTROGRAM_SUFFIX = "_desc-spec2vol_spectrogram.npy"
RUN_ENTITIES = ("subject", "session", "task", "acquisition", "run")
_ABBREVIATIONS = {"subject": "sub", "session": "ses", "task": "task", "acquisition": "acq",
                  "run": "run", "space": "space", "res": "res"}
# fMRIPrep's non-standard output spaces: no TemplateFlow template behind them
NONSTANDARD_SPACES = frozenset({"T1w", "T2w", "anat", "fsnative", "func", "run", "bold", "boldref",
                                "sbref", "session"})


def is_template_space(space: str | None) -> bool:
    """Whether a ``space-`` label names a TemplateFlow template (not T1w, func, ... or none)."""
    return space is not None and space not in NONSTANDARD_SPACES


# Query names of fMRIPrep/sMRIPrep filter files that do not concern spec2vol: a filter file
# written for fMRIPrep is accepted and these parts are ignored (with a note).
_FOREIGN_QUERIES = frozenset({"t1w", "t2w", "flair", "roi", "fmap", "sbref", "dwi", "pet", "asl",
                              "t2star", "mt", "pd", "pdw"})
_FILTER_QUERIES = ("eeg", "bold")
_EXTRA_FILTER_KEYS = frozenset({"extension", "suffix", "datatype", "split"})

# bids-validator (node, 1.x) issues that say nothing about whether spec2vol can read the data;
# most are also ignored by fMRIPrep's validation step.
_IGNORED_VALIDATOR_ISSUES = (
    "INCONSISTENT_SUBJECTS", "INCONSISTENT_PARAMETERS", "EVENTS_TSV_MISSING",
    "EVENTS_COLUMN_ONSET", "EVENTS_COLUMN_DURATION", "TSV_EQUAL_ROWS", "TSV_EMPTY_CELL",
    "TSV_IMPROPER_NA", "PARTICIPANT_ID_COLUMN", "PARTICIPANT_ID_MISMATCH",
    "PHENOTYPE_SUBJECTS_MISSING", "STIMULUS_FILE_MISSING", "ACQTIME_FMT", "WRONG_NEW_LINE",
    "CUSTOM_COLUMN_WITHOUT_DESCRIPTION", "MISSING_TSV_COLUMN_CHANNELS",
    "MISSING_TSV_COLUMN_EEG_ELECTRODES", "CHANNELS_COLUMN_SFREQ", "CHANNELS_COLUMN_LOWCUT",
    "CHANNELS_COLUMN_HIGHCUT", "CHANNELS_COLUMN_NOTCH", "MISSING_SESSION", "UNUSED_STIMULUS",
    "BVAL_MULTIPLE_ROWS", "BVEC_NUMBER_ROWS", "BVEC_ROW_LENGTH", "B_FILE", "MALFORMED_BVEC",
    "MALFORMED_BVAL", "DWI_MISSING_BVEC", "DWI_MISSING_BVAL", "VOLUME_COUNT_MISMATCH",
)
_VALIDATOR_TIMEOUT_S = 600
# mne-bids' lock files ("<file>.lock"), which earlier spec2vol versions left in BIDS_DIR
_STALE_LOCKS = "**/*.lock"
_SKIP_HINT = "fix the dataset, or pass --skip-bids-validation to go on at your own risk"
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_SPLIT_RE = re.compile(r"_split-(\d+)_")


@dataclass(frozen=True)
class RunPair:
    """One run: its EEG recording and, when the dataset has one, its BOLD series.

    Parameters
    ----------
    subject, session, task, acquisition, run : str | None
        The run's entities, as spelled in the EEG file name (the BOLD file's when there is no
        EEG). ``session``, ``acquisition`` and ``run`` are ``None`` when absent.
    eeg, bold : Path | None
        The EEG recording (for BrainVision, the ``.vhdr``), or the spectrogram a previous spec2vol
        run wrote of it (see :attr:`eeg_is_spectrogram`), and the BOLD NIfTI.
    bids_root : Path | None
        The root of the dataset holding ``eeg``: BIDS_DIR, or the EEG derivative folder.
    eeg_from_derivatives : bool
        Whether ``eeg`` comes from the EEG derivative folder.
    eeg_sidecars, bold_sidecars : tuple of Path
        The ``*_eeg.json`` / ``*_bold.json`` files that apply to the run by the BIDS inheritance
        principle, most general first. For an EEG-only run ``bold_sidecars`` holds the BOLD
        sidecars its BOLD run would inherit (e.g. a top-level ``task-rest_bold.json``).
    channels_tsv, events_tsv : Path | None
        The EEG recording's ``*_channels.tsv`` and ``*_events.tsv``.
    space, res : str | None
        The ``space-`` and ``res-`` entities of preprocessed BOLD taken from a derivative dataset
        (``--bold-derivatives``); ``None`` for raw BOLD.
    bold_mask : Path | None
        The derivative's ``*_desc-brain_mask.nii.gz`` of that BOLD series, when it has one.
    """

    subject: str
    session: str | None
    task: str
    acquisition: str | None
    run: str | None
    eeg: Path | None
    bold: Path | None
    bids_root: Path | None = None
    eeg_from_derivatives: bool = False
    eeg_sidecars: tuple[Path, ...] = field(default=())
    bold_sidecars: tuple[Path, ...] = field(default=())
    channels_tsv: Path | None = None
    events_tsv: Path | None = None
    space: str | None = None
    res: str | None = None
    bold_mask: Path | None = None

    @property
    def entities(self) -> dict[str, str]:
        """The entities that are set, among subject, session, task, acquisition, run, space and
        res (the last two name the BOLD outputs' space; EEG outputs leave them out)."""
        return {name: getattr(self, name) for name in (*RUN_ENTITIES, "space", "res")
                if getattr(self, name) is not None}

    @property
    def eeg_is_spectrogram(self) -> bool:
        """Whether ``eeg`` is a spec2vol spectrogram (``--eeg-derivatives`` pointing at a spec2vol
        output dataset) rather than a recording."""
        return self.eeg is not None and self.eeg.name.endswith(SPECTROGRAM_SUFFIX)

    @property
    def label(self) -> str:
        """The run's name stem, e.g. ``sub-01_ses-1_task-rest_run-1``."""
        return "_".join(f"{_ABBREVIATIONS[k]}-{v}" for k, v in self.entities.items())

    @property
    def eeg_json(self) -> Path | None:
        """The most specific ``*_eeg.json`` that applies, if any."""
        return self.eeg_sidecars[-1] if self.eeg_sidecars else None

    @property
    def bold_json(self) -> Path | None:
        """The most specific ``*_bold.json`` that applies, if any."""
        return self.bold_sidecars[-1] if self.bold_sidecars else None


@dataclass
class _File:
    """A data file found in a dataset, with its parsed entities."""

    path: Path
    root: Path
    entities: dict
    derivative: bool = False

    @property
    def key(self) -> tuple:
        ent = self.entities
        return (ent.get("subject"), ent.get("session"), ent.get("task"), ent.get("acquisition"),
                _run_key(ent.get("run")))

    def describe(self) -> str:
        where = _relative(self.path, self.root)
        return f"EEG derivatives {where}" if self.derivative else where


# --------------------------------------------------------------------------------------------
# BIDS_DIR and OUTPUT_DIR checks


def check_bids_dir(bids_dir: str | Path) -> Path:
    """Check that BIDS_DIR is a readable folder holding ``dataset_description.json``.

    This is the part of the validation that ``--skip-bids-validation`` does not skip: a folder
    without ``dataset_description.json`` is almost always the wrong folder (a ``sub-*`` folder or
    the parent of the dataset), not a dataset with minor defects.

    Returns
    -------
    bids_dir : Path
        The absolute path of BIDS_DIR.

    Raises
    ------
    MissingInputError (66)
        BIDS_DIR does not exist, is not a folder or cannot be read.
    ValidationError (16)
        ``dataset_description.json`` is missing or is not a JSON object. Exit 16 rather than 66
        because the folder is there and readable: it is the dataset that is not valid BIDS, which
        is what the BIDS validator reports (DATASET_DESCRIPTION_JSON_MISSING) and exit 16 means.
    """
    bids_dir = _existing_dir(bids_dir, "BIDS_DIR")
    desc = bids_dir / "dataset_description.json"
    if not desc.is_file():
        raise ValidationError(
            "no dataset_description.json: BIDS_DIR must be the root folder of a BIDS dataset "
            "(the folder holding dataset_description.json and the sub-* folders)",
            path=bids_dir,
        )
    try:
        content = json.loads(desc.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValidationError(f"cannot read dataset_description.json ({_one_line(exc)})",
                              path=desc) from exc
    if not isinstance(content, dict):
        raise ValidationError("dataset_description.json must hold a JSON object", path=desc)
    return bids_dir


def validate_bids_dir(bids_dir: str | Path, *, participant_labels: Iterable[str] | None = None,
                      validator: str = "auto") -> str:
    """Validate BIDS_DIR before any work; return a one-line summary for the log.

    The official validator (``bids-validator``, the node 1.x command line) runs when it is on
    the ``PATH``; it checks file names *and* contents (NIfTI headers, JSON sidecars, TSV files).
    Measured on this project's 2-core machine, node start-up included: 0.5 s on the filled NODDI
    fixture (45 files, 64 MB) and 1.2 s on 643 files (40 subjects x 4 runs) under load, against
    0.1-0.25 s for the Python file-name check. That is cheap next to any real work, so it runs
    by default. Issues that do not affect spec2vol (see ``_IGNORED_VALIDATOR_ISSUES``) are
    ignored, as fMRIPrep does, and with ``participant_labels`` so are the files of the other
    participants. Without node, or when it cannot run, every file name is checked with the
    Python ``bids_validator.BIDSValidator`` instead (derivatives/, sourcedata/, code/, hidden
    files and ``.bidsignore`` patterns are skipped).

    Parameters
    ----------
    bids_dir : str | Path
        The dataset.
    participant_labels : iterable of str | None
        Validate only these participants' files (labels with or without ``sub-``).
    validator : {"auto", "node", "python"}
        Which check to run; ``"auto"`` prefers the node validator.

    Returns
    -------
    summary : str
        Which validator ran and what it found (warnings are counted, not raised).

    Raises
    ------
    MissingInputError (66), ValidationError (16)
        As :func:`check_bids_dir`; or the validator found errors — the message names the first
        offending file and suggests ``--skip-bids-validation``.
    """
    if validator not in ("auto", "node", "python"):
        raise ValueError(f"unknown validator {validator!r}")
    bids_dir = check_bids_dir(bids_dir)
    locks = sorted(bids_dir.rglob("*.lock"))
    if locks:
        logger.warning("%s: %d stale lock file(s) in BIDS_DIR, e.g. %s, left by mne-bids (which "
                       "earlier spec2vol versions read sidecars with); not validated, they can be "
                       "deleted", bids_dir, len(locks), locks[0].relative_to(bids_dir))
    labels = _clean_labels(participant_labels, "sub", "participant")
    ignored = _unselected_subject_dirs(bids_dir, labels)
    summary = None
    if validator in ("auto", "node") and shutil.which("bids-validator"):
        summary = _run_node_validator(bids_dir, ignored)
    if summary is None:
        if validator == "node":
            raise ValidationError("the bids-validator command is not installed or failed to run; "
                                  "install it (npm install -g bids-validator@1)", path=bids_dir)
        summary = _python_filename_check(bids_dir, ignored)
    return summary


def check_output_dir(bids_dir: str | Path, output_dir: str | Path) -> Path:
    """Refuse an OUTPUT_DIR that would write into the raw dataset; return it resolved.

    OUTPUT_DIR may be anywhere outside BIDS_DIR, or inside ``BIDS_DIR/derivatives/`` (in a folder
    of its own). Symbolic links are resolved first, so a link cannot smuggle the output into the
    raw tree.

    Raises
    ------
    UsageError (64)
        OUTPUT_DIR is BIDS_DIR, lies inside its raw tree, is ``BIDS_DIR/derivatives`` itself, or
        contains BIDS_DIR.
    """
    return _outside_the_raw_tree(bids_dir, output_dir, "OUTPUT_DIR", "spec2vol")


def check_work_dir(bids_dir: str | Path, work_dir: str | Path) -> Path:
    """Refuse a ``-w/--work-dir`` that would write into the raw dataset, as for OUTPUT_DIR, or
    that names a file; return it resolved."""
    work = _outside_the_raw_tree(bids_dir, work_dir, "-w/--work-dir", "spec2vol_work")
    if work.exists() and not work.is_dir():
        raise UsageError("-w/--work-dir names a file, not a folder; give a folder for the "
                         "intermediate files", path=work_dir)
    return work


def _outside_the_raw_tree(bids_dir, folder, what: str, example: str) -> Path:
    bids = Path(bids_dir).expanduser().resolve()
    out = Path(folder).expanduser().resolve()
    suggestion = (f"use {bids / 'derivatives' / example} (BIDS_DIR/derivatives/{example}) "
                  "or a folder outside BIDS_DIR")
    if out == bids:
        raise UsageError(f"{what} is BIDS_DIR; the input dataset is never written to: "
                         f"{suggestion}", path=folder)
    if bids.is_relative_to(out):
        raise UsageError(f"{what} contains BIDS_DIR ({bids}); outputs would mix with the "
                         f"input: {suggestion}", path=folder)
    if out.is_relative_to(bids):
        parts = out.relative_to(bids).parts
        if parts[0] != "derivatives":
            raise UsageError(f"{what} is inside the raw tree of BIDS_DIR ({bids}), which "
                             f"must stay untouched: {suggestion}", path=folder)
        if len(parts) == 1:
            raise UsageError(f"{what} is BIDS_DIR/derivatives itself; each pipeline writes "
                             f"to a folder of its own: {suggestion}", path=folder)
    return out


# --------------------------------------------------------------------------------------------
# Filters


def load_bids_filters(path: str | Path) -> dict[str, dict]:
    """Read a ``--bids-filter-file`` in fMRIPrep's format.

    The file maps a query name to entity filters, e.g.
    ``{"eeg": {"session": "1"}, "bold": {"run": [1, 2], "acquisition": null}}``. A value may be
    a string, a number, a list of them (any matches), ``null`` (the entity must be absent) or
    ``"*"`` (it must be present). spec2vol uses the ``eeg`` and ``bold`` queries; fMRIPrep's
    other queries (``t1w``, ``fmap``, ...) are accepted so that one filter file can serve both
    tools, and ignored.

    Raises
    ------
    MissingInputError (66)
        The file does not exist or cannot be read.
    UsageError (64)
        The file is not valid JSON, or names an unknown query or entity.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise MissingInputError("BIDS filter file not found", path=path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise MissingInputError(f"cannot read the BIDS filter file ({_one_line(exc)})",
                                path=path) from exc
    try:
        filters = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the BIDS filter file is not valid JSON ({exc})", path=path) from exc
    _check_filters(filters, path)
    return filters


def _check_filters(filters, source) -> None:
    if not isinstance(filters, dict):
        raise UsageError('a BIDS filter file holds a JSON object such as {"bold": {"run": 1}}',
                         path=source)
    known = _known_entities()
    for query, spec in filters.items():
        if query not in _FILTER_QUERIES and query not in _FOREIGN_QUERIES:
            raise UsageError(f"unknown query {query!r} in the BIDS filter file; spec2vol uses "
                             f"{' and '.join(_FILTER_QUERIES)}", path=source)
        if not isinstance(spec, dict):
            raise UsageError(f"the {query!r} query must be a JSON object of entity filters",
                             path=source)
        for entity, value in spec.items():
            if entity not in known:
                raise UsageError(f"unknown entity {entity!r} in the {query!r} query of the BIDS "
                                 "filter file (use pybids names: session, run, acquisition, ...)",
                                 path=source)
            values = value if isinstance(value, list) else [value]
            if not all(v is None or isinstance(v, (str, int)) for v in values):
                raise UsageError(f"the {query!r} filter on {entity!r} must be a string, a number, "
                                 "null or a list of them", path=source)


@functools.lru_cache(maxsize=1)
def _entity_definitions() -> tuple:
    """pybids' entity definitions (raw and derivative), loaded once: loading is costly."""
    from bids.layout.models import Config

    definitions = {}
    for config in ("bids", "derivatives"):
        definitions.update(Config.load(config).entities)
    return tuple(definitions.values())


def _known_entities() -> frozenset[str]:
    return frozenset(_EXTRA_FILTER_KEYS | {e.name for e in _entity_definitions()})


def _parse_entities(path: str | Path) -> dict:
    from bids.layout import parse_file_entities

    return parse_file_entities(str(path), entities=_entity_definitions())


def _matches(entities: Mapping, query: Mapping) -> bool:
    """Whether a file's entities satisfy one fMRIPrep-style query."""
    for name, wanted in query.items():
        have = entities.get(name)
        options = wanted if isinstance(wanted, list) else [wanted]
        if not any(_same_value(name, have, want) for want in options):
            return False
    return True


def _same_value(name: str, have, want) -> bool:
    if want is None:
        return have is None
    if have is None:
        return False
    if want == "*":
        return True
    if name == "extension":
        return str(have).lstrip(".") == str(want).lstrip(".")
    have, want = str(have), str(want)
    if have.isdigit() and want.isdigit():  # run 1 selects run-01
        return int(have) == int(want)
    return have == want


# --------------------------------------------------------------------------------------------
# Pairing


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
        are malformed, or the BOLD derivatives hold several spaces and ``bold_space`` does not
        choose one of them.
    MissingInputError (66)
        BIDS_DIR or ``eeg_derivatives`` is not a readable folder.
    NothingSelectedError (18)
        A participant, session or task label is not in the dataset, or no EEG recording is left
        after selection.
    """
    bids_dir = _existing_dir(bids_dir, "BIDS_DIR")
    subjects = _clean_labels(participant_labels, "sub", "participant")
    sessions = _clean_labels(session_labels, "ses", "session")
    tasks = _clean_labels(task, "task", "task")
    filters = dict(bids_filters or {})
    _check_filters(filters, "bids_filters")
    notes = [f"bids filter query {q!r} does not concern spec2vol; ignored"
             for q in filters if q in _FOREIGN_QUERIES]

    raw_eeg, bold, raw_subjects, raw_sessions = _index(bids_dir, derivative=False)
    deriv_eeg, deriv_subjects, deriv_sessions = [], set(), set()
    if eeg_derivatives is not None:
        deriv_root = _existing_dir(eeg_derivatives, "the EEG derivative folder")
        deriv_eeg, _, deriv_subjects, deriv_sessions = _index(deriv_root, derivative=True)
    if isinstance(bold_derivatives, (str, os.PathLike)):
        bold_derivatives = [bold_derivatives]
    bold_derivatives = list(bold_derivatives or [])
    if bold_derivatives:
        bold = _preproc_bold(bold_derivatives, bold_space, notes)

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
    filtered_bold = [f for f in bold if not _matches(f.entities, bold_query)]
    bold = [f for f in bold if _matches(f.entities, bold_query)]
    raw_eeg = [f for f in raw_eeg if _matches(f.entities, eeg_query)]
    deriv_eeg = [f for f in deriv_eeg if _matches(f.entities, eeg_query)]

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
        raise MissingInputError(f"cannot read the dataset ({_one_line(exc)})", path=root) from exc
    except Exception as exc:  # pybids raises plain ValueError/BIDSError on unusable trees
        raise DataError(f"pybids cannot index this folder ({_one_line(exc)})", path=root) from exc

    def files(suffix: str, datatype: str, extensions, **query) -> list[_File]:
        # file names, not BIDSFile objects: building those is most of pybids' query time
        found = layout.get(suffix=suffix, datatype=datatype, extension=list(extensions),
                           return_type="filename", **query)
        return [_File(Path(f), root, _parse_entities(f), derivative) for f in sorted(found)]

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


def parse_space(text: str) -> tuple[str, str | None]:
    """Split fMRIPrep's ``--output-spaces`` syntax: ``"MNI152NLin2009cAsym:res-2"`` →
    ``("MNI152NLin2009cAsym", "2")``.

    Raises
    ------
    UsageError (64)
        The text is not ``SPACE`` or ``SPACE:res-N`` with BIDS labels.
    """
    name, _, modifier = str(text).strip().partition(":")
    res = None
    if modifier:
        key, _, res = modifier.partition("-")
        if key != "res" or not _LABEL_RE.match(res):
            raise UsageError(f"--bold-space {text!r}: write SPACE or SPACE:res-N, e.g. "
                             "MNI152NLin2009cAsym:res-2")
        if res.isdigit():  # res-02 is res-2
            res = res.lstrip("0") or "0"
    if not _LABEL_RE.match(name):
        raise UsageError(f"--bold-space {text!r}: the space is a BIDS label (letters and digits), "
                         "e.g. MNI152NLin2009cAsym")
    return name, res


def is_spec2vol_dataset(root: str | Path) -> bool:
    """Whether ``root`` is a derivative dataset spec2vol wrote: its ``dataset_description.json``
    names spec2vol in ``GeneratedBy``.

    Only such datasets have their ``desc-target`` BOLD taken as preprocessed BOLD: in another
    pipeline's outputs that description could mean anything.
    """
    try:
        desc = json.loads((Path(root) / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    generated = desc.get("GeneratedBy") if isinstance(desc, dict) else None
    return isinstance(generated, list) and any(
        isinstance(g, dict) and g.get("Name") == PIPELINE_NAME for g in generated)


def _format_space(space, res) -> str:
    return f"{space or 'no space entity'}{f':res-{res}' if res is not None else ''}"


def _preproc_bold(roots, bold_space: str | None, notes: list[str]) -> list[_File]:
    """The preprocessed BOLD of the derivative datasets, in the one space chosen: the
    ``desc-target`` series of spec2vol datasets, the ``desc-preproc`` ones of others."""
    found: list[_File] = []
    for root in roots:
        root = _existing_dir(root, "the BOLD derivative folder")
        desc = "target" if is_spec2vol_dataset(root) else "preproc"
        _, bold, _, _ = _index(root, derivative=True, bold_desc=desc)
        if not bold:
            notes.append(f"{root}: no *_desc-{desc}_bold.nii[.gz] in this BOLD derivative folder")
        found += bold

    def space_of(f: _File) -> tuple:
        res = f.entities.get("res")
        return (_str_or_none(f.entities.get("space")),
                None if res is None else (str(res).lstrip("0") or "0"))

    spaces = sorted({space_of(f) for f in found}, key=lambda s: (str(s[0]), str(s[1])))
    listed = ", ".join(_format_space(*s) for s in spaces) or "none"
    if bold_space is None:
        if len(spaces) > 1:
            raise UsageError(f"the BOLD derivatives hold several spaces ({listed}); choose one with "
                             "--bold-space SPACE[:res-N]")
        return found
    name, res = parse_space(bold_space)
    chosen = [s for s in spaces if s[0] == name and (res is None or s[1] == res)]
    if not chosen:
        raise UsageError(f"--bold-space {bold_space}: no preprocessed BOLD in that space; the BOLD "
                         f"derivatives hold {listed}")
    if len(chosen) > 1:
        raise UsageError(f"--bold-space {bold_space}: several resolutions exist "
                         f"({', '.join(_format_space(*s) for s in chosen)}); add :res-N")
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
    """Keep one file per run key; explain the choice when there were several."""
    by_key: dict[tuple, list[_File]] = {}
    for f in files:
        by_key.setdefault(f.key, []).append(f)
    chosen = {}
    for key, group in by_key.items():
        # fif recordings split in several files are read from the first piece (mne follows the
        # chain), so the later pieces are not rival recordings.
        group = [f for f in group if _split_index(f.path) in (None, 1)] or group[:1]
        group.sort(key=lambda f: (_extension_rank(f.path, extensions), str(f.path)))
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
        if x is not None and y is not None and not _same_value(name, x, y):
            return False
    return True


def _make_pair(e: _File, b: _File | None, bids_dir: Path, *,
               derivative_bold: bool = False) -> RunPair:
    ent = e.entities
    run_entities = {k: ent.get(k) for k in RUN_ENTITIES}
    bold_entities = dict(b.entities) if b else {**run_entities, "datatype": "func"}
    bold_sidecars = _sidecars(bids_dir, bold_entities, "bold", ".json")
    space = res = mask = None
    if derivative_bold and b is not None:
        # the raw sidecars first, the derivative's last: its RepetitionTime wins
        raw_entities = {**{k: b.entities.get(k) for k in RUN_ENTITIES}, "datatype": "func"}
        bold_sidecars = (_sidecars(bids_dir, raw_entities, "bold", ".json")
                         + _sidecars(b.root, bold_entities, "bold", ".json"))
        space, res = _str_or_none(b.entities.get("space")), _str_or_none(b.entities.get("res"))
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
        eeg_sidecars=tuple(_sidecars(e.root, ent, "eeg", ".json")),
        bold_sidecars=tuple(bold_sidecars),
        channels_tsv=_last(_sidecars(e.root, ent, "channels", ".tsv")),
        events_tsv=_last(_sidecars(e.root, ent, "events", ".tsv")),
        space=space,
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


def _sidecars(root: Path, entities: Mapping, suffix: str, extension: str) -> list[Path]:
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
            cand = {k: v for k, v in _parse_entities(candidate).items()
                    if k not in ("suffix", "extension", "datatype")}
            if all(_same_value(k, entities.get(k), v) for k, v in cand.items()) \
                    and len(cand) > best_n:
                best, best_n = candidate, len(cand)
        if best is not None:
            found.append(best)
    return found


# --------------------------------------------------------------------------------------------
# Metadata


def bold_metadata(pair: RunPair) -> dict:
    """The BOLD sidecar metadata of a run, merged along the inheritance chain.

    Raises
    ------
    DataError (65)
        A sidecar is not a JSON object.
    """
    return _merged_json(pair.bold_sidecars)


def repetition_time(pair: RunPair) -> float:
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
    tr = _header_tr(pair.bold)
    if tr is None:
        where = pair.bold_json.name if pair.bold_json else pair.bold.name.replace(
            "".join(pair.bold.suffixes), ".json")
        raise DataError("RepetitionTime is missing from both the BOLD sidecar and the NIfTI "
                        f"header (pixdim[4]); add \"RepetitionTime\" (s) to {where}",
                        path=pair.bold)
    return tr


def eeg_repetition_time(pair: RunPair) -> float | None:
    """The repetition time (s) an EEG-only run was recorded at, when its sidecars say.

    Looked up in the BOLD sidecars the run would inherit (e.g. a top-level
    ``task-rest_bold.json``), then as ``RepetitionTime`` in its EEG sidecars. ``None`` when
    neither has one.
    """
    tr = _sidecar_tr(pair.bold_sidecars)
    return tr if tr is not None else _sidecar_tr(pair.eeg_sidecars)


def _sidecar_tr(sidecars: tuple[Path, ...]) -> float | None:
    meta = _merged_json(sidecars)
    if "RepetitionTime" not in meta:
        return None
    value = meta["RepetitionTime"]
    source = next(p for p in reversed(sidecars) if "RepetitionTime" in _read_json(p))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise DataError(f"RepetitionTime must be a positive number of seconds, not {value!r}",
                        path=source)
    return float(value)


def _header_tr(path: Path) -> float | None:
    import nibabel as nib

    if not path.is_file():
        raise MissingInputError("BOLD file not found", path=path)
    try:
        header = nib.load(path).header
        zooms = header.get_zooms()
        unit = header.get_xyzt_units()[1]
    except Exception as exc:  # nibabel raises several types for corrupt or empty files
        raise DataError(f"cannot read the NIfTI header ({_one_line(exc)})", path=path) from exc
    if len(zooms) < 4 or not zooms[3] > 0:
        return None
    return float(zooms[3]) * {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)


def _merged_json(paths: Iterable[Path]) -> dict:
    merged: dict = {}
    for path in paths:
        merged.update(_read_json(path))
    return merged


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read the JSON sidecar ({_one_line(exc)})", path=path) from exc
    if not isinstance(content, dict):
        raise DataError("a JSON sidecar must hold a JSON object", path=path)
    return content


# --------------------------------------------------------------------------------------------
# Reporting


def format_pair_table(pairs: Iterable[RunPair]) -> str:
    """A plain-text table of the runs found, one line per run, for the log."""
    pairs = list(pairs)
    rows = [("run", "EEG", "EEG from", "BOLD")]
    for p in pairs:
        rows.append((p.label, p.eeg.name if p.eeg else "-",
                     ("spectrogram" if p.eeg_is_spectrogram else "derivatives")
                     if p.eeg_from_derivatives else "raw",
                     p.bold.name if p.bold else "- (EEG only)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    n_paired = sum(1 for p in pairs if p.bold is not None)
    lines.append(f"{len(pairs)} runs: {n_paired} with BOLD, {len(pairs) - n_paired} EEG only")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Helpers


def _existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise MissingInputError(f"{what} does not exist", path=path)
    if not path.is_dir():
        raise MissingInputError(f"{what} is not a folder", path=path)
    if not os.access(path, os.R_OK | os.X_OK):
        raise MissingInputError(f"{what} cannot be read (permission denied)", path=path)
    return path


def _clean_labels(labels, prefix: str, what: str) -> list[str]:
    """Labels without their ``<prefix>-``, in order, without duplicates; refuse unsafe ones."""
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
        if not _LABEL_RE.match(label):
            raise UsageError(f"{what} label {raw!r} is not a BIDS label (letters and digits "
                             f"only, with or without the {prefix}- prefix)")
        if label not in cleaned:
            cleaned.append(label)
    return cleaned


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
              "--bids-filter-file" if any(filters.get(q) for q in _FILTER_QUERIES) else ""]
    chosen = [c for c in chosen if c]
    why = f" with {', '.join(chosen)}" if chosen else ""
    reason = ""
    if notes:
        more = f"; {len(notes) - 1} more note(s)" if len(notes) > 1 else ""
        reason = f" ({notes[0]}{more})"
    return (f"no EEG recording ({', '.join(EEG_EXTENSIONS)}) selected{why}{reason}; "
            "check the labels and filters, or --eeg-derivatives")


def _unselected_subject_dirs(bids_dir: Path, labels: list[str]) -> list[str]:
    if not labels:
        return []
    return sorted(p.name for p in bids_dir.glob("sub-*") if p.is_dir() and p.name[4:] not in labels)


def _run_node_validator(bids_dir: Path, ignored_subjects: list[str]) -> str | None:
    """Run the node bids-validator; ``None`` when it could not run or its output is unusable."""
    config = {"ignore": list(_IGNORED_VALIDATOR_ISSUES),
              "ignoredFiles": [f"/{name}/**" for name in ignored_subjects] + [_STALE_LOCKS]}
    with tempfile.TemporaryDirectory(prefix="spec2vol-validator-") as tmp:
        config_file = Path(tmp) / "bids-validator-config.json"
        config_file.write_text(json.dumps(config), encoding="utf-8")
        try:
            proc = subprocess.run(
                ["bids-validator", str(bids_dir), "--json", "--ignoreWarnings", "-c",
                 str(config_file)],
                capture_output=True, text=True, timeout=_VALIDATOR_TIMEOUT_S, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
    try:
        # node may print its own warnings before the JSON document
        report = json.loads(proc.stdout[proc.stdout.index("{"):])
        errors = report["issues"]["errors"]
    except (ValueError, KeyError, TypeError):
        return None
    if errors:
        first = errors[0]
        files = [f for f in first.get("files") or [] if f]
        where = ""
        if files and isinstance(files[0].get("file"), dict):
            where = files[0]["file"].get("relativePath") or files[0]["file"].get("name") or ""
        n_files = sum(len(e.get("files") or []) or 1 for e in errors)
        reason = str(first.get("reason") or "").strip().split(". ")[0].rstrip(".")
        raise ValidationError(
            f"bids-validator found {len(errors)} kind(s) of error in {n_files} place(s); first: "
            f"{first.get('key')} {where} ({reason}); {_SKIP_HINT}",
            path=bids_dir,
        )
    return "bids-validator (node): no errors"


def _python_filename_check(bids_dir: Path, ignored_subjects: list[str]) -> str:
    """Check every file name with the Python BIDSValidator; raise on the first bad one."""
    from bids_validator import BIDSValidator

    validator = BIDSValidator()
    patterns = _bidsignore_patterns(bids_dir)
    skip_top = {"derivatives", "sourcedata", "code", *ignored_subjects}
    bad, n_checked = [], 0
    for folder, dirs, names in os.walk(bids_dir):
        rel_folder = Path(folder).relative_to(bids_dir)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not (rel_folder == Path(".") and d in skip_top)
                         and not _ignored((rel_folder / d).as_posix() + "/", patterns))
        for name in sorted(names):
            rel = (rel_folder / name).as_posix()
            if name.startswith(".") or name.endswith(".lock") or _ignored(rel, patterns):
                continue
            n_checked += 1
            if not validator.is_bids("/" + rel):
                bad.append(rel)
    if bad:
        raise ValidationError(
            f"{len(bad)} file name(s) do not follow BIDS, first: {bad[0]}; rename it or list it "
            f"in .bidsignore; {_SKIP_HINT}",
            path=bids_dir,
        )
    return f"bids_validator (Python, file names only): {n_checked} files, no errors"


def _bidsignore_patterns(bids_dir: Path) -> list[str]:
    try:
        lines = (bids_dir / ".bidsignore").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """gitignore-style matching, as the validator applies ``.bidsignore``."""
    for pattern in patterns:
        anchored = pattern.startswith("/")
        pat = pattern.lstrip("/")
        if pat.endswith("/"):
            # a folder pattern: matches the folder itself and everything below it
            prefixes = [rel[: i + 1] for i, ch in enumerate(rel) if ch == "/"]
            if any(_glob(p, pat, anchored) for p in prefixes):
                return True
        elif _glob(rel.rstrip("/"), pat, anchored):
            return True
    return False


def _glob(rel: str, pattern: str, anchored: bool) -> bool:
    if "/" in pattern.rstrip("/") or anchored:
        return fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(rel, pattern.rstrip("/"))
    return fnmatch.fnmatchcase(rel.rstrip("/").rsplit("/", 1)[-1], pattern.rstrip("/"))


def _split_index(path: Path) -> int | None:
    match = _SPLIT_RE.search(path.name)
    return int(match.group(1)) if match else None


def _extension_rank(path: Path, extensions) -> int:
    name = path.name.lower()
    return next((i for i, ext in enumerate(extensions) if name.endswith(ext)), len(extensions))


def _run_key(run) -> int | str | None:
    if run is None:
        return None
    text = str(run)
    return int(text) if text.isdigit() else text


def _sort_key(key: tuple) -> tuple:
    return tuple((v is not None, str(v) if not isinstance(v, int) else f"{v:09d}") for v in key)


def _str_or_none(value) -> str | None:
    return None if value is None else str(value)


def _last(items: list[Path]) -> Path | None:
    return items[-1] if items else None


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
