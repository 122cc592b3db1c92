"""BIDS-derivative names, sidecars, ``dataset_description.json`` and atomic writes.

Everything spec2vol writes goes through :func:`atomic_path`: data are written to a hidden
temporary file next to the destination and renamed into place, so a crash, a full disk or a
SIGKILL never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping

from spec2vol_bids import __version__
from spec2vol_bids.errors import DataError, MissingInputError, OutputError, UsageError, one_line, output_error

PIPELINE_NAME = "spec2vol"

_UMASK = os.umask(0)
os.umask(_UMASK)

# Patterns without a trailing slash: the BIDS validator matches folders only that way.
BIDSIGNORE = ("/logs\n/models\n**/figures\n*.html\n*_spectrogram.npy\n*_spectrogram.json\n"
              "*_runs.tsv\n*_statmap.nii.gz\n*_statmap.json\ngroup_metrics.*\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it to ``path`` on success.

    The temporary file keeps ``path``'s suffixes (writers such as nibabel choose the format
    from them) and starts with ``.`` so that BIDS tools ignore it while it exists.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder ({exc.strerror})", path=path.parent) from exc
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_WRITER}-{os.getpid()}-",
                               suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp creates 0600 files; outputs should get the permissions any new file would.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(exc, "file", path) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _writer_identity() -> str:
    """This machine, boot and PID namespace, as 10 hex digits.

    A process id means something only within one PID namespace of one boot of one machine:
    jobs on other nodes, or in other containers, sharing OUTPUT_DIR (SLURM arrays on a shared
    file system) have process ids this process cannot see. Temporary names carry this identity
    so that only this identity's dead writers' files are taken for stale.
    """
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        with contextlib.suppress(OSError):
            parts.append(os.readlink(source) if source.endswith("/pid") else
                         Path(source).read_text().strip())
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:10]


_WRITER = _writer_identity()
# ".<name>.<identity>-<pid>-<random>.tmp<suffixes>"; earlier versions wrote no identity
_TEMPORARY = re.compile(r"^\..+\.(?:([0-9a-f]{10})-)?(\d+)-[^.]+\.tmp")
#: A temporary file this old is stale whoever wrote it: no write of spec2vol takes a day.
STALE_AFTER_S = 24 * 3600


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files that killed processes left behind under ``folder``.

    A temporary file of :func:`atomic_path` carries its writer's identity (host, boot, PID
    namespace) and process id. It is stale when it comes from this identity and no process of
    that id is running, or when it is older than :data:`STALE_AFTER_S` (a writer on another
    node or in another container cannot be asked; a live one is left alone).
    """
    removed = []
    now = time.time()
    for path in Path(folder).rglob(".*.tmp*"):
        match = _TEMPORARY.match(path.name)
        if not match:
            continue
        try:
            old = now - path.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            continue
        ours = match.group(1) == _WRITER
        if old or (ours and not _pid_alive(int(match.group(2)))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    Serialisers that report a failed write in their own way (``torch.save`` raises
    ``RuntimeError`` on a full disk) should serialise to memory and write through this, so a full
    disk is reported as exit 74 like any other write.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Mapping) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_nifti(path: str | Path, img, *, compresslevel: int = 1) -> Path:
    """Write a nibabel image to a ``.nii.gz`` ``path`` atomically and return the path.

    The gzip header carries no name and no time stamp, so the same image gives the same bytes.
    ``compresslevel=0`` stores the data uncompressed inside the gzip stream (still a valid
    ``.nii.gz``): float32 BOLD shrinks by only 10-15 % at level 1, for seconds of CPU per run.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel,
                          mtime=0) as fh:
        img.to_stream(fh)
    return Path(path)


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_json(path: str | Path) -> dict:
    """Read a JSON file; an unreadable or malformed file gives ``None``-free errors upstream."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


#: What the sidecar of a spectrogram spec2vol wrote holds (and a reused one must hold)
SPECTROGRAM_KEYS = ("SamplingFrequency", "RepetitionTime", "FrequencyBinsHz", "Channels",
                    "NumberOfWindows", "VolumeOnsetSeconds")


def read_spectrogram(npy: str | Path, *, finite: bool = False):
    """A spectrogram derivative, memory-mapped, and its sidecar, checked against each other.

    Parameters
    ----------
    npy : str | Path
        A ``*_desc-spec2vol_spectrogram.npy``; its JSON sidecar lies next to it.
    finite : bool
        Also refuse NaN or infinite values (read in blocks: every number trained or
        evaluated on must be finite).

    Returns
    -------
    spec : ndarray (memory-mapped), shape (windows, channels, bins)
    meta : dict

    Raises
    ------
    MissingInputError (66)
        The sidecar is missing.
    DataError (65)
        Either file is unreadable, the sidecar lacks what spec2vol writes, the array is not the
        shape the sidecar gives, or (``finite``) it holds NaN or infinity.
    """
    import numpy as np

    npy = Path(npy)
    sidecar = npy.with_suffix(".json")
    try:
        meta = read_json(sidecar)
    except FileNotFoundError as exc:
        raise MissingInputError("the spectrogram's JSON sidecar is missing; rerun the "
                                "participant level", path=sidecar) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read the spectrogram's sidecar ({one_line(exc)})", path=sidecar) from exc
    missing = [k for k in SPECTROGRAM_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"the spectrogram's sidecar lacks {', '.join(missing)}: it was not "
                        "written by spec2vol (rerun the participant level)", path=sidecar)
    try:
        spec = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the spectrogram ({one_line(exc)}); rerun the participant "
                        "level", path=npy) from exc
    expected = (meta["NumberOfWindows"], len(meta["Channels"]), len(meta["FrequencyBinsHz"]))
    if tuple(spec.shape) != tuple(expected):
        raise DataError(f"the spectrogram's shape {tuple(spec.shape)} does not match its sidecar "
                        f"(windows, channels, bins) {expected}; rerun the participant level", path=npy)
    if finite:
        for start in range(0, spec.shape[0], 256):
            if not np.isfinite(spec[start:start + 256]).all():
                raise DataError("the spectrogram holds NaN or infinite values; rerun the "
                                "participant level for this run", path=npy)
    return spec, meta


