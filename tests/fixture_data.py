"""Test support: a usable copy of the ``eeg_rest_fmri`` fixture (the NODDI EEG-fMRI layout).

The fixture's headers, markers and sidecars are real, but its data files are empty. The copy
made here keeps every real file byte for byte and fills each empty data file with simulated
samples of exactly the size its header announces:

* BrainVision ``.eeg``/``.dat``: NumberOfChannels x DataPoints samples in the header's
  BinaryFormat (INT_16 or IEEE_FLOAT_32) and DataOrientation (MULTIPLEXED or VECTORIZED),
  scaled by each channel's resolution. The raw 5 kHz headers give no DataPoints and their
  markers reach ~800 s (509 MB per subject), so the raw recordings get ``raw_eeg_seconds`` of
  data instead; the markers beyond that point fall outside the recording.
* ``*_bold.nii.gz``: 64x64x30 int16 volumes (a brain-shaped blob with a slow global
  fluctuation and thermal noise), as many as the derivative recording has ``Scan Start``
  markers (300), 3.75x3.75x4 mm, with the sidecar's RepetitionTime in ``pixdim[4]``.
* ``*_T1w.nii.gz`` and ``*_dwi.nii.gz``: small valid images (the dwi with one volume per b-value).

The fixtures live in ``tests/data/`` (see its README for their sources and licences); the tests
never read anything outside the repository.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np

FIXTURE_NAME = "eeg_rest_fmri"
BOLD_GRID = (64, 64, 30)
BOLD_ZOOMS = (3.75, 3.75, 4.0)
DEFAULT_VOLUMES = 300
_BV_DTYPES = {"INT_16": np.dtype("<i2"), "IEEE_FLOAT_32": np.dtype("<f4")}


DATA_DIR = Path(__file__).resolve().parent / "data"


def fixture_source(name: str = FIXTURE_NAME) -> Path:
    """The fixture folder ``tests/data/<name>``; tests copy it before writing anything."""
    source = DATA_DIR / name
    if not (source / "dataset_description.json").is_file():
        raise FileNotFoundError(f"fixture {name!r} not found: {source} has no dataset_description.json")
    return source


def copy_filled_fixture(dst: str | Path, *, seed: int = 0, raw_eeg_seconds: float = 10.0) -> Path:
    """Copy the ``eeg_rest_fmri`` fixture to ``dst`` and fill its empty data files.

    Parameters
    ----------
    dst : str | Path
        The dataset root to create; it must not exist or be an empty folder.
    seed : int
        Seed of the simulated samples (the same seed gives the same bytes).
    raw_eeg_seconds : float
        Length of the raw 5 kHz recordings, whose headers do not announce one.

    Returns
    -------
    dst : Path
        The dataset root (holding ``dataset_description.json``).
    """
    src = fixture_source()
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty")
    empty = []
    for folder, dirs, names in os.walk(src):
        dirs.sort()
        rel = Path(folder).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in sorted(names):
            source = Path(folder) / name
            if source.stat().st_size == 0:
                empty.append(rel / name)
            else:
                # copyfile, not copy2: the fixture is read-only and the copy must not be
                shutil.copyfile(source, dst / rel / name)

    filled = set()
    for index, vhdr in enumerate(sorted(dst.rglob("*.vhdr"))):
        data_file = fill_brainvision(vhdr, seed=(seed, index), seconds=raw_eeg_seconds,
                                     only_if_missing=True)
        filled.add(data_file.relative_to(dst))
    tr = _sidecar_tr(dst)
    bold_jobs = []
    for index, rel in enumerate(sorted(empty)):
        if rel in filled:
            continue
        path = dst / rel
        rng = np.random.default_rng((seed, 1000 + index))
        if rel.name.endswith("_bold.nii.gz"):
            n_volumes = _scan_start_count(dst, rel) or DEFAULT_VOLUMES
            bold_jobs.append((path, rng, n_volumes))
        elif rel.name.endswith("_dwi.nii.gz"):
            bval = path.with_name(rel.name.replace(".nii.gz", ".bval"))
            n_volumes = len(bval.read_text().split())
            _write_small_image(path, rng, (16, 16, 10, max(n_volumes, 1)), zooms=(8.0, 8.0, 8.0))
        elif rel.name.endswith(".nii.gz"):
            _write_small_image(path, rng, (32, 32, 32), zooms=(6.0, 6.0, 6.0))
        else:
            path.touch()
    # gzip compression dominates and releases the GIL: write the series side by side
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(lambda job: write_bold(job[0], job[1], n_volumes=job[2], tr=tr), bold_jobs))
    return dst


def read_vhdr(vhdr: str | Path) -> dict:
    """The header fields the fill needs: channels, points (or None), format, orientation, ..."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in Path(vhdr).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].lower(), {})
        elif current is not None and "=" in line and not line.startswith(";"):
            key, value = line.split("=", 1)
            current[key.strip().lower()] = value.strip()
    common = sections.get("common infos", {})
    n_channels = int(common["numberofchannels"])
    channels = sections.get("channel infos", {})
    names, resolutions = [], []
    for i in range(1, n_channels + 1):
        fields = channels.get(f"ch{i}", f"Ch{i}").split(",")
        names.append(fields[0])
        resolutions.append(float(fields[2]) if len(fields) > 2 and fields[2] else 1.0)
    points = common.get("datapoints")
    return {
        "data_file": Path(vhdr).parent / common["datafile"],
        "n_channels": n_channels,
        "n_points": int(points) if points else None,
        "sfreq": 1e6 / float(common["samplinginterval"]),
        "format": sections.get("binary infos", {}).get("binaryformat", "INT_16").upper(),
        "orientation": common.get("dataorientation", "MULTIPLEXED").upper(),
        "channel_names": names,
        "resolutions": np.asarray(resolutions, dtype=np.float32),
    }


