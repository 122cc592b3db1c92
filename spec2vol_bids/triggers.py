"""Volume timing: which EEG samples belong to which fMRI volume, right or refused.

Every number spec2vol produces depends on cutting the EEG into the TR windows of the BOLD
volumes, so the timing is taken from the scanner's own record, the trigger train, and never
guessed:

1. **Candidates.** Every marker series of the recording is a candidate: each description of the
   EEG file's own markers (``Response/R128``, ``Scanner/Scan Start``, EDF annotations, ...),
   each code of its stim channels (``Status=128``), and each value of every label column of the
   run's ``events.tsv`` (``trial_type=10`` when the scanner pulse is a numeric code, as in
   OpenNeuro ds002725). Series faster than half a TR are slice markers and are grouped per
   volume.
2. **Trains.** In each series the regular chains of triggers at the TR, with their strays,
   filled triggers and fitted period (:mod:`spec2vol_bids.trains`). A period more than 1000
   ppm from the sidecar's TR is not EEG-scanner clock drift but a wrong RepetitionTime: refused.
3. **Fit.** A train fits the BOLD series when it holds exactly one trigger per volume. With
   ``--first-volume-trigger K`` trigger K onwards must hold the volumes (the K-1 before are
   dummy scans, triggers after the last volume are ignored) or run into the recording's end
   (the EEG stopped before the scan did); K counts the triggers of the series' trains in time
   order, so in a recording of two scans K picks the second by its first trigger. Fewer
   triggers than volumes are never accepted without it: an early stop, a late start, lost
   first triggers and a paused recording look alike in the markers. Without BOLD any train
   fits, and the rest of these rules decide.
4. **Choice.** Exactly the fitting trains count. None: refused, naming what was found. Several:
   they must agree within ``max(2 samples, 1 % of the TR)`` on every volume, or the run is
   refused; the EEG file's own markers are preferred to events.tsv, and known volume-marker
   names (``R128``, ``Scan Start``, ``Volume``, ``V``, ``T``) to others. BrainVision stimulus
   markers (``Stimulus/S  5``, or ``S  5`` in EEGLAB and EDF conversions) count only when
   ``--volume-marker`` names them; without BOLD, so does every series but ``R128``, ``Scan
   Start`` and ``Volume`` (a tone every TR in one block would fit as well).
5. **Windows.** Volume ``v``'s window starts at its own trigger (observed or filled), so drift
   does not accumulate over a run. Only ``--eeg-offset S`` places the volumes every TR from
   ``S`` seconds instead (``--eeg-offset 0``: the EEG starts with the first volume), and not
   against a train that fits the volumes from another time.

The choice and what it rests on (trigger series, per-volume onsets, strays, filled triggers,
drift, the other candidates) go into the spectrogram's sidecar and the participant report.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spec2vol_bids.errors import DataError, UsageError
from spec2vol_bids.markers import SOURCES, MarkerSeries, marker_series, matches
from spec2vol_bids.trains import (CHAIN_TOLERANCE, MIN_TRIGGERS, Train, find_trains,
                                  no_fit_message, several_trains_message)

logger = logging.getLogger(__name__)

#: Per-volume scanner marker names, in order of preference among trains that agree. Compared
#: with the last "/"-separated part of a description (mne writes the BrainVision marker
#: "Response,R128" as "Response/R128"), without whitespace and case-insensitively.
VOLUME_MARKERS = ("R128", "Scan Start", "Volume", "V", "T")
#: The names that say "scanner volume" on their own. Without BOLD no volume count confirms a
#: train, and "V" or "T" are as often a visual stimulus or a target: only these, or the series
#: ``--volume-marker`` names, time an EEG-only run.
SCANNER_MARKERS = VOLUME_MARKERS[:3]

# Trains that fit must agree on every volume to within this fraction of the TR (or 2 samples).
_AGREEMENT = 0.01
# A fitted trigger period this far from RepetitionTime is not clock drift but a wrong TR.
_SUSPICIOUS_DRIFT_PPM = 1000


@dataclass
class VolumeTiming:
    """Where the fMRI volumes lie in an EEG recording.

    Attributes
    ----------
    starts : ndarray of int
        The first sample of each volume's TR window, for the volumes the EEG covers.
    tr, sfreq : float
        Repetition time (s) and EEG sampling frequency (Hz).
    window_samples : int
        Samples in one TR window, ``round(tr * sfreq)``.
    train : Train | None
        The trigger train the windows follow; ``None`` with ``--eeg-offset``.
    first_trigger : int
        The 1-based index of the train's trigger that marks the first BOLD volume.
    first_trigger_in_series : int | None
        ``--first-volume-trigger`` as given: counted along the series' trains.
    candidates : list of dict
        Every marker series considered, for the sidecar and the report.
    """

    starts: np.ndarray = field(repr=False)
    tr: float
    sfreq: float
    window_samples: int
    train: Train | None = None
    first_trigger: int = 1
    first_trigger_in_series: int | None = None
    candidates: list = field(default_factory=list, repr=False)

    @property
    def n_volumes(self) -> int:
        return len(self.starts)

    @property
    def t0(self) -> float:
        return float(self.starts[0]) / self.sfreq

    @property
    def marker(self) -> str | None:
        return self.train.series.name if self.train else None

    @property
    def drift_ppm(self) -> float | None:
        if self.train is None:
            return None
        return (self.train.period / (self.tr * self.sfreq) - 1.0) * 1e6

    def sidecar(self) -> dict:
        """What the spectrogram's JSON sidecar records about the timing."""
        fs = self.sfreq
        meta = {
            "VolumeOnsetSeconds": self.t0,
            "VolumeMarker": self.marker,
            "VolumeOnsetsSeconds": [round(float(s) / fs, 6) for s in self.starts],
        }
        if self.train is None:
            meta["VolumeTiming"] = {"Method": "--eeg-offset: one volume every RepetitionTime"}
            return meta
        train, skip = self.train, self.first_trigger - 1
        used = slice(skip, skip + self.n_volumes)
        meta["VolumeTiming"] = {
            "Method": "trigger train: each window starts at its volume's trigger",
            "Marker": train.series.name,
            "MarkerSource": SOURCES[train.series.source],
            "SliceMarkersGroupedPerVolume": train.slices,
            "TriggersInTrain": int(len(train.onsets)),
            "FirstVolumeTrigger": self.first_trigger,
            "FirstVolumeTriggerInSeries": self.first_trigger_in_series,
            "TriggersObserved": int(train.observed[used].sum()),
            "FilledVolumes": [int(i) - skip for i in train.filled if skip <= i < skip + self.n_volumes],
            "StrayMarkersSeconds": [round(float(s) / fs, 6) for s in train.strays],
            "MedianIntervalSeconds": float(np.median(np.diff(train.onsets))) / fs,
            "FittedIntervalSeconds": train.period / fs,
            "ClockDriftPPM": round(self.drift_ppm, 2),
            "Candidates": self.candidates,
        }
        return meta


