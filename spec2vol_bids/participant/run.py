"""Everything the participant level does for one run, and nothing left behind when it fails."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from spec2vol_bids.errors import DataError, OutputError, Spec2VolError, UsageError
from spec2vol_bids.naming import (TARGET_SUFFIX, build_name, parse_name, run_dir, run_key, run_label,
                                  sidecar_path, source_uri)
from spec2vol_bids.participant.result import RunResult
from spec2vol_bids.participant.spectrogram import eeg_entities, process_eeg, reuse_spectrogram
from spec2vol_bids.participant.target import process_bold

LOGGER = logging.getLogger(__name__)


def process_run(pair, config, model_tr: float | None = None) -> RunResult:
    """Everything the participant level does for one run (top level so processes can run it).

    The EEG comes first: its alignment to the volumes is where a run is most often refused, and
    it needs only the BOLD series' volume count (from its header). A run that fails leaves none
    of the outputs it wrote behind. A run whose inputs or options are refused (a
    :class:`Spec2VolError` before synthesis, other than a failed write) leaves none of its
    earlier ones either: they were made from inputs or options that no longer hold, and the
    group level would train on them. A model refused at synthesis leaves the run's derivatives
    as they were, unless this run had rewritten one of them (its recording changed): then the
    earlier ones, a synthesised series among them, were made from what is gone, and go too.
    """
    from spec2vol_bids.bids.metadata import repetition_time

    result = RunResult(label=pair.label, entities=pair.entities,
                       eeg=str(pair.eeg) if pair.eeg else None,
                       bold=str(pair.bold) if pair.bold else None)
    before = _own_outputs(pair, config.inputs.output_dir)
    synthesising = False
    try:
        tr, n_volumes = None, None
        if pair.bold is not None:
            tr = repetition_time(pair)
            n_volumes = _bold_volumes(pair, config.participant)
        if pair.eeg is not None and pair.eeg_is_spectrogram:
            reuse_spectrogram(pair, config, result)
        elif pair.eeg is not None:
            tr = tr if tr is not None else _eeg_only_tr(pair, config, model_tr)
            process_eeg(pair, config, tr, n_volumes, result)
        if pair.bold is not None:
            process_bold(pair, config, tr, result)
        if config.participant.model_path and pair.eeg is not None:
            synthesising = True
            _synthesize(pair, config, tr, result)
    except BaseException as error:
        # refused for its inputs or options, not for a failed write (a full disk)
        refused = isinstance(error, Spec2VolError) and not isinstance(error, OutputError)
        now = _own_outputs(pair, config.inputs.output_dir)
        rewritten = any(path in before and before[path] != stamp for path, stamp in now.items())
        everything = refused and (not synthesising or rewritten)
        stale = [path for path, stamp in now.items() if everything or before.get(path) != stamp]
        for path in stale:
            path.unlink(missing_ok=True)
        earlier = [path for path in stale if path in before]
        if everything and earlier:
            LOGGER.warning("%s: refused; its earlier derivatives are removed (%d files)", pair.label,
                           len(earlier))
        raise
    return result


def _own_outputs(pair, output_dir: Path) -> dict[Path, tuple]:
    """The run's files in OUTPUT_DIR (every one is ``<run>_desc-...``), with their identity."""
    folder = Path(output_dir) / f"sub-{pair.subject}"
    if not folder.is_dir():
        return {}
    found = {}
    for label in {pair.label, run_label(eeg_entities(pair))}:
        for path in folder.rglob(f"{label}_desc-*"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                found[path] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return found


def _bold_volumes(pair, settings) -> int:
    """The BOLD series' volume count, from its header; refused when too short to pair."""
    from spec2vol_bids import bold

    n_volumes = int(bold.load_bold(pair.bold).shape[3])
    needed = settings.discard_volumes + settings.context + 1
    if n_volumes < needed:
        context = "the model's context" if settings.model_path else "--context"
        raise DataError(f"the BOLD series has {n_volumes} volumes, fewer than the {needed} a run "
                        f"needs (--discard-volumes {settings.discard_volumes} + {context} "
                        f"{settings.context} + 1)", path=pair.bold)
    return n_volumes


def _eeg_only_tr(pair, config, model_tr: float | None) -> float:
    """The TR of a run without BOLD: its sidecar's, else its volume markers', else the model's."""
    from spec2vol_bids import eeg, triggers
    from spec2vol_bids.bids.metadata import eeg_repetition_time

    tr = eeg_repetition_time(pair)
    if tr is None:
        raw = eeg.read_eeg(pair.eeg, work_dir=config.execution.work_dir / "eeg" / pair.label)
        tr = triggers.marker_repetition_time(raw, pair.events_tsv, config.participant.volume_marker)
    tr = tr if tr is not None else model_tr
    if tr is None:
        raise DataError("this EEG run has no BOLD, no RepetitionTime in its sidecars, no volume "
                        "markers and no model to take one from; add RepetitionTime to its _eeg.json",
                        path=pair.eeg)
    return float(tr)


def synth_path(pair, output_dir: Path) -> Path:
    """Where a run's synthesised BOLD series goes."""
    return run_dir(output_dir, pair.entities, "func") / build_name(pair.entities, "bold", ".nii.gz",
                                                                  desc="synth")


def check_no_group_synthesis(pairs, output_dir: Path) -> None:
    """``--model`` never replaces the group level's held-out synthesis of a run (its sidecar
    holds the fold's metrics): group.html and group_metrics.tsv describe that one.

    Raises
    ------
    UsageError (64)
        Naming the run's series.
    """
    import json

    for pair in (p for p in pairs if p.eeg is not None):
        nii = synth_path(pair, output_dir)
        try:
            meta = json.loads(sidecar_path(nii).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and "Metrics" in meta:
            raise UsageError(f"OUTPUT_DIR holds the group level's held-out synthesis of this run "
                             f"(fold {meta.get('Fold')}), which its reports describe; apply the "
                             "model into another OUTPUT_DIR", path=nii)


def check_no_other_half(pairs, output_dir: Path) -> None:
    """A run with EEG only never gets its spectrogram written beside a BOLD target of a run of
    the same name in OUTPUT_DIR: that target came from another dataset (or from BOLD since
    removed), and the group level would pair the two. (BOLD without EEG is not processed.)

    Raises
    ------
    UsageError (64)
        Naming the target.
    """
    for pair in (p for p in pairs if p.eeg is not None and p.bold is None):
        folder = run_dir(output_dir, pair.entities, "func")
        for target in sorted(folder.glob(f"*{TARGET_SUFFIX}")) if folder.is_dir() else ():
            if run_key(parse_name(target.name)) == run_key(pair.entities):
                raise UsageError("OUTPUT_DIR holds a BOLD target of this run, which has no BOLD in "
                                 "BIDS_DIR: it comes from another dataset (or from BOLD since "
                                 "removed), and the group level would pair it with this EEG; give "
                                 "this dataset its own OUTPUT_DIR", path=target)


def _synthesize(pair, config, tr: float, result: RunResult) -> None:
    from spec2vol_bids import synthesize

    nii = synth_path(pair, config.inputs.output_dir)
    spectrogram = Path(result.spectrogram)
    try:
        synthesize.synthesize_from_checkpoint(
            config.participant.model_path, spectrogram, nii,
            target=Path(result.target) if result.target else None, tr=tr,
            sources=[source_uri(pair.eeg, config.inputs.bids_dir)])
    except DataError as error:
        if error.path != str(spectrogram):
            raise
        # the spectrogram may be removed with the run's other new files: name the recording
        raise DataError(error.reason, path=pair.eeg) from error
    result.synth = str(nii)
    LOGGER.info("%s: synthesised BOLD written to %s", pair.label, nii)
