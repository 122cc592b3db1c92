"""BrainVision headers: the files they name, and a header to read when they name the wrong ones.

A BrainVision recording is three files: the ``.vhdr`` header, whose ``DataFile=`` and
``MarkerFile=`` name the other two. Renamed datasets often keep the old names in the header.
:func:`checked_header` reads through a corrected copy (in the work directory; the input is never
modified) when the intended file can be found unambiguously by the header's own stem, and
refuses a header that names another recording's files beside its own.
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from spec2vol_bids.bids.annex import require_content
from spec2vol_bids.derivatives import content_digest
from spec2vol_bids.errors import DataError, MissingInputError

logger = logging.getLogger(__name__)

# Extensions a BrainVision binary data file is given in the wild (Recorder: .eeg, Analyzer
# exports: .dat, segmented/averaged exports: .seg/.avg).
_BV_DATA_SUFFIXES = (".eeg", ".dat", ".seg", ".avg")
_BV_BYTES = {"INT_16": 2, "INT_32": 4, "IEEE_FLOAT_32": 4}


def parse_vhdr(text: str) -> dict[str, dict[str, str]]:
    """The ``key=value`` entries of a BrainVision header, by (lower-case) section."""
    sections: dict[str, dict[str, str]] = {}
    current = sections.setdefault("", {})
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].strip().lower(), {})
        elif "=" in line:
            key, value = line.split("=", 1)
            current[key.strip().lower()] = value.strip()
    return sections


def brainvision_files(vhdr: str | Path) -> list[Path]:
    """The files a BrainVision header leads the reader to: its ``DataFile=`` and
    ``MarkerFile=`` (which may lie outside the header's folder) and the same-stem data and
    marker files the recovery of a broken header falls back on. Only existing files."""
    vhdr = Path(vhdr)
    try:
        common = parse_vhdr(vhdr.read_bytes().decode("utf-8", errors="replace")).get("common infos", {})
    except OSError:
        return []
    named = [vhdr.parent / common[k] for k in ("datafile", "markerfile") if common.get(k)]
    stem = [p for p in vhdr.parent.glob(f"{glob.escape(vhdr.stem)}.*")
            if p.suffix.lower() in (*_BV_DATA_SUFFIXES, ".vmrk")]
    return sorted({p for p in named + stem if p.is_file()})


def checked_header(path: Path, work_dir: Path) -> Path:
    """Check a BrainVision header against its data file; return the header to read.

    Returns ``path`` itself when the header is sound, or a corrected copy in ``work_dir`` when
    it names a data or marker file that does not exist but the intended one can be found
    unambiguously by the header's stem.
    """
    raw_bytes = path.read_bytes()
    text = raw_bytes.decode("utf-8", errors="replace")
    hdr = parse_vhdr(text)
    common = hdr.get("common infos", {})
    data_name = common.get("datafile")
    if not data_name:
        raise DataError("BrainVision header has no DataFile= entry", path=path)
    data_file = path.parent / data_name
    fixes: dict[bytes, str] = {}
    if data_file.is_symlink():  # a git-annex link without its content: say how to get it
        require_content(data_file, "the BrainVision data file")
    if not data_file.is_file():
        candidates = sorted(
            p for p in path.parent.glob(f"{glob.escape(path.stem)}.*")
            if p.suffix.lower() in _BV_DATA_SUFFIXES and p.is_file()
        )
        if not candidates:
            raise MissingInputError(f"header names DataFile={data_name}, which does not exist, "
                                    "and no data file with the header's name lies beside it; put "
                                    "the recording's data file there", path=path)
        if len(candidates) > 1:
            raise DataError(
                f"header names DataFile={data_name}, which does not exist, and several data "
                f"files have the header's name ({', '.join(p.name for p in candidates)}); name "
                "the right one in DataFile=", path=path)
        data_file = candidates[0]
        logger.warning("%s: DataFile=%s does not exist; reading %s instead", path, data_name,
                       data_file.name)
        fixes[b"DataFile"] = str(data_file.resolve())
    require_content(data_file, "the BrainVision data file")
    marker_name = common.get("markerfile")
    marker_file = path.parent / marker_name if marker_name else None
    _refuse_another_recordings_file(path, "DataFile", data_file, _BV_DATA_SUFFIXES)
    if marker_file is not None:
        _refuse_another_recordings_file(path, "MarkerFile", marker_file, (".vmrk",))
    if marker_file is not None and (marker_file.is_file() or marker_file.is_symlink()):
        # its volume markers would be lost without a word
        require_content(marker_file, "the BrainVision marker file")
        with open(marker_file, "rb") as fh:
            head = fh.read(64).lstrip(b"\xef\xbb\xbf").replace(b"BrainVision", b"Brain Vision")
        if not head.startswith(b"Brain Vision Data Exchange Marker File"):
            raise DataError("not a BrainVision marker file (it does not begin with \"Brain Vision "
                            "Data Exchange Marker File\"); restore the recording's .vmrk",
                            path=marker_file)
    if marker_file is not None and not marker_file.is_file():
        sibling = path.with_suffix(".vmrk")
        if sibling.is_file():
            logger.warning("%s: MarkerFile=%s does not exist; reading %s instead", path,
                           marker_name, sibling.name)
            marker_file = sibling
            fixes[b"MarkerFile"] = str(sibling.resolve())
        else:
            logger.warning("%s: MarkerFile=%s does not exist; reading without markers", path,
                           marker_name)
            marker_file = None
            fixes[b"MarkerFile"] = ""
    _check_brainvision_size(path, hdr, data_file)
    if not fixes:
        return path
    # The corrected header lives in work_dir, so it names both files by absolute path: a
    # relative MarkerFile= would be looked for in work_dir and the volume markers lost.
    fixes[b"DataFile"] = str(data_file.resolve())
    if marker_file is not None:
        fixes[b"MarkerFile"] = str(marker_file.resolve())
    work_dir.mkdir(parents=True, exist_ok=True)
    fixed = work_dir / path.name
    fixed.write_bytes(_replace_entries(raw_bytes, fixes))
    return fixed


def _refuse_another_recordings_file(path: Path, key: str, named: Path, suffixes) -> None:
    """A header that names an existing file of another name, beside a file of the header's own
    name (``sub-01_..._eeg.vmrk``), belongs to one recording and points at another's (a header
    copied from another run, or a rename half done): which one holds this run's samples or
    volume markers cannot be told, so unless the two files are copies, refuse."""
    if not named.is_file() or named.stem == path.stem:
        return
    own = [p for p in path.parent.glob(f"{glob.escape(path.stem)}.*")
           if p.suffix.lower() in suffixes and p.is_file()]
    for sibling in own:
        if not sibling.samefile(named) and not _same_content(sibling, named):
            raise DataError(f"the header names {key}={named.name}, but {sibling.name}, with the "
                            f"header's own name, lies beside it with other content; one of them "
                            f"belongs to another recording: correct {key}= in the header or move "
                            "the other file away", path=path)


def _same_content(a: Path, b: Path) -> bool:
    """Copies of one file, by size and first and last MiB (without reading gigabytes)."""
    return content_digest(a) == content_digest(b)


def _replace_entries(raw_bytes: bytes, fixes: dict[bytes, str]) -> bytes:
    """Replace (or, for an empty value, remove) ``Key=`` lines of a BrainVision header."""
    lines = raw_bytes.splitlines(keepends=True)
    out = []
    for line in lines:
        key = line.split(b"=", 1)[0].strip()
        if b"=" in line and key in fixes:
            if not fixes[key]:
                continue
            ending = line[len(line.rstrip(b"\r\n")):]
            line = key + b"=" + fixes[key].encode("utf-8") + ending
        out.append(line)
    return b"".join(out)


def _check_brainvision_size(path: Path, hdr: dict, data_file: Path) -> None:
    """Refuse binary data files that are empty, truncated mid-sample or shorter than announced.

    mne infers the number of samples from the file size and would silently read such files.
    """
    common = hdr.get("common infos", {})
    if common.get("dataformat", "BINARY").upper() != "BINARY":
        return
    fmt = hdr.get("binary infos", {}).get("binaryformat", "INT_16").upper()
    try:
        n_channels = int(common["numberofchannels"])
    except (KeyError, ValueError) as exc:
        raise DataError("BrainVision header has no valid NumberOfChannels=", path=path) from exc
    if fmt not in _BV_BYTES or n_channels < 1:
        raise DataError(f"unsupported BinaryFormat={fmt} or NumberOfChannels={n_channels}", path=path)
    frame = _BV_BYTES[fmt] * n_channels
    size = data_file.stat().st_size
    if size == 0:
        raise DataError("the EEG data file is empty", path=data_file)
    if size % frame:
        raise DataError(
            f"the EEG data file is truncated: {size} bytes is not a whole number of "
            f"{n_channels}-channel {fmt} samples",
            path=data_file,
        )
    announced = common.get("datapoints")
    if announced and announced.isdigit() and size // frame < int(announced):
        raise DataError(
            f"the EEG data file holds {size // frame} samples but its header announces "
            f"{announced}; the file is truncated",
            path=data_file,
        )
