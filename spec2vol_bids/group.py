"""The group level: cross-validation folds → training → evaluation → synthesis, final model.

Each fold holds out its test subject(s) completely: the EEG scaling, the training data and the
checkpoint selection never see them (``--select val`` holds out one more, *training*, subject).
Folds are independent jobs: ``--folds`` runs a subset (e.g. one per SLURM array task), a file
lock per fold lets concurrent jobs share one OUTPUT_DIR, a finished fold (its ``done.json`` is
written last) is skipped, and whichever job finds every fold finished writes the group table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from filelock import FileLock

from spec2vol_bids import evaluate, linear, logs, oracle, synthesize, train
from spec2vol_bids.config import LINEAR_MODELS, Config, Training, check_training
from spec2vol_bids.data import (PairedDataset, Run, cache_target, check_same_preprocessing, find_runs,
                                resolve_channels, run_digest, subjects_of)
from spec2vol_bids.derivatives import init_output_dataset, write_json, write_text
from spec2vol_bids.errors import DataError, NothingSelectedError, UsageError
from spec2vol_bids.models import save_checkpoint
from spec2vol_bids.naming import MASK_SUFFIX, TARGET_SUFFIX, build_name, parse_name, run_dir, source_uri

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
    train.resolve_device(training.device)  # starts the process group under torchrun
    runs = find_runs(out_dir, participant_label=inputs.participant_label,
                     session_label=inputs.session_label, task=inputs.task)
    paired = [r for r in runs if r.target is not None]
    if not paired:
        raise NothingSelectedError("no paired EEG spectrogram and BOLD target derivatives found; "
                                   "run the participant level first", path=out_dir)
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
    records = {out_dir / "models" / f"fold-{fold.label}": _record(training, models, channels,
                                                                  fold.test, paired)
               for fold in folds}
    if final:
        records[out_dir / "models" / "final"] = _record(training, [training.model], channels, [],
                                                        paired)
    _check_finished(records)
    started = datetime.now(timezone.utc)
    if train.is_main():
        init_output_dataset(out_dir, inputs.bids_dir)
        if config.execution.argv:  # the command line, not a library call
            logger.info("log: %s", logs.add_log_file(out_dir, "group"))
    logger.info("group level: %d subjects, %d runs, %d channels; folds %s; models %s",
                len(subjects), len(paired), len(channels), " ".join(f.label for f in chosen),
                ", ".join(models + [MEAN]))

    for fold in chosen:
        folder = out_dir / "models" / f"fold-{fold.label}"
        _locked_once(folder, records[folder],
                     lambda fold=fold: run_fold(fold, paired, channels, training, models,
                                                out_dir=out_dir, work_dir=work_dir,
                                                bids_dir=inputs.bids_dir))
    if train.is_main() and all(_done(out_dir, f.label) for f in folds):
        with FileLock(str(_lock_path(out_dir / "models" / "group"))):
            aggregate(out_dir, [f.label for f in folds])
    elif train.is_main():
        pending = [f.label for f in folds if not _done(out_dir, f.label)]
        logger.info("folds still to run: %s; the group table is written when all have finished",
                    " ".join(pending))
    if final:
        final_runs, final_val = split_validation(paired, training.select)
        _locked_once(out_dir / "models" / "final", records[out_dir / "models" / "final"],
                     lambda: _train_final(final_runs, final_val, channels, training,
                                          out_dir=out_dir, work_dir=work_dir))
    if train.is_main():
        _finish_reports(config, subjects, started)
    train.barrier()
    return 0


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
    # the participant settings were the participant level's (its own logs record them)
    settings = {k: v for k, v in config.as_dict().items() if k != "participant"}
    logger.info("report: %s", report.write_group_report(out_dir, config=settings))
    provenance.write_provenance(
        out_dir, level="group", argv=list(config.execution.argv) or ["spec2vol"],
        config=settings, seeds={"seed": config.training.seed}, started=started,
        finished=datetime.now(timezone.utc), stages={"group": (started, datetime.now(timezone.utc))},
    )
    logger.info("group level done: derivatives, models and reports in %s", out_dir)


def _train_final(train_runs, val_runs, channels, config, *, out_dir: Path, work_dir: Path) -> dict:
    """The all-subject model, ``models/final`` (what ``participant --model`` applies)."""
    train_and_save(train_runs, val_runs, channels, config, config.model, out_dir / "models" / "final",
                   work_dir=work_dir, checkpoint=work_dir / "checkpoints" / "final" / config.model,
                   extra={"Fold": "final", "TestSubjects": []})
    return {"Fold": "final", "TrainSubjects": subjects_of([*train_runs, *val_runs])}


def _lock_path(folder: Path) -> Path:
    """The lock of ``folder``: next to it in OUTPUT_DIR, so every job writing there sees it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder.parent / f".{folder.name}.lock"


