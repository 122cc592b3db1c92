"""BOLD targets: lazy reading, DCT resampling to the model's grid, per-volume normalisation.

docs/design.md, "Preprocessing", step 5. A BOLD series is read lazily (nibabel ``dataobj``), a few volumes at a time;
each volume is resampled by truncating or zero-padding its orthonormal 3-D DCT-II (the
authors' CN-EPFL treatment, 108×108×64 → 64×64×30) and min–max scaled to [0, 1] on its own.
The affine is rescaled so that the resampled volume covers the same field of view.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.fft

from spec2vol_bids.bids.annex import require_content
from spec2vol_bids.errors import DataError, one_line
from spec2vol_bids.spectra import fft_workers

logger = logging.getLogger(__name__)

MODEL_IN_PLANE = (64, 64)
DEFAULT_SLICES = 30
MAX_NATIVE_SLICES = 40

# What nibabel and the decompressors raise on corrupt, truncated or non-NIfTI files.
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile,
                nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError)


def load_bold(path):
    """Open a 4-D BOLD series without reading its data.

    Parameters
    ----------
    path : str | Path
        A NIfTI file (``.nii`` or ``.nii.gz``).

    Returns
    -------
    img : nibabel.Nifti1Image | nibabel.Nifti2Image
        The image; its data are read on access through ``img.dataobj``. The file is kept
        open, so reading a compressed series a few volumes at a time decompresses it once.

    Raises
    ------
    MissingInputError
        The file does not exist.
    DataError
        The file is empty, not a readable NIfTI image (corrupt gzip, bad header) or not 4-D.
    """
    path = Path(path)
    require_content(path, "BOLD file")
    if path.stat().st_size == 0:
        raise DataError("the BOLD file is empty", path=path)
    try:
        img = nib.load(path, keep_file_open=True)
    except _READ_ERRORS as exc:
        raise DataError(f"cannot read the BOLD file ({one_line(exc)})", path=path) from exc
    if len(img.shape) != 4 or min(img.shape) < 1:
        raise DataError(f"a BOLD series must be 4-D with no empty dimension; this image is {'×'.join(map(str, img.shape))}",
                        path=path)
    return img


def header_tr(img) -> float | None:
    """Repetition time in seconds from a NIfTI header (4th zoom and time units), or None."""
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or not zooms[3] > 0:
        return None
    unit = img.header.get_xyzt_units()[1]
    scale = {"msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    # pixdim is float32: 2.16 is stored as 2.1600000858..., which is not what the scanner ran
    return round(float(zooms[3]) * scale, 6)


def spatial_code(header) -> int:
    """The NIfTI code of the space a header's affine maps into (1 scanner, 2 aligned, 3
    Talairach, 4 MNI, 5 template): its sform's, else its qform's; 0 when neither is set to
    one of these."""
    codes = [int(header[field]) for field in ("sform_code", "qform_code")]
    return next((code for code in codes if 1 <= code <= 5), 0)


def with_spatial_code(img, code: int):
    """``img`` with both its sform and qform set to its affine and ``code`` (kept as nibabel
    makes it when ``code`` is 0), so that every reader places it in the source's space."""
    if code:
        img.set_sform(img.affine, code)
        img.set_qform(img.affine, code)
    return img


def default_target_grid(shape) -> tuple[int, int, int]:
    """The model's grid for a series of spatial ``shape``: native if 64×64 with ≤ 40 slices.

    Larger or differently shaped series (CN-EPFL: 108×108×64) go to 64×64×30.
    """
    x, y, z = (int(n) for n in shape[:3])
    if (x, y) == MODEL_IN_PLANE and z <= MAX_NATIVE_SLICES:
        return (x, y, z)
    return (*MODEL_IN_PLANE, DEFAULT_SLICES)


