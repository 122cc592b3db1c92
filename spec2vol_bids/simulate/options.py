"""The simulation's options, checked once for the Python function and the command line alike.

The defaults live in the signature of :func:`~.dataset.simulate_dataset`; the command line reads
them from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spec2vol_bids.errors import UsageError
from spec2vol_bids.simulate.eeg_writers import EEG_DTYPES, EEG_FORMATS, VOLUME_MARKERS
from spec2vol_bids.simulate.latent import COUPLINGS, HRF_DELAYS, MAX_SOURCES, SOURCES, channel_names

#: Seconds of EEG before the first volume when the EEG has volume markers; without markers the
#: EEG can only be aligned by starting it with the first volume, so the offset is then 0.
EEG_OFFSET = 2.0

# whole-number options and their lowest values, in the order they are checked
_COUNTS = (("subjects", 1), ("sessions", 0), ("runs", 1), ("volumes", 1), ("channels", 1), ("sources", 1),
           ("eeg_only_subjects", 0), ("bold_only_subjects", 0), ("seed", 0))


@dataclass(frozen=True)
class Options:
    """The checked options of one simulation (the keyword arguments of ``simulate_dataset``)."""

    subjects: int
    sessions: int
    runs: int
    task: str
    volumes: int
    tr: float
    sfreq: float
    channels: int
    grid: tuple[int, int, int]
    eeg_format: str
    volume_marker: str
    eeg_only_subjects: int
    bold_only_subjects: int
    sources: int
    eeg_offset: float
    eeg_dtype: str
    seed: int
    coupling: str
    hrf_delay: float

    @property
    def eeg_duration(self) -> int:
        """Whole seconds of EEG: the offset, every volume and at least one TR of tail."""
        return int(np.ceil(self.eeg_offset + (self.volumes + 1) * self.tr - 1e-9))

    def kind(self, subject: int) -> str:
        """``eeg+bold``, ``eeg`` or ``bold``: EEG-only and BOLD-only subjects come last."""
        if subject > self.subjects - self.bold_only_subjects:
            return "bold"
        if subject > self.subjects - self.bold_only_subjects - self.eeg_only_subjects:
            return "eeg"
        return "eeg+bold"


def check_options(**opts) -> Options:
    """Validate simulation options.

    Parameters
    ----------
    **opts
        Every keyword argument of :func:`~.dataset.simulate_dataset` but ``out_dir``,
        ``overwrite`` and ``progress``.

    Returns
    -------
    Options
        With ``eeg_offset`` resolved when it was ``None``.

    Raises
    ------
    UsageError
        For the first problem found, naming the option as the command line spells it.
    """
    counts = {name: _integer(opts, name, low) for name, low in _COUNTS}
    tr, sfreq = _positive(opts, "tr"), _positive(opts, "sfreq")
    task = str(opts["task"])
    if not task.isalnum() or not task.isascii():
        raise UsageError(f"--task must be a BIDS label (letters and digits only; got {task!r})")
    grid = _grid(opts["grid"])
    _check_formats(opts["eeg_format"], opts["volume_marker"], opts["eeg_dtype"])
    _check_consistency(counts, tr, sfreq, opts["eeg_format"])
    offset = _eeg_offset(opts["eeg_offset"], opts["volume_marker"])
    channel_names(counts["channels"])
    if opts["coupling"] not in COUPLINGS:
        raise UsageError(f"--coupling must be {' or '.join(COUPLINGS)} (got {opts['coupling']!r})")
    delay = opts["hrf_delay"]
    if isinstance(delay, bool) or not (isinstance(delay, (int, float)) and HRF_DELAYS[0] <= delay <= HRF_DELAYS[1]):
        raise UsageError(f"--hrf-delay must be a number of seconds from {HRF_DELAYS[0]:g} to "
                         f"{HRF_DELAYS[1]:g} (got {delay!r})")
    return Options(**counts, task=task, tr=tr, sfreq=sfreq, grid=grid, eeg_format=opts["eeg_format"],
                   volume_marker=opts["volume_marker"], eeg_offset=offset, eeg_dtype=opts["eeg_dtype"],
                   coupling=opts["coupling"], hrf_delay=float(delay))


def _option(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _integer(opts: dict, name: str, low: int) -> int:
    value = opts[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UsageError(f"{_option(name)} must be an integer >= {low} (got {value!r})")
    return int(value)


def _positive(opts: dict, name: str) -> float:
    value = opts[name]
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise UsageError(f"{_option(name)} must be a positive number (got {opts[name]!r})")
    return value


def _grid(grid) -> tuple[int, int, int]:
    try:
        checked = tuple(int(g) for g in grid)
    except (TypeError, ValueError):
        checked = ()
    if len(checked) != 3 or min(checked) < 4:
        raise UsageError(f"--grid needs three integers >= 4 (got {grid!r})")
    return checked


def _check_formats(eeg_format, volume_marker, eeg_dtype) -> None:
    if eeg_format not in EEG_FORMATS:
        raise UsageError(f"--eeg-format must be one of {', '.join(EEG_FORMATS)} (got {eeg_format!r})")
    if volume_marker not in VOLUME_MARKERS:
        spelled = ", ".join(repr(m) if " " in m else m for m in VOLUME_MARKERS)
        raise UsageError(f"--volume-marker must be one of {spelled} (got {volume_marker!r})")
    if eeg_dtype not in EEG_DTYPES:
        raise UsageError(f"--eeg-dtype must be {' or '.join(EEG_DTYPES)} (got {eeg_dtype!r})")
    if eeg_dtype == "int16" and eeg_format != "vhdr":
        raise UsageError("--eeg-dtype int16 applies to --eeg-format vhdr only (EDF is 16-bit and BDF 24-bit)")


def _check_consistency(counts: dict, tr: float, sfreq: float, eeg_format: str) -> None:
    """Options that are each valid but do not fit together."""
    subjects, n_sources = counts["subjects"], counts["sources"]
    partial = counts["eeg_only_subjects"] + counts["bold_only_subjects"]
    if partial > subjects:
        raise UsageError(f"--eeg-only-subjects plus --bold-only-subjects ({partial}) exceed --subjects ({subjects})")
    if n_sources > MAX_SOURCES:
        raise UsageError(f"--sources must be at most {MAX_SOURCES} (got {n_sources})")
    top = max(s.band[1] for s in SOURCES[:n_sources])
    # the pink-noise filter and the oscillations must stay clear of Nyquist
    if top >= 0.45 * sfreq:
        raise UsageError(
            f"--sfreq {sfreq:g} is too low for {n_sources} sources (their bands reach {top:g} Hz); "
            f"use --sfreq > {top / 0.45:.0f} or fewer --sources"
        )
    if tr * sfreq < 2:
        raise UsageError(f"--tr {tr:g} s is shorter than two EEG samples at --sfreq {sfreq:g}")
    if eeg_format in ("edf", "bdf") and sfreq != int(sfreq):
        raise UsageError(f"--eeg-format {eeg_format} needs an integer --sfreq (got {sfreq:g})")


def _eeg_offset(offset, volume_marker: str) -> float:
    """The offset in seconds; ``None`` means :data:`EEG_OFFSET`, or 0 without markers."""
    given = offset
    if offset is None:
        offset = 0.0 if volume_marker == "none" else EEG_OFFSET
    try:
        offset = float(offset)
    except (TypeError, ValueError):
        offset = float("nan")
    if not np.isfinite(offset) or offset < 0:
        raise UsageError(f"--eeg-offset must be a number of seconds >= 0 (got {given!r})")
    return offset