def volume_timing(
    raw,
    tr: float,
    *,
    n_volumes: int | None,
    events_tsv: str | Path | None = None,
    marker: str | None = None,
    offset: float | None = None,
    first_trigger: int | None = None,
    discard: int,
    context: int,
    source: str | Path | None = None,
) -> VolumeTiming:
    """Find the TR window of every fMRI volume in an EEG recording.

    Parameters
    ----------
    raw : mne.io.BaseRaw
        The EEG recording.
    tr : float
        The BOLD repetition time, seconds.
    n_volumes : int | None
        Volumes of the BOLD series; ``None`` for EEG without BOLD (the train decides).
    events_tsv : str | Path | None
        The run's events.tsv; its labels are candidate trigger series too.
    marker : str | None
        ``--volume-marker``: consider only this series. Matched, case- and whitespace-
        insensitively, with a whole description, its last ``/``-separated part, an events.tsv
        ``column=value`` or its value; ``eeg:NAME`` or ``events:NAME`` restricts the source.
    offset : float | None
        ``--eeg-offset``: the first volume starts ``offset`` seconds after the first sample and
        the others follow every TR; markers are not used.
    first_trigger : int | None
        ``--first-volume-trigger``: the 1-based trigger of the train that marks the first volume.
    discard, context : int
        A run must cover at least ``discard + context + 1`` volumes.
    source : str | Path | None
        The file to name in messages (default: the recording's data file).

    Returns
    -------
    timing : VolumeTiming

    Raises
    ------
    DataError (65)
        No trigger train fits the BOLD series, two fitting trains disagree, the named marker is
        absent, or the EEG covers too few volumes; the message names what was found and the
        options that resolve it.
    UsageError (64)
        ``marker`` or ``first_trigger`` with ``offset``; ``offset`` outside the recording.
    """
    path = source or raw.filenames[0]
    sfreq = float(raw.info["sfreq"])
    window = int(np.floor(tr * sfreq + 0.5))
    needed = discard + context + 1
    if offset is not None:
        if marker is not None or first_trigger is not None:
            raise UsageError("--eeg-offset places the volumes itself: leave out --volume-marker "
                             "and --first-volume-trigger")
        timing = _offset_timing(raw, tr, offset, n_volumes, window, path)
        _check_offset_against_triggers(timing, raw, events_tsv, n_volumes, path)
    else:
        timing = _train_timing(raw, tr, n_volumes, events_tsv, marker, first_trigger, window, path)
    if timing.n_volumes < needed:
        raise DataError(f"the EEG covers {timing.n_volumes} TR windows from t0 = {timing.t0:.3f} s, "
                        f"fewer than the {needed} needed (--discard-volumes {discard} + context "
                        f"{context} + 1)",
                        path=path)
    if n_volumes is not None and timing.n_volumes < n_volumes:
        logger.warning("%s: the EEG covers %d of %d volumes; the run is truncated to %d", path,
                       timing.n_volumes, n_volumes, timing.n_volumes)
    return timing


