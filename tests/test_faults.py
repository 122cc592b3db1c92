"""Faults: interruptions, kills, a full disk, concurrent jobs; and inputs that stay untouched.

The BIDS-App runs in subprocesses on copies of a small simulated dataset (three subjects, 20
volumes). Group runs train the tiny network on one fixed split (subjects 01 and 02, tested on
03) for a couple of epochs, which takes seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
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

def assert_interrupted(proc: subprocess.Popen, signum: int, rerun: str) -> None:
    """Send ``signum``; the run must exit 130 without a traceback, its last line saying that
    the same command ``rerun``."""
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"spec2vol: interrupted; the same command {rerun}"


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
    assert_interrupted(proc, signal.SIGINT, "skips what is finished and resumes training from its "
                                            "last checkpoint")

    import torch

    state = torch.load(checkpoint, weights_only=True)
    assert 1 <= state["epoch"] < 50 and len(state["history"]) == state["epoch"]
    assert partial_files(work) == [] and partial_files(participant_outputs) == []
    assert not (participant_outputs / "models" / "fold-fixed" / "done.json").exists()
    assert unreadable_outputs(participant_outputs) == []


def test_sigterm_during_participant_exits_130_and_says_what_a_rerun_does(simulated_bids, tmp_path):
    out = tmp_path / "out"
    proc = start(simulated_bids, out, "participant", *PARTICIPANT_OPTIONS)
    wait_for(lambda: out.is_dir() and any(out.glob("sub-*/eeg/*.npy")), proc)
    assert_interrupted(proc, signal.SIGTERM, "skips the runs whose outputs are up to date and "
                                             "redoes the rest")
    assert partial_files(out) == [] and unreadable_outputs(out) == []


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
    # and a checkpoint that a killed process of this machine had half written (pid not running)
    from spec2vol_bids import derivatives

    half = checkpoint.with_name(f".{checkpoint.name}.{derivatives._WRITER}-4194000-abcd.tmp.pt")
    half.write_bytes(b"PK")

    proc = group(simulated_bids_source, out, work, *FIXED_SPLIT)
    assert proc.returncode == 0, proc.stderr
    assert partial_files(work) == []
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
    # a failed write is not a refusal of the run: its up-to-date spectrogram of an earlier
    # call stays (another --target-grid remakes only the target, which no longer fits)
    earlier = tmp_path / "earlier"
    assert run_spec2vol(simulated_bids, earlier, "participant", "--participant-label", "01",
                        *PARTICIPANT_OPTIONS).returncode == 0
    spectrogram = next((earlier / "sub-01" / "eeg").glob("*_spectrogram.npy"))
    made = spectrogram.stat().st_mtime_ns
    options = [*PARTICIPANT_OPTIONS[:PARTICIPANT_OPTIONS.index("--target-grid")], "--target-grid",
               "32", "32", "16", *PARTICIPANT_OPTIONS[PARTICIPANT_OPTIONS.index("--target-grid") + 4:]]
    proc = run_spec2vol(simulated_bids, earlier, "participant", "--participant-label", "01",
                        *options, preexec_fn=_file_size_limit(200_000))
    assert proc.returncode in (73, 74), proc.stderr
    assert spectrogram.stat().st_mtime_ns == made


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
        metrics = pd.read_csv(folder / "metrics.tsv", sep="\t")
        # the simulated dataset carries its ground truth, hence the oracle ceiling
        assert sorted(metrics["model"]) == ["mean", "oracle", "spec2vol"]
        assert set(metrics["participant_id"]) == {f"sub-{label}"}
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


def test_raw_dataset_untouched_by_runs_killed_while_reading(simulated_bids, tmp_path):
    """Every file of BIDS_DIR keeps its bytes, size, time and mode: after a validated run, and
    after a run killed with SIGKILL while it reads the EEG. A stale mne-bids lock file (left
    by an earlier version, which read sidecars through mne-bids) neither stalls the run nor
    fails its validation."""
    channels = next(simulated_bids.glob("sub-01/eeg/*_channels.tsv"))
    stale = channels.with_name(channels.name + ".lock")
    stale.write_text("")
    before = checksums(simulated_bids)
    options = [o for o in PARTICIPANT_OPTIONS if o != "--skip-bids-validation"]
    tic = time.monotonic()
    proc = run_spec2vol(simulated_bids, tmp_path / "out", "participant", *options)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - tic < 60 and "stale lock file" in proc.stderr
    assert checksums(simulated_bids) == before
    for seconds in (1.5, 3.0, 4.5):  # killed at different points of reading and writing
        out = tmp_path / f"killed-{seconds}"
        kill_after(start(simulated_bids, out, "participant", *PARTICIPANT_OPTIONS, "-w",
                         tmp_path / f"work-{seconds}"), seconds)
        assert checksums(simulated_bids) == before, f"killed after {seconds} s"
    assert sorted(p.name for p in simulated_bids.rglob("*.lock")) == [stale.name]


def test_work_dir_inside_the_raw_dataset_or_a_file_is_refused(simulated_bids, tmp_path):
    before = checksums(simulated_bids)
    for work, needle in [(simulated_bids / "work", "-w/--work-dir is inside the raw tree"),
                         (simulated_bids, "-w/--work-dir is BIDS_DIR")]:
        for level in ("participant", "group"):
            proc = run_spec2vol(simulated_bids, tmp_path / "out", level, "--skip-bids-validation",
                                "-w", work)
            assert_clean_failure(proc, 64, needle)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    proc = run_spec2vol(simulated_bids, tmp_path / "out", "participant", "--skip-bids-validation",
                        "-w", afile)
    assert_clean_failure(proc, 64, "names a file, not a folder")
    assert checksums(simulated_bids) == before and not (tmp_path / "out").exists()



def test_the_work_folder_check_writes_nothing_into_the_dataset(simulated_bids, tmp_path):
    """-w under BIDS_DIR/derivatives, in a folder that does not exist yet: the check that it can
    be made must not probe by writing into the dataset (the folder's mtime would change)."""
    from spec2vol_bids.bids.validation import check_work_dir

    derivatives = simulated_bids / "derivatives"
    derivatives.mkdir(exist_ok=True)
    stamp = derivatives.stat().st_mtime_ns
    check_work_dir(simulated_bids, derivatives / "spec2vol" / "work")
    assert derivatives.stat().st_mtime_ns == stamp and not (derivatives / "spec2vol").exists()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    stamp = outside.stat().st_mtime_ns
    check_work_dir(simulated_bids, outside / "work")
    assert outside.stat().st_mtime_ns != stamp and list(outside.iterdir()) == []  # probed, cleaned


def test_up_to_date_means_verified(simulated_bids, tmp_path):
    """A rerun skips a run only when every file it reads is unchanged and its outputs are
    intact: a truncated spectrogram or target, or a changed data file that the BrainVision
    header names outside the run's folder, is recomputed."""
    out = tmp_path / "out"
    assert run_spec2vol(simulated_bids, out, "participant", *PARTICIPANT_OPTIONS).returncode == 0
    spec = next(out.glob("sub-01/eeg/*_spectrogram.npy"))
    target = next(out.glob("sub-01/func/*_desc-target_bold.nii.gz"))
    reference = {p: p.read_bytes() for p in (spec, target)}
    for damaged in (spec, target):
        with open(damaged, "r+b") as fh:
            fh.truncate(damaged.stat().st_size - 100)
        proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01",
                            *PARTICIPANT_OPTIONS)
        assert proc.returncode == 0, proc.stderr
        assert f"{damaged}: damaged" in proc.stderr
        assert damaged.read_bytes() == reference[damaged]
    # the header's DataFile= may name a file in another folder: it is an input too
    vhdr = next(simulated_bids.glob("sub-01/eeg/*_eeg.vhdr"))
    elsewhere = tmp_path / "raw-data" / "recording.eeg"
    elsewhere.parent.mkdir()
    shutil.move(vhdr.with_suffix(".eeg"), elsewhere)
    text = vhdr.read_text()
    vhdr.write_text(text.replace(f"DataFile={vhdr.stem}.eeg", f"DataFile={elsewhere}"))
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01", *PARTICIPANT_OPTIONS)
    assert proc.returncode == 0 and "spectrogram up to date" not in proc.stderr  # the header changed
    assert run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01",
                        *PARTICIPANT_OPTIONS).stderr.count("spectrogram up to date") == 1
    data = np.memmap(elsewhere, dtype=np.float32, mode="r+")
    data[1000:2000] *= 2.0  # same size, same name: the content changed (and the mtime)
    data.flush()
    del data
    proc = run_spec2vol(simulated_bids, out, "participant", "--participant-label", "01", *PARTICIPANT_OPTIONS)
    assert proc.returncode == 0 and "spectrogram up to date" not in proc.stderr


