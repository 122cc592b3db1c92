"""Check spec2vol on one CUDA GPU: scan parity, speed, memory and the group level end to end.

From the repository root, in at most 8 minutes on one GPU; prints one Markdown table (for
docs/gpu.md, which says what is measured and why) and writes it with the environment as JSON::

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget 440]
    python benchmarks/gpu_check.py --dry-run    # the plan; touches no GPU, exits 0

A check that does not fit in what is left of ``--budget`` is recorded as ``skipped: budget``,
a failing one as ``FAIL``, ``error: ...`` or ``out of memory``, and the others still run. Exit
status: 0 when nothing failed (targets are reported, not enforced), 1 when a check failed or
raised, 69 without a CUDA device, 64 for an unusable ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from importlib import metadata
from pathlib import Path
from unittest import mock

import pandas as pd
import torch
from bench_models import SHAPE, best_time  # benchmarks/ is on sys.path when run as a script
from torch.autograd import DeviceType

from spec2vol_bids import __version__, config, train
from spec2vol_bids.errors import one_line
from spec2vol_bids.models import build_model, vmunet
from spec2vol_bids.models.selective_scan import resolve_backend, selective_scan

EX_UNAVAILABLE, EX_USAGE = 69, 64  # sysexits, as spec2vol's own codes
TRAINING = config.defaults(config.Training)
BATCH, ACCUM = TRAINING["batch_size"], TRAINING["grad_accum"]  # published: 16 x 2
INFER_BATCHES = (1, 64)
#: (batch, channels, L, states, groups): the full model's first VM-UNet stage (16 x 16 tokens,
#: 4 paths x 192 inner channels) at the published batch, its longest scan.
SCAN_SHAPE = (BATCH, 4 * 192, 256, 16, 4)
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}  # relative L2 error; fp32 as tests/test_selective_scan
CPU_REFERENCE = dict(samples_per_s=2.25, source="docs/model.md: spec2vol bf16 autocast training, "
                     "batch 4, 2 threads, 2-core AMD EPYC with AVX-512 BF16")
#: Seconds each kind of check needs at least; the group level's are kept back for it.
NEED = {"scan": 20, "training": 25, "inference": 10, "profile": 40, "group": 180}
SIMULATION_ARGS = "--subjects 2 --volumes 60 --channels 16 --grid 32 32 8 --seed 7".split()
PARTICIPANT_ARGS = ("--discard-volumes", "2", "--context", "4", "--target-grid", "32", "32", "8",
                    "--freq-bins", "16", "--skip-bids-validation")
# two subjects: two folds. --deterministic: without it two one-process runs on an H200 gave
# dynamics 0.177279 and 0.177473 (atomic additions in CUDA kernels); with it, identical tables
GROUP_ARGS = ("--model-config", "tiny", "--epochs", "2", "--batch-size", "8", "--no-final",
              "--seed", "0", "--skip-bids-validation", "--deterministic")
THREADS = min(8, os.cpu_count() or 1)  # for the group runs' CPU work, the same in both
SCAN_RANGE = "spec2vol::selective_scan"
#: The scan in a profile: the annotated call, the backward of fast or mamba (*Scan*Backward).
SCAN_EVENT = re.compile(rf"^{re.escape(SCAN_RANGE)}$|Scan\w*Backward")


def row(check, case, value=None, unit="", status="ok", peak_gib=None, detail="") -> dict:
    """One line of the table (and of the JSON's ``rows``)."""
    return dict(check=check, case=case, value=value, unit=unit, peak_gib=peak_gib, status=status,
                detail=detail)


def run_case(rows, deadline, need, check, case, fn, device) -> None:
    """Append ``row(check, case, **fn())``, or a row saying why there is none: one broken part
    (an optional kernel, a small GPU's memory) must not hide the other results."""
    if deadline - time.monotonic() < need:
        fn = functools.partial(dict, status="skipped: budget")
    try:
        rows.append(row(check, case, **fn()))
    except torch.cuda.OutOfMemoryError:
        rows.append(row(check, case, status="out of memory"))
    except Exception as exc:  # noqa: BLE001 - any failure is a result to report
        rows.append(row(check, case, status=f"error: {type(exc).__name__}: {one_line(exc)}"))
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"[{deadline - time.monotonic():4.0f} s left] {check} | {case} | "
          f"{format_value(rows[-1])} | {rows[-1]['status']}", file=sys.stderr, flush=True)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats) -> tuple[float, float | None]:
    """Best seconds of ``repeats`` runs after a warm-up, and the peak GPU GiB while timed
    (``fn`` ends with :func:`synchronize`: the clock must see the GPU's work)."""
    fn()  # warm-up: kernels chosen, optimiser state and memory pools made
    if device.type != "cuda":
        return best_time(fn, repeats), None
    torch.cuda.reset_peak_memory_stats(device)
    return best_time(fn, repeats), torch.cuda.max_memory_allocated(device) / 2**30


