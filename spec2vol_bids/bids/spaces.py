"""Preprocessed BOLD from derivative datasets and the spaces it lies in.

``--bold-derivatives`` names datasets such as fMRIPrep's, whose
``*_space-<space>[_res-<r>]_desc-preproc_bold`` series replace the raw BOLD, or earlier spec2vol
outputs, whose ``*_desc-target_bold`` series do; ``--bold-space`` chooses among their spaces
in fMRIPrep's ``--output-spaces`` syntax.
"""

from __future__ import annotations

import json
from pathlib import Path

from spec2vol_bids.derivatives import PIPELINE_NAME
from spec2vol_bids.errors import UsageError
from spec2vol_bids.naming import is_label

# fMRIPrep's non-standard output spaces: no TemplateFlow template behind them
NONSTANDARD_SPACES = frozenset({"T1w", "T2w", "anat", "fsnative", "func", "run", "bold", "boldref",
                                "sbref", "session"})


def is_template_space(space: str | None) -> bool:
    """Whether a ``space-`` label names a TemplateFlow template (not T1w, func, ... or none)."""
    return space is not None and space not in NONSTANDARD_SPACES


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
        if key != "res" or not is_label(res):
            raise UsageError(f"--bold-space {text!r}: write SPACE or SPACE:res-N, e.g. "
                             "MNI152NLin2009cAsym:res-2")
        if res.isdigit():  # res-02 is res-2
            res = res.lstrip("0") or "0"
    if not is_label(name):
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


def format_space(space, res) -> str:
    return f"{space or 'no space entity'}{f':res-{res}' if res is not None else ''}"