def _done(out_dir: Path, label: str) -> bool:
    return (out_dir / "models" / f"fold-{label}" / "done.json").exists()


def _locked_once(folder: Path, record: dict, job) -> None:
    """Run ``job`` unless ``folder/done.json`` exists, holding a lock; then write the marker.

    The marker keeps ``record`` (:func:`_record`). A finished folder is kept only when it was
    made as asked now, from the same derivatives; otherwise the run is refused rather than
    mixing two protocols or two versions of the data in one table. Under torchrun rank 0 takes
    the lock and decides; every rank runs the job (training is collective) and only rank 0
    writes.
    """
    lock = FileLock(str(_lock_path(folder))) if train.is_main() else contextlib.nullcontext()
    with lock:
        skip = _broadcast((folder / "done.json").exists())
        if skip:
            _check_same_record(folder, record)
            logger.info("%s is finished; skipping it (delete the folder to redo it)", folder)
            return
        info = job() or {}
        if train.is_main():
            write_json(folder / "done.json", {**info, **record,
                                              "Finished": datetime.now(timezone.utc).isoformat()})
        train.barrier()


def _record(training: Training, models: Sequence[str], channels: Sequence[str],
            test: Sequence[str], runs: Sequence[Run]) -> dict:
    """What a folder of trained models is made from: the group's model, each model's protocol
    (:func:`_protocol`), the channels, the test subjects and a digest of every run's
    participant-level derivatives."""
    return {"Model": training.model, "Protocols": {name: _protocol(training, name) for name in models},
            "Channels": list(channels), "TestSubjects": list(test),
            "Inputs": {run.name: run_digest(run) for run in runs}}


def _check_finished(records: dict[Path, dict]) -> None:
    """Before anything is trained: refuse when a finished folder of this run (every fold, and
    the final model when it is made) was made otherwise; name every such folder."""
    found = [(folder, _record_mismatch(folder, record)) for folder, record in records.items()
             if (folder / "done.json").exists()]
    found = [(folder, mismatch) for folder, mismatch in found if mismatch]
    if found:
        (folder, (error, text)), others = found[0], [f.name for f, _ in found[1:]]
        also = f" (so were {', '.join(others)})" if others else ""
        raise error(f"{text}{also}", path=folder)


def _check_same_record(folder: Path, record: dict) -> None:
    """Refuse a finished ``folder`` made otherwise than ``record`` says the run would make it."""
    mismatch = _record_mismatch(folder, record)
    if mismatch:
        error, text = mismatch
        raise error(text, path=folder)


def _record_mismatch(folder: Path, record: dict) -> tuple[type, str] | None:
    """How a finished ``folder`` differs from ``record``: the error to raise and its text."""
    try:
        done = json.loads((folder / "done.json").read_text())
    except (OSError, ValueError):
        return DataError, "its done.json is unreadable; delete that folder to retrain it"
    retrain = "delete that folder to retrain it, use another OUTPUT_DIR, or"
    if not isinstance(done, dict) or not isinstance(done.get("Protocols"), dict):
        return UsageError, ("made by an earlier spec2vol, which did not record its models, options "
                            "and derivatives; delete that folder to retrain it, or use another "
                            "OUTPUT_DIR")
    stored = done["Protocols"]
    if done.get("Model") != record["Model"] or set(stored) != set(record["Protocols"]):
        return UsageError, (f"trained for the models {', '.join(sorted(stored))} (group model "
                            f"{done.get('Model')}), not {', '.join(sorted(record['Protocols']))} "
                            f"(group model {record['Model']}); {retrain} ask for the models it "
                            "was trained for")
    differ = [f"{name}: {key} {stored[name].get(key, 'unrecorded')!r} there, {value!r} now"
              for name, asked in record["Protocols"].items() for key, value in asked.items()
              if stored[name].get(key) != value]
    if differ:
        return UsageError, (f"trained with other options ({'; '.join(differ)}); {retrain} give "
                            "the options it was trained with")
    for key, what in (("Channels", "channels"), ("TestSubjects", "test subjects")):
        if done.get(key) != record[key]:
            return UsageError, (f"trained with other {what} ({' '.join(done.get(key) or [])} "
                                f"there, {' '.join(record[key])} now); {retrain} give the ones it "
                                "was trained with")
    inputs, now = done.get("Inputs") or {}, record["Inputs"]
    changes = [(what, names) for what, names in (
        ("remade since", [n for n in now if n in inputs and inputs[n] != now[n]]),
        ("not there then", [n for n in now if n not in inputs]),
        ("not selected now", [n for n in inputs if n not in now])) if names]
    if changes:
        shown = "; ".join(f"{what}: {' '.join(names)}" for what, names in changes)
        return DataError, (f"trained on other participant-level derivatives ({shown}); {retrain} "
                           "select the runs it was trained on, as they were")
    return None


