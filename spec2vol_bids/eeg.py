"""Read EEG, choose and order its channels, and align it to the fMRI volumes.

Three concerns of the participant level live here (DESIGN §2, steps 1–2):

* :func:`read_eeg` opens a recording lazily (``preload=False``) through mne-bids when it sits
  in a BIDS tree, else through mne's readers, and turns every way a file can be broken into a
  one-line :class:`~spec2vol_bids.errors.DataError` (65) or
  :class:`~spec2vol_bids.errors.MissingInputError` (66) naming the file. BrainVision headers
  whose ``DataFile=``/``MarkerFile=`` name a missing file (OpenNeuro ds002158) are read through
  a corrected copy of the header written to the work directory; the input is never modified.
* :func:`eeg_channels` keeps EEG channels only and :func:`canonical_channel_order` puts them in
  one spatially sensible order shared by every subject.
* :func:`find_volume_onsets` finds the first volume (t0) from scanner markers, checks their
  spacing against the repetition time and counts the TR windows the recording covers.
"""

from __future__ import annotations

import csv
import glob
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mne
import numpy as np

from spec2vol_bids.errors import DataError, MissingInputError, UsageError
from spec2vol_bids.spectra import flat_channels, window_starts

logger = logging.getLogger(__name__)

_READERS = {
    ".vhdr": mne.io.read_raw_brainvision,
    ".edf": mne.io.read_raw_edf,
    ".bdf": mne.io.read_raw_bdf,
    ".set": mne.io.read_raw_eeglab,
    ".fif": mne.io.read_raw_fif,
}

# Extensions a BrainVision binary data file is given in the wild (Recorder: .eeg, Analyzer
# exports: .dat, segmented/averaged exports: .seg/.avg).
_BV_DATA_SUFFIXES = (".eeg", ".dat", ".seg", ".avg")
_BV_BYTES = {"INT_16": 2, "INT_32": 4, "IEEE_FLOAT_32": 4}

# Names of non-EEG channels, used when no channels.tsv says what a channel is: the NODDI
# recordings carry their ECG as channel 32, typed EEG in the header.
_NON_EEG_NAME = re.compile(
    r"^(?:[hv]?eog|ecg|ekg|emg|resp|gsr|eda|trig(?:ger)?|status|sti\b|stim|photo|audio|"
    r"mic|acc|pulse|ppg)",
    re.IGNORECASE,
)

# Per-volume scanner markers, most specific first. Descriptions are compared on their last
# "/"-separated part (mne writes BrainVision "Response,R128" as "Response/R128"), without
# whitespace and case-insensitively.
VOLUME_MARKERS = ("R128", "Scan Start", "Volume", "V", "T")
# Per-slice scanner markers (NODDI: "Scanner/s " once per slice).
SLICE_MARKERS = ("s", "Slice")


@dataclass
class VolumeTiming:
    """Where the fMRI volumes lie in an EEG recording.

    Attributes
    ----------
    t0 : float
        Onset of the first volume, in seconds from the first EEG sample; volume ``v`` starts at
        ``t0 + v * tr``.
    marker : str | None
        The marker description t0 was taken from, or ``None`` (``offset=`` given, or no markers).
    onsets : ndarray
        Volume onsets the markers give, in seconds from the first sample (empty without
        markers); kept for quality control of the marker intervals against the TR.
    n_volumes : int
        Number of volumes whose full TR window the recording covers.
    tr : float
        The repetition time, in seconds.
    sfreq : float
        The EEG sampling frequency, in Hz.
    window_samples : int
        Samples in one TR window, ``round(tr * sfreq)``.
    """

    t0: float
    marker: str | None
    onsets: np.ndarray = field(repr=False)
    n_volumes: int
    tr: float
    sfreq: float
    window_samples: int