def available_backends(device) -> list[str]:
    """The fast scan backends that run on ``device`` ("mamba" where its CUDA kernel imports)."""
    with contextlib.suppress(ValueError):
        return ["fast", resolve_backend("mamba", device)]
    return ["fast"]


def precisions(device) -> list[str]:
    """fp32, and bf16 where the GPU has it natively (emulated bf16 would time nothing useful)."""
    native = device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    return ["fp32", "bf16"] if native else ["fp32"]


def scan_backend(backend: str | None):
    """The models' scans on ``backend`` in the context (None: the automatic choice)."""
    return mock.patch.dict(os.environ, {"SPEC2VOL_SCAN": backend} if backend else {})


# -- 1. selective scan ------------------------------------------------------------------------

def scan_inputs(shape, device, precision, seed=0) -> tuple[dict, torch.Tensor]:
    """``selective_scan``'s tensors as SS2D gives them (``shape``: batch, channels, L, states,
    groups; A, D and the bias float32), drawn on the CPU so that every device gets the same
    numbers, and a float32 output gradient."""
    batch, channels, length, states, groups = shape
    gen = torch.Generator().manual_seed(seed)
    rand, randn = (functools.partial(f, generator=gen) for f in (torch.rand, torch.randn))
    # As SS2D starts: A = -(1..states) per channel (+ up to 10 %), softplus(bias) in [1e-3, 0.1]
    dt = torch.exp(rand(channels) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = dict(u=randn(batch, channels, length), delta=randn(batch, channels, length) * 0.5,
                  A=-torch.arange(1.0, states + 1) * (1 + 0.1 * rand(channels, states)),
                  B=randn(batch, groups, states, length), C=randn(batch, groups, states, length),
                  D=randn(channels), delta_bias=dt + torch.log(-torch.expm1(-dt)))
    grad_out = randn(batch, channels, length).to(device)
    return {k: v.to(device, torch.bfloat16 if precision == "bf16" and k in "u delta B C".split()
                    else torch.float32) for k, v in inputs.items()}, grad_out


def scan_run(backend, inputs, grad_out) -> dict:
    """Output and the gradient of every input (float32, detached) for one backend."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = selective_scan(*(leaves[k] for k in "u delta A B C D".split()), delta_softplus=True,
                       delta_bias=leaves["delta_bias"], backend=backend)
    (y.float() * grad_out).sum().backward()
    return {"y": y.detach().float(), **{k: v.grad.float() for k, v in leaves.items()}}


def check_scan(device, rows, deadline, *, shape=SCAN_SHAPE, dtypes=("fp32", "bf16"), repeats=3):
    """Each fast backend against the sequential scan, then every backend's forward + backward."""
    backends = available_backends(device)
    for precision in dtypes:
        inputs, grad_out = scan_inputs(shape, device, precision)
        # run once per precision, inside the first case (whose guard catches its failure)
        reference = functools.cache(functools.partial(scan_run, "sequential", inputs, grad_out))

        def parity(backend):  # called at once by run_case, in this iteration
            got, want = scan_run(backend, inputs, grad_out), reference()
            errors = {k: float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30))
                      for k in want}  # relative L2 errors
            worst, tol = max(errors, key=errors.get), TOLERANCE[precision]
            return dict(value=errors[worst], unit="rel. error", status="ok" if errors[worst] <= tol
                        else "FAIL", detail=f"worst: {worst}; y {errors['y']:.1e}; tol. {tol:g}")

        def fwd_bwd(backend):
            seconds, peak = timed(lambda: (scan_run(backend, inputs, grad_out),
                                           synchronize(device)), device, repeats)
            return dict(value=seconds * 1e3, unit="ms", peak_gib=peak, detail=f"best of {repeats}")

        for backend in backends:
            run_case(rows, deadline, NEED["scan"], "scan parity", f"{backend} {precision}",
                     functools.partial(parity, backend), device)
        for backend in backends + ["sequential"]:
            run_case(rows, deadline, NEED["scan"], "scan fwd+bwd", f"{backend} {precision}",
                     functools.partial(fwd_bwd, backend), device)