def test_temporaries_of_writers_on_other_nodes_are_left_alone(tmp_path):
    """OUTPUT_DIR shared by jobs that cannot see each other's process ids (other nodes, other
    containers): a live writer's temporary file survives the others' clean-up."""
    from spec2vol_bids import derivatives

    out = tmp_path / "out"
    (out / "sub-01").mkdir(parents=True)
    # a writer in a PID namespace of its own (where the machine allows one) keeps its file open
    # while this process cleans up; it then finishes its write
    writer = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from spec2vol_bids.derivatives import atomic_path
        with atomic_path(Path({str(out / "sub-01" / "x.json")!r})) as tmp:
            tmp.write_text("{{}}")
            Path({str(tmp_path / "ready")!r}).write_text(tmp.name)
            time.sleep(4)
    """)
    prefix = ["unshare", "--pid", "--fork", "--mount-proc"]
    isolated = shutil.which("unshare") and subprocess.run(
        [*prefix, "true"], capture_output=True).returncode == 0
    proc = subprocess.Popen([*(prefix if isolated else []), sys.executable, "-c", writer],
                            env=cli_env(), stderr=subprocess.PIPE, text=True)
    wait_for((tmp_path / "ready").exists, proc, timeout=60)
    assert derivatives.remove_stale_temporaries(out) == []
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert (out / "sub-01" / "x.json").read_text() == "{}"
    # the same by name: another identity's writer, whose process id does not exist here, is
    # alive as far as this process can tell; this identity's dead writer is stale, and so is
    # any temporary file older than a day
    other = out / "sub-01" / ".y.json.0123456789-4194000-abcd.tmp.json"
    dead = out / "sub-01" / f".z.json.{derivatives._WRITER}-4194000-abcd.tmp.json"
    ancient = out / "sub-01" / ".w.json.0123456789-4194000-abcd.tmp.json"
    for path in (other, dead, ancient):
        path.write_text("")
    day_ago = time.time() - derivatives.STALE_AFTER_S - 60
    os.utime(ancient, (day_ago, day_ago))
    assert sorted(derivatives.remove_stale_temporaries(out)) == sorted([dead, ancient])
    assert other.exists()
