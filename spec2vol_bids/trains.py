"""Trigger trains: the regular chains of scanner triggers in a marker series.

In each series the longest chain of markers whose spacings are whole numbers of the TR (within
``max(2 samples, 0.5 %)``) is a trigger train; the longest chain among the markers left is
another, and so on (a previous scan in the same recording). Markers off a train are its
*strays* (a relay pulse, the last trigger of a previous scan, a duplicate); triggers missing
inside it (a gap of k TRs) are *filled* by linear interpolation between their neighbours. A
train has at least three triggers and observes at least half of its volumes. Its period is the
least-squares slope of its triggers: the difference from the nominal TR is the EEG-scanner
clock drift. Series faster than half a TR are slice markers and are grouped per volume first
(the first slice of each volume; see :func:`_group_slices`). :mod:`spec2vol_bids.triggers`
decides which train, if any, holds the BOLD volumes; the refusals that list the trains found
are worded here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spec2vol_bids.markers import MarkerSeries

# A regular train: spacing within this fraction of the nominal TR to estimate the period ...
_PERIOD_TOLERANCE = 0.01
# ... then every spacing within this fraction of the period (or 2 samples) of a whole number.
CHAIN_TOLERANCE = 0.005
# Markers looked back over for a train's previous trigger: at most this many strays between two.
_LOOKBACK = 64
MIN_TRIGGERS = 3


@dataclass
class Train:
    """The trigger train found in a marker series (see the module docstring)."""

    series: MarkerSeries
    onsets: np.ndarray = field(repr=False)  # one sample per volume of the train
    observed: np.ndarray = field(repr=False)  # whether volume i has its own trigger
    strays: np.ndarray = field(repr=False)  # samples of the markers off the train
    period: float  # fitted samples per volume
    slices: bool  # grouped from slice markers

    @property
    def filled(self) -> np.ndarray:
        return np.flatnonzero(~self.observed)

    def describe(self, sfreq: float) -> str:
        text = f"a regular train of {len(self.onsets)} triggers"
        extra = [f"{len(self.filled)} filled" if len(self.filled) else "",
                 f"{len(self.strays)} off the train" if len(self.strays) else "",
                 "slice markers grouped per volume" if self.slices else ""]
        extra = [e for e in extra if e]
        return text + (f" ({', '.join(extra)})" if extra else "") + \
            f" from {self.onsets[0] / sfreq:.3f} s"


def find_trains(series: MarkerSeries, tr: float, sfreq: float) -> list[Train]:
    """The trigger trains of a marker series at repetition time ``tr``, longest first.

    A series may hold several: a recording of two scans, or a scan's train and the last
    triggers of a previous one. The longest regular chain is taken, then the longest among the
    remaining markers, and so on; each train's strays are all the series' markers off it.
    """
    nominal = tr * sfreq
    samples, slices = series.samples, False
    if len(samples) >= 2 and np.median(np.diff(samples)) < 0.5 * nominal:
        samples, slices = _group_slices(samples, nominal), True
    trains: list[Train] = []
    remaining = samples
    while len(remaining) >= MIN_TRIGGERS:
        spacing = np.diff(remaining)
        near = spacing[np.abs(spacing - nominal) <= _PERIOD_TOLERANCE * nominal]
        if len(near) < MIN_TRIGGERS - 1:
            break
        chain = _longest_chain(remaining, float(np.median(near)))
        if len(chain) < MIN_TRIGGERS:
            break
        on_chain = remaining[chain]
        remaining = np.delete(remaining, chain)
        steps = np.rint(np.diff(on_chain) / np.median(near)).astype(np.int64)
        index = np.concatenate([[0], np.cumsum(steps)])
        if len(chain) < 0.5 * (index[-1] + 1):
            continue  # mostly filled: a sparse series that happens to fall on the TR grid
        period, _ = np.polyfit(index.astype(float), on_chain.astype(float), 1)
        volumes = np.arange(index[-1] + 1)
        observed = np.zeros(len(volumes), dtype=bool)
        observed[index] = True
        onsets = np.floor(np.interp(volumes, index, on_chain) + 0.5).astype(np.int64)
        trains.append(Train(series, onsets, observed, np.setdiff1d(samples, on_chain),
                            float(period), slices))
    return trains


def _group_slices(samples: np.ndarray, nominal: float) -> np.ndarray:
    """The first slice marker of each volume, from per-slice markers.

    Volumes acquired with a pause after their slices show as regular gaps longer than 1.5
    slice intervals, one per volume: each gap starts a volume, and a first group with fewer
    slices than the others (a recording started mid-volume) is dropped. Back-to-back
    acquisitions (NODDI) have none: slice ``j`` of the run is the marker ``j`` slice intervals
    after the first one (a missing slice marker leaves a gap, not a shift), and volumes start
    every round(TR / slice interval) slices. Where the first marker lies within a slice interval
    of the recording's start, the recording may have started mid-volume, and where the markers
    do not span whole volumes, slices were lost at the start or the end: in both cases the
    grouping is unknown and no volume starts are returned.
    """
    gaps = np.diff(samples)
    step = float(np.median(gaps))
    per_volume = max(1, int(round(nominal / step)))
    breaks = np.flatnonzero(gaps > 1.5 * step)
    expected_volumes = (samples[-1] - samples[0]) / nominal
    if len(breaks) >= 0.5 * expected_volumes:  # a pause after every volume
        starts = np.concatenate([[0], breaks + 1])
        sizes = np.diff(np.concatenate([starts, [len(samples)]]))
        if len(sizes) > 1 and sizes[0] < np.median(sizes[1:]):
            starts = starts[1:]
        return samples[starts]
    if samples[0] < 1.5 * step:
        return samples[:0]
    # slices per gap, not slices since the first marker: a fractional slice interval (333.3
    # samples at 5 kHz) must not accumulate into an off-by-one over a run
    index = np.concatenate([[0], np.cumsum(np.maximum(np.rint(gaps / step), 1))]).astype(np.int64)
    if (index[-1] + 1) % per_volume:
        # not whole volumes: slices lost at the start (or the end) shift every volume's first
        # slice, and which cannot be told
        return samples[:0]
    return samples[index % per_volume == 0]


def _longest_chain(samples: np.ndarray, period: float) -> list[int]:
    """Indices of the longest chain of markers spaced by whole numbers of ``period``.

    Dynamic programming over the sorted markers: the chain ending at marker i extends the
    longest chain ending at one of the previous markers that lies k >= 1 periods back (within
    the tolerance); among equally long ones, the one closest to a whole number of periods.
    """
    tolerance = max(2.0, CHAIN_TOLERANCE * period)
    n = len(samples)
    length = np.ones(n, dtype=np.int64)
    previous = np.full(n, -1, dtype=np.int64)
    for i in range(1, n):
        lo = max(0, i - _LOOKBACK)
        back = samples[i] - samples[lo:i]
        k = np.rint(back / period)
        residual = np.abs(back - k * period)
        fits = np.flatnonzero((k >= 1) & (residual <= tolerance))
        if len(fits):
            best = length[fits + lo].max()
            ties = fits[length[fits + lo] == best]
            # among equally long chains the one this marker continues most regularly
            previous[i] = ties[np.argmin(residual[ties])] + lo
            length[i] = best + 1
    chain, i = [], int(np.argmax(length))
    while i >= 0:
        chain.append(i)
        i = int(previous[i])
    return chain[::-1]


def no_fit_message(trains: dict, tr: float, sfreq: float, n_volumes, first_trigger,
                    marker: str | None) -> str:
    """Why no train of ``trains`` (series -> its trains) fits, and the options that resolve it."""
    volumes = f"the {n_volumes} BOLD volumes" if n_volumes is not None else "the recording"
    if first_trigger is not None:
        volumes += f" from trigger {first_trigger}"
    off_tr = False
    if not trains:
        found = "the recording and its events.tsv hold no markers"
    else:
        ranked = sorted(trains.items(), key=lambda st: (not st[1], -len(st[0].samples)))
        parts = []
        for series, found_trains in ranked[:6]:
            spacing = np.diff(series.samples)
            median, spread = (float(np.median(spacing)), np.ptp(spacing)) if len(spacing) else (0, 0)
            every = f", {'every' if found_trains or spread <= max(2, median / 100) else 'median interval'}"
            every = f"{every} {median / sfreq:.3f} s" if len(spacing) else ""
            count = len(series.samples)
            text = f"{series.label} {count} marker{'s' if count != 1 else ''}{every}"
            if found_trains:
                text += ": " + " and ".join(t.describe(sfreq) for t in found_trains)
            elif len(spacing) and median < 0.5 * tr * sfreq:
                text += (": slice markers that cannot be grouped into volumes (the recording "
                         "starts mid-volume, or slices are lost at its start or end)")
            elif len(spacing) and 0.01 < abs(median / (tr * sfreq) - 1) < 0.2:
                off_tr = True
            parts.append(text)
        more = f" and {len(trains) - 6} more" if len(trains) > 6 else ""
        found = "found " + "; ".join(parts) + more
    given = ("the BOLD sidecar's RepetitionTime" if n_volumes is not None else
             "the RepetitionTime this run without BOLD was given (its _eeg.json's, else the model's)")
    tr_hint = (f"; if a series above marks the volumes at another interval, {given} is wrong"
               if off_tr else "")
    marker_advice = "" if marker else "--volume-marker NAME, "
    return (f"no trigger train fits {volumes} at RepetitionTime {tr:g} s ({found}){tr_hint}; give "
            f"{marker_advice}--first-volume-trigger K when the train holds dummy or extra "
            "triggers or the recording stopped before the scan, or --eeg-offset SECONDS (0 when "
            "the EEG starts with the first volume)")


def several_trains_message(chosen: Train, other: Train, skip: int, other_skip: int, trains: dict,
                           sfreq: float, n_volumes: int | None) -> str:
    """Two trains that fit a run without BOLD count different volumes, or two trains of one
    series (two scans in one recording) both fit: of two series the user names one with
    ``--volume-marker``, of one series ``--first-volume-trigger`` picks."""
    counts = (f"{chosen.series.label}: {len(chosen.onsets) - skip} from "
              f"{chosen.onsets[skip] / sfreq:.3f} s, {other.series.label}: "
              f"{len(other.onsets) - other_skip} from {other.onsets[other_skip] / sfreq:.3f} s")
    if chosen.series is not other.series:
        return (f"two trigger trains fit this run without BOLD but count different volumes "
                f"({counts}); choose one with --volume-marker (eeg:NAME or events:NAME)")
    # two scans (or a paused scan) in one recording: K picks the train that starts at trigger K
    series_trains = sorted(trains[chosen.series], key=lambda t: t.onsets[0])
    starts, k = [], 1
    for t in series_trains:
        starts.append(f"{k} for the one from {t.onsets[0] / sfreq:.3f} s")
        k += len(t.onsets)
    fit = (f"that each fit the {n_volumes} BOLD volumes" if n_volumes is not None else
           "and this run has no BOLD to tell which one is meant")
    return (f"{chosen.series.label} holds {len(series_trains)} trigger trains (scans) {fit} "
            f"({counts}); choose one with --first-volume-trigger K, counted along the series' "
            f"trains: {'; '.join(starts)}")
