"""The marker series of an EEG recording: every kind of marker, from every place it is kept.

A recording's markers live in its own file (BrainVision ``.vmrk``, EDF/BDF annotations, EEGLAB
events), in its stim channels (BioSemi ``Status``, FIF ``STI 014``) as codes, and in the run's
``events.tsv`` as labels. Each kind is a :class:`MarkerSeries`; :mod:`spec2vol_bids.triggers`
finds the scanner's trigger train among them.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Where a marker series comes from.
SOURCES = {"eeg": "EEG file", "events": "events.tsv"}
# events.tsv columns that hold times, durations or free text rather than labels
_NOT_LABELS = frozenset({"onset", "duration", "sample", "response_time", "stim_file", "hed"})


@dataclass(frozen=True, eq=False)
class MarkerSeries:
    """All markers of one kind in a recording.

    Attributes
    ----------
    name : str
        The description (EEG file) or ``column=value`` (events.tsv), as ``--volume-marker``
        takes it.
    source : {'eeg', 'events'}
        The EEG file's own markers, or the run's events.tsv.
    samples : ndarray of int
        Sample indices from the first sample, sorted, without duplicates.
    doubt : str | None
        Why its times may be wrong (an events.tsv whose onsets disagree with its ``sample``
        column), or None.
    """

    name: str
    source: str
    samples: np.ndarray = field(repr=False)
    doubt: str | None = None

    @property
    def label(self) -> str:
        return f"'{self.name}' ({SOURCES[self.source]})"


def marker_series(raw, events_tsv: str | Path | None = None) -> list[MarkerSeries]:
    """Every marker series of a recording: its own markers, then its events.tsv labels.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The recording (its annotations are the EEG file's markers).
    events_tsv : str | Path | None
        The run's ``*_events.tsv``: onsets in seconds from the first EEG sample. An unreadable
        file is set aside with a warning (the EEG file's own markers remain).

    Returns
    -------
    series : list of MarkerSeries
        Markers outside the recording are left out.
    """
    sfreq = float(raw.info["sfreq"])
    found: list[MarkerSeries] = []
    ann = raw.annotations
    if len(ann):
        samples = raw.time_as_index(ann.onset, use_rounding=True, origin=ann.orig_time)
        names = np.array([str(d).strip() for d in ann.description], dtype=object)
        for name in dict.fromkeys(names):
            found.append(_series(str(name), "eeg", samples[names == name], raw.n_times))
    found += _stim_series(raw)
    if events_tsv is not None:
        found += _events_series(Path(events_tsv), sfreq, raw.n_times)
    return [s for s in found if len(s.samples)]


def _stim_series(raw) -> list[MarkerSeries]:
    """Trigger codes of the recording's stim channels (BioSemi ``Status``, FIF ``STI 014``):
    one series per code, ``<channel>=<code>``, at the samples where the channel takes it."""
    import mne

    series = []
    for name, kind in zip(raw.ch_names, raw.get_channel_types()):
        if kind != "stim":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                events = mne.find_events(raw, stim_channel=name, shortest_event=1,
                                         consecutive=True, initial_event=True, verbose=False)
        except Exception as exc:  # noqa: BLE001 - an unreadable stim channel only loses its codes
            logger.warning("%s: stim channel %s not read (%s)", raw.filenames[0], name, exc)
            continue
        samples = events[:, 0] - raw.first_samp
        for code in np.unique(events[:, 2]):
            series.append(_series(f"{name}={int(code)}", "eeg", samples[events[:, 2] == code],
                                  raw.n_times))
    return series


def _series(name: str, source: str, samples, n_times: int, doubt: str | None = None) -> MarkerSeries:
    samples = np.unique(np.asarray(samples, dtype=np.int64))
    return MarkerSeries(name, source, samples[(samples >= 0) & (samples < n_times)], doubt)


def _events_series(path: Path, sfreq: float, n_times: int) -> list[MarkerSeries]:
    from spec2vol_bids.bids.tsv import read_tsv

    try:
        rows = read_tsv(path)
    except Exception as exc:  # any unreadable events.tsv: the EEG file's markers still count
        logger.warning("%s: events.tsv set aside (%s); the EEG file's own markers are used",
                       path, " ".join(str(exc).split()))
        return []
    if not rows or "onset" not in rows[0]:
        logger.warning("%s: events.tsv has no onset column; set aside", path)
        return []
    onsets = np.array([_number(r["onset"]) for r in rows])
    valid = np.isfinite(onsets)
    if not valid.any():
        logger.warning("%s: events.tsv has no onset that is a number of seconds (%r); set aside",
                       path, rows[0]["onset"])
        return []
    samples = np.floor(onsets * sfreq + 0.5)
    garbled = [(line, row["onset"]) for line, (row, ok) in enumerate(zip(rows, valid), start=2)
               if not ok and row["onset"].strip() != "n/a"]
    doubt = (f"{len(garbled)} of its onsets are not numbers (line {garbled[0][0]}: "
             f"{garbled[0][1]!r}), so triggers may be missing from it" if garbled else
             _sample_column_doubt(onsets, np.array([_number(r.get("sample", "n/a")) for r in rows])))
    series = []
    for column in rows[0]:
        if column in _NOT_LABELS:
            continue
        values = np.array([r.get(column, "") for r in rows], dtype=object)
        for value in dict.fromkeys(values[valid]):
            if value in ("", "n/a"):
                continue
            hits = valid & (values == value)
            series.append(_series(f"{column}={value}", "events", samples[hits], n_times, doubt))
    return series


def _sample_column_doubt(onsets: np.ndarray, samples: np.ndarray) -> str | None:
    """Whether an events.tsv's ``sample`` column contradicts its onsets.

    BIDS counts both from the recording's first sample, so ``sample = onset · rate`` for one
    rate (the recording's, which need not be the EEG read here: a derivative may be resampled).
    Rows off that line by more than 2 samples or 2 ms (onsets are often rounded to the ms)
    mean the onsets count from something else.
    """
    both = np.isfinite(onsets) & np.isfinite(samples)
    order = np.argsort(onsets[both], kind="stable")
    t, n = onsets[both][order], samples[both][order]
    apart = np.diff(t) > 0
    if not apart.any():
        return None
    # the rate from the rows' spacings, which a constant offset between the columns leaves alone
    rate = float(np.median(np.diff(n)[apart] / np.diff(t)[apart]))
    error = np.abs(samples[both] - rate * onsets[both])
    worst = int(np.argmax(error))
    if error[worst] <= max(2.0, 0.002 * rate):
        return None
    onset, sample = onsets[both][worst], samples[both][worst]
    return (f"its onsets disagree with its sample column by up to {error[worst] / rate:.3f} s "
            f"(onset {onset:g} s, sample {sample:.0f} = {sample / rate:.3f} s at {rate:g} Hz)")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return np.nan


def matches(series: MarkerSeries, wanted: str) -> bool:
    source = None
    text = wanted
    if ":" in wanted and wanted.split(":", 1)[0].lower() in SOURCES:
        source, text = wanted.split(":", 1)
        source = source.lower()
    if source is not None and series.source != source:
        return False

    def key(s: str) -> str:
        return re.sub(r"\s+", "", s).lower()

    name = series.name
    forms = {key(name), key(name.rsplit("/", 1)[-1]), key(name.split("=", 1)[-1])}
    return key(text) in forms
