"""The group level: cross-validation folds → training → evaluation → synthesis, final model.

Each fold holds out its test subject(s) completely: the EEG scaling, the training data and the
checkpoint selection never see them (``--select val`` holds out one more, *training*, subject).
Folds are independent jobs: ``--folds`` runs a subset (e.g. one per SLURM array task), a file
lock per fold lets concurrent jobs share one OUTPUT_DIR, a finished fold (its ``done.json`` is
written last) is skipped when :mod:`spec2vol_bids.finished` finds it made as asked now, and
whichever job finds every fold finished writes the group table.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from filelock import FileLock

from spec2vol_bids import devices, evaluate, linear, logs, oracle, synthesize, train
from spec2vol_bids.bold import spatial_code
from spec2vol_bids.config import LINEAR_MODELS, Config, Training, check_training
from spec2vol_bids.data import (PairedDataset, Run, cache_target, check_same_preprocessing, find_runs,
                                resolve_channels, subjects_of)
from spec2vol_bids.derivatives import (init_output_dataset, read_json, remove_stale_temporaries,
                                      source_dataset_name, write_json, write_text)
from spec2vol_bids.errors import DataError, MissingInputError, NothingSelectedError, UsageError
from spec2vol_bids.finished import (check_finished, folder_record, input_digests, is_done, lock_path,
                                    locked_once, protocol)
from spec2vol_bids.models import save_checkpoint
from spec2vol_bids.naming import (MASK_SUFFIX, SPACE_ENTITIES, TARGET_SUFFIX, build_name,
                                  dataset_root, parse_name, run_dir, sidecar_path, source_uri)

logger = logging.getLogger(__name__)

MEAN = "mean"


@dataclasses.dataclass
class Fold:
    """A train/test split: ``label`` names it (``models/fold-<label>``)."""

    label: str
    test: list[str]


def plan_folds(subjects: Sequence[str], split: str = "loso",
               test_subjects: Sequence[str] | None = None) -> list[Fold]:
    """Leave-one-subject-out folds (one per subject), or one ``fixed`` fold."""
    if split == "fixed":
        test = sorted({s.removeprefix("sub-") for s in test_subjects or []})
        if not test:
            raise UsageError("--split fixed needs --test-subjects")
        unknown = [s for s in test if s not in subjects]
        if unknown:
            raise UsageError(f"--test-subjects {' '.join(unknown)}: no paired EEG-BOLD derivatives "
                             f"for them (have: {' '.join(subjects)})")
        if len(test) == len(subjects):
            raise UsageError("--test-subjects names every subject; nothing is left to train on")
        return [Fold("fixed", test)]
    if split != "loso":
        raise UsageError(f"--split must be loso or fixed, not {split!r}")
    return [Fold(s, [s]) for s in subjects]


def split_validation(runs: Sequence[Run], select: str) -> tuple[list[Run], list[Run]]:
    """``(train, val)``: with ``select="val"`` the last training subject (sorted) is held out."""
    if select != "val":
        return list(runs), []
    subjects = subjects_of(runs)
    if len(subjects) < 2:
        raise DataError("--select val needs at least two training subjects in every fold")
    val = subjects[-1]
    return [r for r in runs if r.subject != val], [r for r in runs if r.subject == val]


def run_group(config: Config) -> int:
    """Run the group level as ``config`` asks; return 0.

    Raises
    ------
    Spec2VolError
        For missing derivatives, inconsistent channels or impossible options.
    """
    inputs, training = config.inputs, config.training
    out_dir, work_dir = inputs.output_dir, config.execution.work_dir
    torch.set_num_threads(config.execution.omp_nthreads)
    check_training(training)
    devices.set_deterministic(training.deterministic)  # before any GPU work
    # starts the process group under torchrun; an impossible --precision is refused now
    device = devices.resolve_device(training.device)
    devices.autocast_dtype(device, training.precision)
    if training.deterministic and device.type == "cuda" and "e2fnet" in {training.model, *training.compare}:
        raise UsageError("--deterministic: E2fNet's bicubic upsampling has no deterministic backward "
                         "pass on a GPU in PyTorch; leave out --deterministic, or E2fNet")
    runs = find_runs(out_dir, participant_label=inputs.participant_label,
                     session_label=inputs.session_label, task=inputs.task)
    paired = [r for r in runs if r.target is not None]
    if not paired:
        present = sorted(p.name for p in out_dir.glob("sub-*") if p.is_dir())
        hint = (f"the {len(runs)} run(s) found have no BOLD: the group level trains and scores "
                "models on runs with both" if runs else
                f"OUTPUT_DIR holds derivatives of {' '.join(present)} only; check "
                "--participant-label, --session-label and --task" if present and (
                    inputs.participant_label or inputs.session_label or inputs.task)
                else "run the participant level first")
        raise NothingSelectedError(f"no paired EEG spectrogram and BOLD target derivatives found; "
                                   f"{hint}", path=out_dir)
    _check_participants_finished(inputs.bids_dir, out_dir, inputs.participant_label)
    subjects = subjects_of(paired)
    if len(subjects) < 2:
        raise DataError(f"training needs at least two subjects with paired EEG and BOLD; found "
                        f"{len(subjects)} ({' '.join(subjects)})", path=out_dir)
    check_same_preprocessing(paired, out_dir)
    channels = resolve_channels(paired, training.channels)
    folds = plan_folds(subjects, training.split, training.test_subjects)
    chosen = _chosen_folds(folds, training.folds)
    models = list(dict.fromkeys([training.model, *training.compare]))
    final = not training.no_final and not training.folds
    digests = input_digests(paired)
    records = {_fold_dir(out_dir, fold.label): folder_record(training, models, channels, fold.test,
                                                             digests)
               for fold in folds}
    if final:
        records[out_dir / "models" / "final"] = folder_record(training, [training.model], channels,
                                                              [], digests)
    check_finished(records, {folder: _outputs(folder, record, paired, out_dir)
                             for folder, record in records.items()})
    _note_other_folds(out_dir, records, runs, paired)
    _check_no_applied_synthesis([r for r in paired if r.subject in
                                 {s for fold in chosen for s in fold.test}], out_dir)
    started = datetime.now(timezone.utc)
    if devices.is_main():
        init_output_dataset(out_dir, inputs.bids_dir)
        remove_stale_temporaries(work_dir)  # a checkpoint half-written by a killed run
        if config.execution.argv:  # the command line, not a library call
            logger.info("log: %s", logs.add_log_file(out_dir, "group", started))
    logger.info("group level: %d subjects, %d runs, %d channels; folds %s; models %s",
                len(subjects), len(paired), len(channels), " ".join(f.label for f in chosen),
                ", ".join(models + [MEAN]))

    for fold in chosen:
        folder = _fold_dir(out_dir, fold.label)
        locked_once(folder, records[folder],
                    lambda fold=fold: run_fold(fold, paired, channels, training, models,
                                               out_dir=out_dir, work_dir=work_dir,
                                               bids_dir=inputs.bids_dir))
    if devices.is_main() and all(is_done(_fold_dir(out_dir, f.label)) for f in folds):
        with FileLock(str(lock_path(out_dir / "models" / "group"))):
            aggregate(out_dir, [f.label for f in folds])
    elif devices.is_main():
        pending = [f.label for f in folds if not is_done(_fold_dir(out_dir, f.label))]
        logger.info("folds still to run: %s; the group table is written when all have finished",
                    " ".join(pending))
    if final:
        final_runs, final_val = split_validation(paired, training.select)
        locked_once(out_dir / "models" / "final", records[out_dir / "models" / "final"],
                    lambda: _train_final(final_runs, final_val, channels, training,
                                         out_dir=out_dir, work_dir=work_dir))
    if devices.is_main():
        _finish_reports(config, subjects, started)
    devices.barrier()
    return 0


def _check_participants_finished(bids_dir: Path, out_dir: Path, labels) -> None:
    """Every selected participant of BIDS_DIR with EEG has been through the participant level
    (it writes ``sub-<label>_runs.tsv`` when it is done with one): a job killed half-way, or
    an array task that never ran, would otherwise leave the folds and the final model to the
    participants that happen to be finished.

    Raises
    ------
    MissingInputError (66)
        Naming the participants without it.
    """
    if bids_dir is None or not Path(bids_dir).is_dir():
        return
    wanted = set(labels or ())
    with_eeg = sorted({p.name for p in Path(bids_dir).glob("sub-*")
                       if p.is_dir() and (not wanted or p.name[4:] in wanted)
                       and (any(p.glob("eeg")) or any(p.glob("ses-*/eeg")))})
    missing = [s for s in with_eeg if not (Path(out_dir) / s / f"{s}_runs.tsv").is_file()]
    if missing:
        raise MissingInputError(f"the participant level has not finished {' '.join(missing)} of "
                                f"BIDS_DIR (no {missing[0]}_runs.tsv): run it for them first, or "
                                "leave them out with --participant-label", path=out_dir)


def _note_other_folds(out_dir: Path, records: dict, runs: Sequence[Run], paired: Sequence[Run]) -> None:
    """Say which subjects this run leaves out (EEG only) and which fold folders of an earlier
    plan it does not score (a subject since dropped, another split): neither is in its tables
    or reports."""
    unpaired = sorted({r.subject for r in runs} - {r.subject for r in paired})
    if unpaired:
        logger.info("not in training or scores (EEG only): %s",
                    " ".join(f"sub-{s}" for s in unpaired))
    for folder in sorted((out_dir / "models").glob("fold-*")):
        if folder not in records and is_done(folder):
            logger.warning("%s is not one of this run's folds (its test subjects are not among "
                           "the paired runs found, or it is of another split); it is left out of "
                           "group_metrics.tsv and group.html", folder.relative_to(out_dir))


def _check_no_applied_synthesis(held_out: Sequence[Run], out_dir: Path) -> None:
    """The held-out synthesis of a run never replaces the series ``participant --model`` wrote
    for it (a sidecar without the fold's metrics): that came from another model, which the
    user may still need, and nothing would say it was gone.

    Raises
    ------
    UsageError (64)
        Naming the series.
    """
    for run in held_out:
        synth = held_out_paths(run, out_dir)[0]
        sidecar = sidecar_path(synth)
        if synth.exists() and "Metrics" not in (read_json(sidecar) if sidecar.is_file() else {}):
            raise UsageError("OUTPUT_DIR holds a series synthesised for this run by participant "
                             "--model, where the group level writes its held-out synthesis; move "
                             "it out of OUTPUT_DIR first", path=synth)


def _chosen_folds(folds: list[Fold], wanted: Sequence[str] | None) -> list[Fold]:
    """The folds ``--folds`` names (all without it)."""
    if not wanted:
        return folds
    unknown = sorted(set(wanted) - {f.label for f in folds})
    if unknown:
        raise UsageError(f"--folds {' '.join(unknown)}: no such fold (folds: "
                         f"{' '.join(f.label for f in folds)})")
    return [f for f in folds if f.label in set(wanted)]


def _finish_reports(config: Config, subjects: Sequence[str], started: datetime) -> None:
    """group.html, every participant's report (now with metrics and slices) and provenance."""
    from spec2vol_bids import provenance, report

    out_dir = config.inputs.output_dir
    for subject in subjects:
        report.write_participant_report(out_dir, subject.removeprefix("sub-"))
    settings = config.as_dict("group")
    logger.info("report: %s", report.write_group_report(out_dir, config=settings))
    provenance.write_provenance(
        out_dir, level="group", argv=list(config.execution.argv) or ["spec2vol"],
        config=settings, seeds={"seed": config.training.seed}, started=started,
        finished=datetime.now(timezone.utc), stages={"group": (started, datetime.now(timezone.utc))},
    )
    logger.info("group level done: derivatives, models and reports in %s", out_dir)


def _fold_dir(out_dir: Path, label: str) -> Path:
    return out_dir / "models" / f"fold-{label}"


def _outputs(folder: Path, record: dict, runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """What a finished ``folder`` wrote (its :func:`~spec2vol_bids.finished.folder_record` is
    ``record``): each model with its record and history, and for a fold its table and its test
    runs' held-out series."""
    folders = [folder] + [folder / name for name in record["Protocols"] if name != record["Model"]]
    models = [model / file for model in folders for file in ("model.pt", "model.json", "history.tsv")]
    if not record["TestSubjects"]:
        return models
    held_out = [path for run in runs if run.subject in record["TestSubjects"]
                for image in held_out_paths(run, out_dir)
                for path in (image, sidecar_path(image))]
    return [*models, folder / "metrics.tsv", *held_out]


def _train_final(train_runs, val_runs, channels, config, *, out_dir: Path, work_dir: Path) -> dict:
    """The all-subject model, ``models/final`` (what ``participant --model`` applies)."""
    train_and_save(train_runs, val_runs, channels, config, config.model, out_dir / "models" / "final",
                   work_dir=work_dir, checkpoint=work_dir / "checkpoints" / "final" / config.model,
                   extra={"Fold": "final", "TestSubjects": []})
    return {"Fold": "final", "TrainSubjects": subjects_of([*train_runs, *val_runs])}


def train_and_save(train_runs: Sequence[Run], val_runs: Sequence[Run], channels: Sequence[str],
                   config: Training, model_name: str, folder: Path, *, work_dir: Path,
                   checkpoint: Path, extra: dict) -> train.TrainResult:
    """Train one model and store it as ``folder/model.pt`` + ``model.json`` + ``history.tsv``."""
    fold = extra.get("Fold")
    label = f"{'final model' if fold == 'final' else f'fold {fold}'} {model_name}"
    linear_model = model_name in LINEAR_MODELS
    if linear_model:  # closed form; its inner cross-validation needs no validation split
        result = linear.fit_ridge([*train_runs, *val_runs], channels, work_dir=work_dir,
                                  model_name=model_name, description=label)
        fitting = {"TrainSubjects": subjects_of([*train_runs, *val_runs]), "ValSubjects": []}
    else:
        result = train.train(train_runs, channels, dataclasses.replace(config, model=model_name),
                             work_dir=work_dir, checkpoint=checkpoint / "checkpoint.pt",
                             val_runs=val_runs, description=label)
        fitting = {"TrainSubjects": subjects_of(train_runs), "ValSubjects": subjects_of(val_runs),
                   "Epochs": config.epochs, "Selection": config.select,
                   "SelectedEpoch": result.selected_epoch,
                   # how it computed (not part of Config: a fold may resume on another device)
                   "Precision": "fp32" if result.autocast is None else "bf16",
                   "Deterministic": config.deterministic}
    if not devices.is_main():
        return result
    ref = train_runs[0]
    target_img = _target_header(ref)
    meta = {
        **extra,
        "Model": model_name,
        "Config": protocol(config, model_name),
        "Channels": list(channels),
        "NormStats": result.norm,
        **fitting,
        "RepetitionTime": float(ref.meta["RepetitionTime"]),
        "Context": ref.context,
        "DiscardVolumes": _discarded([*train_runs, *val_runs]),
        "TargetShape": list(target_img.shape[:3]),
        "TargetAffine": target_img.affine.tolist(),
        "TargetSpatialCode": spatial_code(target_img.header),
        # EEG-only synthesis places its volumes on this run's grid: say whose, and how far the
        # other training runs' grids lie from it
        "TargetAffineFrom": ref.name,
        # subject labels say "in-sample" only within one dataset
        "TrainingDataset": source_dataset_name(dataset_root(ref.spectrogram)),
        "TargetGridSpreadMm": _grid_spread([*train_runs, *val_runs], target_img),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "model.pt", result.model, model_name=model_name, channels=list(channels),
                    norm_stats=result.norm, extra=meta)
    write_json(folder / "model.json", meta)
    history = pd.DataFrame(result.history, columns=list(train.HISTORY_COLUMNS))
    write_text(folder / "history.tsv", history.to_csv(sep="\t", index=False, na_rep="n/a",
                                                      float_format="%.6g"))
    logger.info("%s: model written to %s%s", label, folder / "model.pt",
                "" if linear_model else f" (epoch {result.selected_epoch} selected)")
    return result


def _discarded(runs: Sequence[Run]) -> int | dict[str, int]:
    """The volumes discarded before the runs' first samples: one number when the participant
    level discarded as many in every run, else each run's."""
    counts = {run.discard for run in runs}
    return counts.pop() if len(counts) == 1 else {run.name: run.discard for run in runs}


def _target_header(run: Run) -> nib.Nifti1Image:
    return nib.load(run.target)


def _grid_spread(runs: Sequence[Run], ref: nib.Nifti1Image) -> float:
    """How far (mm) the corners of the runs' target grids lie, at most, from those of ``ref``:
    0 when every run is on one grid (a template space), the head's displacement between
    sessions and subjects in scanner space."""
    shape = np.array(ref.shape[:3]) - 1
    corners = np.array([[i, j, k, 1] for i in (0, shape[0]) for j in (0, shape[1])
                        for k in (0, shape[2])], dtype=float).T
    at = ref.affine @ corners
    spread = max(float(np.max(np.linalg.norm((_target_header(run).affine @ corners - at)[:3], axis=0)))
                 for run in runs)
    return round(spread, 3)


def run_fold(fold: Fold, paired: Sequence[Run], channels: Sequence[str], config: Training,
             models: Sequence[str], *, out_dir: Path, work_dir: Path,
             bids_dir: Path | None = None) -> dict:
    """Train, evaluate and synthesise one fold; write ``models/fold-<label>/metrics.tsv``."""
    folder = _fold_dir(out_dir, fold.label)
    training = [r for r in paired if r.subject not in fold.test]
    testing = [r for r in paired if r.subject in fold.test]
    train_runs, val_runs = split_validation(training, config.select)
    extra = {"Fold": fold.label, "TestSubjects": list(fold.test)}
    trained = {}
    for name in models:
        sub = folder if name == config.model else folder / name
        trained[name] = train_and_save(train_runs, val_runs, channels, config, name, sub,
                                       work_dir=work_dir,
                                       checkpoint=work_dir / "checkpoints" / f"fold-{fold.label}" / name,
                                       extra=extra)
    if not devices.is_main():
        return {}
    device = devices.resolve_device(config.device)
    # the mean-volume baseline averages every training subject's targets (validation included)
    mean_volume = PairedDataset(training, channels, trained[config.model].norm, work_dir).mean_target()
    rows = []
    for subject in fold.test:
        per_model = {name: [] for name in [*models, MEAN]}
        subject_runs = [r for r in testing if r.subject == subject]
        ceilings = [oracle.truth_regressors(bids_dir, run) for run in subject_runs]
        if all(c is not None for c in ceilings):  # a simulated dataset: its ground truth's ceiling
            per_model[oracle.ORACLE] = []
        for run, regressors in zip(subject_runs, ceilings):
            for name in per_model:
                result = evaluate_model_on_run(run, channels, trained.get(name), mean_volume,
                                               work_dir=work_dir, device=device,
                                               regressors=regressors if name == oracle.ORACLE else None)
                per_model[name].append(result)
                if name == config.model:
                    write_run_outputs(run, result, out_dir=out_dir, model_name=name, fold=fold.label,
                                      model_path=folder / "model.pt")
        for name, results in per_model.items():
            rows.append(evaluate.subject_row(subject, name, fold.label, results))
            logger.info("fold %s sub-%s %s: SSIM %.3f, PSNR %.2f, dynamics %.3f", fold.label,
                        subject, name, rows[-1]["ssim"], rows[-1]["psnr"], rows[-1]["dynamics"])
    evaluate.write_table(rows, folder / "metrics.tsv")
    return {"Fold": fold.label, "TestSubjects": list(fold.test),
            "Models": list(dict.fromkeys(row["model"] for row in rows))}


def evaluate_model_on_run(run: Run, channels: Sequence[str], result: train.TrainResult | None,
                          mean_volume: np.ndarray, *, work_dir: Path, device: torch.device,
                          regressors: np.ndarray | None = None) -> dict:
    """Predictions and metrics of a trained model (in the arithmetic it was trained in), of the
    mean volume (``result`` None) or, given the simulation's true ``regressors``, of the oracle
    ceiling."""
    target = np.load(cache_target(run.target, work_dir), mmap_mode="r")[run.sample_volumes]
    target = np.asarray(target, dtype=np.float32)
    if regressors is not None:
        pred = oracle.oracle_prediction(regressors, target)
    elif result is None:
        pred = np.broadcast_to(mean_volume, target.shape)
    else:
        dataset = PairedDataset([run], channels, result.norm, work_dir)
        loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)
        pred = synthesize.predict(result.model, loader, device, result.autocast)
    metrics = evaluate.evaluate_run(pred, target, _target_header(run).affine, mask=_run_mask(run))
    metrics["pred"] = pred
    return metrics


def _run_mask(run: Run) -> np.ndarray | None:
    """The ``desc-brain_mask`` the participant level wrote beside the target, as ``(D, H, W)``."""
    path = run.target.with_name(run.target.name.replace(TARGET_SUFFIX, MASK_SUFFIX))
    if not path.is_file():
        return None
    return np.asarray(nib.load(path).dataobj).astype(bool).transpose(2, 0, 1)


def write_run_outputs(run: Run, result: dict, *, out_dir: Path, model_name: str, fold: str,
                      model_path: Path) -> None:
    """``desc-synth_bold.nii.gz`` and ``desc-dynamics_statmap.nii.gz`` of a held-out run.

    They keep the target's ``space``/``res`` entities, so they overlay on the same template.
    """
    img = _target_header(run)
    synth, statmap = held_out_paths(run, out_dir)
    sources = [source_uri(p, out_dir, dataset="") for p in (run.spectrogram, run.target, model_path)]
    metrics = {"SSIM": float(result["ssim"].mean()), "PSNR": float(result["psnr"].mean()),
               "SSIM3D": float(result["ssim3d"].mean()), "Dynamics": result["dynamics"]}
    synthesize.write_synth(result["pred"], synth,
                           affine=img.affine, tr=float(run.meta["RepetitionTime"]),
                           first_volume=int(run.sample_volumes[0]), spatial_code=spatial_code(img.header),
                           sidecar={"Model": model_name, "Fold": fold, "Sources": sources,
                                    "Metrics": metrics})
    synthesize.write_statmap(
        result["dynamics_map"], statmap,
        affine=img.affine, spatial_code=spatial_code(img.header),
        sidecar={"Description": "Voxel-wise Pearson correlation of the synthesised and measured BOLD "
                                "time series (each voxel's mean removed); 0 outside the brain mask "
                                "computed from the measured mean volume and where a series is constant.",
                 "Model": model_name, "Fold": fold, "Sources": sources,
                 "SourceVolumes": [int(run.sample_volumes[0]), int(run.sample_volumes[-1])],
                 "MeanInMask": result["dynamics"]})


def held_out_paths(run: Run, out_dir: Path) -> tuple[Path, Path]:
    """Where a held-out run's synthesised series and dynamics map go (``desc-synth_bold``,
    ``desc-dynamics_statmap``), with the target's space entities (``space``, ``cohort``,
    ``res``)."""
    entities = {**run.entities, **{k: v for k, v in parse_name(run.target.name).items()
                                   if k in SPACE_ENTITIES}}
    folder = run_dir(out_dir, entities, "func")
    return (folder / build_name(entities, "bold", ".nii.gz", desc="synth"),
            folder / build_name(entities, "statmap", ".nii.gz", desc="dynamics"))


def aggregate(out_dir: Path, labels: Sequence[str]) -> dict:
    """Concatenate the folds' tables into ``group_metrics.tsv`` and summarise per model."""
    tables = [evaluate.read_table(_fold_dir(out_dir, label) / "metrics.tsv") for label in labels]
    table = pd.concat(tables, ignore_index=True)
    summary = evaluate.summarise(table)
    # group_metrics.json is both the TSV's column sidecar and the per-model summary
    evaluate.write_table(table.to_dict("records"), out_dir / "group_metrics.tsv",
                         sidecar={"Folds": list(labels), "Summary": summary})
    logger.info("group metrics (mean ± std over %d subjects):\n%s", len(table["participant_id"].unique()),
                "\n".join(evaluate.summary_lines(summary)))
    return summary
