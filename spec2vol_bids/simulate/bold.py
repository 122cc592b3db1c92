"""The simulated BOLD: each subject's anatomy on the EPI grid and its 4-D runs.

The BOLD is the MNI152 template (bundled with nilearn) resampled to the EPI grid with a
per-subject intensity, contrast and head position, modulated by the latent sources through
their maps (:mod:`.latent`), plus slow drifts, a global signal and thermal noise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage, signal

from spec2vol_bids.derivatives import write_json
from spec2vol_bids.naming import sidecar_path
from spec2vol_bids.simulate.latent import source_maps

_BOLD_NOISE = 0.01  # thermal noise sd, relative to the subject's intensity scale


def grid_affine(grid: tuple[int, int, int]) -> np.ndarray:
    """The EPI voxel-to-MNI affine: 220 mm square field of view, 144 mm slab, RAS axes.

    Parameters
    ----------
    grid : tuple of int
        The voxel grid (X, Y, Z).

    Returns
    -------
    ndarray, shape (4, 4)
    """
    shape = np.asarray(grid, float)
    zooms = np.array([220.0 / max(grid[:2])] * 2 + [144.0 / grid[2]])
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = np.array([0.0, -18.0, 18.0]) - zooms * (shape - 1) / 2
    return affine


def load_template(grid):
    """The MNI152 T1 template and brain mask (bundled with nilearn), blurred to the EPI voxel size.

    Returns
    -------
    image, soft_mask : ndarray
        On the template's 2 mm grid; the image scaled to a maximum of 1.
    affine : ndarray
        The template's affine.
    """
    from nilearn import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = datasets.load_mni152_template(resolution=2)
        mask = datasets.load_mni152_brain_mask(resolution=2)
    zooms = np.abs(np.diag(grid_affine(grid))[:3])
    sigma = zooms / 2.355 / np.asarray(img.header.get_zooms()[:3])
    data = ndimage.gaussian_filter(np.asarray(img.dataobj, float), sigma)
    soft = ndimage.gaussian_filter(np.asarray(mask.dataobj, float), sigma)
    return data / data.max(), soft, img.affine


@dataclass
class Anatomy:
    """One subject's EPI-grid anatomy and source maps."""

    image: np.ndarray  # (X, Y, Z) mean intensity
    mask: np.ndarray  # bool (X, Y, Z)
    maps: np.ndarray  # (X, Y, Z, K) signed fractional BOLD change per unit regressor
    scale: float  # intensity scale, the reference of noise and drifts
    shift: np.ndarray  # head position (mm)


def subject_anatomy(rng, template, grid, sources) -> Anatomy:
    """A subject's anatomy: the template in a shifted head, with its own intensity and contrast.

    Parameters
    ----------
    rng : numpy.random.Generator
    template : tuple
        What :func:`load_template` returns.
    grid : tuple of int
        The EPI grid.
    sources : list of Source

    Returns
    -------
    Anatomy
    """
    data, soft, t_affine = template
    shift = np.clip(rng.normal(0.0, 2.0, 3), -4.0, 4.0)
    scale = rng.uniform(600.0, 1000.0)
    contrast = rng.uniform(0.8, 1.25)
    affine = grid_affine(grid)
    ijk = np.indices(grid, dtype=float).reshape(3, -1)
    # MNI coordinates of each EPI voxel in the subject's (shifted) head
    mni = affine[:3, :3] @ ijk + affine[:3, 3:] - shift[:, None]
    tvox = np.linalg.solve(t_affine[:3, :3], mni - t_affine[:3, 3:])
    anat = ndimage.map_coordinates(data, tvox, order=1, cval=0.0).reshape(grid)
    brain = np.clip(ndimage.map_coordinates(soft, tvox, order=1, cval=0.0).reshape(grid), 0.0, 1.0)
    maps = source_maps(mni, brain, sources)
    return Anatomy(scale * np.maximum(anat, 0.0) ** contrast, brain > 0.5, maps, scale, shift)


