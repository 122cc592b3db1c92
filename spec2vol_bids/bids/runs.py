"""A run of the dataset: its EEG recording, its BOLD series and the sidecars that apply."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from spec2vol_bids.naming import RUN_ENTITIES, SPACE_ENTITIES, SPECTROGRAM_SUFFIX, run_label


@dataclass(frozen=True)
class RunPair:
    """One run: its EEG recording and, when the dataset has one, its BOLD series.

    Parameters
    ----------
    subject, session, task, acquisition, run : str | None
        The run's entities, as spelled in the EEG file name (the BOLD file's when there is no
        EEG). ``session``, ``acquisition`` and ``run`` are ``None`` when absent.
    eeg, bold : Path | None
        The EEG recording (for BrainVision, the ``.vhdr``), or the spectrogram a previous spec2vol
        run wrote of it (see :attr:`eeg_is_spectrogram`), and the BOLD NIfTI.
    bids_root : Path | None
        The root of the dataset holding ``eeg``: BIDS_DIR, or the EEG derivative folder.
    eeg_from_derivatives : bool
        Whether ``eeg`` comes from the EEG derivative folder.
    eeg_sidecars, bold_sidecars : tuple of Path
        The ``*_eeg.json`` / ``*_bold.json`` files that apply to the run by the BIDS inheritance
        principle, most general first. For an EEG-only run ``bold_sidecars`` holds the BOLD
        sidecars its BOLD run would inherit (e.g. a top-level ``task-rest_bold.json``).
    channels_tsv, events_tsv : Path | None
        The EEG recording's ``*_channels.tsv`` and ``*_events.tsv``.
    space, cohort, res : str | None
        The ``space-``, ``cohort-`` and ``res-`` entities of preprocessed BOLD taken from a
        derivative dataset (``--bold-derivatives``); ``None`` for raw BOLD.
    bold_mask : Path | None
        The derivative's ``*_desc-brain_mask.nii.gz`` of that BOLD series, when it has one.
    """

    subject: str
    session: str | None
    task: str
    acquisition: str | None
    run: str | None
    eeg: Path | None
    bold: Path | None
    bids_root: Path | None = None
    eeg_from_derivatives: bool = False
    eeg_sidecars: tuple[Path, ...] = field(default=())
    bold_sidecars: tuple[Path, ...] = field(default=())
    channels_tsv: Path | None = None
    events_tsv: Path | None = None
    space: str | None = None
    cohort: str | None = None
    res: str | None = None
    bold_mask: Path | None = None

    @property
    def entities(self) -> dict[str, str]:
        """The entities that are set, among subject, session, task, acquisition, run, space,
        cohort and res (the last three name the BOLD outputs' space; EEG outputs leave them
        out)."""
        return {name: getattr(self, name) for name in (*RUN_ENTITIES, *SPACE_ENTITIES)
                if getattr(self, name) is not None}

    @property
    def eeg_is_spectrogram(self) -> bool:
        """Whether ``eeg`` is a spec2vol spectrogram (``--eeg-derivatives`` pointing at a spec2vol
        output dataset) rather than a recording."""
        return self.eeg is not None and self.eeg.name.endswith(SPECTROGRAM_SUFFIX)

    @property
    def label(self) -> str:
        """The run's name stem, e.g. ``sub-01_ses-1_task-rest_run-1``."""
        return run_label(self.entities)

    @property
    def eeg_json(self) -> Path | None:
        """The most specific ``*_eeg.json`` that applies, if any."""
        return self.eeg_sidecars[-1] if self.eeg_sidecars else None

    @property
    def bold_json(self) -> Path | None:
        """The most specific ``*_bold.json`` that applies, if any."""
        return self.bold_sidecars[-1] if self.bold_sidecars else None


def format_pair_table(pairs: Iterable[RunPair]) -> str:
    """A plain-text table of the runs found, one line per run, for the log."""
    pairs = list(pairs)
    rows = [("run", "EEG", "EEG from", "BOLD")]
    for p in pairs:
        rows.append((p.label, p.eeg.name if p.eeg else "-",
                     ("spectrogram" if p.eeg_is_spectrogram else "derivatives")
                     if p.eeg_from_derivatives else "raw",
                     p.bold.name if p.bold else "- (EEG only)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    n_paired = sum(1 for p in pairs if p.bold is not None)
    lines.append(f"{len(pairs)} runs: {n_paired} with BOLD, {len(pairs) - n_paired} EEG only")
    return "\n".join(lines)