def _protocol(config: Training, model_name: str) -> dict:
    """What shaped ``model_name``'s fit: the network's training settings, or for a linear model
    (closed form, run-standardised EEG) nothing but its name."""
    if model_name in LINEAR_MODELS:
        return {"model": model_name, "eeg_normalisation": "run"}
    return {name: getattr(dataclasses.replace(config, model=model_name), name)
            for name in train.PROTOCOL}


def _broadcast(value):
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


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
                   "SelectedEpoch": result.selected_epoch}
    if not train.is_main():
        return result
    ref = train_runs[0]
    target_img = _target_header(ref)
    meta = {
        **extra,
        "Model": model_name,
        "Config": _protocol(config, model_name),
        "Channels": list(channels),
        "NormStats": result.norm,
        **fitting,
        "RepetitionTime": float(ref.meta["RepetitionTime"]),
        "Context": ref.context,
        "DiscardVolumes": ref.discard,
        "TargetShape": list(target_img.shape[:3]),
        "TargetAffine": target_img.affine.tolist(),
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


def _target_header(run: Run) -> nib.Nifti1Image:
    return nib.load(run.target)


def run_fold(fold: Fold, paired: Sequence[Run], channels: Sequence[str], config: Training,
             models: Sequence[str], *, out_dir: Path, work_dir: Path,
             bids_dir: Path | None = None) -> dict:
    """Train, evaluate and synthesise one fold; write ``models/fold-<label>/metrics.tsv``."""
    folder = out_dir / "models" / f"fold-{fold.label}"
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
    if not train.is_main():
        return {}
    device = train.resolve_device(config.device)
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
    """Predictions and metrics of a trained model, of the mean volume (``result`` None) or,
    given the simulation's true ``regressors``, of the oracle ceiling."""
    target = np.load(cache_target(run.target, work_dir), mmap_mode="r")[run.sample_volumes]
    target = np.asarray(target, dtype=np.float32)
    if regressors is not None:
        pred = oracle.oracle_prediction(regressors, target)
    elif result is None:
        pred = np.broadcast_to(mean_volume, target.shape)
    else:
        dataset = PairedDataset([run], channels, result.norm, work_dir)
        loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)
        pred = synthesize.predict(result.model, loader, device)
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
    entities = {**run.entities, **{k: v for k, v in parse_name(run.target.name).items()
                                   if k in ("space", "res")}}
    folder = run_dir(out_dir, entities, "func")
    sources = [source_uri(p, out_dir, dataset="") for p in (run.spectrogram, run.target, model_path)]
    metrics = {"SSIM": float(result["ssim"].mean()), "PSNR": float(result["psnr"].mean()),
               "SSIM3D": float(result["ssim3d"].mean()), "Dynamics": result["dynamics"]}
    synthesize.write_synth(result["pred"], folder / build_name(entities, "bold", ".nii.gz", desc="synth"),
                           affine=img.affine, tr=float(run.meta["RepetitionTime"]),
                           first_volume=int(run.sample_volumes[0]),
                           sidecar={"Model": model_name, "Fold": fold, "Sources": sources,
                                    "Metrics": metrics})
    synthesize.write_statmap(
        result["dynamics_map"], folder / build_name(entities, "statmap", ".nii.gz", desc="dynamics"),
        affine=img.affine,
        sidecar={"Description": "Voxel-wise Pearson correlation of the synthesised and measured BOLD "
                                "time series (each voxel's mean removed); 0 outside the brain mask "
                                "computed from the measured mean volume and where a series is constant.",
                 "Model": model_name, "Fold": fold, "Sources": sources,
                 "SourceVolumes": [int(run.sample_volumes[0]), int(run.sample_volumes[-1])],
                 "MeanInMask": result["dynamics"]})


def aggregate(out_dir: Path, labels: Sequence[str]) -> dict:
    """Concatenate the folds' tables into ``group_metrics.tsv`` and summarise per model."""
    tables = [evaluate.read_table(out_dir / "models" / f"fold-{label}" / "metrics.tsv") for label in labels]
    table = pd.concat(tables, ignore_index=True)
    summary = evaluate.summarise(table)
    # group_metrics.json is both the TSV's column sidecar and the per-model summary
    evaluate.write_table(table.to_dict("records"), out_dir / "group_metrics.tsv",
                         sidecar={"Folds": list(labels), "Summary": summary})
    logger.info("group metrics (mean ± std over %d subjects):\n%s", len(table["participant_id"].unique()),
                "\n".join(evaluate.summary_lines(summary)))
    return summary