def read_eeg(path, *, work_dir, bids_root=None, verbose=False) -> mne.io.BaseRaw:
    """Open an EEG recording without loading its data.

    Parameters
    ----------
    path : str | Path
        The recording: ``.vhdr`` (BrainVision), ``.edf``, ``.bdf``, ``.set`` or ``.fif``.
    work_dir : str | Path
        A folder this function may write to; a corrected BrainVision header goes there.
    bids_root : str | Path | None
        The BIDS dataset the file belongs to. When given and the file has BIDS sidecars, the
        recording is read with :func:`mne_bids.read_raw_bids` (channel types, bad channels and
        line frequency from the sidecars); if mne-bids cannot make sense of the sidecars, the
        file is read with mne alone and a warning is logged.
    verbose : bool
        Let mne print its own messages.

    Returns
    -------
    raw : mne.io.BaseRaw
        The recording, ``preload=False``.

    Raises
    ------
    MissingInputError
        The file (or its data file) does not exist.
    DataError
        The file cannot be read: unknown format, corrupt or truncated data, broken header.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError("EEG file not found", path=path)
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        raise DataError(
            f"unsupported EEG format {suffix!r}; use one of {', '.join(sorted(_READERS))}",
            path=path,
        )
    read_path = path
    if suffix == ".vhdr":
        read_path = _checked_brainvision_header(path, Path(work_dir))
    problem = None
    if bids_root is not None and read_path == path and _has_bids_sidecars(path):
        raw, problem = _read_with_mne_bids(path, bids_root, verbose)
        if raw is not None:
            return raw
    # Read once, not first with mne and again with mne-bids: each parses the header and
    # markers. mne's reader turns a broken file into a clean error before any warning
    # about sidecars is logged.
    raw = _read_with_mne(read_path, path, verbose)
    if problem is not None:
        logger.warning("%s: mne-bids could not read the sidecars (%s); reading the file with mne",
                       path, problem)
    return raw


def _read_with_mne(read_path: Path, path: Path, verbose: bool) -> mne.io.BaseRaw:
    kwargs = {"preload": False, "verbose": verbose}
    if read_path.suffix.lower() == ".fif":
        kwargs["allow_maxshield"] = False
    try:
        with warnings.catch_warnings():
            # mne warns about things that do not matter here (missing coordinates of an ECG
            # channel, deprecations); unreadable data raise.
            warnings.simplefilter("ignore", RuntimeWarning)
            return _READERS[read_path.suffix.lower()](read_path, **kwargs)
    except FileNotFoundError as exc:
        raise MissingInputError(f"a file this recording needs is missing ({exc})", path=path) from exc
    except Exception as exc:  # mne raises many types for malformed files; all are data errors
        raise DataError(f"cannot read EEG file ({_one_line(exc)})", path=path) from exc


def _has_bids_sidecars(path: Path) -> bool:
    stem = path.name.rsplit("_", 1)[0]
    return any((path.parent / f"{stem}_{name}").is_file() for name in ("channels.tsv", "eeg.json"))


def _read_with_mne_bids(path: Path, bids_root, verbose: bool):
    """(raw, None), or (None, why) when mne-bids cannot read the recording."""
    import mne_bids

    try:
        bids_path = mne_bids.get_bids_path_from_fname(path)
        bids_path.update(root=bids_root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return mne_bids.read_raw_bids(bids_path, verbose=verbose), None
    except Exception as exc:  # mne-bids is stricter about sidecars than we need to be
        return None, _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _parse_vhdr(text: str) -> dict[str, dict[str, str]]:
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


def _checked_brainvision_header(path: Path, work_dir: Path) -> Path:
    """Check a BrainVision header against its data file; return the header to read.

    Returns ``path`` itself when the header is sound, or a corrected copy in ``work_dir`` when
    it names a data or marker file that does not exist but the intended one can be found
    unambiguously by the header's stem.
    """
    raw_bytes = path.read_bytes()
    text = raw_bytes.decode("utf-8", errors="replace")
    hdr = _parse_vhdr(text)
    common = hdr.get("common infos", {})
    data_name = common.get("datafile")
    if not data_name:
        raise DataError("BrainVision header has no DataFile= entry", path=path)
    data_file = path.parent / data_name
    fixes: dict[bytes, str] = {}
    if not data_file.is_file():
        candidates = sorted(
            p for p in path.parent.glob(f"{glob.escape(path.stem)}.*")
            if p.suffix.lower() in _BV_DATA_SUFFIXES and p.is_file()
        )
        if len(candidates) != 1:
            found = ", ".join(p.name for p in candidates) or "none"
            raise DataError(
                f"header names DataFile={data_name}, which does not exist, and no single data "
                f"file with the header's name was found (candidates: {found})",
                path=path,
            )
        data_file = candidates[0]
        logger.warning("%s: DataFile=%s does not exist; reading %s instead", path, data_name,
                       data_file.name)
        fixes[b"DataFile"] = str(data_file.resolve())
    marker_name = common.get("markerfile")
    if marker_name and not (path.parent / marker_name).is_file():
        sibling = path.with_suffix(".vmrk")
        if sibling.is_file():
            logger.warning("%s: MarkerFile=%s does not exist; reading %s instead", path,
                           marker_name, sibling.name)
            fixes[b"MarkerFile"] = str(_corrected_marker_copy(sibling, data_file, work_dir))
        else:
            logger.warning("%s: MarkerFile=%s does not exist; reading without markers", path,
                           marker_name)
            fixes[b"MarkerFile"] = ""
    _check_brainvision_size(path, hdr, data_file)
    if not fixes:
        return path
    # The corrected header lives in work_dir, so it names the data file by absolute path.
    fixes.setdefault(b"DataFile", str(data_file.resolve()))
    work_dir.mkdir(parents=True, exist_ok=True)
    fixed = work_dir / path.name
    fixed.write_bytes(_replace_entries(raw_bytes, fixes))
    return fixed


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


def _corrected_marker_copy(marker: Path, data_file: Path, work_dir: Path) -> Path:
    work_dir.mkdir(parents=True, exist_ok=True)
    copy = work_dir / marker.name
    copy.write_bytes(_replace_entries(marker.read_bytes(), {b"DataFile": data_file.name}))
    return copy.resolve()


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


def eeg_channels(raw: mne.io.BaseRaw, channels_tsv=None) -> list[str]:
    """Names of the EEG channels of a recording, in file order.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The recording.
    channels_tsv : str | Path | None
        The BIDS ``channels.tsv`` of the recording. When given, its ``type`` column decides
        (``EEG`` kept; ECG, EOG, EMG, TRIG, MISC, … dropped). Otherwise the channel types of
        ``raw`` decide, and channels named like non-EEG signals (ECG, EKG, EOG, HEOG, VEOG,
        EMG, trigger/status, …) are dropped too, because many headers type everything EEG.

    Returns
    -------
    names : list of str
        The EEG channels. Flat channels are found later, from the spectrogram
        (:func:`spec2vol_bids.spectra.flat_channels`), to avoid a second pass over the data.
    """
    if channels_tsv is not None:
        types = _channel_types_from_tsv(Path(channels_tsv))
        missing = [name for name in types if name not in raw.ch_names]
        if missing:
            raise DataError(
                f"channels.tsv lists channels the recording lacks: {', '.join(missing[:5])}",
                path=channels_tsv,
            )
        names = [name for name in raw.ch_names if types.get(name, "").upper() == "EEG"]
    else:
        ch_types = raw.get_channel_types()
        names = [
            name for name, kind in zip(raw.ch_names, ch_types)
            if kind == "eeg" and not _NON_EEG_NAME.match(name.strip())
        ]
    dropped = [name for name in raw.ch_names if name not in names]
    if dropped:
        logger.info("%s: not EEG, dropped: %s", raw.filenames[0], ", ".join(dropped))
    if not names:
        raise DataError("the recording has no EEG channels", path=raw.filenames[0])
    return names


def _channel_types_from_tsv(path: Path) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as exc:
        raise MissingInputError(f"cannot read channels.tsv ({exc.strerror})", path=path) from exc
    if not rows or "name" not in rows[0] or "type" not in rows[0]:
        raise DataError("channels.tsv needs 'name' and 'type' columns", path=path)
    return {row["name"]: (row["type"] or "").strip() for row in rows}


def canonical_channel_order(names) -> list[str]:
    """Order channel names as in the standard 10-05 montage, unknown names last.

    The encoder's first convolutions run across neighbouring rows of the (channel, frequency)
    grid, so every subject (and every synthesis run) must present its electrodes in the same,
    spatially sensible order. The 10-05 order goes front to back, left to right within a row.

    Parameters
    ----------
    names : list of str
        Channel names, in any order; matching is case-insensitive.

    Returns
    -------
    ordered : list of str
        The same names (original spelling): 10-05 positions first in montage order, then the
        names the montage does not know, alphabetically (case-insensitive).
    """
    rank = {name.lower(): i for i, name in enumerate(_standard_1005_names())}
    known = sorted((n for n in names if n.lower() in rank), key=lambda n: rank[n.lower()])
    unknown = sorted((n for n in names if n.lower() not in rank), key=lambda n: (n.lower(), n))
    return known + unknown


def _standard_1005_names() -> list[str]:
    with warnings.catch_warnings():
        # mne 1.13 renames "standard_1005" to "colin27_1005"; both hold the same positions.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            montage = mne.channels.make_standard_montage("colin27_1005")
        except ValueError:
            montage = mne.channels.make_standard_montage("standard_1005")
    return montage.ch_names


def drop_flat_channels(spec, channels, *, source=None):
    """Remove the channels :func:`~spec2vol_bids.spectra.tr_spectrogram` found flat.

    Parameters
    ----------
    spec : ndarray, shape (windows, channels, bins)
        A spectrogram from :func:`~spec2vol_bids.spectra.tr_spectrogram`, where flat channels
        are rows of zeros left out of the z-score (it logs a warning naming them).
    channels : list of str
        The channel names along ``spec``'s second axis.
    source : str | Path | None
        The recording, for the error message.

    Returns
    -------
    spec : ndarray
        Without the flat channels.
    channels : list of str
        The remaining names.
    flat : list of str
        The names removed.

    Raises
    ------
    DataError
        Every channel is flat.
    """
    mask = flat_channels(spec)
    if mask.all():
        raise DataError("every EEG channel is flat (zero variance)", path=source)
    flat = [name for name, bad in zip(channels, mask) if bad]
    if not flat:
        return spec, list(channels), []
    return spec[:, ~mask], [name for name, bad in zip(channels, mask) if not bad], flat


def _marker_key(description: str) -> str:
    return re.sub(r"\s+", "", description.rsplit("/", 1)[-1]).lower()


def _marker_onsets(raw: mne.io.BaseRaw, key: str) -> tuple[np.ndarray, str | None]:
    """Sample indices (from the first sample) of the annotations whose key is ``key``."""
    ann = raw.annotations
    keys = np.array([_marker_key(d) for d in ann.description], dtype=object)
    hits = keys == key
    if not hits.any():
        return np.empty(0, dtype=np.int64), None
    samples = raw.time_as_index(ann.onset[hits], use_rounding=True, origin=ann.orig_time)
    description = str(ann.description[np.flatnonzero(hits)[0]]).strip()
    return np.unique(samples.astype(np.int64)), description


def _group_slices(samples: np.ndarray, tr_samples: float) -> np.ndarray:
    """The first slice marker of each volume.

    Volumes acquired with a pause after the slices show as gaps longer than 1.5 slice
    intervals; back-to-back acquisitions (NODDI) have none, so slices are counted instead:
    round(TR / slice interval) per volume.
    """
    if len(samples) < 2:
        return samples
    gaps = np.diff(samples)
    step = np.median(gaps)
    breaks = np.flatnonzero(gaps > 1.5 * step)
    if len(breaks):
        return np.concatenate([samples[:1], samples[breaks + 1]])
    per_volume = max(1, int(round(tr_samples / step)))
    return samples[::per_volume]


def find_volume_onsets(
    raw: mne.io.BaseRaw,
    tr: float,
    *,
    n_volumes: int | None,
    marker: str | None = None,
    offset: float | None = None,
    discard: int = 6,
    context: int = 20,
) -> VolumeTiming:
    """Find the first fMRI volume in the EEG and count the TR windows the EEG covers.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The EEG recording (annotations hold the scanner markers).
    tr : float
        The repetition time of the BOLD series, in seconds.
    n_volumes : int | None
        Volumes in the BOLD series; ``None`` (EEG without BOLD, for synthesis) takes every
        full TR window the recording holds after t0.
    marker : str | None
        Use this marker: matched against whole annotation descriptions or their last
        ``/``-separated part (``"R128"`` matches ``"Response/R128"``), case- and
        whitespace-insensitively. Markers closer than half a TR are taken as slice markers and
        grouped per volume.
    offset : float | None
        Take t0 = ``offset`` seconds and ignore markers.
    discard, context : int
        Volumes dropped at the start and TR windows of context per sample; a run must cover
        at least ``discard + context + 1`` volumes.

    Returns
    -------
    timing : VolumeTiming
        Without ``marker`` and ``offset``, the first per-volume marker found among ``R128``,
        ``Scan Start``, ``Volume``, ``V``, ``T`` gives t0, else slice markers (``s``,
        ``Slice``) grouped per volume, else t0 = 0 with a warning.

    Raises
    ------
    DataError
        The marker intervals differ from the TR by more than 1 %, the named marker is absent,
        or the EEG covers fewer than ``discard + context + 1`` volumes.
    UsageError
        Both ``marker`` and ``offset`` were given.
    """
    path = raw.filenames[0]
    sfreq = float(raw.info["sfreq"])
    if tr <= 0 or (n_volumes is not None and n_volumes < 1):
        raise DataError(f"invalid repetition time {tr} s or volume count {n_volumes}", path=path)
    if marker is not None and offset is not None:
        raise UsageError("give either a volume marker or an EEG offset, not both")
    onsets = np.empty(0, dtype=np.int64)
    used = None
    if offset is not None:
        t0_sample = int(np.floor(offset * sfreq + 0.5))
        if not 0 <= t0_sample < raw.n_times:
            raise UsageError(f"EEG offset {offset} s lies outside the recording "
                             f"({raw.n_times / sfreq:.1f} s): {path}")
    else:
        onsets, used = _detect_markers(raw, tr, marker)
        if used is None:
            logger.warning("%s: no volume markers found; the first volume is taken to start at "
                           "the first EEG sample (set --volume-marker or --eeg-offset)", path)
            t0_sample = 0
        else:
            t0_sample = int(onsets[0])
            _check_spacing(onsets, tr, sfreq, used, path)
            if n_volumes is not None and len(onsets) != n_volumes:
                logger.warning("%s: %d '%s' markers for %d volumes; volumes are placed every TR "
                               "from the first marker", path, len(onsets), used, n_volumes)
            elif n_volumes is None:
                # EEG without BOLD: the scanner acquired one volume per marker, no more.
                n_volumes = len(onsets)
    window = int(np.floor(tr * sfreq + 0.5))
    wanted = n_volumes if n_volumes is not None else int((raw.n_times - t0_sample) / (tr * sfreq)) + 1
    starts = window_starts(t0_sample / sfreq, tr, sfreq, wanted)
    covered = int(np.count_nonzero(starts + window <= raw.n_times))
    needed = discard + context + 1
    if covered < needed:
        raise DataError(
            f"the EEG covers {covered} TR windows from t0 = {t0_sample / sfreq:.3f} s, fewer than "
            f"the {needed} needed (discard {discard} + context {context} + 1)",
            path=path,
        )
    if n_volumes is not None and covered < n_volumes:
        logger.warning("%s: the EEG covers %d of %d volumes; the run is truncated to %d", path,
                       covered, n_volumes, covered)
    return VolumeTiming(
        t0=t0_sample / sfreq,
        marker=used,
        onsets=onsets / sfreq,
        n_volumes=covered,
        tr=float(tr),
        sfreq=sfreq,
        window_samples=window,
    )


def marker_repetition_time(raw: mne.io.BaseRaw, marker: str | None = None) -> float | None:
    """The repetition time implied by per-volume markers (median interval), or None.

    For EEG recorded without BOLD (or whose BOLD is not shared) the scanner's volume markers
    are the only record of the TR. Slice markers are not used: grouping them needs the TR.
    """
    names = [marker] if marker else list(VOLUME_MARKERS)
    for name in names:
        samples, used = _marker_onsets(raw, _marker_key(name))
        if used is not None and len(samples) > 2:
            return float(np.median(np.diff(samples))) / raw.info["sfreq"]
    return None


def _detect_markers(raw, tr, marker):
    """(volume onsets in samples, description used); (empty, None) without markers."""
    tr_samples = tr * raw.info["sfreq"]
    if marker is not None:
        wanted = re.sub(r"\s+", "", marker).lower()
        keys = {_marker_key(d) for d in raw.annotations.description}
        whole = {re.sub(r"\s+", "", d).lower(): _marker_key(d) for d in raw.annotations.description}
        key = wanted if wanted in keys else whole.get(wanted)
        if key is None:
            available = sorted(set(str(d).strip() for d in raw.annotations.description))
            raise DataError(
                f"no marker {marker!r} in the recording (markers: {', '.join(available[:10]) or 'none'})",
                path=raw.filenames[0],
            )
        samples, used = _marker_onsets(raw, key)
        if len(samples) > 1 and np.median(np.diff(samples)) < 0.5 * tr_samples:
            samples = _group_slices(samples, tr_samples)
        return samples, used
    for name in VOLUME_MARKERS:
        samples, used = _marker_onsets(raw, _marker_key(name))
        if used is not None:
            return samples, used
    for name in SLICE_MARKERS:
        samples, used = _marker_onsets(raw, _marker_key(name))
        if used is not None:
            return _group_slices(samples, tr_samples), used
    return np.empty(0, dtype=np.int64), None


def _check_spacing(onsets, tr, sfreq, used, path):
    if len(onsets) < 2:
        return
    interval = float(np.median(np.diff(onsets))) / sfreq
    if abs(interval - tr) > 0.01 * tr:
        raise DataError(
            f"'{used}' markers come every {interval:.4f} s but RepetitionTime is {tr} s "
            f"(more than 1% apart); check the BOLD sidecar or choose --volume-marker",
            path=path,
        )