def container_info() -> dict | None:
    """Describe the container the tool runs in, from variables the images set."""
    kind = os.environ.get("SPEC2VOL_CONTAINER_TYPE")
    if not kind:
        return None
    info = {"Type": kind}
    tag = os.environ.get("SPEC2VOL_CONTAINER_TAG")
    if tag:
        info["Tag"] = tag
    return info


_NAME_PREFIX = "spec2vol derivatives of "


def dataset_description(bids_dir: str | Path, bids_name: str | None = None) -> dict:
    """The ``dataset_description.json`` content of a spec2vol derivative dataset."""
    generated = {
        "Name": PIPELINE_NAME,
        "Version": __version__,
        "CodeURL": "https://github.com/spec2vol/spec2vol",
        "Description": "TR-window EEG spectrograms, normalised BOLD targets of the runs with "
                       "BOLD, and BOLD synthesised from EEG by the trained models",
    }
    container = container_info()
    if container:
        generated["Container"] = container
    desc = {
        "Name": _NAME_PREFIX + (bids_name or Path(bids_dir).name),
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [{"URL": Path(bids_dir).resolve().as_uri()}],
        # the sidecars' "bids:raw:" URIs name the source dataset
        "DatasetLinks": {"raw": Path(bids_dir).resolve().as_uri()},
    }
    return desc


def content_digest(path: str | Path, chunk: int = 1 << 20) -> bytes:
    """A file's size and its first and last MiB: enough to tell two versions of a file apart
    without reading gigabytes, and the same for a copy (an edit confined to the middle of a
    file larger than 2 MiB passes unseen)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(chunk)
        fh.seek(max(0, size - chunk))
        tail = fh.read(chunk)
    return f"{size}:".encode() + head + tail


def source_dataset_name(out_dir: str | Path) -> str | None:
    """The ``Name`` of the dataset a spec2vol OUTPUT_DIR holds the derivatives of, or None
    (no description, or not spec2vol's)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        ours = read_json(Path(out_dir) / "dataset_description.json").get("Name")
        if isinstance(ours, str) and ours.startswith(_NAME_PREFIX):
            return ours[len(_NAME_PREFIX):]
    return None


def check_same_source(out_dir: str | Path, bids_dir: str | Path, what: str = "OUTPUT_DIR") -> None:
    """``out_dir`` (OUTPUT_DIR, or an earlier spec2vol OUTPUT_DIR given as ``what``, e.g.
    ``--eeg-derivatives``) holds derivatives of BIDS_DIR's dataset, or none yet.

    Another dataset's runs of the same names would replace its derivatives, or be taken for
    this one's (its sub-01 is not this one's sub-01), and the group level would train on both.
    The datasets are told apart by their ``Name``, which the derivatives' own name carries: a
    copy of the dataset at another path (or the same one mounted at ``/data`` in a container)
    passes. Without a ``Name`` in BIDS_DIR, or for derivatives spec2vol did not write, nothing
    is checked.

    Raises
    ------
    UsageError (64)
        Naming both datasets.
    """
    with contextlib.suppress(OSError, ValueError, AttributeError):
        name = read_json(Path(bids_dir) / "dataset_description.json").get("Name")
        ours = read_json(Path(out_dir) / "dataset_description.json").get("Name")
        if (isinstance(name, str) and name and isinstance(ours, str)
                and ours.startswith(_NAME_PREFIX) and ours != _NAME_PREFIX + name):
            advice = ("give each dataset its own OUTPUT_DIR" if what == "OUTPUT_DIR" else
                      f"give {what} the spec2vol outputs of this dataset")
            raise UsageError(f"{what} holds the derivatives of the dataset "
                             f"\"{ours[len(_NAME_PREFIX):]}\", BIDS_DIR is \"{name}\": {advice} "
                             f"(if it is the same dataset, renamed, set its new Name in {what}'s "
                             "dataset_description.json)",
                             path=Path(out_dir) / "dataset_description.json")


def init_output_dataset(out_dir: str | Path, bids_dir: str | Path) -> Path:
    """Create ``out_dir`` as a BIDS derivative dataset (idempotent, safe for concurrent jobs).

    ``dataset_description.json`` and ``.bidsignore`` are written only when absent, each by an
    atomic rename, so two jobs starting together both see an intact file.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "logs").mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the output folder ({exc.strerror}); choose a writable OUTPUT_DIR",
            path=out_dir,
        ) from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError("the output folder is not writable; choose another OUTPUT_DIR", path=out_dir)
    remove_stale_temporaries(out_dir)
    desc_file = out_dir / "dataset_description.json"
    if not desc_file.exists():
        bids_name = None
        with contextlib.suppress(OSError, ValueError):
            bids_name = read_json(Path(bids_dir) / "dataset_description.json").get("Name")
        write_json(desc_file, dataset_description(bids_dir, bids_name))
    ignore = out_dir / ".bidsignore"
    if not ignore.exists():
        write_text(ignore, BIDSIGNORE)
    return out_dir