# -- 2.-4. models -----------------------------------------------------------------------------

def training_step(model, device, precision, batch, accum):
    """One optimiser step over ``accum`` micro-batches as spec2vol trains (loss, AdamW, clipping;
    bench_models.py's closure makes CPU tensors under CPU autocast, so it is not reused)."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=TRAINING["lr"],
                                  weight_decay=TRAINING["weight_decay"])
    cfg = model.config
    x = torch.rand(batch, cfg.context, cfg.eeg_channels, cfg.freq_bins, device=device)
    target = torch.rand(batch, *cfg.out_shape, device=device)

    def step():
        model.train()
        optimiser.zero_grad(set_to_none=True)
        for _ in range(accum):
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                loss = train.loss_fn(model(x), target)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAINING["clip_grad"])
        optimiser.step()
        synchronize(device)

    return step


def measure_training(template, device, precision, backend, batch, accum, repeats) -> dict:
    step = training_step(copy.deepcopy(template).to(device), device, precision, batch, accum)
    with scan_backend(backend):
        seconds, peak = timed(step, device, repeats)
    return dict(value=batch * accum / seconds, unit="samples/s", peak_gib=peak,
                detail=f"batch {batch} x {accum} accumulation, best of {repeats} steps")


def measure_inference(template, device, precision, backend, batch, repeats) -> dict:
    model, cfg = copy.deepcopy(template).to(device).eval(), template.config
    x = torch.rand(batch, cfg.context, cfg.eeg_channels, cfg.freq_bins, device=device)
    with scan_backend(backend), torch.no_grad(), \
            torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
        seconds, peak = timed(lambda: (model(x), synchronize(device)), device, repeats)
    return dict(value=seconds / batch, unit="s/volume", peak_gib=peak,
                detail=f"batch {batch}, best of {repeats}")


def annotated_scan():
    """A context in which VM-UNet's selective scans run in a profiler range, SCAN_RANGE."""
    original = vmunet.selective_scan

    def annotated(*args, **kwargs):
        with torch.profiler.record_function(SCAN_RANGE):
            return original(*args, **kwargs)

    return mock.patch.object(vmunet, "selective_scan", annotated)


def scan_shares(events, wall_s) -> tuple[float, float | None]:
    """The scan's share of the step's wall time (host) and of all GPU kernel time (None without
    a GPU); a host event's device time includes the kernels of the operations inside it."""
    found = [e for e in events if e.device_type == DeviceType.CPU and SCAN_EVENT.search(e.name)]
    ids = {id(e) for e in found}

    def enclosed(event):  # by another scan event: its time is counted there already
        parent = event.cpu_parent
        while parent is not None and id(parent) not in ids:
            parent = parent.cpu_parent
        return parent is not None

    scan = [e for e in found if not enclosed(e)]
    kernels = sum(e.self_device_time_total for e in events
                  if e.device_type != DeviceType.CPU and e.name != SCAN_RANGE
                  and not getattr(e, "is_user_annotation", False))
    return (sum(e.cpu_time_total for e in scan) / (wall_s * 1e6),
            sum(e.device_time_total for e in scan) / kernels if kernels else None)


def measure_scan_share(template, device, precision, backend, batch, accum) -> dict:
    model = copy.deepcopy(template).to(device)
    with scan_backend(backend):
        step = training_step(model, device, precision, batch, accum)
        step()  # warm-up
        with annotated_scan(), torch.profiler.profile() as prof:
            start = time.perf_counter()
            step()
            wall = time.perf_counter() - start
    host, gpu = scan_shares(prof.events(), wall)
    return dict(value=100 * (host if gpu is None else gpu), unit="% of step",
                detail=f"host wall time {100 * host:.0f} %"
                + ("" if gpu is None else f"; GPU kernel time {100 * gpu:.0f} %"))


