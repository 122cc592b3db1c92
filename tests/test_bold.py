"""BOLD targets (spec2vol_bids.bold): reading, DCT resampling, affine, normalisation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from spec2vol_bids.bold import (
    bold_targets,
    dct_resample,
    default_target_grid,
    header_tr,
    load_bold,
    normalise_volumes,
    resampled_affine,
)
from spec2vol_bids.errors import DataError, MissingInputError


def band_limited(shape, shift=0.0):
    """A smooth function of the field of view sampled at the voxel centres of ``shape``.

    It holds only DCT frequencies below 10 along every axis, so any grid with at least 10
    voxels per axis represents it exactly.
    """
    x, y, z = np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij")
    return (1.0 + np.cos(np.pi * 3 * x) * np.cos(np.pi * 5 * y) + 0.5 * np.cos(np.pi * 7 * z)
            + 0.3 * np.cos(np.pi * 2 * x) * np.cos(np.pi * 9 * z) + shift * np.cos(np.pi * y))


def oblique_affine(zooms=(2.0, 2.0, 2.5)):
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                    [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(zooms)
    affine[:3, 3] = [-100.0, -110.0, -70.0]
    return affine


def test_band_limited_volume_is_resampled_exactly():
    fine = band_limited((108, 108, 64)).astype(np.float32)
    coarse = band_limited((64, 64, 30))
    assert np.abs(dct_resample(fine, (64, 64, 30)) - coarse).max() < 1e-4
    assert np.abs(dct_resample(coarse.astype(np.float32), (108, 108, 64)) - fine).max() < 1e-4
    assert np.abs(dct_resample(coarse, (64, 64, 30)) - coarse).max() < 1e-12  # identity


def test_constant_stays_constant_and_4d_equals_per_volume():
    assert np.allclose(dct_resample(np.full((20, 18, 9), 3.5, np.float32), (12, 30, 7)), 3.5,
                       atol=1e-5)
    stack = np.stack([band_limited((24, 22, 16), s) for s in (0.0, 0.7, -0.4)], axis=-1)
    together = dct_resample(stack, (12, 12, 10))
    for v in range(3):
        np.testing.assert_allclose(together[..., v], dct_resample(stack[..., v], (12, 12, 10)),
                                   atol=1e-12)


def test_same_bytes_whatever_the_thread_count(monkeypatch):
    stack = np.random.default_rng(0).normal(size=(30, 28, 20, 3)).astype(np.float32)
    results = set()
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        results.add(dct_resample(stack, (16, 12, 10)).tobytes())
    assert len(results) == 1


def test_centre_of_mass_stays_in_place():
    """A 108×108×64 blob resampled to 64×64×30 keeps its world centre of mass (< 1 voxel)."""
    shape, grid = (108, 108, 64), (64, 64, 30)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    blob = np.exp(-(((i - 30.3) / 9) ** 2 + ((j - 70.8) / 11) ** 2 + ((k - 41.2) / 6) ** 2))
    affine = oblique_affine()
    new_affine = resampled_affine(affine, shape, grid)
    resampled = dct_resample(blob.astype(np.float32), grid)

    def world_com(volume, aff):
        idx = np.indices(volume.shape).reshape(3, -1)
        com = (idx * volume.ravel()).sum(axis=1) / volume.sum()
        return aff[:3, :3] @ com + aff[:3, 3]

    moved = np.linalg.norm(world_com(resampled, new_affine) - world_com(blob, affine))
    new_voxel = np.linalg.norm(new_affine[:3, :3], axis=0).min()
    assert moved < new_voxel
    assert moved < 0.05  # in practice it does not move at all
    # Field-of-view corners stay fixed: voxel (-0.5, -0.5, -0.5) maps to the same point.
    corner = np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(new_affine @ corner, affine @ corner, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0),
                               [2.0 * 108 / 64, 2.0 * 108 / 64, 2.5 * 64 / 30])


def test_default_target_grid():
    assert default_target_grid((64, 64, 30, 300)) == (64, 64, 30)
    assert default_target_grid((64, 64, 32)) == (64, 64, 32)
    assert default_target_grid((108, 108, 64, 370)) == (64, 64, 30)
    assert default_target_grid((64, 64, 48)) == (64, 64, 30)


def test_normalise_volumes():
    data = np.stack([np.arange(24.0).reshape(2, 3, 4) - 5, np.full((2, 3, 4), 7.0)], axis=-1)
    out = normalise_volumes(data)
    assert out.dtype == np.float32
    assert out[..., 0].min() == 0 and out[..., 0].max() == 1
    np.testing.assert_allclose(out[..., 0], np.arange(24.0).reshape(2, 3, 4) / 23, rtol=1e-6)
    assert not out[..., 1].any()


def test_bold_targets_from_file(tmp_path):
    shape, n_vol = (40, 36, 20), 7
    data = np.stack([band_limited(shape, s) * 1000 for s in np.linspace(-1, 1, n_vol)], axis=-1)
    img = nib.Nifti1Image(data.astype(np.int16), oblique_affine())
    img.header.set_xyzt_units("mm", "msec")
    img.header.set_zooms((2.0, 2.0, 2.5, 2160.0))
    path = tmp_path / "sub-01_task-rest_bold.nii.gz"
    nib.save(img, path)
    loaded = load_bold(path)
    assert header_tr(loaded) == 2.16
    seconds = nib.Nifti1Image(np.zeros((2, 2, 2, 2), np.int16), np.eye(4))
    seconds.header.set_xyzt_units("mm", "sec")
    seconds.header.set_zooms((2.0, 2.0, 2.5, 2.16))
    assert float(seconds.header.get_zooms()[3]) != 2.16 and header_tr(seconds) == 2.16  # float32's 2.1600000858
    targets, affine = bold_targets(loaded, (20, 18, 10), chunk=3)
    assert targets.shape == (20, 18, 10, n_vol) and targets.dtype == np.float32
    expected = normalise_volumes(dct_resample(np.asarray(loaded.dataobj, np.float32), (20, 18, 10)))
    np.testing.assert_allclose(targets, expected, atol=1e-6)
    np.testing.assert_allclose(affine, resampled_affine(oblique_affine(), shape, (20, 18, 10)))
    native, native_affine = bold_targets(loaded, shape)
    np.testing.assert_allclose(native, normalise_volumes(np.asarray(loaded.dataobj)), atol=1e-6)
    np.testing.assert_allclose(native_affine, oblique_affine())


def test_bad_bold_files(tmp_path):
    with pytest.raises(MissingInputError):
        load_bold(tmp_path / "absent_bold.nii.gz")
    empty = tmp_path / "empty_bold.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as err:
        load_bold(empty)
    assert err.value.code == 65 and "empty_bold.nii.gz" in str(err.value)

    not_gzip = tmp_path / "junk_bold.nii.gz"
    not_gzip.write_bytes(b"this is not a gzip stream" * 50)
    with pytest.raises(DataError, match="junk_bold.nii.gz"):
        load_bold(not_gzip)

    three_d = tmp_path / "vol_bold.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), three_d)
    with pytest.raises(DataError, match="must be 4-D"):
        load_bold(three_d)

    # A valid header followed by a cut-off gzip stream: found when the volumes are read.
    good = tmp_path / "good_bold.nii.gz"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.standard_normal((16, 16, 8, 20)).astype(np.float32),
                             np.eye(4)), good)
    cut = tmp_path / "cut_bold.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cut_bold.nii.gz") as err:
        bold_targets(load_bold(cut), (8, 8, 4), chunk=5)
    assert err.value.code == 65

    # A constant volume (lost, or padded with zeros) would be a blank target; among the
    # discarded first volumes it is no sample's target.
    data = rng.standard_normal((16, 16, 8, 20)).astype(np.float32)
    data[..., 0] = 0
    data[..., 13] = 7
    blank = tmp_path / "blank_bold.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), blank)
    with pytest.raises(DataError, match=r"BOLD volume 0 is constant \(every voxel 0\)"):
        bold_targets(load_bold(blank), (8, 8, 4), chunk=5)
    with pytest.raises(DataError, match=r"BOLD volume 13 is constant \(every voxel 7\)"):
        bold_targets(load_bold(blank), (8, 8, 4), chunk=5, discard=1)
    data[..., 13] = rng.standard_normal((16, 16, 8))
    nib.save(nib.Nifti1Image(data, np.eye(4)), blank)
    assert not bold_targets(load_bold(blank), (8, 8, 4), discard=1)[0][..., 0].any()

    # A gzip header followed by garbage: inflating fails when the NIfTI header is read.
    garbled = tmp_path / "garbled_bold.nii.gz"
    garbled.write_bytes(good.read_bytes()[:10] + rng.bytes(4000))
    with pytest.raises(DataError, match="garbled_bold.nii.gz") as err:
        load_bold(garbled)
    assert err.value.code == 65
