"""The participant level: run pairs → EEG spectrograms and BOLD targets → derivatives.

For every selected run this writes the TR-window spectrogram of its EEG
(:mod:`.spectrogram`) and, when the run has BOLD, the normalised, resampled target series
(:mod:`.target`), then per participant the pairing inventory, QC figures and the HTML report.
With ``--model`` it also synthesises BOLD from the EEG of every run, EEG-only participants
included. Re-running skips runs whose outputs are up to date (:mod:`.freshness`).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from spec2vol_bids import __version__
from spec2vol_bids.config import MODELS
from spec2vol_bids.derivatives import check_same_source, init_output_dataset, write_text
from spec2vol_bids.errors import MissingInputError, Spec2VolError, UsageError
from spec2vol_bids.participant.result import RunResult
from spec2vol_bids.participant.run import check_no_group_synthesis, check_no_other_half, process_run
from spec2vol_bids.participant.spectrogram import check_spectrogram_inputs
from spec2vol_bids.participant.target import fetch_templates

LOGGER = logging.getLogger(__name__)

__all__ = ["RunResult", "process_run", "run_participant"]


def run_participant(config) -> int:
    """Run the participant level for the selected participants; return the exit code."""
    from spec2vol_bids import logs, provenance, report
    from spec2vol_bids.bids import filters, pairing
    from spec2vol_bids.bids.runs import format_pair_table

    started = datetime.now(timezone.utc)
    inputs = config.inputs
    bids_filters = filters.load_bids_filters(inputs.bids_filter_file) if inputs.bids_filter_file else None
    pairs, notes = pairing.find_run_pairs(
        inputs.bids_dir, participant_labels=inputs.participant_label,
        session_labels=inputs.session_label, task=inputs.task, bids_filters=bids_filters,
        eeg_derivatives=inputs.eeg_derivatives, bold_derivatives=inputs.bold_derivatives,
        bold_space=inputs.bold_space)
    model_tr, model_bins, model_context, model_grid = _read_model(config.participant.model_path)
    # the model reads its own context and bins and synthesises its own grid
    config = _at_model(config, "context", model_context,
                       f"reads {model_context} TR windows of EEG before each volume")
    config = _at_model(config, "target_grid", model_grid,
                       f"synthesises volumes on a {'x'.join(map(str, model_grid or ()))} grid")
    check_spectrogram_inputs(pairs, config, model_bins)
    if config.participant.fmax is None:  # --fmax decides the bins (checked at synthesis)
        config = _at_model(config, "freq_bins", model_bins,
                           f"was trained on {model_bins} frequency bins")
    if config.participant.model_path:
        check_no_group_synthesis(pairs, inputs.output_dir)
    check_same_source(inputs.output_dir, inputs.bids_dir)
    for option, folders in (("--eeg-derivatives", [inputs.eeg_derivatives]),
                            ("--bold-derivatives", inputs.bold_derivatives or [])):
        for folder in (f for f in folders if f is not None):
            check_same_source(folder, inputs.bids_dir, option)
    check_no_other_half(pairs, inputs.output_dir)
    fetch_templates(pairs)
    init_output_dataset(inputs.output_dir, inputs.bids_dir)
    LOGGER.info("spec2vol %s participant level; log: %s", __version__,
                logs.add_log_file(inputs.output_dir, "participant", started))
    LOGGER.info("runs found:\n%s", format_pair_table(pairs))
    for text in notes:
        LOGGER.warning("%s", text)

    pairs = [p for p in pairs if p.eeg is not None or p.bold is not None]
    results, failed = _run_all(pairs, config, model_tr)

    subjects = sorted({r.entities["subject"] for r in results} | {p.subject for p, _ in failed})
    for subject in subjects:
        _inventory(inputs.output_dir, subject, [r for r in results if r.entities["subject"] == subject],
                   [(p, e) for p, e in failed if p.subject == subject], notes)
        LOGGER.info("report: %s", report.write_participant_report(inputs.output_dir, subject))
    provenance.write_provenance(
        inputs.output_dir, level="participant", argv=list(config.execution.argv),
        config=config.as_dict("participant"), seeds={}, started=started,
        finished=datetime.now(timezone.utc), stages={
            "runs": [dataclasses.asdict(r) for r in results],
            "failed": {pair.label: str(error) for pair, error in failed}})
    if failed:
        raise _summary(failed, len(pairs))
    LOGGER.info("participant level done: %d runs of %d participants in %s", len(results),
                len(subjects), inputs.output_dir)
    return 0


def _run_all(pairs, config, model_tr) -> tuple[list[RunResult], list[tuple]]:
    """Every run, one's refusal not stopping the others: the results and ``(pair, error)`` of
    the runs refused (each leaves nothing behind, see :func:`process_run`)."""
    nprocs = min(config.execution.nprocs, len(pairs))
    if nprocs > 1:
        with ProcessPoolExecutor(max_workers=nprocs) as pool:
            futures = [pool.submit(process_run, pair, config, model_tr) for pair in pairs]
            outcomes = [_outcome(future.result) for future in futures]
    else:
        outcomes = [_outcome(lambda pair=pair: process_run(pair, config, model_tr)) for pair in pairs]
    failed = [(pair, error) for pair, (_, error) in zip(pairs, outcomes) if error is not None]
    for pair, error in failed:
        LOGGER.error("%s: refused: %s", pair.label, error)
    return [result for result, error in outcomes if error is None], failed


def _outcome(call) -> tuple[RunResult | None, Spec2VolError | None]:
    try:
        return call(), None
    except Spec2VolError as error:  # a user's problem with this run; anything else stops all
        return None, error


def _summary(failed: list[tuple], n_runs: int) -> Spec2VolError:
    """The first refusal, with how many runs were refused and done when there were several."""
    error = failed[0][1]
    if n_runs == 1:
        return error
    more = f" ({len(failed) - 1} more refused: see the log)" if len(failed) > 1 else ""
    return type(error)(f"{error}{more}; {n_runs - len(failed)} of {n_runs} runs are done: fix it "
                       "and rerun (finished runs are skipped), or leave it out with "
                       "--participant-label or --bids-filter-file", code=error.code)


def _read_model(path: Path | None) -> tuple[float | None, int | None, int | None, tuple | None]:
    """``--model``, read once before any output is written: its TR, frequency bin count,
    context and target grid."""
    if path is None:
        return None, None, None, None
    from spec2vol_bids.models import load_checkpoint  # torch: only a run with --model needs it

    if path.is_dir():
        raise MissingInputError(f"a folder, not a model file; give the model.pt in it "
                                f"({path / 'model.pt'})", path=path)
    if not path.is_file():
        named = f" (a name such as {path.name} is for the group level)" if path.name in MODELS else ""
        raise MissingInputError(f"model file not found{named}; give the model.pt written by the "
                                "group level (OUTPUT_DIR/models/final/model.pt)", path=path)
    _, meta = load_checkpoint(path)
    extra = meta.get("extra") or {}
    grid = tuple(int(n) for n in extra["TargetShape"]) if extra.get("TargetShape") else None
    return (extra.get("RepetitionTime"), int(meta["config"]["freq_bins"]),
            int(meta["config"]["context"]), grid)


def _at_model(config, name: str, value, has: str):
    """``config`` with the model's ``value`` of the participant setting ``name`` unless its
    option was given; another value is refused (64: two choices the user made disagree), as
    the model ``has`` its own (the message's words)."""
    if value is None:
        return config
    settings = config.participant
    given = getattr(settings, name)
    given = tuple(given) if isinstance(given, list) else given
    if given is not None and given != value:
        option = "--" + name.replace("_", "-")
        shown = " ".join(map(str, given)) if isinstance(given, tuple) else given
        raise UsageError(f"the model {has} but {option} {shown} was given; leave {option} out to use "
                         "the model's", path=settings.model_path)
    return dataclasses.replace(config, participant=dataclasses.replace(settings, **{name: value}))


def _inventory(out_dir: Path, subject: str, results: list[RunResult], failed: list[tuple],
               notes: list[str]) -> Path:
    """``sub-<label>/sub-<label>_runs.tsv``: what was found, paired, produced or refused for a
    participant."""
    lines = ["run\teeg\tbold\tstatus\tnote"]
    for r in results:
        status = "paired" if r.eeg and r.bold else ("eeg-only" if r.eeg else "bold-only")
        note = f"{r.n_windows} windows, {len(r.channels)} channels" if r.n_windows else ""
        if r.skipped:
            note += " (up to date)"
        lines.append("\t".join([r.label, r.eeg or "n/a", r.bold or "n/a", status, note.strip()]))
    for pair, error in failed:
        lines.append("\t".join([pair.label, str(pair.eeg or "n/a"), str(pair.bold or "n/a"), "refused",
                                str(error).replace("\t", " ")]))
    for text in notes:
        if f"sub-{subject}" in text:
            lines.append("\t".join(["n/a", "n/a", "n/a", "note", text.replace("\t", " ")]))
    return write_text(out_dir / f"sub-{subject}" / f"sub-{subject}_runs.tsv", "\n".join(lines) + "\n")