def check_models(device, rows, deadline, *, shape=SHAPE, size="full", batch=BATCH, accum=ACCUM,
                 infer_batches=INFER_BATCHES, dtypes=("fp32", "bf16"), repeats=3):
    """Training and inference of spec2vol (each scan backend) and E2fNet; the scan's share."""
    for name in ("spec2vol", "e2fnet"):
        torch.manual_seed(0)
        template = build_model(name, size=size, **shape)  # on the CPU; each case takes a copy
        backends = available_backends(device) if name == "spec2vol" else [None]
        for precision in dtypes:
            for backend in backends:
                label = " ".join(filter(None, (name, backend, precision)))
                run_case(rows, deadline, NEED["training"], "training", label, functools.partial(
                    measure_training, template, device, precision, backend, batch, accum,
                    repeats), device)
                for n in infer_batches:
                    run_case(rows, deadline, NEED["inference"], "inference", f"{label} batch {n}",
                             functools.partial(measure_inference, template, device, precision,
                                               backend, n, repeats), device)
        for backend in backends if name == "spec2vol" else []:
            label = f"{name} {backend} {dtypes[-1]}"
            run_case(rows, deadline, NEED["profile"], "scan share", label, functools.partial(
                measure_scan_share, template, device, dtypes[-1], backend, batch, accum), device)


# -- 5. the group level, one process and torchrun ---------------------------------------------

def group_commands(scratch: Path, device="cuda", threads=THREADS) -> dict[str, list[str]]:
    """The group check's command lines in their order, every path under ``scratch``; the
    participant outputs are copied to ``one/out`` and ``torchrun/out`` before the group runs."""
    bids, app = str(scratch / "bids"), [sys.executable, "-m", "spec2vol_bids"]

    def group(name):  # the same options, threads included, so that the two runs compare
        return [bids, str(scratch / name / "out"), "group", *GROUP_ARGS, "--device", device,
                "--omp-nthreads", str(threads)]

    return {"simulate": [sys.executable, "-m", "spec2vol_bids.simulate", bids, *SIMULATION_ARGS],
            "participant": [*app, bids, str(scratch / "participant"), "participant",
                            *PARTICIPANT_ARGS],
            "one process": [*app, *group("one")],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc-per-node", "1", "-m", "spec2vol_bids", *group("torchrun")]}


def run_logged(argv, log: Path, timeout: float) -> int:
    """Run ``argv`` into ``log``; past ``timeout`` kill its process group (torchrun's workers
    too) and raise :class:`subprocess.TimeoutExpired`."""
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "MPLBACKEND": "Agg"})
        try:
            return proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def compare_tables(a: Path, b: Path) -> tuple[bool, float]:
    """Whether two metric TSVs are byte-identical, and their largest numeric difference (NaN
    when their rows or columns differ)."""
    left, right = (pd.read_csv(p, sep="\t") for p in (a, b))  # "n/a" reads as NaN
    if left.shape != right.shape or not left.columns.equals(right.columns):
        return False, math.nan
    numbers = left.select_dtypes("number").columns
    diff = (left[numbers] - right[numbers]).abs().max().max() if len(numbers) else 0.0
    return a.read_bytes() == b.read_bytes(), float(0.0 if pd.isna(diff) else diff)


def run_group_check(deadline, device="cuda") -> dict:
    """Run :func:`group_commands` in a new temporary folder (logs in its ``logs``; removed when
    the tables are identical, else kept to look into) and compare the metric tables."""
    scratch, seconds = Path(tempfile.mkdtemp(prefix="spec2vol-gpu-check-")), {}
    (scratch / "logs").mkdir(parents=True, exist_ok=True)
    for label, argv in group_commands(scratch, device).items():
        if label == "one process":
            for name in ("one", "torchrun"):
                shutil.copytree(scratch / "participant", scratch / name / "out")
        start, log = time.monotonic(), scratch / "logs" / f"{label.replace(' ', '-')}.log"
        try:
            code = run_logged(argv, log, deadline - time.monotonic())
        except subprocess.TimeoutExpired:
            return dict(status=f"skipped: budget (stopped in {label}; logs in {scratch})")
        seconds[label] = time.monotonic() - start
        if code:  # the log's last line says why (spec2vol's one-line errors)
            last = one_line("".join(log.read_text().strip().splitlines()[-1:]))
            return dict(status=f"error: {label} exit {code}: {last} (logs in {scratch})")
    identical, diff = compare_tables(*(scratch / name / "out" / "group_metrics.tsv"
                                       for name in ("one", "torchrun")))
    if identical:
        shutil.rmtree(scratch, ignore_errors=True)
    return dict(value=None if math.isnan(diff) else diff, unit="max |difference|",
                status="ok (identical)" if identical else f"FAIL (tables differ; see {scratch})",
                detail=", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
                + "; world size 1: spec2vol starts NCCL only for WORLD_SIZE > 1")