def fill_brainvision(vhdr: str | Path, *, seed=0, seconds: float = 10.0,
                     only_if_missing: bool = False) -> Path:
    """Write simulated samples to the data file a ``.vhdr`` names; return the data file.

    The signal, in µV: white noise (5 µV) plus a 10 Hz alpha rhythm whose amplitude and phase
    vary over channels; channels named ECG get a 1 Hz train of R-wave spikes instead.
    ``seconds`` sets the length when the header has no DataPoints. With ``only_if_missing``,
    a data file that already holds bytes is left alone.
    """
    hdr = read_vhdr(vhdr)
    data_file = hdr["data_file"]
    if only_if_missing and data_file.is_file() and data_file.stat().st_size > 0:
        return data_file
    dtype = _BV_DTYPES[hdr["format"]]
    n_points = hdr["n_points"] or int(round(seconds * hdr["sfreq"]))
    n_channels = hdr["n_channels"]
    rng = np.random.default_rng(seed)
    t = np.arange(n_points, dtype=np.float32) / np.float32(hdr["sfreq"])
    amplitude = rng.uniform(2.0, 12.0, n_channels).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, n_channels).astype(np.float32)
    # a·sin(ωt + φ) = a·cos φ·sin ωt + a·sin φ·cos ωt: two outer products, not a full sin
    data = rng.standard_normal((n_points, n_channels), dtype=np.float32)
    data *= 5.0
    data += np.outer(np.sin(2 * np.pi * 10 * t), amplitude * np.cos(phase))
    data += np.outer(np.cos(2 * np.pi * 10 * t), amplitude * np.sin(phase))
    for ch, name in enumerate(hdr["channel_names"]):
        if "ECG" in name.upper():
            beats = np.arange(int(0.3 * hdr["sfreq"]), n_points, int(hdr["sfreq"]))
            data[beats, ch] += 800.0
    data /= hdr["resolutions"]
    if dtype.kind == "i":
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    data = data.astype(dtype, copy=False)
    if hdr["orientation"] == "VECTORIZED":
        data = np.ascontiguousarray(data.T)
    data.tofile(data_file)
    return data_file


def write_bold(path: str | Path, rng: np.random.Generator, *, n_volumes: int = DEFAULT_VOLUMES,
               tr: float = 2.16, grid: tuple[int, int, int] = BOLD_GRID) -> Path:
    """Write a 4-D int16 BOLD series: brain-shaped blob x slow fluctuation + thermal noise."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in grid]
    i, j, k = np.meshgrid(*axes, indexing="ij")
    r2 = (i / 0.75) ** 2 + (j / 0.9) ** 2 + (k / 0.8) ** 2
    mask = r2 < 1
    anatomy = (np.sqrt(1 - r2[mask]) * 600 + 400).astype(np.float32)
    fluctuation = 1 + 0.002 * np.cumsum(rng.standard_normal(n_volumes, dtype=np.float32))
    # Thermal noise: volume v reads a window of one noise bank shifted by a prime stride, so
    # every voxel gets an independent-looking series at 1/25 of the cost of drawing them all.
    stride = 997
    bank = rng.standard_normal(anatomy.size + stride * n_volumes, dtype=np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(bank, anatomy.size)[::stride][:n_volumes]
    inside = fluctuation[:, None].astype(np.float32) * anatomy[None, :]
    inside += 8.0 * windows
    series = np.zeros((n_volumes, *grid), dtype=np.int16)
    series[:, mask] = np.rint(inside)
    # (T, X, Y, Z) in C order is (X, Y, Z, T) in Fortran order: NIfTI's layout, written as is
    img = nib.Nifti1Image(series.transpose(1, 2, 3, 0), _affine(grid, BOLD_ZOOMS))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((*BOLD_ZOOMS, tr))
    img.header.set_dim_info(slice=2)
    img.to_filename(path)
    return Path(path)


def _write_small_image(path: Path, rng: np.random.Generator, shape, zooms) -> None:
    data = rng.integers(0, 1000, size=shape, dtype=np.int16)
    img = nib.Nifti1Image(data, _affine(shape[:3], zooms))
    img.header.set_xyzt_units("mm", "sec")
    img.to_filename(path)


def _affine(grid, zooms) -> np.ndarray:
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * z for n, z in zip(grid, zooms)]
    return affine


def _sidecar_tr(root: Path) -> float:
    sidecar = root / "task-rest_bold.json"
    return float(json.loads(sidecar.read_text())["RepetitionTime"]) if sidecar.is_file() else 2.16


def _scan_start_count(root: Path, bold_rel: Path) -> int | None:
    """Volumes of a subject's BOLD: its derivative recording's ``Scan Start`` markers."""
    subject = bold_rel.parts[0]
    markers = sorted((root / "derivatives" / subject).glob("eeg/*.vmrk"))
    if not markers:
        return None
    text = markers[0].read_text(encoding="utf-8", errors="replace")
    return sum(1 for line in text.splitlines() if ",Scan Start," in line) or None
