"""Faults: interruptions, kills, a full disk, concurrent jobs; and inputs that stay untouched.

The BIDS-App runs in subprocesses on copies of a small simulated dataset (three subjects, 20
volumes). Group runs train the tiny network on one fixed split (subjects 01 and 02, tested on
03) for a couple of epochs, which takes seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import (
    GROUP_OPTIONS,
    PARTICIPANT_OPTIONS,
    assert_clean_failure,
    cli_env,
    partial_files,
    run_spec2vol,
    spec2vol_command,
    unreadable_outputs,
)

FIXED_SPLIT = ("--split", "fixed", "--test-subjects", "03", "--no-final")


def _default_signals() -> None:
    """Give the child the default disposition of the signals the tests send.

    An ignored signal stays ignored across exec: a suite started under nohup or from a
    background job would otherwise hand its children an ignored SIGINT, and the test would
    measure how it was launched rather than the tool.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def start(*args, **kwargs) -> subprocess.Popen:
    kwargs.setdefault("preexec_fn", _default_signals)
    return subprocess.Popen(spec2vol_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env(), **kwargs)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before the awaited moment:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the run to get there")
        time.sleep(0.05)


def kill_after(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``proc`` after ``seconds`` unless it ends first; True when it was killed."""
    try:
        proc.communicate(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return True


def derivative_files(out: Path) -> dict[str, Path]:
    """The data files and sidecars of the subjects (logs, reports and figures left out)."""
    return {p.relative_to(out).as_posix(): p for p in sorted(out.glob("sub-*/*/*"))
            if p.is_file() and not p.name.startswith(".")}


def assert_same_derivatives(a: Path, b: Path) -> None:
    """Byte-identical ``.npy``, identical NIfTI data and affines, identical JSON content."""
    files_a, files_b = derivative_files(a), derivative_files(b)
    assert sorted(set(files_a) - set(files_b)) == [], "missing from the second run's outputs"
    assert sorted(set(files_b) - set(files_a)) == [], "only in the second run's outputs"
    for name, path in files_a.items():
        other = files_b[name]
        if name.endswith(".npy"):
            assert path.read_bytes() == other.read_bytes(), name
        elif name.endswith(".nii.gz"):
            img_a, img_b = nib.load(path), nib.load(other)
            np.testing.assert_array_equal(np.asarray(img_a.dataobj), np.asarray(img_b.dataobj), err_msg=name)
            np.testing.assert_array_equal(img_a.affine, img_b.affine, err_msg=name)
        elif name.endswith(".json"):
            meta_a, meta_b = json.loads(path.read_text()), json.loads(other.read_text())
            for meta in (meta_a, meta_b):  # where each copy of the inputs lives
                meta.pop("Sources", None)
            assert meta_a == meta_b, name


def checksums(root: Path) -> dict:
    """SHA-256, size, modification time and mode of every file under ``root``."""
    table = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        table[path.relative_to(root).as_posix()] = (digest, st.st_size if digest else None,
                                                    st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return table


def group(bids: Path, out: Path, work: Path, *extra, epochs: int = 2, **kwargs):
    return run_spec2vol(bids, out, "group", *GROUP_OPTIONS, "--epochs", epochs, "-w", work, *extra, **kwargs)


# -- interruptions --------------------------------------------------------------------------

def test_sigint_during_group_saves_a_checkpoint_and_exits_130(simulated_bids_source, participant_outputs, tmp_path):
    work = tmp_path / "work"
    checkpoint = work / "checkpoints" / "fold-fixed" / "spec2vol" / "checkpoint.pt"
    # Started as under nohup or a batch system (SIGINT ignored in the parent): the child must
    # still get the default disposition, or the result depends on how the suite was launched.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc = start(simulated_bids_source, participant_outputs, "group", *GROUP_OPTIONS, "--epochs", "50",
                     "-w", work, *FIXED_SPLIT)
    finally:
        signal.signal(signal.SIGINT, previous)
    wait_for(checkpoint.exists, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "spec2vol: interrupted"

    import torch

    state = torch.load(checkpoint, weights_only=True)
    assert 1 <= state["epoch"] < 50 and len(state["history"]) == state["epoch"]
    assert partial_files(work) == [] and partial_files(participant_outputs) == []
    assert not (participant_outputs / "models" / "fold-fixed" / "done.json").exists()
    assert unreadable_outputs(participant_outputs) == []


def kill_at_file_count(proc: subprocess.Popen, out: Path, count: int, timeout: float = 240) -> bool:
    """SIGKILL ``proc`` as soon as ``out`` holds ``count`` files (temporary ones included).

    Progress measured in files written, rather than seconds, puts the kill at the same point
    of the work however loaded the machine is. True when the process was killed.
    """
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and sum(1 for p in out.rglob("*") if p.is_file()) >= count:
            proc.kill()
            proc.communicate()
            return True
        time.sleep(0.01)
    proc.kill()
    proc.communicate()
    return False


def test_sigkill_during_participant_then_rerun_is_identical(simulated_bids, participant_outputs_source, tmp_path):
    """Killed at three seeded random points, each rerun resuming the last; then completed."""
    out = tmp_path / "out"
    total = sum(1 for p in participant_outputs_source.rglob("*") if p.is_file())
    points = sorted(random.Random(20240607).sample(range(3, total - 3), 3))
    killed = 0
    for count in points:
        proc = start(simulated_bids, out, "participant", *PARTICIPANT_OPTIONS)
        killed += kill_at_file_count(proc, out, count)
        assert unreadable_outputs(out) == [], f"after SIGKILL at {count} files"
    assert killed >= 2, f"the runs ended before the kills at {points} files of {total}"
    proc = run_spec2vol(simulated_bids, out, "participant", *PARTICIPANT_OPTIONS)
    assert proc.returncode == 0, proc.stderr
    assert_same_derivatives(participant_outputs_source, out)
    assert unreadable_outputs(out) == []


def test_sigkill_during_group_then_rerun_is_identical(simulated_bids_source, participant_outputs_source, tmp_path):
    # the uninterrupted run
    reference = Path(shutil.copytree(participant_outputs_source, tmp_path / "reference" / "out"))
    proc = group(simulated_bids_source, reference, tmp_path / "reference" / "work", *FIXED_SPLIT)
    assert proc.returncode == 0, proc.stderr

    # killed once an epoch has been checkpointed, then at a seeded moment of the resumed run
    out = Path(shutil.copytree(participant_outputs_source, tmp_path / "killed" / "out"))
    work = tmp_path / "killed" / "work"
    checkpoint = work / "checkpoints" / "fold-fixed" / "spec2vol" / "checkpoint.pt"
    args = (simulated_bids_source, out, "group", *GROUP_OPTIONS, "--epochs", "2", "-w", work, *FIXED_SPLIT)
    proc = start(*args)
    wait_for(checkpoint.exists, proc)
    proc.kill()
    proc.communicate()
    assert unreadable_outputs(out) == [] and unreadable_outputs(work) == []
    kill_after(start(*args), round(random.Random(11).uniform(1.0, 8.0), 2))
    assert unreadable_outputs(out) == [] and unreadable_outputs(work) == []

    proc = group(simulated_bids_source, out, work, *FIXED_SPLIT)
    assert proc.returncode == 0, proc.stderr
    assert (out / "group_metrics.tsv").read_text() == (reference / "group_metrics.tsv").read_text()
    metrics = "models/fold-fixed/metrics.tsv"
    assert (out / metrics).read_text() == (reference / metrics).read_text()

    import torch

    weights = torch.load(out / "models" / "fold-fixed" / "model.pt", weights_only=True)["state_dict"]
    expected = torch.load(reference / "models" / "fold-fixed" / "model.pt", weights_only=True)["state_dict"]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
    synth = "sub-03/func/sub-03_task-rest_desc-synth_bold.nii.gz"
    np.testing.assert_array_equal(nib.load(out / synth).get_fdata(), nib.load(reference / synth).get_fdata())


# -- a full disk ----------------------------------------------------------------------------

def _file_size_limit(n_bytes: int):
    """A ``preexec_fn`` that lets the child write files of at most ``n_bytes``.

    SIGXFSZ is ignored so that a write beyond the limit fails with EFBIG, as a full disk
    fails with ENOSPC, instead of killing the process.
    """
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


def test_full_disk_during_participant(simulated_bids, tmp_path):
    # the spectrogram (20 KB) fits, the BOLD target (~0.6 MB) does not
    out = tmp_path / "out"
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01",
                        *PARTICIPANT_OPTIONS, preexec_fn=_file_size_limit(200_000))
    assert proc.returncode in (73, 74), proc.stderr
    assert_clean_failure(proc, proc.returncode, "sub-01_task-rest_desc-target_bold.nii.gz", out_dir=out)
    assert not (out / "sub-01" / "func" / "sub-01_task-rest_desc-target_bold.nii.gz").exists()


def test_full_disk_during_group(simulated_bids_source, participant_outputs, tmp_path):
    # the target cache (0.6 MB per run) fits, the training checkpoint (~8 MB) does not
    work = tmp_path / "work"
    proc = group(simulated_bids_source, participant_outputs, work, *FIXED_SPLIT, epochs=1,
                 preexec_fn=_file_size_limit(2_000_000))
    assert proc.returncode in (73, 74), proc.stderr
    assert_clean_failure(proc, proc.returncode, "checkpoint", out_dir=participant_outputs)
    assert partial_files(work) == [] and unreadable_outputs(work) == []
    assert not (participant_outputs / "models" / "fold-fixed" / "model.pt").exists()


# -- concurrent jobs ------------------------------------------------------------------------

def _assert_intact_description(out: Path) -> None:
    desc = json.loads((out / "dataset_description.json").read_text(encoding="utf-8"))
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "spec2vol"
    assert partial_files(out) == [] and unreadable_outputs(out) == []


def test_concurrent_participant_jobs_share_one_output_dir(simulated_bids_source, tmp_path):
    out = tmp_path / "out"
    jobs = [start(simulated_bids_source, out, "participant", "--participant-label", label, *PARTICIPANT_OPTIONS)
            for label in ("01", "02")]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    _assert_intact_description(out)
    for label in ("01", "02"):
        stem = f"sub-{label}_task-rest_desc"
        assert np.load(out / f"sub-{label}" / "eeg" / f"{stem}-spec2vol_spectrogram.npy").shape == (20, 16, 16)
        assert nib.load(out / f"sub-{label}" / "func" / f"{stem}-target_bold.nii.gz").shape == (32, 32, 8, 20)
    assert not (out / "sub-03").exists()


def test_concurrent_group_fold_jobs_share_one_output_dir(simulated_bids_source, participant_outputs, tmp_path):
    description = (participant_outputs / "dataset_description.json").read_bytes()
    work = tmp_path / "work"
    jobs = [start(simulated_bids_source, participant_outputs, "group", *GROUP_OPTIONS, "--epochs", "1",
                  "-w", work, "--folds", label) for label in ("01", "02")]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    assert (participant_outputs / "dataset_description.json").read_bytes() == description
    _assert_intact_description(participant_outputs)
    for label in ("01", "02"):
        folder = participant_outputs / "models" / f"fold-{label}"
        assert (folder / "done.json").exists() and (folder / "model.pt").exists()
        assert (folder / "metrics.tsv").read_text().count(f"sub-{label}") == 2  # spec2vol and mean
    assert not (participant_outputs / "models" / "fold-03").exists()
    assert not (participant_outputs / "group_metrics.tsv").exists()  # fold 03 is still to run


# -- inputs are read-only -------------------------------------------------------------------

def read_only_prefix(folder: Path) -> list[str]:
    """A command prefix that runs the command with ``folder`` mounted read-only, if possible.

    A private mount namespace (``unshare -m``, which needs privileges) makes writes into
    ``folder`` fail with EROFS even for root; without one the prefix is empty.
    """
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = ["unshare", "-m", "sh", "-c", script, str(folder)]
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run([*prefix, "sh", "-c", f'! touch "{folder}/.probe" 2>/dev/null'], capture_output=True)
    return prefix if probe.returncode == 0 and not (folder / ".probe").exists() else []


def test_inputs_are_never_modified(simulated_bids, tmp_path):
    """Both levels on a write-protected dataset leave every file's bytes, times and mode alone.

    The dataset is ``chmod -R a-w``; as root ignores that, the runs also see it through a
    read-only bind mount where the system allows one, and checksums are compared either way.
    """
    for path in [simulated_bids, *simulated_bids.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = checksums(simulated_bids)
    prefix = read_only_prefix(simulated_bids)
    out, work = tmp_path / "out", tmp_path / "work"
    runs = [("participant", *PARTICIPANT_OPTIONS),
            ("group", *GROUP_OPTIONS, "--epochs", "1", *FIXED_SPLIT)]
    for args in runs:
        proc = subprocess.run([*prefix, *spec2vol_command(simulated_bids, out, *args, "-w", work)],
                              capture_output=True, text=True, env=cli_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    assert (out / "group_metrics.tsv").exists()
    after = checksums(simulated_bids)
    assert sorted(after) == sorted(before)  # nothing created, nothing left behind
    assert {k: v for k, v in after.items() if v[0]} == {k: v for k, v in before.items() if v[0]}
