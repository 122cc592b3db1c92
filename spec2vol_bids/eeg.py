"""Read EEG, choose and order its channels.

Two concerns of the participant level live here (docs/design.md, "Preprocessing"):

* :func:`read_eeg` opens a recording lazily (``preload=False``) with mne's readers and turns
  every way a file can be broken into a one-line :class:`~spec2vol_bids.errors.DataError` (65)
  or :class:`~spec2vol_bids.errors.MissingInputError` (66) naming the file. BrainVision headers
  are checked first (:mod:`spec2vol_bids.brainvision`). The BIDS sidecars are
  read by spec2vol itself (:mod:`spec2vol_bids.bids.tsv`), not by mne-bids, which takes lock
  files inside the dataset while it reads.
* :func:`eeg_channels` keeps EEG channels only and :func:`canonical_channel_order` puts them in
  one spatially sensible order shared by every subject.

Where the volumes lie in the recording is :mod:`spec2vol_bids.triggers`' job.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from pathlib import Path

import mne

from spec2vol_bids.bids.annex import require_content
from spec2vol_bids.brainvision import checked_header
from spec2vol_bids.errors import DataError, MissingInputError, one_line
from spec2vol_bids.spectra import flat_channels

logger = logging.getLogger(__name__)

READERS = {
    ".vhdr": mne.io.read_raw_brainvision,
    ".edf": mne.io.read_raw_edf,
    ".bdf": mne.io.read_raw_bdf,
    ".set": mne.io.read_raw_eeglab,
    ".fif": mne.io.read_raw_fif,
}


# Names of non-EEG channels, used when no channels.tsv says what a channel is: the NODDI
# recordings carry their ECG as channel 32, typed EEG in the header.
_NON_EEG_NAME = re.compile(
    r"^(?:[hv]?eog|ecg|ekg|emg|resp|gsr|eda|trig(?:ger)?|status|sti\b|stim|photo|audio|"
    r"mic|acc|pulse|ppg)",
    re.IGNORECASE,
)

# Sampling rates outside this range (Hz) come from a broken header, not from an EEG amplifier.
PLAUSIBLE_SFREQ = (20.0, 100_000.0)


def read_eeg(path, *, work_dir, verbose=False) -> mne.io.BaseRaw:
    """Open an EEG recording without loading its data.

    Parameters
    ----------
    path : str | Path
        The recording: ``.vhdr`` (BrainVision), ``.edf``, ``.bdf``, ``.set`` or ``.fif``.
    work_dir : str | Path
        A folder this function may write to; a corrected BrainVision header goes there.
    verbose : bool
        Let mne print its own messages.

    Returns
    -------
    raw : mne.io.BaseRaw
        The recording, ``preload=False``.

    Raises
    ------
    MissingInputError
        The file (or its data file) does not exist, or is a git-annex pointer whose content
        was never fetched.
    DataError
        The file cannot be read: unknown format, corrupt or truncated data, broken header,
        duplicate channel names, an implausible sampling rate.
    """
    path = Path(path)
    require_content(path, "EEG file")
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise DataError(
            f"unsupported EEG format {suffix!r}; use one of {', '.join(sorted(READERS))}",
            path=path,
        )
    read_path = path
    if suffix == ".vhdr":
        read_path = checked_header(path, Path(work_dir))
    kwargs = {"preload": False, "verbose": verbose}
    if suffix == ".fif":
        kwargs["allow_maxshield"] = False
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            # mne warns about things that do not matter here (missing coordinates of an ECG
            # channel, deprecations); what does (duplicate names) is checked below.
            warnings.simplefilter("always")
            raw = READERS[suffix](read_path, **kwargs)
    except FileNotFoundError as exc:
        raise MissingInputError(f"a file this recording needs is missing ({exc})", path=path) from exc
    except Exception as exc:  # mne raises many types for malformed files; all are data errors
        # mne renames duplicate channels ("Fp1-0") and may then fail on the new names
        _refuse_duplicate_names(caught, path)
        raise DataError(f"cannot read EEG file ({one_line(exc)})", path=path) from exc
    _refuse_duplicate_names(caught, path)
    sfreq = float(raw.info["sfreq"])
    if not PLAUSIBLE_SFREQ[0] <= sfreq <= PLAUSIBLE_SFREQ[1]:
        raise DataError(f"sampling rate {sfreq:g} Hz is implausible for EEG (expected "
                        f"{PLAUSIBLE_SFREQ[0]:g}-{PLAUSIBLE_SFREQ[1]:g} Hz); check the header's "
                        "sampling interval or rate", path=path)
    return raw


def _refuse_duplicate_names(caught, path: Path) -> None:
    duplicates = [str(w.message) for w in caught if "names are not unique" in str(w.message)]
    if duplicates:
        names = duplicates[0].split("duplicates for:", 1)[-1].split(". ", 1)[0].strip(" {}'.")
        raise DataError(f"the recording has duplicate channel names ({names}); each channel needs "
                        "a name of its own to be matched across subjects", path=path)


def eeg_channels(raw: mne.io.BaseRaw, channels_tsv=None) -> list[str]:
    """Names of the EEG channels of a recording, in file order.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The recording.
    channels_tsv : str | Path | None
        The BIDS ``channels.tsv`` of the recording. When it has a row for every channel of the
        recording, its ``type`` column decides (``EEG`` kept; ECG, EOG, EMG, TRIG, MISC, …
        dropped); rows of channels the recording lacks are ignored with a warning. Otherwise
        (no such file, unreadable, no ``name``/``type`` column, channels without a row) the
        recording decides, with a warning when a file was set aside: its channel types, minus
        channels named like non-EEG signals (ECG, EKG, EOG, HEOG, VEOG, EMG, trigger/status, …),
        because many headers type everything EEG. Either way, channels whose ``status`` is
        ``bad`` in the file are dropped.

    Returns
    -------
    names : list of str
        The EEG channels. Flat channels are found later, from the spectrogram
        (:func:`spec2vol_bids.spectra.flat_channels`), to avoid a second pass over the data.

    Raises
    ------
    DataError
        Fewer than two EEG channels: the spectrogram is z-scored across channels.
    """
    path = raw.filenames[0]
    rows = _channel_rows(Path(channels_tsv), raw.ch_names) if channels_tsv is not None else {}
    if rows and all(name in rows for name in raw.ch_names):
        names = [name for name in raw.ch_names if rows[name].get("type", "").upper() == "EEG"]
    else:
        if rows:
            logger.warning("%s: no row for channel(s) %s; channel types taken from the EEG file "
                           "instead (its bad-channel marks still apply)", channels_tsv,
                           ", ".join(n for n in raw.ch_names if n not in rows)[:200])
        names = [
            name for name, kind in zip(raw.ch_names, raw.get_channel_types())
            if kind == "eeg" and not _NON_EEG_NAME.match(name.strip())
        ]
    bad = [name for name in names if rows.get(name, {}).get("status", "").lower() == "bad"]
    if bad:
        logger.info("%s: marked bad in channels.tsv, dropped: %s", path, ", ".join(bad))
        names = [name for name in names if name not in bad]
    dropped = [name for name in raw.ch_names if name not in names]
    if dropped:
        logger.info("%s: not used as EEG: %s", path, ", ".join(dropped))
    if not names:
        why = (f" left: channels.tsv marks all {len(bad)} bad" if bad else "")
        raise DataError(f"the recording has no EEG channels{why}", path=path)
    if len(names) < 2:
        raise DataError(f"the recording has a single EEG channel ({names[0]}); the spectrogram is "
                        "z-scored across channels and needs at least two", path=path)
    return names


def _channel_rows(path: Path, ch_names: list[str]) -> dict[str, dict]:
    """channels.tsv rows by name (of the recording's channels); empty, with a warning, when the
    file cannot be used."""
    from spec2vol_bids.bids.tsv import read_tsv

    try:
        rows = read_tsv(path)
    except (DataError, MissingInputError) as exc:
        logger.warning("%s; channel types taken from the EEG file instead", exc)
        return {}
    if not rows or "name" not in rows[0] or "type" not in rows[0]:
        logger.warning("%s: no 'name' and 'type' columns; channel types taken from the EEG file "
                       "instead", path)
        return {}
    names = [row["name"] for row in rows]
    if len(set(names)) != len(names):
        logger.warning("%s: a channel name appears twice; channel types taken from the EEG file "
                       "instead", path)
        return {}
    extra = [n for n in names if n not in ch_names]
    if extra:
        logger.warning("%s: rows for channel(s) the recording lacks, ignored: %s", path,
                       ", ".join(extra[:5]))
    return {row["name"]: row for row in rows if row["name"] in ch_names}


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
    rank = {name.lower(): i for i, name in enumerate(standard_montage().ch_names)}
    known = sorted((n for n in names if n.lower() in rank), key=lambda n: rank[n.lower()])
    unknown = sorted((n for n in names if n.lower() not in rank), key=lambda n: (n.lower(), n))
    return known + unknown


@functools.lru_cache(maxsize=1)
def standard_montage() -> mne.channels.DigMontage:
    """The standard 10-05 montage (electrode names and positions), read once."""
    with warnings.catch_warnings():
        # mne 1.13 renames "standard_1005" to "colin27_1005"; both hold the same positions.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return mne.channels.make_standard_montage("colin27_1005")
        except ValueError:
            return mne.channels.make_standard_montage("standard_1005")


def check_native_rates(path, channels, top_hz: float, sfreq: float) -> None:
    """Refuse a spectrogram whose bins reach above what a channel was recorded with.

    EDF and BDF store every channel at its own rate, and mne upsamples the slower ones to the
    fastest without a word; above its own Nyquist frequency such a channel holds nothing, so its
    upper bins would be zeros z-scored against the other channels'.

    Parameters
    ----------
    path : str | Path
        The recording; only ``.edf`` and ``.bdf`` files are checked.
    channels : list of str
        The channels the spectrogram keeps.
    top_hz : float
        Its highest frequency bin.
    sfreq : float
        The rate the reader gives every channel (the file's fastest).

    Raises
    ------
    DataError
        A kept channel's own Nyquist frequency lies below ``top_hz``.
    """
    path = Path(path)
    if path.suffix.lower() not in (".edf", ".bdf"):
        return
    rates = _edf_channel_rates(path)
    slow = {name: rates[name] for name in channels if rates.get(name, sfreq) / 2 < top_hz}
    if slow:
        lowest = min(slow.values())
        listed = ", ".join(f"{name} ({rate:g} Hz)" for name, rate in list(slow.items())[:5])
        several = len(slow) > 1
        raise DataError(
            f"channel{'s' if several else ''} {listed}, recorded below the file's {sfreq:g} Hz, "
            f"hold{'' if several else 's'} nothing above {lowest / 2:g} Hz, but the spectrogram "
            f"reaches {top_hz:g} Hz; give --fmax {lowest / 2:g} or lower, or mark "
            f"{'them' if several else 'it'} bad in channels.tsv", path=path)


def _edf_channel_rates(path: Path) -> dict[str, float]:
    """Each signal's own sampling rate from an EDF/BDF header: its samples per data record over
    the record's duration (the header layout of the EDF specification, shared by BDF)."""
    with open(path, "rb") as fh:
        fixed = fh.read(256)
        n_signals = int(fixed[252:256].decode("ascii", "replace").strip() or 0)
        duration = float(fixed[244:252].decode("ascii", "replace").strip() or 0)
        signals = fh.read(256 * n_signals)
    if n_signals <= 0 or duration <= 0 or len(signals) < 256 * n_signals:
        return {}
    labels = [signals[16 * i:16 * (i + 1)].decode("latin-1").strip() for i in range(n_signals)]
    counts_at = 216 * n_signals  # label 16, transducer 80, unit 8, 4 x range 8, prefilter 80
    counts = [signals[counts_at + 8 * i:counts_at + 8 * (i + 1)].decode("ascii", "replace").strip()
              for i in range(n_signals)]
    return {label: int(count) / duration for label, count in zip(labels, counts)
            if count.isdigit()}


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