def dct_resample(volume: np.ndarray, shape) -> np.ndarray:
    """Resample volume(s) by truncating or zero-padding their orthonormal 3-D DCT-II.

    Parameters
    ----------
    volume : ndarray, shape (X, Y, Z) or (X, Y, Z, V)
        One volume or a stack of volumes (last axis); the first three axes are resampled.
    shape : tuple of 3 int
        The new (X', Y', Z').

    Returns
    -------
    resampled : ndarray, shape (X', Y', Z'[, V]), float32 (float64 for float64 input)

    Notes
    -----
    The lowest ``min(n, n')`` coefficients of each axis are kept (the rest dropped or zero
    filled), then the orthonormal inverse DCT of the new length is taken. Orthonormal
    transforms of different lengths scale a constant by ``sqrt(n / n')`` per axis, so the result
    is multiplied by ``sqrt(n' / n)`` per axis: a constant volume stays the same constant, and a
    volume that is band-limited (only coefficients below ``min(n, n')``) is resampled exactly —
    the same smooth function sampled at the voxel centres of the new grid, which spans the same
    field of view (see :func:`resampled_affine`). The authors do not rescale, but the per-volume
    min–max normalisation that follows removes any constant factor, so targets are the same.

    The 3-D transform is separable; it is applied axis by axis, the most shrunk axis first
    (CN-EPFL: slices 64 → 30), so that the later axes transform fewer values. The transforms
    run on :func:`~spec2vol_bids.spectra.fft_workers` threads, each line on one thread, so
    the result does not depend on the thread count.
    """
    out = np.asarray(volume)
    if not np.issubdtype(out.dtype, np.floating):
        out = out.astype(np.float32)
    workers = fft_workers()
    for axis in sorted(range(3), key=lambda a: shape[a] / out.shape[a]):
        old, new = out.shape[axis], int(shape[axis])
        if new == old:
            continue
        coef = scipy.fft.dct(out, type=2, axis=axis, norm="ortho", workers=workers)
        out = scipy.fft.idct(coef, type=2, n=new, axis=axis, norm="ortho", workers=workers)
        out *= np.sqrt(new / old).astype(out.dtype)
    return out


def resampled_affine(affine, old_shape, new_shape) -> np.ndarray:
    """Voxel-to-world affine of a volume resampled from ``old_shape`` to ``new_shape``.

    The field of view — voxel centres 0..n−1 with edges at −½ and n−½ — keeps its place:
    voxels grow by ``n / n'`` per axis and new voxel ``i'`` has its centre at old voxel
    coordinate ``(i' + ½)·n/n' − ½``.
    """
    scale = np.asarray(old_shape[:3], dtype=float) / np.asarray(new_shape[:3], dtype=float)
    to_old = np.eye(4)
    to_old[:3, :3] = np.diag(scale)
    to_old[:3, 3] = 0.5 * scale - 0.5
    return np.asarray(affine, dtype=float) @ to_old


def normalise_volumes(data: np.ndarray) -> np.ndarray:
    """Min–max scale each volume (last axis) to [0, 1], as float32; a constant volume → 0."""
    data = np.asarray(data)
    if data.ndim == 3:
        return normalise_volumes(data[..., None])[..., 0]
    out = np.empty(data.shape, dtype=np.float32)
    for v in range(data.shape[-1]):
        volume = data[..., v].astype(np.float64)
        low, high = volume.min(), volume.max()
        if not (np.isfinite(low) and np.isfinite(high)):
            raise DataError("a BOLD volume holds NaN or infinite values")
        if high > low:
            out[..., v] = (volume - low) / (high - low)
        else:
            out[..., v] = 0
    return out


def bold_targets(img, grid, *, chunk: int = 32, discard: int = 0):
    """Resampled, normalised BOLD volumes: the model's targets.

    Parameters
    ----------
    img : nibabel image
        A 4-D series from :func:`load_bold`.
    grid : tuple of 3 int
        The target grid (X, Y, Z), e.g. from :func:`default_target_grid`.
    chunk : int
        Volumes read and resampled at once; bounds memory for long or large series.
    discard : int
        Volumes at the start that no sample uses (``--discard-volumes``); they may be constant.

    Returns
    -------
    data : ndarray, shape (X, Y, Z, V), float32
        Each volume DCT-resampled to ``grid`` and min–max scaled to [0, 1].
    affine : ndarray, shape (4, 4)
        The affine of the resampled grid, covering the original field of view.

    Raises
    ------
    DataError (65)
        A volume cannot be read, holds NaN or infinite values, or is constant (from ``discard``
        on).
    """
    grid = tuple(int(n) for n in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise DataError(f"the target grid must be three positive sizes, not {grid}")
    shape = img.shape
    n_volumes = shape[3]
    path = img.get_filename()
    out = np.empty((*grid, n_volumes), dtype=np.float32)
    for a in range(0, n_volumes, chunk):
        b = min(a + chunk, n_volumes)
        try:
            block = np.asarray(img.dataobj[..., a:b], dtype=np.float32)
        except _READ_ERRORS as exc:
            raise DataError(f"cannot read BOLD volumes {a}-{b - 1} ({one_line(exc)})",
                            path=path) from exc
        flat = [v for v in np.flatnonzero(np.ptp(block.reshape(-1, b - a), axis=0) == 0)
                if a + v >= discard]
        if flat:  # a lost or padded volume: its target would be a blank the model learns
            raise DataError(f"BOLD volume {a + flat[0]} is constant (every voxel "
                            f"{block[..., flat[0]].flat[0]:g}); remove it from the series, or "
                            "discard it with --discard-volumes if it comes first", path=path)
        try:
            out[..., a:b] = normalise_volumes(dct_resample(block, grid))
        except DataError as exc:
            raise DataError(f"{exc} (volumes {a}-{b - 1})", path=path) from exc
    return out, resampled_affine(img.affine, shape[:3], grid)
