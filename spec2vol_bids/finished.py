"""Finished folders of trained models: their records, the checks before reuse, their locks.

A fold's folder (and the final model's) is finished when its ``done.json`` exists; it is written
last and records what the models were made from (:func:`folder_record`). A later group call
reuses a finished folder only when it would make it the same way, from the same derivatives,
and when the folder still holds what it wrote; otherwise it refuses before training anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch.distributed as dist
from filelock import FileLock

from spec2vol_bids import devices, train
from spec2vol_bids.config import LINEAR_MODELS, Training
from spec2vol_bids.data import Run, run_digest
from spec2vol_bids.derivatives import write_json
from spec2vol_bids.errors import DataError, UsageError

logger = logging.getLogger(__name__)


def lock_path(folder: Path) -> Path:
    """The lock of ``folder``: next to it in OUTPUT_DIR, so every job writing there sees it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder.parent / f".{folder.name}.lock"


def is_done(folder: Path) -> bool:
    return (folder / "done.json").exists()


def locked_once(folder: Path, record: dict, job) -> None:
    """Run ``job`` unless ``folder/done.json`` exists, holding a lock; then write the marker.

    The marker keeps ``record`` (:func:`folder_record`). A finished folder is kept only when it was
    made as asked now, from the same derivatives; otherwise the run is refused rather than
    mixing two protocols or two versions of the data in one table. Under torchrun rank 0 takes
    the lock and decides; every rank runs the job (training is collective) and only rank 0
    writes.
    """
    lock = FileLock(str(lock_path(folder))) if devices.is_main() else contextlib.nullcontext()
    with lock:
        skip = broadcast(is_done(folder))
        if skip:
            check_same_record(folder, record)
            logger.info("%s is finished; skipping it (delete the folder to redo it)", folder)
            return
        info = job() or {}
        if devices.is_main():
            write_json(folder / "done.json", {**info, **record,
                                              "Finished": datetime.now(timezone.utc).isoformat()})
        devices.barrier()


def input_digests(runs: Sequence[Run]) -> dict[str, str]:
    """Each run's :func:`~spec2vol_bids.data.run_digest`, by run name."""
    return {run.name: run_digest(run) for run in runs}


def folder_record(training: Training, models: Sequence[str], channels: Sequence[str],
                  test: Sequence[str], inputs: dict[str, str]) -> dict:
    """What a folder of trained models is made from: the group's model, each model's protocol
    (:func:`protocol`), the channels, the test subjects and the digests of every run's
    participant-level derivatives (:func:`input_digests`)."""
    return {"Model": training.model, "Protocols": {name: protocol(training, name) for name in models},
            "Channels": list(channels), "TestSubjects": list(test), "Inputs": dict(inputs)}


def check_finished(records: dict[Path, dict], outputs: dict[Path, list[Path]]) -> None:
    """Before anything is trained: refuse when a finished folder of this run (every fold, and
    the final model when it is made) was made otherwise than ``records`` says, or has lost any
    of the ``outputs`` it wrote; name every such folder."""
    found = [(folder, record_mismatch(folder, record) or _lost(folder, outputs.get(folder, ())))
             for folder, record in records.items() if is_done(folder)]
    found = [(folder, mismatch) for folder, mismatch in found if mismatch]
    if found:
        (folder, (error, text)), others = found[0], [f.name for f, _ in found[1:]]
        also = f" (so were {', '.join(others)})" if others else ""
        raise error(f"{text}{also}", path=folder)


def _lost(folder: Path, outputs: Sequence[Path]) -> tuple[type, str] | None:
    """The refusal for a finished ``folder`` whose ``outputs`` are not all there any more: the
    reports and the group table would describe files that are gone."""
    missing = [path for path in outputs if not path.is_file()]
    if not missing:
        return None
    out_dir = folder.parent.parent
    shown = " ".join(path.relative_to(out_dir).as_posix() for path in missing[:4])
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    return DataError, (f"finished, but {len(missing)} of the files it wrote are missing ({shown}"
                       f"{more}); delete that folder to redo it")


def check_same_record(folder: Path, record: dict) -> None:
    """Refuse a finished ``folder`` made otherwise than ``record`` says the run would make it."""
    mismatch = record_mismatch(folder, record)
    if mismatch:
        error, text = mismatch
        raise error(text, path=folder)


def record_mismatch(folder: Path, record: dict) -> tuple[type, str] | None:
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


def protocol(config: Training, model_name: str) -> dict:
    """What shaped ``model_name``'s fit: the network's training settings, or for a linear model
    (closed form, run-standardised EEG) nothing but its name."""
    if model_name in LINEAR_MODELS:
        return {"model": model_name, "eeg_normalisation": "run"}
    config = dataclasses.replace(config, model=model_name)
    recipe = train.readout_recipe(config)
    return {**{name: getattr(config, name) for name in train.PROTOCOL},
            **({"readout": recipe} if recipe else {})}


def broadcast(value):
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value
