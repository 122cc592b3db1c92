"""Brain masks and anatomy of standard spaces from TemplateFlow, with explicit offline behaviour.

fMRIPrep-style outputs in a template space (``space-MNI152NLin2009cAsym``) come with their own
brain mask. Only when one is missing does the computation need TemplateFlow (the template's
mask): nothing is downloaded when the file is in ``TEMPLATEFLOW_HOME`` already, and a failed
download is one :class:`MissingInputError` (exit 66), raised before any work, that says how to
pre-fetch the file on a machine with network.

The template's T1w image is only the anatomical background of the report figures, so it is
never downloaded: :func:`local_template_anatomy` looks in ``TEMPLATEFLOW_HOME`` (without
importing TemplateFlow, which may reach for the network), and the reports fall back on what is
at hand (see :func:`spec2vol_bids.report.anatomical_underlay`). Compute nodes without network
process template-space derivatives as they are.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from spec2vol_bids.errors import DataError, MissingInputError

# TemplateFlow's own default (a few seconds per try) would be several minutes of retries
_DOWNLOAD_TIMEOUT_S = 10

#: What each kind of template file is, for TemplateFlow's query and for the messages
_KINDS = {
    "mask": ({"desc": "brain", "suffix": "mask"}, "brain mask"),
    "T1w": ({"desc": None, "suffix": "T1w"}, "T1w image"),
}


def prefetch_command(space: str, res: str | None, kind: str = "mask", cohort: str | None = None) -> str:
    """The shell command that puts a template file into ``TEMPLATEFLOW_HOME``.

    Parameters
    ----------
    space : str
        The template, e.g. ``MNI152NLin2009cAsym``.
    res : str | None
        The resolution label (``2`` for ``res-2``); ``None`` fetches every resolution.
    kind : {"mask", "T1w"}
        The brain mask or the T1w image.
    cohort : str | None
        The template's cohort (``1`` for ``cohort-1`` of ``MNIPediatricAsym``), if it has them.
    """
    query, _ = _KINDS[kind]
    resolution = f", resolution={int(res)}" if res is not None and str(res).isdigit() else ""
    cohort_arg = f", cohort={cohort!r}" if cohort is not None else ""
    args = ", ".join(f"{k}={v!r}" for k, v in query.items())
    return (f"python -c \"import templateflow.api as tf; "
            f"tf.get('{space}'{cohort_arg}{resolution}, {args})\"")


def template_mask(space: str, res: str | None = None, cohort: str | None = None) -> Path:
    """The ``tpl-<space>[_cohort-<c>][_res-<r>]_desc-brain_mask.nii.gz`` of a TemplateFlow
    template.

    Parameters
    ----------
    space : str
        The template's name, e.g. ``MNI152NLin2009cAsym``.
    res : str | None
        The resolution label as in fMRIPrep's file names (``2`` for ``res-2``, which TemplateFlow
        stores as ``res-02``); ``None`` takes the finest one available.
    cohort : str | None
        The cohort of a template that has several (``MNIPediatricAsym``); a template with
        cohorts is refused without one: their brains differ.

    Returns
    -------
    path : Path
        The mask in ``TEMPLATEFLOW_HOME`` (downloaded only when it was missing).

    Raises
    ------
    MissingInputError (66)
        The mask is not in ``TEMPLATEFLOW_HOME`` and cannot be downloaded (no network, or no
        such template or resolution); the message gives the pre-fetch command.
    DataError (65)
        No cohort is given and the template's masks in ``TEMPLATEFLOW_HOME`` are of several.
    """
    return _template_file(space, res, "mask",
                          "or give a derivative dataset that has *_desc-brain_mask files", cohort)


def templateflow_home() -> Path:
    """``$TEMPLATEFLOW_HOME``, or TemplateFlow's default ``~/.cache/templateflow``."""
    return Path(os.environ.get("TEMPLATEFLOW_HOME", str(Path.home() / ".cache" / "templateflow")))


def local_template_anatomy(space: str, res: str | None = None,
                           cohort: str | None = None) -> Path | None:
    """The template's T1w image when ``TEMPLATEFLOW_HOME`` holds it, else ``None``; no request.

    TemplateFlow names it ``tpl-<space>/[cohort-<c>/]tpl-<space>[_cohort-<c>][_res-<rr>]_T1w.nii.gz``
    (fMRIPrep's ``res-2`` is TemplateFlow's ``res-02``); an empty placeholder of a not yet
    fetched file does not count.
    """
    folder = templateflow_home() / f"tpl-{space}"
    stem = f"tpl-{space}"
    if cohort is not None:
        folder, stem = folder / f"cohort-{cohort}", f"{stem}_cohort-{cohort}"
    if res is None:
        candidates = sorted(folder.glob(f"{stem}*_T1w.nii.gz"))
    else:
        labels = {str(res), f"{int(res):02d}"} if str(res).isdigit() else {str(res)}
        candidates = [folder / f"{stem}_res-{label}_T1w.nii.gz" for label in sorted(labels)]
    found = [p for p in candidates if "_desc-" not in p.name and p.is_file() and p.stat().st_size > 0]
    return found[0] if found else None


def _template_file(space: str, res: str | None, kind: str, alternative: str,
                   cohort: str | None = None) -> Path:
    query, what = _KINDS[kind]
    home = templateflow_home()
    which = (f"{f' of cohort-{cohort}' if cohort is not None else ''}"
             f"{f' at res-{res}' if res is not None else ''}")
    hint = (f"the {space} {what}{which} is not in TEMPLATEFLOW_HOME ({home}) and could not be "
            f"downloaded; pre-fetch it on a machine with network with TEMPLATEFLOW_HOME={home} "
            f"{prefetch_command(space, res, kind, cohort)}" + (f", {alternative}" if alternative else ""))
    query = {**query, "extension": ".nii.gz"}
    if res is not None:
        query["resolution"] = int(res) if str(res).isdigit() else res
    if cohort is not None:
        query["cohort"] = cohort
    try:
        with warnings.catch_warnings():
            # TemplateFlow warns (ResourceWarning) when it populates an empty home
            warnings.simplefilter("ignore")
            from templateflow import api, conf

            conf._cache.config.timeout = _DOWNLOAD_TIMEOUT_S
            found = api.get(space, raise_empty=True, **query)
    except Exception as exc:  # requests, OSError, or TemplateFlow's own errors: all mean "missing"
        raise MissingInputError(f"{hint} ({type(exc).__name__})") from exc
    paths = sorted(Path(p) for p in (found if isinstance(found, list) else [found]))
    paths = [p for p in paths if p.is_file() and p.stat().st_size > 0]
    if not paths:
        raise MissingInputError(hint)
    cohorts = sorted({part for p in paths for part in p.name.split("_") if part.startswith("cohort-")})
    if cohort is None and len(cohorts) > 1:
        raise DataError(f"the series names no cohort, but the {space} template's {what} differs "
                        f"between its cohorts ({', '.join(cohorts)}); give the series' own mask, "
                        f"or a series named with its cohort-<label> entity as fMRIPrep writes it")
    return paths[0]
