"""Whether a run's outputs are up to date: same inputs, same options, and still intact.

Each output's sidecar records a hash of every file the run read (name, size and modification
time) and of the options that shape it. A rerun skips the run only when the hash agrees *and*
the output still reads back as its sidecar describes, so a damaged output is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from spec2vol_bids import __version__
from spec2vol_bids.derivatives import content_digest, read_json

LOGGER = logging.getLogger(__name__)


def input_hash(paths: list[Path], options: dict) -> str:
    """A hash of the inputs (name, size, modification time) and the options that shape outputs."""
    h = hashlib.sha256()
    h.update(f"spec2vol {__version__}".encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    for path in sorted(set(paths)):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def recording_fingerprint(recording: Path) -> str | None:
    """A fingerprint of a recording's content: its header and the data and marker files it
    leads to (BrainVision), or its ``.fdt`` (EEGLAB), each by name, size and its first and last
    MiB. None when one of them is missing or empty (a dataset whose raw data were left out), so
    that nothing is compared."""
    h = hashlib.sha256()
    for path in recording_files(recording):
        if not path.is_file() or path.stat().st_size == 0:
            return None
        h.update(f"{path.suffix.lower()}:".encode() + content_digest(path))
    return h.hexdigest()[:16]


def recording_files(recording: Path) -> list[Path]:
    """A recording's files as read: the file itself and, for BrainVision, the data and marker
    files its header leads to; for EEGLAB, its ``.fdt``. Sorted, each once."""
    from spec2vol_bids.brainvision import brainvision_files

    recording = Path(recording)
    files = [recording]
    if recording.suffix.lower() == ".vhdr":
        files += brainvision_files(recording)
    elif recording.suffix.lower() == ".set" and recording.with_suffix(".fdt").is_file():
        files.append(recording.with_suffix(".fdt"))
    return sorted(set(files))


def related_files(path: Path) -> list[Path]:
    """The data file and its sidecars: every file beside it sharing the run's entity prefix."""
    prefix = "_".join(path.name.split("_")[:-1])
    return [p for p in path.parent.iterdir() if p.is_file() and p.name.startswith(prefix + "_")]


def is_done(sidecar: Path, data: Path, digest: str) -> bool:
    """Whether a run's output is up to date: made from the same inputs and options (its
    sidecar's hash) and still intact (readable, of the shape its sidecar gives), so a damaged
    or truncated output is recomputed rather than trusted."""
    if not (sidecar.exists() and data.exists()):
        return False
    try:
        meta = read_json(sidecar)
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("InputHash") != digest:
        return False
    intact = _intact_spectrogram if data.suffix == ".npy" else _intact_target
    if intact(data, meta):
        return True
    LOGGER.warning("%s: damaged (unreadable or not the shape its sidecar gives); recomputing", data)
    return False


def _intact_spectrogram(npy: Path, meta: dict) -> bool:
    try:
        shape = np.load(npy, mmap_mode="r").shape
        return shape == (meta["NumberOfWindows"], len(meta["Channels"]), len(meta["FrequencyBinsHz"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _intact_target(nii: Path, meta: dict) -> bool:
    """The header's shape is the sidecar's and the file holds all of its data: a ``.nii.gz``'s
    gzip trailer records the uncompressed size, which a truncated file does not end with."""
    import nibabel as nib

    try:
        img = nib.load(nii)
        shape = tuple(img.shape)
        if shape != (*meta["TargetGrid"], meta["NumberOfVolumes"]):
            return False
        # the proxy's offset is the file's: a loaded header's vox_offset is reset to 0
        size = int(img.dataobj.offset) + int(np.prod(shape)) * img.get_data_dtype().itemsize
        with open(nii, "rb") as fh:
            if nii.name.endswith(".gz"):
                fh.seek(-4, os.SEEK_END)
                return int.from_bytes(fh.read(4), "little") == size % 2**32
            return os.fstat(fh.fileno()).st_size >= size
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return False
