"""A run's BOLD → its training target (``*_desc-target_bold.nii.gz`` + sidecar) and brain mask.

The series is resampled to the target grid by 3-D DCT truncation and every volume min-max
scaled to [0, 1] (:mod:`spec2vol_bids.bold`). Preprocessed BOLD in a template space comes with
its brain mask, written on the target grid; only when the derivative lacks one is the template's
taken from TemplateFlow (:func:`fetch_templates`, before any work).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from spec2vol_bids.derivatives import read_json, write_json, write_nifti
from spec2vol_bids.errors import DataError
from spec2vol_bids.naming import TARGET_SUFFIX, build_name, run_dir, source_uri
from spec2vol_bids.participant.freshness import input_hash, is_done
from spec2vol_bids.participant.result import RunResult

LOGGER = logging.getLogger(__name__)


def process_bold(pair, config, tr: float, result: RunResult) -> None:
    """Normalised, resampled BOLD target of one run as NIfTI + JSON sidecar (skipped when done)."""
    import nibabel as nib

    from spec2vol_bids import bold

    out = run_dir(config.inputs.output_dir, pair.entities, "func")
    nii = out / build_name(pair.entities, "bold", ".nii.gz", desc="target")
    sidecar = out / build_name(pair.entities, "bold", ".json", desc="target")
    mask_source = _mask_source(pair)
    sources = [pair.bold, *([mask_source] if mask_source else [])]
    digest = input_hash([*sources, *pair.bold_sidecars],
                        {"target_grid": config.participant.target_grid, "tr": tr})
    result.target = str(nii)
    if is_done(sidecar, nii, digest):
        result.n_volumes = read_json(sidecar)["NumberOfVolumes"]
        LOGGER.info("%s: BOLD target up to date, skipped", pair.label)
        return
    img = bold.load_bold(pair.bold)
    # a target a previous spec2vol run wrote is on its model grid already
    native = img.shape[:3] if pair.bold.name.endswith(TARGET_SUFFIX) else None
    grid = tuple(config.participant.target_grid or native or bold.default_target_grid(img.shape[:3]))
    data, affine = bold.bold_targets(img, grid, discard=config.participant.discard_volumes)
    target = bold.with_spatial_code(nib.Nifti1Image(data, affine), bold.spatial_code(img.header))
    target.header.set_xyzt_units("mm", "sec")
    target.header["pixdim"][4] = tr
    # float32 targets hardly compress: stored (level 0) they write in a fifth of the time
    write_nifti(nii, target, compresslevel=0)
    if mask_source is not None:
        _write_mask(mask_source, target, out / build_name(pair.entities, "mask", ".nii.gz", desc="brain"))
    write_json(sidecar, {
        "Description": "Measured BOLD resampled to the target grid (3-D DCT) with every volume "
                       "min-max scaled to [0, 1]: the model's training target",
        "RepetitionTime": tr, "SkullStripped": False, "TargetGrid": list(grid),
        "OriginalShape": list(img.shape), "NumberOfVolumes": int(data.shape[3]),
        "Sources": [source_uri(p, config.inputs.bids_dir) for p in sources],
        "InputHash": digest,
    })
    result.n_volumes = int(data.shape[3])
    LOGGER.info("%s: BOLD target %s -> %s, %d volumes", pair.label, img.shape[:3], grid, data.shape[3])


def _mask_source(pair) -> Path | None:
    """The brain mask of a run's BOLD: the derivative's, else its template's (TemplateFlow)."""
    from spec2vol_bids import templates
    from spec2vol_bids.bids.spaces import is_template_space

    if pair.bold_mask is not None:
        return pair.bold_mask
    if is_template_space(pair.space):
        return templates.template_mask(pair.space, pair.res, pair.cohort)
    return None


def fetch_templates(pairs) -> list[Path]:
    """Get the TemplateFlow brain masks the runs need, before any work is done: those of runs
    in template spaces whose derivatives hold none. Nothing else is fetched (the reports' T1w
    background is never downloaded: :func:`spec2vol_bids.templates.local_template_anatomy`).

    Raises
    ------
    MissingInputError (66)
        A mask is missing and cannot be downloaded; the message says how to pre-fetch it.
    """
    from spec2vol_bids import templates
    from spec2vol_bids.bids.spaces import is_template_space

    needed = sorted({(p.space, p.res, p.cohort) for p in pairs if p.bold is not None
                     and p.bold_mask is None and is_template_space(p.space)}, key=str)
    return [templates.template_mask(space, res, cohort) for space, res, cohort in needed]


def _write_mask(source: Path, target_img, path: Path) -> None:
    """The brain mask on the target grid: copied when the grids agree, else resampled
    (nearest neighbour) to the target's affine and shape.

    Raises
    ------
    DataError (65)
        The mask lies in another space than its series (one's NIfTI space code says scanner, the
        other's a standard space), or
        covers none of the target's voxels (empty, or elsewhere): every score inside it would
        be 0 or meaningless.
    """
    import nibabel as nib
    from nilearn.image import resample_img

    from spec2vol_bids.bold import spatial_code, with_spatial_code

    mask = nib.load(source)
    codes = spatial_code(mask.header), spatial_code(target_img.header)
    # scanner space against a standard one (Talairach, MNI, template); 2, "aligned", is what
    # many tools write by default, so it tells nothing
    if {codes[0], codes[1]} & {1} and {codes[0], codes[1]} & {3, 4, 5}:
        raise DataError(f"the brain mask's space code is {codes[0]} but its BOLD series' is "
                        f"{codes[1]}: it belongs to another space; give the series' own mask",
                        path=source)
    same = (mask.shape[:3] == target_img.shape[:3]
            and np.allclose(mask.affine, target_img.affine, atol=1e-4))
    if not same:
        mask = resample_img(mask, target_affine=target_img.affine,
                            target_shape=target_img.shape[:3], interpolation="nearest",
                            force_resample=True, copy_header=True)
    data = np.asarray(mask.dataobj)[..., 0] if mask.ndim == 4 else np.asarray(mask.dataobj)
    if not np.any(data > 0):
        raise DataError("the brain mask covers none of its BOLD series' voxels (it is empty, or "
                        "lies elsewhere in space); give the series' own mask", path=source)
    out = with_spatial_code(nib.Nifti1Image((data > 0).astype(np.uint8), target_img.affine),
                            spatial_code(target_img.header))
    out.header.set_xyzt_units("mm")
    write_nifti(path, out)