# -- 6. targets, report, plan -----------------------------------------------------------------

def target_rows(rows, cpu_samples_per_s) -> list[dict]:
    """The issue's targets: fast within 2x of mamba-ssm; spec2vol bf16 training >= 40x CPU."""
    def value(check, case):  # of a row that ran and passed
        return next((r["value"] for r in rows if (r["check"], r["case"]) == (check, case)
                     and r["status"].startswith("ok") and r["value"]), None)

    out = []
    for check, case in (("scan fwd+bwd", "{} {}"), ("training", "spec2vol {} {}")):
        for precision in ("fp32", "bf16"):
            fast, mamba = (value(check, case.format(b, precision)) for b in ("fast", "mamba"))
            # None unless both ran; times for the scan, rates for training
            ratio = fast and mamba and (fast / mamba if check[0] == "s" else mamba / fast)
            out.append(row("target", f"fast vs mamba-ssm, {check} {precision}", ratio, "x slower",
                           "skipped: not both measured" if ratio is None else
                           "met (<= 2x)" if ratio <= 2 else "NOT met (<= 2x)"))
    rates = {b: value("training", f"spec2vol {b} bf16") for b in ("fast", "mamba")}
    best = max((b for b in rates if rates[b]), key=rates.get, default=None)
    ratio = rates[best] / cpu_samples_per_s if best else None
    out.append(row("target", f"spec2vol bf16 training vs CPU {cpu_samples_per_s:g} samples/s",
                   ratio, "x", "skipped: no bf16 training figure" if ratio is None else
                   "met (>= 40x)" if ratio >= 40 else "NOT met (>= 40x)",
                   detail=f"{best} backend, {rates[best]:.1f} samples/s" if best else ""))
    return out


def format_value(r) -> str:
    return "" if r["value"] is None else f"{r['value']:.3g} {r['unit']}"


def format_table(report: dict) -> str:
    """The report as a Markdown table under two lines naming the machine."""
    env, cpu = report["environment"], report["environment"]["cpu_reference"]
    lines = [f"spec2vol GPU check on {env['device']}: torch {env['torch']}, CUDA {env['cuda']}, "
             f"mamba-ssm {env['mamba_ssm'] or 'not installed'}; {report['elapsed_s']:.0f} s of "
             f"a {report['budget_s']:g} s budget",
             f"CPU reference: {cpu['samples_per_s']:g} samples/s ({cpu['source']})", "",
             "| check | case | result | peak GPU GiB | status | detail |", "|---" * 6 + "|"]
    lines += [f"| {r['check']} | {r['case']} | {format_value(r)} | "
              f"{'' if r['peak_gib'] is None else format(r['peak_gib'], '.1f')} | {r['status']} | "
              f"{r['detail']} |" for r in report["rows"]]
    return "\n".join(lines)


def mamba_version() -> str | None:
    """mamba-ssm's version from its metadata (importing it may start CUDA), or None."""
    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version("mamba-ssm")
    return None


def environment(device, cpu_samples_per_s) -> dict:
    """What ran where: the GPU, library versions, the CPU figure of the 40x target."""
    props = torch.cuda.get_device_properties(device)
    return dict(device=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=props.total_memory / 2**30, torch=torch.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                python=sys.version.split()[0], spec2vol=__version__, mamba_ssm=mamba_version(),
                scan_backends=available_backends(device), precisions=precisions(device),
                cpu_reference={**CPU_REFERENCE, "samples_per_s": cpu_samples_per_s})