def write_bold_run(path: Path, rng, anatomy: Anatomy, regressors, tr, task):
    """Write the 4-D BOLD series (int16, TR in pixdim[4]) and its sidecar.

    Parameters
    ----------
    path : Path
        The ``*_bold.nii.gz`` to write.
    rng : numpy.random.Generator
        The run's generator (drifts, global signal, noise).
    anatomy : Anatomy
    regressors : ndarray, shape (sources, volumes)
        The standardised HRF regressors (:func:`~.latent.volume_truth`).
    tr : float
    task : str
    """
    import nibabel as nib

    grid = anatomy.image.shape
    img = nib.Nifti1Image(_bold_series(rng, anatomy, regressors, tr), grid_affine(grid))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((*img.header.get_zooms()[:3], float(tr)))
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    write_json(
        sidecar_path(path),
        {
            "TaskName": task,
            "RepetitionTime": float(tr),
            "EchoTime": 0.03,
            "MagneticFieldStrength": 3,
            "SkullStripped": False,
            "TaskDescription": "Simulated resting state; EEG was recorded simultaneously",
        },
    )


def _bold_series(rng, anatomy: Anatomy, regressors, tr) -> np.ndarray:
    """The run's magnitude images, (X, Y, Z, volumes) int16 in F order, in blocks of volumes."""
    grid = anatomy.image.shape
    n_vol = regressors.shape[1]
    # voxels in F order (x fastest), the order of the NIfTI file, so that the output array's
    # 2-D view below is a plain reshape
    image = anatomy.image.ravel(order="F").astype(np.float32)
    inside = np.flatnonzero(image > 0)
    image = image[inside]
    maps = np.ascontiguousarray(anatomy.maps.reshape(-1, anatomy.maps.shape[-1], order="F")[inside].T)
    # slow scanner drifts with a smooth spatial profile, and a global signal
    ijk = (np.indices(grid, dtype=np.float32).reshape(3, -1, order="F").T / np.asarray(grid) - 0.5)[inside]
    drift_lin = 0.01 * rng.standard_normal() + ijk @ (0.01 * rng.standard_normal(3)).astype(np.float32)
    drift_quad = 0.005 * rng.standard_normal() + ijk @ (0.005 * rng.standard_normal(3)).astype(np.float32)
    global_signal = 0.004 * _global_signal(rng, n_vol, tr)
    tau = np.linspace(-1.0, 1.0, n_vol)
    noise_sd = np.float32(_BOLD_NOISE * anatomy.scale)
    out = np.empty((*grid, n_vol), np.int16, order="F")
    flat = out.reshape(-1, n_vol, order="F")
    step = max(1, 4_000_000 // flat.shape[0])
    for v0 in range(0, n_vol, step):
        v = slice(v0, min(v0 + step, n_vol))
        col = np.s_[:, None]
        modulation = regressors[:, v].T.astype(np.float32) @ maps  # volumes × voxels inside
        modulation += (1.0 + global_signal[v]).astype(np.float32)[col]
        modulation += tau[v].astype(np.float32)[col] * drift_lin
        modulation += (tau[v] ** 2 - 1 / 3).astype(np.float32)[col] * drift_quad
        modulation *= image
        # volume after volume from the generator, so the block size does not change the data
        volumes = rng.standard_normal((modulation.shape[0], flat.shape[0]), dtype=np.float32)
        volumes *= noise_sd
        volumes[:, inside] += modulation
        # magnitude images: the noise floor outside the head is Rician, never negative
        np.abs(volumes, out=volumes)
        np.rint(volumes, out=volumes)
        np.minimum(volumes, 32767, out=volumes)
        flat[:, v] = volumes.T
    return out


def _global_signal(rng, n_vol, tr):
    """A standardised global BOLD fluctuation below 0.1 Hz, one value per volume."""
    cutoff = min(0.1, 0.4 / tr)
    sos = signal.butter(2, cutoff, fs=1.0 / tr, output="sos")
    z = signal.sosfiltfilt(sos, rng.standard_normal(n_vol + 60))[30:-30]
    return (z - z.mean()) / max(z.std(), 1e-12)