def _check_offset_against_triggers(timing: VolumeTiming, raw, events_tsv, n_volumes, path) -> None:
    """``--eeg-offset`` places the volumes itself, but not against a trigger train that fits
    them and starts elsewhere: the scanner's record contradicts the user's, and one is wrong.

    Raises
    ------
    UsageError (64)
        Naming the train and where it starts.
    """
    try:
        triggers = _train_timing(raw, timing.tr, n_volumes, events_tsv, None, None,
                                 timing.window_samples, path)
    except DataError:  # no train (or none to trust) to contradict the offset
        return
    if abs(triggers.starts[0] - timing.starts[0]) > max(2.0, _AGREEMENT * timing.tr * timing.sfreq):
        raise UsageError(f"--eeg-offset {timing.t0:g} s differs from the volume triggers, "
                         f"{triggers.train.series.label} from {triggers.t0:.3f} s, which fit the "
                         f"volumes: leave out --eeg-offset to follow them: {path}")


def _offset_timing(raw, tr, offset, n_volumes, window, path) -> VolumeTiming:
    from spec2vol_bids.spectra import window_starts

    sfreq = float(raw.info["sfreq"])
    if not np.isfinite(offset) or not 0 <= offset * sfreq < raw.n_times:
        raise UsageError(f"--eeg-offset {offset} s lies outside the recording "
                         f"({raw.n_times / sfreq:.1f} s): {path}")
    wanted = n_volumes if n_volumes is not None else int((raw.n_times - offset * sfreq) // (tr * sfreq)) + 1
    starts = window_starts(offset, tr, sfreq, wanted)
    return VolumeTiming(starts[starts + window <= raw.n_times], float(tr), sfreq, window)


def _train_timing(raw, tr, n_volumes, events_tsv, marker, first_trigger, window, path):
    sfreq = float(raw.info["sfreq"])
    series = marker_series(raw, events_tsv)
    if marker is not None:
        chosen = [s for s in series if matches(s, marker)]
        if not chosen:
            raise DataError(f"no marker {marker!r} in the recording or its events.tsv "
                            f"(markers: {_names(series)})", path=path)
        series = chosen
    trains = {s: find_trains(s, tr, sfreq) for s in series}
    first = {id(t): _first_in_train(t, found, first_trigger)
             for found in trains.values() for t in found}
    fitting = [t for found in trains.values() for t in found
               if first[id(t)] is not None
               and _fits(t, n_volumes, first_trigger and first[id(t)], raw.n_times)]
    # a stimulus locked to the volumes (shown 0.3 s after each) fits as well as the scanner's
    # triggers, but only the user can say that it marks them; without BOLD any regular stimulus
    # series would fit, so only names that mean a scanner volume count there
    unnamed = [t for t in fitting if marker is None and (
        _is_stimulus(t.series) or (n_volumes is None and not _is_scanner_marker(t)))]
    fitting = [t for t in fitting if not any(t is u for u in unnamed)]
    candidates = [_candidate(s, found, sfreq, fitting) for s, found in trains.items()]
    if not fitting:
        raise DataError(no_fit_message(trains, tr, sfreq, n_volumes, first_trigger, marker)
                        + _unnamed_hint(unnamed, n_volumes), path=path)
    fitting.sort(key=_preference)
    chosen = fitting[0]
    skip = first[id(chosen)] - 1
    wanted = n_volumes if n_volumes is not None else len(chosen.onsets) - skip
    for other in fitting[1:]:
        other_skip = first[id(other)] - 1
        # without BOLD nothing else counts the volumes: the shorter train may have stopped
        lengths_differ = (n_volumes is None
                          and len(other.onsets) - other_skip != len(chosen.onsets) - skip)
        gap = _disagreement(chosen, other, skip, other_skip, wanted)
        disagree = gap > max(2.0, _AGREEMENT * tr * sfreq)
        if lengths_differ or (disagree and other.series is chosen.series):
            # two series: --volume-marker names one; two scans of one series: K picks one
            raise DataError(several_trains_message(chosen, other, skip, other_skip, trains, sfreq,
                                                   n_volumes), path=path)
        if disagree:
            raise DataError(
                f"two trigger trains fit the {wanted} volumes but disagree by up to "
                f"{gap / sfreq:.3f} s: {chosen.series.label} from {chosen.onsets[skip] / sfreq:.3f} s "
                f"and {other.series.label} from {other.onsets[other_skip] / sfreq:.3f} s; choose one "
                "with --volume-marker (eeg:NAME or events:NAME)", path=path)
    starts = chosen.onsets[skip:skip + wanted]
    _check_events_train(chosen, [t for found in trains.values() for t in found
                                          if not any(t is f for f in fitting)], starts, sfreq, path)
    if len(chosen.strays) or len(chosen.filled):
        logger.warning("%s: volume triggers %s: %s", path, chosen.series.label, chosen.describe(sfreq))
    timing = VolumeTiming(starts[starts + window <= raw.n_times], float(tr), sfreq, window,
                          train=chosen, first_trigger=skip + 1,
                          first_trigger_in_series=first_trigger, candidates=candidates)
    if abs(timing.drift_ppm) > _SUSPICIOUS_DRIFT_PPM:
        # the windows would follow the triggers, but last the wrong TR and give its bins
        raise DataError(f"the volume triggers ({chosen.series.label}) come every "
                        f"{chosen.period / sfreq:.6f} s but RepetitionTime says {tr:g} s "
                        f"({timing.drift_ppm:+.0f} ppm; EEG-scanner clock drift stays below a few "
                        "hundred ppm): correct the BOLD sidecar's RepetitionTime", path=path)
    return timing


def _fits(train: Train, n_volumes: int | None, first_trigger: int | None, n_times: int) -> bool:
    """Whether the train holds the BOLD volumes (see the module docstring, step 3).

    Without ``--first-volume-trigger`` only a train of exactly one trigger per volume fits:
    fewer triggers could be a recording that stopped early, or one that started late, lost
    its first triggers or paused, and which of these cannot be read from the markers. With it
    the user says where the scan starts: triggers after the last volume are ignored, and a
    train that runs into the end of the recording (whose next trigger would lie beyond its
    last sample) may hold fewer.
    """
    available = len(train.onsets) - (first_trigger or 1) + 1
    if available < 1:
        return False
    if n_volumes is None or available == n_volumes:
        return True
    if first_trigger is None:
        return False
    if available > n_volumes:
        return True
    tolerance = max(2.0, CHAIN_TOLERANCE * train.period)
    return train.onsets[-1] + train.period > n_times - 1 - tolerance


def _check_events_train(chosen: Train, others: list[Train], starts: np.ndarray, sfreq: float,
                        path) -> None:
    """A train chosen from events.tsv must put its triggers where every trigger train of the
    EEG file puts them, even one that does not fit (31 R128 for 30 volumes): events.tsv is a
    copy of the scanner's record, and a copy shifted in time (onsets counted from another
    marker, as in NATVIEW) would move every window. A chosen events.tsv whose onsets disagree
    with its own ``sample`` column is refused as well. A train chosen from the EEG file is that
    record; ``--volume-marker`` makes the choice the user's.

    Raises
    ------
    DataError (65)
        Naming both trains and where they start.
    """
    if chosen.series.source == "eeg":
        return
    if chosen.series.doubt:
        raise DataError(f"the trigger train of {chosen.series.label} fits the volumes, but "
                        f"{chosen.series.doubt}; correct the events.tsv, or choose the EEG file's "
                        "markers with --volume-marker eeg:NAME", path=path)
    tolerance = max(2.0, _AGREEMENT * chosen.period)
    for other in (t for t in others if t.series.source == "eeg"):
        triggers = other.onsets[other.observed]
        inside = triggers[(triggers >= starts[0] - tolerance) & (triggers <= starts[-1] + tolerance)]
        nearest = np.abs(inside[:, None] - starts[None, :]).min(axis=1) if len(inside) else inside
        if not len(inside) or np.any(nearest > tolerance):
            raise DataError(
                f"the trigger train of {chosen.series.label} fits the volumes from "
                f"{starts[0] / sfreq:.3f} s, but {other.series.label} holds a train "
                f"at the TR elsewhere ({len(other.onsets)} triggers from "
                f"{other.onsets[0] / sfreq:.3f} s): one of them is wrong; choose with "
                "--volume-marker (eeg:NAME or events:NAME) and, if the train holds extra "
                "triggers, --first-volume-trigger K", path=path)


def _is_stimulus(series: MarkerSeries) -> bool:
    """BrainVision's stimulus port ("Stimulus/S  5"), where presentation software writes; the
    scanner's triggers come on the response port (R128) or as scanner markers. Converted to
    EEGLAB or EDF the port's name is lost but its codes keep their form ("S  5")."""
    name = series.name.strip().lower()
    return series.source == "eeg" and (name.startswith("stimulus/")
                                       or re.fullmatch(r"s\s*\d{1,3}", name) is not None)


def _first_in_train(train: Train, series_trains: list[Train], first_trigger: int | None):
    """``--first-volume-trigger K`` as the 1-based index into ``train``, or None when trigger K
    lies in another train of the series. K counts the triggers of the series' trains in time
    order (strays left out), so a recording of two scans is chosen by the first trigger of the
    second (K = the first scan's count + 1) and a single train reads K as its own index."""
    if first_trigger is None:
        return 1
    before = sum(len(t.onsets) for t in series_trains if t.onsets[0] < train.onsets[0])
    k = first_trigger - before
    return k if 1 <= k <= len(train.onsets) else None


def _is_scanner_marker(train: Train) -> bool:
    return _marker_name(train) in {re.sub(r"\s+", "", m).lower() for m in SCANNER_MARKERS}


def _unnamed_hint(unnamed: list[Train], n_volumes) -> str:
    """Why trains that would fit were not taken: stimulus markers, or without BOLD a name that
    does not say "scanner volume"."""
    if not unnamed:
        return ""
    label = unnamed[0].series.label
    if n_volumes is None and not _is_stimulus(unnamed[0].series):
        return (f"; {label} would fit, but without BOLD only scanner volume markers "
                f"({', '.join(SCANNER_MARKERS)}) time the volumes unless --volume-marker names "
                "another series")
    return (f"; {label} would fit, but stimulus markers mark the volumes only when "
            "--volume-marker names them")


def _marker_name(train: Train) -> str:
    return re.sub(r"\s+", "", train.series.name.rsplit("/", 1)[-1].split("=", 1)[-1]).lower()


def _preference(train: Train) -> tuple:
    name = _marker_name(train)
    known = [re.sub(r"\s+", "", m).lower() for m in VOLUME_MARKERS]
    rank = known.index(name) if name in known else len(known)
    return (train.series.source != "eeg", rank, -int(train.observed.sum()))


def _disagreement(a: Train, b: Train, skip: int, other_skip: int, wanted: int) -> float:
    x, y = a.onsets[skip:skip + wanted], b.onsets[other_skip:other_skip + wanted]
    n = min(len(x), len(y))
    return float(np.max(np.abs(x[:n] - y[:n]))) if n else 0.0


def _candidate(series: MarkerSeries, trains: list[Train], sfreq: float, fitting: list) -> dict:
    spacing = np.diff(series.samples)
    entry = {"Marker": series.name, "Source": SOURCES[series.source], "Count": int(len(series.samples)),
             "MedianIntervalSeconds": round(float(np.median(spacing)) / sfreq, 6) if len(spacing) else None,
             "Trains": [{"Triggers": int(len(t.onsets)), "Filled": int(len(t.filled)),
                         "FirstSeconds": round(float(t.onsets[0]) / sfreq, 6),
                         "Fits": any(t is f for f in fitting)} for t in trains]}
    return entry


def _names(series: list[MarkerSeries]) -> str:
    names = [s.label for s in series[:10]]
    return ", ".join(names) + (" ..." if len(series) > 10 else "") if names else "none"


def marker_repetition_time(raw, events_tsv=None, marker: str | None = None) -> float | None:
    """The repetition time implied by a recording's volume markers, or ``None``.

    For EEG recorded without BOLD (or whose BOLD is not shared) the scanner's volume markers
    are the only record of the TR: the median spacing of the series named ``marker``, else of
    the first name that means a scanner volume on its own (:data:`SCANNER_MARKERS`) with at
    least three markers. Slice markers are not used: grouping them needs the TR.
    """
    sfreq = float(raw.info["sfreq"])
    series = marker_series(raw, events_tsv)
    for name in [marker] if marker else SCANNER_MARKERS:
        for s in series:
            if matches(s, name) and len(s.samples) >= MIN_TRIGGERS:
                return float(np.median(np.diff(s.samples))) / sfreq
    return None
