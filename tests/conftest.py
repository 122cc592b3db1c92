"""Shared fixtures: small datasets made once per session, the CLI as a user runs it.

Building a dataset or running the participant level costs seconds, so each is done once per
session (``*_source`` fixtures, to be treated as read-only) and every test that changes files
works on its own ``shutil.copytree`` copy (which keeps modification times, so the copies'
derivatives stay up to date with their inputs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixture_data import copy_filled_fixture

#: The simulated dataset: three subjects so that leave-one-subject-out has a training subject
#: to hold out for ``--select val``; 20 volumes of 2 s, 16 EEG channels, a 32x32x8 grid.
SIMULATION = dict(subjects=3, volumes=20, channels=16, grid=(32, 32, 8), seed=7)

#: Participant-level options that fit the simulated runs: 20 volumes leave 14 samples per run
#: with 2 discarded volumes and 4 windows of context; the tiny model needs H and W divisible by
#: 32; 16 frequency bins and one thread keep every run to a fraction of a second.
PARTICIPANT_OPTIONS = ("--discard-volumes", "2", "--context", "4", "--target-grid", "32", "32", "8",
                       "--freq-bins", "16", "--omp-nthreads", "1", "--skip-bids-validation")

#: Group-level options for a CPU test: the tiny network, small batches, one thread (the
#: number of epochs is up to each test).
GROUP_OPTIONS = ("--model-config", "tiny", "--batch-size", "4", "--omp-nthreads", "1")


def spec2vol_command(*args) -> list[str]:
    """``python -m spec2vol_bids ARGS``: the BIDS-App as installed, with this interpreter."""
    return [sys.executable, "-m", "spec2vol_bids", *map(str, args)]


def cli_env(**extra) -> dict:
    """The environment of a CLI subprocess: no display, one thread, anything in ``extra``."""
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    env.update(extra)
    return env


def run_spec2vol(*args, timeout: float = 300, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run the BIDS-App to completion; stdout and stderr are captured as text."""
    return subprocess.run(spec2vol_command(*args), capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), **kwargs)


def error_line(stderr: str) -> str:
    """The single ``spec2vol: error:`` line of a failed run (asserting that there is one)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("spec2vol: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def partial_files(out_dir: Path) -> list[Path]:
    """Temporary files (``.<name>.<random>.tmp…``) left in ``out_dir``."""
    if not Path(out_dir).exists():
        return []
    return sorted(p for p in Path(out_dir).rglob(".*") if p.is_file() and ".tmp" in p.name)


def unreadable_outputs(out_dir: Path) -> list[str]:
    """Final-named data files under ``out_dir`` that do not load (a corrupt or partial write)."""
    import nibabel as nib

    bad = []
    for path in sorted(Path(out_dir).rglob("*")) if Path(out_dir).exists() else []:
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            if path.suffix == ".npy":
                np.load(path)
            elif path.name.endswith((".nii", ".nii.gz")):
                np.asarray(nib.load(path).dataobj)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".pt":
                import torch

                torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to load is what is looked for
            bad.append(f"{path}: {type(exc).__name__}: {exc}")
    return bad


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int, *needles: str,
                         out_dir: Path | None = None) -> str:
    """Exit ``code``, one ``spec2vol: error:`` line holding ``needles``, nothing half-written."""
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{proc.stderr}"
    line = error_line(proc.stderr)
    for needle in needles:
        assert str(needle) in line, f"{needle!r} not in {line!r}"
    if out_dir is not None:
        assert partial_files(out_dir) == []
        assert unreadable_outputs(out_dir) == []
    return line


@pytest.fixture(scope="session")
def simulated_bids_source(tmp_path_factory) -> Path:
    """The simulated dataset of :data:`SIMULATION`, made once; copy it before changing it."""
    from spec2vol_bids.simulate import simulate_dataset

    return simulate_dataset(tmp_path_factory.mktemp("simulated") / "bids", **SIMULATION)


@pytest.fixture()
def simulated_bids(simulated_bids_source, tmp_path) -> Path:
    """A private copy of the simulated dataset."""
    return Path(shutil.copytree(simulated_bids_source, tmp_path / "bids"))


@pytest.fixture(scope="session")
def participant_outputs_source(simulated_bids_source, tmp_path_factory) -> Path:
    """The participant level's outputs for the simulated dataset (made once, read-only)."""
    out = tmp_path_factory.mktemp("participant") / "out"
    proc = run_spec2vol(simulated_bids_source, out, "participant", *PARTICIPANT_OPTIONS)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture()
def participant_outputs(participant_outputs_source, tmp_path) -> Path:
    """A private copy of the participant-level outputs (e.g. to run the group level into)."""
    return Path(shutil.copytree(participant_outputs_source, tmp_path / "out"))


@pytest.fixture(scope="session")
def filled_noddi_source(tmp_path_factory) -> Path:
    """The NODDI-layout fixture with its data files filled (made once, read-only)."""
    return copy_filled_fixture(tmp_path_factory.mktemp("noddi") / "eeg_rest_fmri")


@pytest.fixture()
def filled_noddi(filled_noddi_source, tmp_path) -> Path:
    """A private copy of the filled NODDI-layout fixture."""
    return Path(shutil.copytree(filled_noddi_source, tmp_path / "eeg_rest_fmri"))
