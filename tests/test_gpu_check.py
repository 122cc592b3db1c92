"""benchmarks/gpu_check.py without a GPU: its checks run for real on the CPU at tiny sizes (scan
parity and timing, training and inference, the profiler's scan share, the targets and the
table), its group-level command lines parse with the real command lines, ``--dry-run`` needs
no GPU, and a run without CUDA is one line and exit 69."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed.run as torchrun

from spec2vol_bids.cli.parser import parse_args
from spec2vol_bids.evaluate import write_table
from spec2vol_bids.simulate.cli import _parser as simulate_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402  (benchmarks/ is not a package)

CPU = torch.device("cpu")
torch.set_num_threads(1)  # as test_train.py: tiny models run fastest on one thread
#: The tiny models on a small input: a training step takes well under a second on one core.
TINY = dict(shape=dict(eeg_channels=8, freq_bins=16, out_shape=(4, 32, 32), context=2), size="tiny")


def _by_case(rows) -> dict:
    return {(r["check"], r["case"]): r for r in rows}


def test_scan_parity_and_timing_run_on_the_cpu(monkeypatch):
    rows = []
    gpu_check.check_scan(CPU, rows, time.monotonic() + 120, shape=(2, 8, 37, 4, 2), repeats=1)
    found = _by_case(rows)
    assert set(found) == {(check, f"{backend} {precision}") for precision in ("fp32", "bf16")
                          for check, backend in [("scan parity", "fast"), ("scan fwd+bwd", "fast"),
                                                 ("scan fwd+bwd", "sequential")]}
    fp32, bf16 = found["scan parity", "fast fp32"], found["scan parity", "fast bf16"]
    assert fp32["status"] == bf16["status"] == "ok", rows
    # the fast scan's summation order differs from the sequential one's: small, not zero
    assert 0 < fp32["value"] < 1e-5 and fp32["unit"] == "rel. error"
    assert 0 < bf16["value"] < gpu_check.TOLERANCE["bf16"]
    assert "worst: " in fp32["detail"]
    for precision in ("fp32", "bf16"):
        for backend in ("fast", "sequential"):
            timing = found["scan fwd+bwd", f"{backend} {precision}"]
            assert timing["status"] == "ok" and timing["value"] > 0 and timing["unit"] == "ms"
            assert timing["peak_gib"] is None  # no GPU memory to report
    json.dumps(rows)  # plain numbers only, ready for the report

    # a tolerance below the measured error fails the check
    monkeypatch.setitem(gpu_check.TOLERANCE, "fp32", fp32["value"] / 2)
    rows = []
    gpu_check.check_scan(CPU, rows, time.monotonic() + 120, shape=(2, 8, 37, 4, 2),
                         dtypes=("fp32",), repeats=1)
    assert _by_case(rows)["scan parity", "fast fp32"]["status"] == "FAIL"


def test_a_case_that_does_not_fit_or_fails_is_recorded_and_the_next_one_runs():
    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def never_called():
        raise AssertionError("a case past the budget must not start")

    rows, soon, later = [], time.monotonic() + 5, time.monotonic() + 60
    gpu_check.run_case(rows, soon, 10, "check", "late", never_called, CPU)
    gpu_check.run_case(rows, later, 10, "check", "raises", lambda: {"value": 1 / 0}, CPU)
    gpu_check.run_case(rows, later, 10, "check", "memory", out_of_memory, CPU)
    gpu_check.run_case(rows, later, 10, "check", "runs", lambda: dict(value=2.5, unit="x"), CPU)
    assert [(r["case"], r["status"]) for r in rows] == [
        ("late", "skipped: budget"), ("raises", "error: ZeroDivisionError: division by zero"),
        ("memory", "out of memory"), ("runs", "ok")]
    assert rows[-1]["value"] == 2.5 and gpu_check.format_value(rows[-1]) == "2.5 x"


def test_training_inference_and_scan_share_run_on_the_cpu():
    backend_before = os.environ.get("SPEC2VOL_SCAN")
    rows = []
    gpu_check.check_models(CPU, rows, time.monotonic() + 300, batch=2, accum=2,
                           infer_batches=(1, 3), dtypes=("fp32",), repeats=1, **TINY)
    assert [(r["check"], r["case"]) for r in rows] == [
        ("training", "spec2vol fast fp32"), ("inference", "spec2vol fast fp32 batch 1"),
        ("inference", "spec2vol fast fp32 batch 3"), ("scan share", "spec2vol fast fp32"),
        ("training", "e2fnet fp32"), ("inference", "e2fnet fp32 batch 1"),
        ("inference", "e2fnet fp32 batch 3")]
    assert all(r["status"] == "ok" for r in rows), rows
    found = _by_case(rows)
    training = found["training", "spec2vol fast fp32"]
    assert training["unit"] == "samples/s" and training["value"] > 0
    assert training["detail"].startswith("batch 2 x 2 accumulation")
    assert found["inference", "e2fnet fp32 batch 3"]["unit"] == "s/volume"
    share = found["scan share", "spec2vol fast fp32"]
    # the scan is a real part of a VM-UNet step, not all of it; no GPU share on the CPU
    assert 1 < share["value"] < 95, share
    assert "host wall time" in share["detail"] and "GPU" not in share["detail"]
    # the profiler annotation and the backend choice are undone
    assert gpu_check.vmunet.selective_scan is gpu_check.selective_scan
    assert os.environ.get("SPEC2VOL_SCAN") == backend_before
    json.dumps(rows)


def test_group_commands_parse_with_the_real_command_lines(tmp_path):
    commands = gpu_check.group_commands(tmp_path)
    assert list(commands) == ["simulate", "participant", "one process", "torchrun"]
    simulate = commands["simulate"]
    assert simulate[:3] == [sys.executable, "-m", "spec2vol_bids.simulate"]
    dataset = simulate_parser().parse_args(simulate[3:])
    assert dataset.out_dir == tmp_path / "bids" and dataset.subjects == 2
    configs = {}
    for label in ("participant", "one process"):
        assert commands[label][:3] == [sys.executable, "-m", "spec2vol_bids"]
        configs[label] = parse_args(commands[label][3:])
    launcher = commands["torchrun"]
    assert launcher[:3] == [sys.executable, "-m", "torch.distributed.run"]
    launch = torchrun.get_args_parser().parse_args(launcher[3:])
    assert launch.standalone and launch.module and launch.nproc_per_node == "1"
    assert launch.training_script == "spec2vol_bids"
    configs["torchrun"] = parse_args(launch.training_script_args)

    participant, one, ddp = configs["participant"], configs["one process"], configs["torchrun"]
    assert participant.inputs.analysis_level == "participant"
    assert participant.participant.target_grid == tuple(dataset.grid)
    assert participant.inputs.output_dir == tmp_path / "participant"
    # the two group runs differ only in where they write
    assert one.training == ddp.training and one.participant == ddp.participant
    assert one.execution.omp_nthreads == ddp.execution.omp_nthreads
    assert (one.inputs.output_dir, ddp.inputs.output_dir) == (tmp_path / "one" / "out",
                                                              tmp_path / "torchrun" / "out")
    assert one.training.device == "cuda" and one.training.epochs == 2
    assert one.training.size == "tiny" and one.training.folds is None  # every fold
    assert gpu_check.group_commands(tmp_path, "cpu")["torchrun"][-3:] == \
        ["cpu", "--omp-nthreads", str(gpu_check.THREADS)]


def test_metric_tables_compare_byte_for_byte(tmp_path):
    rows = [dict(participant_id="01", model=model, fold="01", ssim=0.5 + i / 10, psnr=20.0 + i,
                 ssim3d=0.4, dynamics=0.1 * i, n_samples=12) for i, model in
            enumerate(["mean", "spec2vol"])]
    write_table(rows, tmp_path / "a.tsv")
    write_table(rows, tmp_path / "b.tsv")
    assert gpu_check.compare_tables(tmp_path / "a.tsv", tmp_path / "b.tsv") == (True, 0.0)
    write_table([rows[0], {**rows[1], "psnr": 21.25}], tmp_path / "c.tsv")
    identical, diff = gpu_check.compare_tables(tmp_path / "a.tsv", tmp_path / "c.tsv")
    assert not identical and abs(diff - 0.25) < 1e-9
    write_table(rows[:1], tmp_path / "d.tsv")
    identical, diff = gpu_check.compare_tables(tmp_path / "a.tsv", tmp_path / "d.tsv")
    assert not identical and pd.isna(diff)


def test_targets_and_the_table():
    row = gpu_check.row
    rows = [row("scan fwd+bwd", "fast bf16", 3.0, "ms"), row("scan fwd+bwd", "mamba bf16", 2.0),
            row("scan fwd+bwd", "fast fp32", 3.0, "ms"),
            row("scan fwd+bwd", "mamba fp32", 1.0, "ms", status="FAIL"),  # failed: not compared
            row("training", "spec2vol fast fp32", 30.0, "samples/s"),
            row("training", "spec2vol mamba fp32", 70.0, "samples/s"),
            row("training", "spec2vol fast bf16", 80.0, "samples/s", peak_gib=12.3),
            row("training", "spec2vol mamba bf16", 100.0, "samples/s")]
    targets = _by_case(gpu_check.target_rows(rows, 2.25))
    expected = {"fast vs mamba-ssm, scan fwd+bwd fp32": (None, "skipped: not both measured"),
                "fast vs mamba-ssm, scan fwd+bwd bf16": (1.5, "met (<= 2x)"),
                "fast vs mamba-ssm, training fp32": (70 / 30, "NOT met (<= 2x)"),
                "fast vs mamba-ssm, training bf16": (1.25, "met (<= 2x)"),
                "spec2vol bf16 training vs CPU 2.25 samples/s": (100 / 2.25, "met (>= 40x)")}
    assert {case: (r["value"], r["status"]) for (_, case), r in targets.items()} == expected
    assert targets["target", "spec2vol bf16 training vs CPU 2.25 samples/s"]["detail"] == \
        "mamba backend, 100.0 samples/s"
    slow_cpu = gpu_check.target_rows(rows, 3.0)[-1]
    assert slow_cpu["status"] == "NOT met (>= 40x)" and abs(slow_cpu["value"] - 100 / 3) < 1e-9
    assert gpu_check.target_rows([], 2.25)[-1]["status"] == "skipped: no bf16 training figure"

    report = dict(environment=dict(device="Test GPU", torch="2.13.0", cuda="12.8", mamba_ssm=None,
                                   cpu_reference=dict(gpu_check.CPU_REFERENCE)),
                  budget_s=440, elapsed_s=321.4, rows=rows + list(targets.values()))
    lines = gpu_check.format_table(report).splitlines()
    assert lines[0].startswith("spec2vol GPU check on Test GPU: torch 2.13.0, CUDA 12.8, "
                               "mamba-ssm not installed; 321 s of a 440 s budget")
    assert "2.25 samples/s" in lines[1] and "AMD EPYC" in lines[1]
    assert lines[3] == "| check | case | result | peak GPU GiB | status | detail |"
    assert len(lines) == 5 + len(report["rows"])
    assert "| training | spec2vol fast bf16 | 80 samples/s | 12.3 | ok |  |" in lines
    assert "| target | fast vs mamba-ssm, scan fwd+bwd bf16 | 1.5 x slower |  | met (<= 2x) |  |" \
        in lines
    json.loads(json.dumps(report))


def test_dry_run_prints_the_plan_and_touches_no_gpu(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--cpu-samples-per-s", "3"]) == 0
    plan = capsys.readouterr().out
    lines, plan = plan.splitlines(), " ".join(plan.split())  # the steps are wrapped
    for needle in ("scan parity with the sequential scan", "16x768x256x16x4",
                   "batch 16 x 2 accumulation", "batch 1 and 64", "torch.profiler",
                   "-m torch.distributed.run --standalone --nproc-per-node 1 -m spec2vol_bids",
                   "group --model-config tiny --epochs 2", "--device cuda",
                   "torchrun/out/group_metrics.tsv must be identical", "40 x 3 = 120 samples/s",
                   str(out)):
        assert needle in plan, needle
    assert len([line for line in lines if line.startswith("     $ ")]) == 4
    assert not out.exists() and not torch.cuda.is_initialized()


def test_an_unusable_report_path_is_one_line_and_exit_64(tmp_path, capsys):
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text("{}")
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "bids" / "r.json")]) == 64
    assert gpu_check.main(["--out", str(tmp_path / "missing" / "r.json")]) == 64
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(e.startswith("gpu_check: error: --out ") for e in errors)
    assert "inside the BIDS dataset" in errors[0] and "cannot write into" in errors[1]


def test_without_cuda_a_run_is_one_line_and_exit_69(tmp_path):
    # CUDA hidden, so that the check is the same on a machine with a GPU
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 69, proc.stderr
    assert proc.stderr.startswith("gpu_check: error: no CUDA device is available")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no report written
