"""What processing one run produced."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunResult:
    """What processing one run produced, for the inventory, the report and the log."""

    label: str
    entities: dict
    eeg: str | None = None
    bold: str | None = None
    spectrogram: str | None = None
    target: str | None = None
    synth: str | None = None
    n_windows: int | None = None
    n_volumes: int | None = None
    channels: list = field(default_factory=list)
    dropped_channels: list = field(default_factory=list)
    marker: str | None = None
    t0: float | None = None
    skipped: bool = False
