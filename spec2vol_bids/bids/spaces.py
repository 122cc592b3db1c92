"""Preprocessed BOLD from derivative datasets and the spaces it lies in.

``--bold-derivatives`` names datasets such as fMRIPrep's, whose
``*_space-<space>[_cohort-<c>][_res-<r>]_desc-preproc_bold`` series replace the raw BOLD, or
earlier spec2vol outputs, whose ``*_desc-target_bold`` series do; ``--bold-space`` chooses among
their spaces in fMRIPrep's ``--output-spaces`` syntax (``func`` for the series without a
``space-`` entity).
"""

from __future__ import annotations

import json
from pathlib import Path

from spec2vol_bids.derivatives import PIPELINE_NAME
from spec2vol_bids.errors import UsageError
from spec2vol_bids.naming import is_label

#: fMRIPrep's name for the BOLD run's own space, whose series carry no ``space-`` entity
NATIVE = "func"

# fMRIPrep's non-standard output spaces: no TemplateFlow template behind them
NONSTANDARD_SPACES = frozenset({"T1w", "T2w", "anat", "fsnative", "func", "run", "bold", "boldref",
                                "sbref", "session"})


def is_template_space(space: str | None) -> bool:
    """Whether a ``space-`` label names a TemplateFlow template (not T1w, func, ... or none)."""
    return space is not None and space not in NONSTANDARD_SPACES


def parse_space(text: str) -> tuple[str, str | None, str | None]:
    """Split fMRIPrep's ``--output-spaces`` syntax: ``"MNIPediatricAsym:cohort-1:res-2"`` →
    ``("MNIPediatricAsym", "2", "1")`` (space, resolution, cohort).

    Raises
    ------
    UsageError (64)
        The text is not ``SPACE[:cohort-N][:res-N]`` with BIDS labels.
    """
    name, *modifiers = str(text).strip().split(":")
    found: dict[str, str] = {}
    for modifier in modifiers:
        key, _, value = modifier.partition("-")
        if key not in ("res", "cohort") or key in found or not is_label(value):
            raise UsageError(f"--bold-space {text!r}: write SPACE, SPACE:res-N or "
                             "SPACE:cohort-N:res-N, e.g. MNI152NLin2009cAsym:res-2")
        found[key] = (value.lstrip("0") or "0") if value.isdigit() else value  # res-02 is res-2
    if not is_label(name):
        raise UsageError(f"--bold-space {text!r}: the space is a BIDS label (letters and digits), "
                         "e.g. MNI152NLin2009cAsym")
    return name, found.get("res"), found.get("cohort")


def unparse_space(space: str | None, res: str | None, cohort: str | None = None) -> str:
    """The ``--bold-space`` text of a space: ``SPACE[:cohort-N][:res-N]``."""
    return (f"{space or NATIVE}{f':cohort-{cohort}' if cohort is not None else ''}"
            f"{f':res-{res}' if res is not None else ''}")


def format_space(space, res, cohort=None) -> str:
    """A space for messages; the series without a space entity (fMRIPrep's ``func``) say so."""
    text = unparse_space(space, res, cohort)
    return text.replace(NATIVE, f"{NATIVE} (no space entity)", 1) if space is None else text


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