def plan(args, out: Path) -> str:
    """What a run would do: each check with its sizes, and the group check's command lines."""
    commands = group_commands(Path(tempfile.gettempdir(), "spec2vol-gpu-check-XXXXXXXX"))
    cpu = args.cpu_samples_per_s
    steps = [
        f"gpu_check dry run: nothing runs and no GPU is touched. A run writes {out} and prints one "
        f"table, within {args.budget:g} s (a check that does not fit: 'skipped: budget').",
        f"1. scan parity with the sequential scan, output and gradients: fast, and mamba where "
        f"mamba-ssm's kernel imports (mamba-ssm: {mamba_version() or 'not installed here'}); "
        f"batch x channels x L x states x groups {'x'.join(map(str, SCAN_SHAPE))}; fp32 (tolerance "
        f"{TOLERANCE['fp32']:g}), bf16 ({TOLERANCE['bf16']:g}) where the GPU has it; then each "
        f"backend's forward + backward time",
        f"2. training samples/s, spec2vol (each backend) and e2fnet, {SHAPE['eeg_channels']} "
        f"channels x {SHAPE['freq_bins']} bins -> {SHAPE['out_shape']}: fp32 and bf16 autocast, "
        f"batch {BATCH} x {ACCUM} accumulation (AdamW, training loss), best of 3; peak GPU memory",
        f"3. inference s/volume: the same cases at batch {' and '.join(map(str, INFER_BATCHES))}",
        "4. the selective scan's share of one spec2vol bf16 training step (torch.profiler)",
        f"5. group level ({NEED['group']} s kept for it) in a new temporary folder: the commands "
        "below, the participant outputs copied to one/out and torchrun/out before the group "
        "runs; one/out/group_metrics.tsv and torchrun/out/group_metrics.tsv must be identical",
        f"6. targets: fast within 2x of mamba-ssm; spec2vol bf16 training >= 40 x {cpu:g} = "
        f"{40 * cpu:g} samples/s ({CPU_REFERENCE['source']})"]
    return "\n".join([textwrap.fill(s, 96, subsequent_indent="   ", break_long_words=False,
                                    break_on_hyphens=False) for s in steps]
                     + [f"     $ {shlex.join(c)}" for c in commands.values()])


def main(argv=None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--budget", type=float, default=440, help="seconds for all checks")
    parser.add_argument("--cpu-samples-per-s", type=float, default=CPU_REFERENCE["samples_per_s"],
                        help=f"the CPU figure of the 40x target ({CPU_REFERENCE['source']})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; no GPU needed")
    args = parser.parse_args(argv)
    out = args.out.expanduser().absolute()
    bids = next((p for p in out.parents if (p / "dataset_description.json").is_file()), None)
    writable = out.parent.is_dir() and os.access(out.parent, os.W_OK)  # known before the run
    problem = (f"--out {out}: cannot write into {out.parent}" if not writable else
               f"--out {out} is inside the BIDS dataset {bids}" if bids else
               None if args.dry_run or torch.cuda.is_available() else  # a dry run touches no GPU
               f"no CUDA device is available to torch {torch.__version__} (CUDA build: "
               f"{torch.version.cuda}); --dry-run prints the plan")
    if problem:
        print(f"gpu_check: error: {problem}", file=sys.stderr)
        return EX_UNAVAILABLE if problem.startswith("no CUDA") else EX_USAGE
    if args.dry_run:
        print(plan(args, out))
        return 0
    device, start = torch.device("cuda", torch.cuda.current_device()), time.monotonic()
    rows, dtypes = [], precisions(device)
    check_scan(device, rows, start + args.budget - NEED["group"], dtypes=dtypes)
    check_models(device, rows, start + args.budget - NEED["group"], dtypes=dtypes)
    run_case(rows, start + args.budget, NEED["group"], "group level, 2 epochs",
             "cuda: one process vs torchrun --nproc-per-node 1",
             functools.partial(run_group_check, start + args.budget), device)
    rows += target_rows(rows, args.cpu_samples_per_s)
    report = dict(command=shlex.join(sys.argv), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  environment=environment(device, args.cpu_samples_per_s), budget_s=args.budget,
                  elapsed_s=time.monotonic() - start, rows=rows)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    return 1 if any(r["status"].startswith(("FAIL", "error")) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
