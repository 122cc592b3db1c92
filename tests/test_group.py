"""Tests of the group level: folds, leakage guards, resume after SIGKILL, concurrent jobs, learning."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from test_data import CONTEXT, DISCARD, GRID, TR, write_derivatives

from spec2vol_bids import data, group, linear
from spec2vol_bids.config import Config, build
from spec2vol_bids.errors import DataError, NothingSelectedError, UsageError
from spec2vol_bids.models import load_checkpoint

torch.set_num_threads(1)
TESTS = Path(__file__).parent


def options(out: Path, **changes) -> dict:
    """Group-level option values for a CPU test (the command line's names), see ``config.build``."""
    values = dict(bids_dir=out.parent / "bids", output_dir=out, analysis_level="group",
                  work_dir=out.parent / "work", model="spec2vol", model_config="tiny", epochs=2,
                  batch_size=8, grad_accum=1, lr=3e-3, warmup_steps=2, device="cpu", no_final=True,
                  omp_nthreads=1)
    values.update(changes)
    return values


def configured(out: Path, **changes) -> Config:
    return build(options(out, **changes))


def _fold_script(values: dict) -> str:
    """A Python program that runs ``run_group`` with these option values (1 thread)."""
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    return textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)
        from spec2vol_bids import group
        from spec2vol_bids.config import build
        sys.exit(group.run_group(build({args!r})))
    """)


def _run_in_subprocess(values: dict) -> subprocess.Popen:
    """Start ``run_group`` in a fresh interpreter (1 thread, like the reference run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _fold_script(values)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _state(path: Path) -> dict:
    return load_checkpoint(path)[0].state_dict()


def test_folds_and_bad_options(tmp_path):
    assert [f.label for f in group.plan_folds(["01", "02", "03"])] == ["01", "02", "03"]
    fixed = group.plan_folds(["01", "02", "03"], "fixed", ["sub-03"])
    assert [(f.label, f.test) for f in fixed] == [("fixed", ["03"])]
    with pytest.raises(UsageError, match="--test-subjects 09"):
        group.plan_folds(["01", "02"], "fixed", ["09"])
    eeg_only = write_derivatives(tmp_path / "eeg-only", subjects=("01", "02"), n_volumes=40, bold=False)
    with pytest.raises(NothingSelectedError, match="the 2 run.s. found have no BOLD"):
        group.run_group(configured(eeg_only))
    out = write_derivatives(tmp_path / "out", subjects=("01",), n_volumes=40)
    with pytest.raises(DataError, match="at least two subjects"):
        group.run_group(configured(out))
    write_derivatives(out, subjects=("02",), n_volumes=40)
    with pytest.raises(UsageError, match="--folds 07: no such fold"):
        group.run_group(configured(out, folds=["07"]))
    with pytest.raises(NothingSelectedError, match="OUTPUT_DIR holds derivatives of sub-01 sub-02 "
                                                   "only; check --participant-label"):
        group.run_group(configured(out, participant_label=["09"]))
    with pytest.raises(DataError, match="--select val needs at least two training subjects"):
        group.run_group(configured(out, select="val"))


def test_nothing_leaks_from_the_held_out_subject(tmp_path):
    """Normalisation and the selected checkpoint do not change when the test subject is gone."""
    full = write_derivatives(tmp_path / "a" / "out", subjects=("01", "02", "03"), n_volumes=40)
    # the held-out subject's EEG is made extreme: any use of it would move the min-max scaling
    spec_file = next(full.glob("sub-01/eeg/*.npy"))
    np.save(spec_file, np.load(spec_file) * 50)
    group.run_group(configured(full, folds=["01"], select="val", epochs=3))
    with_test = json.loads((full / "models" / "fold-01" / "model.json").read_text())
    assert with_test["ValSubjects"] == ["03"] and with_test["TrainSubjects"] == ["02"]
    # a CPU trains in float32 under --precision auto
    assert with_test["Precision"] == "fp32" and with_test["Deterministic"] is False

    without = tmp_path / "b" / "out"
    shutil.copytree(full, without, ignore=shutil.ignore_patterns("sub-01", "models"))
    runs = data.find_runs(without)
    assert data.subjects_of(runs) == ["02", "03"]
    train_runs, val_runs = group.split_validation(runs, "val")
    config = configured(without, select="val", epochs=3).training
    group.train_and_save(train_runs, val_runs, data.resolve_channels(runs), config, "spec2vol",
                         without / "models" / "fold-01", work_dir=tmp_path / "b" / "work",
                         checkpoint=tmp_path / "b" / "work" / "ck", extra={"Fold": "01"})
    without_test = json.loads((without / "models" / "fold-01" / "model.json").read_text())
    assert without_test["NormStats"] == with_test["NormStats"]
    assert without_test["SelectedEpoch"] == with_test["SelectedEpoch"]
    a, b = _state(full / "models" / "fold-01" / "model.pt"), _state(without / "models" / "fold-01" / "model.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_killed_fold_resumes_to_the_same_result(tmp_path):
    reference = write_derivatives(tmp_path / "ref" / "out", subjects=("01", "02", "03"), n_volumes=50)
    killed = write_derivatives(tmp_path / "kill" / "out", subjects=("01", "02", "03"), n_volumes=50)
    settings = dict(folds=["01"], epochs=3, batch_size=4)
    job = _run_in_subprocess(options(reference, **settings))
    assert job.wait(timeout=600) == 0, job.stderr.read().decode()[-2000:]

    job = _run_in_subprocess(options(killed, **settings))
    checkpoint = tmp_path / "kill" / "work" / "checkpoints" / "fold-01" / "spec2vol" / "checkpoint.pt"
    while not checkpoint.exists():
        assert job.poll() is None, "training finished or failed before its first checkpoint"
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert torch.load(checkpoint, weights_only=True)["epoch"] < 3
    assert not (killed / "models" / "fold-01" / "done.json").exists()
    job = _run_in_subprocess(options(killed, **settings))
    assert job.wait(timeout=600) == 0, job.stderr.read().decode()[-2000:]

    a, b = _state(reference / "models" / "fold-01" / "model.pt"), _state(killed / "models" / "fold-01" / "model.pt")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    metrics = [pd.read_csv(d / "models" / "fold-01" / "metrics.tsv", sep="\t") for d in (reference, killed)]
    pd.testing.assert_frame_equal(metrics[0], metrics[1])


def test_concurrent_fold_jobs_aggregate_like_one_run(tmp_path):
    subjects = ("01", "02", "03")
    sequential = write_derivatives(tmp_path / "seq" / "out", subjects=subjects, n_volumes=32)
    shared = write_derivatives(tmp_path / "par" / "out", subjects=subjects, n_volumes=32)
    settings = dict(epochs=1, compare=["e2fnet"])
    jobs = [_run_in_subprocess(options(sequential, no_final=False, **settings))]
    assert jobs[0].wait(timeout=600) == 0, jobs[0].stderr.read().decode()[-2000:]
    jobs = [_run_in_subprocess(options(shared, folds=folds, **settings)) for folds in (["01"], ["02", "03"])]
    for job in jobs:
        assert job.wait(timeout=600) == 0, job.stderr.read().decode()[-2000:]
    tables = [(d / "group_metrics.tsv").read_text() for d in (sequential, shared)]
    assert tables[0] == tables[1]
    table = pd.read_csv(shared / "group_metrics.tsv", sep="\t", dtype=str)
    assert len(table) == 9 and sorted(set(table["model"])) == ["e2fnet", "mean", "spec2vol"]
    summary = json.loads((shared / "group_metrics.json").read_text())["Summary"]
    assert summary["mean"]["dynamics"] == {"mean": 0.0, "std": 0.0}
    assert (shared / "models" / "fold-02" / "e2fnet" / "model.pt").exists()
    final = json.loads((sequential / "models" / "final" / "model.json").read_text())
    assert final["TrainSubjects"] == list(subjects) and final["TestSubjects"] == []
    assert not (shared / "models" / "final").exists()  # --folds jobs leave the final model alone
    # a rerun finds every fold finished and changes nothing
    before = {p: p.stat().st_mtime_ns for p in (shared / "models").rglob("model.pt")}
    assert group.run_group(configured(shared, **settings)) == 0
    assert {p: p.stat().st_mtime_ns for p in (shared / "models").rglob("model.pt")} == before
    # a rerun with another protocol is refused, never mixed into the finished folds' table
    with pytest.raises(UsageError, match="fold-01: trained with other options "
                                         r"\(spec2vol: protocol 'residual' there, 'published' now"):
        group.run_group(configured(shared, protocol="published", **settings))
    assert {p: p.stat().st_mtime_ns for p in (shared / "models").rglob("model.pt")} == before


def test_learning_is_real(tmp_path):
    """A held-out subject of a simulated set: under the residual protocol (the default) the tiny
    Spec2Vol's dynamics beat the mean volume's by >= 0.2 at the mean volume's SSIM and reach the
    ridge baseline's, as does its linear readout alone. One fold keeps the test in budget; which
    subject is held out changes nothing of what it checks."""
    subjects = ("01", "02", "03")
    n_volumes = 120
    out = write_derivatives(tmp_path / "out", subjects=subjects, n_volumes=n_volumes)
    assert group.run_group(configured(out, epochs=8, lr=1e-3, folds=["02"],
                                      compare=["ridge"])) == 0
    table = pd.read_csv(out / "models" / "fold-02" / "metrics.tsv", sep="\t",
                        dtype={"participant_id": str}).set_index("model")
    assert table.loc["spec2vol", "dynamics"] - table.loc["mean", "dynamics"] >= 0.2, table
    # measured 0.882 against ridge's 0.851 (with a readout per context window: 0.84)
    assert table.loc["spec2vol", "dynamics"] >= table.loc["ridge", "dynamics"], table
    assert table.loc["ridge", "dynamics"] - table.loc["mean", "dynamics"] >= 0.2, table
    for model in ("spec2vol", "ridge"):
        assert table.loc[model, "ssim"] >= table.loc["mean", "ssim"] - 0.01, table
    sidecar = json.loads((out / "models" / "fold-02" / "model.json").read_text())
    assert sidecar["NormStats"] == {"kind": "run"} and sidecar["Config"]["protocol"] == "residual"
    ridge = json.loads((out / "models" / "fold-02" / "ridge" / "model.json").read_text())
    assert ridge["NormStats"] == {"kind": "run"} and ridge["TrainSubjects"] == ["01", "03"]
    # the linear readout beside the network learned the linear part as well as ridge did: with
    # the network's output held at zero it still reaches ridge. (The network's part alone, the
    # readout zeroed, is no stable measure: it scored 0.26, then -0.05 after an 11 % change of
    # the readout's SGD step, the full model 0.888 and 0.882.)
    model, meta = load_checkpoint(out / "models" / "fold-02" / "model.pt")

    class Silent(torch.nn.Module):
        def forward(self, x):
            return x.new_zeros(len(x), *model.config.out_shape)
    model.net = Silent()
    held_out = [run for run in data.find_runs(out) if run.subject == "02"]
    mean = data.PairedDataset([r for r in data.find_runs(out) if r.subject != "02"], meta["channels"],
                              meta["norm_stats"], tmp_path / "w").mean_target()
    alone = group.evaluate_model_on_run(
        held_out[0], meta["channels"], SimpleNamespace(model=model, norm=meta["norm_stats"], autocast=None),
        mean, work_dir=tmp_path / "w", device=torch.device("cpu"))
    assert alone["dynamics"] >= table.loc["ridge", "dynamics"], (alone["dynamics"], table)  # 0.882
    # the held-out subject got its synthesised series and dynamics map
    synth = out / "sub-02" / "func" / "sub-02_task-rest_desc-synth_bold.nii.gz"
    img = nib.load(synth)
    assert img.shape == GRID + (n_volumes - DISCARD - CONTEXT,)
    assert img.header.get_zooms()[3] == pytest.approx(TR)
    side = json.loads(synth.with_name(synth.name.replace(".nii.gz", ".json")).read_text())
    assert side["Fold"] == "02" and side["SourceVolumes"] == [DISCARD + CONTEXT, n_volumes - 1]
    assert side["Metrics"]["Dynamics"] == pytest.approx(table.loc["spec2vol", "dynamics"], abs=1e-5)
    rmap = nib.load(synth.with_name(synth.name.replace("desc-synth_bold", "desc-dynamics_statmap")))
    assert rmap.shape == GRID


def test_torchrun_ddp_matches_one_process(tmp_path):
    """Two CPU ranks under torchrun (gloo) split every batch between them; the averaged gradients
    are those of the whole batch, so the fold ends with the weights of a one-process run."""
    settings = dict(epochs=3, batch_size=8, folds=["01"])
    single = write_derivatives(tmp_path / "single" / "out", subjects=("01", "02"), n_volumes=58)
    assert group.run_group(configured(single, **settings)) == 0
    ddp = Path(shutil.copytree(single.parent, tmp_path / "ddp")) / "out"
    shutil.rmtree(ddp / "models")
    shutil.rmtree(ddp.parent / "work", ignore_errors=True)
    script = tmp_path / "fold.py"
    script.write_text(_fold_script(options(ddp, **settings)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                            "PYTHONPATH": str(TESTS.parent)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (_state(d / "models" / "fold-01" / "model.pt") for d in (single, ddp))
    assert one.keys() == two.keys()
    for name in one:
        # measured: 2e-5 apart after 12 steps (summation order); 5e-2 without the all-reduce
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=2e-4, msg=name)
    history = pd.read_csv(ddp / "models" / "fold-01" / "history.tsv", sep="\t")
    assert len(history) == 3  # written once (rank 0), one row per epoch
    resume = torch.load(ddp.parent / "work" / "checkpoints" / "fold-01" / "spec2vol" / "checkpoint.pt",
                        weights_only=True)
    assert json.loads(resume["fingerprint"])["world"] == 2  # two ranks really shared the fold


def test_a_linear_model_as_the_groups_model_gives_the_final_model(tmp_path):
    """``--model hrf-ridge``: the folds' models and the final all-subject model (what
    ``participant --model`` applies) are hrf-ridge fits at the runs' TR; the final one equals a
    closed-form refit on every subject. A model named twice (``--compare``) is trained once."""
    out = write_derivatives(tmp_path / "out", subjects=("01", "02", "03"), n_volumes=60)
    # a model named twice is trained once
    assert group.run_group(configured(out, model="hrf-ridge", compare=["ridge", "hrf-ridge", "ridge"],
                                      no_final=False)) == 0
    table = pd.read_csv(out / "group_metrics.tsv", sep="\t", dtype={"participant_id": str})
    assert sorted(table.model.unique()) == ["hrf-ridge", "mean", "ridge"]
    assert not table.duplicated(["participant_id", "model"]).any()
    assert np.isfinite(table.dynamics).all()
    fold = json.loads((out / "models" / "fold-01" / "model.json").read_text())
    assert fold["Model"] == "hrf-ridge" and fold["TrainSubjects"] == ["02", "03"]
    # a closed-form fit records no network settings, so other ones do not make it stale
    assert fold["Config"] == {"model": "hrf-ridge", "eeg_normalisation": "run"}
    assert not {"Epochs", "Selection", "SelectedEpoch", "Precision"} & fold.keys()
    done = (out / "models" / "fold-01" / "done.json").stat().st_mtime_ns
    assert group.run_group(configured(out, model="hrf-ridge", compare=["ridge"], epochs=7, lr=5e-4,
                                      no_final=False)) == 0
    assert (out / "models" / "fold-01" / "done.json").stat().st_mtime_ns == done
    # ... but a network compared beside it was trained with its settings, which do count
    with pytest.raises(UsageError, match=r"trained for the models hrf-ridge, ridge \(group model "
                                         r"hrf-ridge\), not hrf-ridge, ridge, spec2vol \(group model "
                                         r"hrf-ridge\).*\(so were fold-02, fold-03\)"):
        group.run_group(configured(out, model="hrf-ridge", compare=["ridge", "spec2vol"]))
    final, meta = load_checkpoint(out / "models" / "final" / "model.pt")
    runs = data.find_runs(out)
    assert meta["model_name"] == "hrf-ridge"
    assert final.config.hrf_tr == float(runs[0].meta["RepetitionTime"])
    assert meta["extra"]["TrainSubjects"] == ["01", "02", "03"]
    # the final model is the closed-form fit on every subject, refitted here
    refit = linear.fit_ridge(runs, meta["channels"], work_dir=tmp_path / "w", model_name="hrf-ridge")
    x = torch.randn(2, runs[0].context, len(meta["channels"]), final.config.freq_bins)
    torch.testing.assert_close(final(x), refit.model(x), rtol=1e-4, atol=1e-4)


def test_a_fold_records_each_runs_discarded_volumes_when_they_differ(tmp_path):
    out = write_derivatives(tmp_path / "out", subjects=("01", "02", "03"), n_volumes=40)
    discard = data.find_runs(out)[0].discard
    _edit_sidecars(out, ["03"], DiscardVolumes=discard + 3)
    assert group.run_group(configured(out, model="ridge", folds=["01", "03"])) == 0
    fold_01 = json.loads((out / "models" / "fold-01" / "model.json").read_text())
    assert fold_01["DiscardVolumes"] == {"sub-02_task-rest": discard, "sub-03_task-rest": discard + 3}
    assert json.loads((out / "models" / "fold-03" / "model.json").read_text())["DiscardVolumes"] == discard


def _edit_sidecars(out: Path, subjects, **changes) -> None:
    """What a participant-level rerun with other options leaves: spectrogram sidecars that
    say so (the arrays themselves do not depend on the context)."""
    for subject in subjects:
        for sidecar in (out / f"sub-{subject}").rglob("*_spectrogram.json"):
            meta = json.loads(sidecar.read_text())
            sidecar.write_text(json.dumps({**meta, **changes}))


def test_finished_folds_are_reused_only_for_the_same_models_options_and_derivatives(tmp_path, caplog):
    """A finished fold records each model's options and a digest of the derivatives; a rerun
    that asks for other ones, or finds the derivatives remade, is refused. Derivatives made
    with different options for different subjects are refused before any training."""
    out = write_derivatives(tmp_path / "out", subjects=("01", "02", "03"), n_volumes=40)
    settings = dict(model="ridge", compare=["spec2vol", "hrf-ridge"], epochs=1, folds=["01"])
    assert group.run_group(configured(out, **settings)) == 0
    done = json.loads((out / "models" / "fold-01" / "done.json").read_text())
    assert done["Model"] == "ridge" and list(done["Protocols"]) == ["ridge", "spec2vol", "hrf-ridge"]
    assert done["Protocols"]["ridge"] == {"model": "ridge", "eeg_normalisation": "run"}
    assert done["Protocols"]["spec2vol"]["epochs"] == 1 and done["TestSubjects"] == ["01"]
    assert sorted(done["Inputs"]) == [f"sub-{s}_task-rest" for s in ("01", "02", "03")]
    models = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("model.pt")}
    assert len(models) == 3
    # the order of --compare does not matter
    assert group.run_group(configured(out, **{**settings, "compare": ["hrf-ridge", "spec2vol"]})) == 0
    # a finished fold of a subject since dropped is named, and left out of the tables
    shutil.copytree(out / "models" / "fold-01", out / "models" / "fold-07")
    with caplog.at_level(logging.WARNING, logger="spec2vol_bids"):
        assert group.run_group(configured(out, **settings)) == 0
    assert "models/fold-07 is not one of this run's folds" in caplog.text
    shutil.rmtree(out / "models" / "fold-07")
    # the compared network's settings count although the group's model is linear
    with pytest.raises(UsageError, match=r"other options \(spec2vol: epochs 1 there, 2 now\)"):
        group.run_group(configured(out, **{**settings, "epochs": 2}))
    # ... also for a job of another fold, before it trains: the table would mix the two
    with pytest.raises(UsageError, match=r"fold-01: trained with other options"):
        group.run_group(configured(out, **{**settings, "epochs": 2, "folds": ["02"]}))
    assert not (out / "models" / "fold-02").exists()
    with pytest.raises(UsageError, match=r"other channels \(Fp1 Fp2 .* there, Fp1 Fp2 F7 now\)"):
        group.run_group(configured(out, **settings, channels=["Fp1", "Fp2", "F7"]))
    # a finished fold that lost files it wrote: the table and the reports would describe them
    lost = [next((out / "sub-01").rglob("*_desc-synth_bold.nii.gz")),
            out / "models" / "fold-01" / "spec2vol" / "model.pt",
            out / "models" / "fold-01" / "spec2vol" / "history.tsv"]
    for path in lost:
        path.rename(tmp_path / path.name)
    with pytest.raises(DataError, match=r"fold-01: finished, but 3 of the files it wrote are missing "
                                        r"\(models/fold-01/spec2vol/model\.pt "
                                        r"models/fold-01/spec2vol/history\.tsv "
                                        r"sub-01/func/sub-01_task-rest_desc-synth_bold\.nii\.gz\)"):
        group.run_group(configured(out, **settings))
    for path in lost:
        (tmp_path / path.name).rename(path)
    # a folder of an earlier version, which recorded none of it
    legacy = out / "models" / "fold-02"
    legacy.mkdir()
    (legacy / "done.json").write_text(json.dumps({"Fold": "02", "Models": ["ridge"]}))
    with pytest.raises(UsageError, match="fold-02: made by an earlier spec2vol"):
        group.run_group(configured(out, **settings))
    shutil.rmtree(legacy)
    # a target edited outside spec2vol, its sidecar unchanged: the fold learned from another
    target = next((out / "sub-02").rglob("*_desc-target_bold.nii.gz"))
    shutil.copy2(target, tmp_path / "target-kept.nii.gz")
    img = nib.load(target)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., ::-1], img.affine, img.header), target)
    with pytest.raises(DataError, match=r"fold-01: trained on other participant-level derivatives "
                                        r"\(remade since: sub-02_task-rest\)"):
        group.run_group(configured(out, **settings))
    shutil.copyfile(tmp_path / "target-kept.nii.gz", target)  # a copy of the same content passes
    assert group.run_group(configured(out, **settings)) == 0
    # one subject remade with another context: refused, naming who has which
    _edit_sidecars(out, ["03"], Context=CONTEXT + 2, InputHash="remade")
    with pytest.raises(DataError, match=rf"differ in their context \(TR windows\) \({CONTEXT}: "
                                        rf"sub-01 sub-02; {CONTEXT + 2}: sub-03\)"):
        group.run_group(configured(out, **settings))
    # all remade alike: consistent, but not what fold 01 was trained on
    _edit_sidecars(out, ["01", "02"], Context=CONTEXT + 2, InputHash="remade")
    with pytest.raises(DataError, match=r"fold-01: trained on other participant-level derivatives \(remade since: "
                                        r"sub-01_task-rest sub-02_task-rest sub-03_task-rest\)"):
        group.run_group(configured(out, **settings))
    # and the first subject at another TR: a bin is another frequency
    _edit_sidecars(out, ["01"], RepetitionTime=2 * TR)
    with pytest.raises(DataError, match=rf"repetition time \(s\) \({2 * TR:g}: sub-01; {TR:g}: sub-02 sub-03\)"):
        group.run_group(configured(out, **settings))
    assert {p: p.stat().st_mtime_ns for p in (out / "models").rglob("model.pt")} == models
