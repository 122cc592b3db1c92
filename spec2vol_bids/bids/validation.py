"""Checks of the inputs before any work: BIDS_DIR, its validation, OUTPUT_DIR and the work folder.

:func:`check_inputs` runs them for either level: OUTPUT_DIR and ``-w`` may not write into the
raw dataset, and BIDS_DIR must be a dataset (the participant level also validates it, with the
official validator when installed, unless ``--skip-bids-validation``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable

from spec2vol_bids.errors import MissingInputError, OutputError, UsageError, ValidationError, one_line
from spec2vol_bids.naming import clean_labels

logger = logging.getLogger(__name__)

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


def check_inputs(config) -> None:
    """Check BIDS_DIR, OUTPUT_DIR and the work folder of a run (either level) before any work.

    Raises
    ------
    UsageError (64), MissingInputError (66), ValidationError (16)
        As :func:`check_output_dir`, :func:`check_work_dir`, :func:`check_bids_dir` and
        :func:`validate_bids_dir`.
    """
    inputs = config.inputs
    check_output_dir(inputs.bids_dir, inputs.output_dir)
    check_work_dir(inputs.bids_dir, config.execution.work_dir)
    if inputs.analysis_level == "participant" and not inputs.skip_bids_validation:
        logger.debug("%s", validate_bids_dir(inputs.bids_dir, participant_labels=inputs.participant_label))
    else:
        check_bids_dir(inputs.bids_dir)


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
    bids_dir = existing_dir(bids_dir, "BIDS_DIR")
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
        raise ValidationError(f"cannot read dataset_description.json ({one_line(exc)})",
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
    labels = clean_labels(participant_labels, "sub", "participant")
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
    existing = next(p for p in (work, *work.parents) if p.exists())
    # never a probe inside the input dataset (a work folder under BIDS_DIR/derivatives whose
    # parents do not exist yet): only whether a file is in the way is checked there
    inside_input = existing.is_relative_to(Path(bids_dir).expanduser().resolve())
    try:  # a probe, removed at once: the folder itself is made when it is first needed
        if not existing.is_dir():
            raise NotADirectoryError(0, "it is a file")
        if not inside_input:
            os.rmdir(tempfile.mkdtemp(prefix=".spec2vol-probe-", dir=existing))
    except OSError as exc:
        raise OutputError(f"cannot create the work folder in {existing} ({exc.strerror}); "
                          "choose another -w/--work-dir", path=work_dir) from exc
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


def existing_dir(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise MissingInputError(f"{what} does not exist", path=path)
    if not path.is_dir():
        raise MissingInputError(f"{what} is not a folder", path=path)
    if not os.access(path, os.R_OK | os.X_OK):
        raise MissingInputError(f"{what} cannot be read (permission denied)", path=path)
    return path


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
