"""The participant level end to end: the NODDI fixture, idempotence and parallel runs."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fixture_data import copy_filled_fixture
from spec2vol_bids.simulate import simulate_dataset


def spec2vol(*args):
    proc = subprocess.run([sys.executable, "-m", "spec2vol_bids", *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    return proc


@pytest.fixture(scope="module")
def noddi(tmp_path_factory):
    return copy_filled_fixture(tmp_path_factory.mktemp("noddi") / "eeg_rest_fmri")


def test_noddi_fixture_with_derivative_eeg(noddi, tmp_path):
    out = tmp_path / "out"
    proc = spec2vol(noddi, out, "participant", "--eeg-derivatives", noddi / "derivatives")
    assert proc.returncode == 0, proc.stderr
    expected_windows = {"32": 299, "35": 300, "36": 300}
    for sub, n_windows in expected_windows.items():
        base = out / f"sub-{sub}"
        spec = np.load(base / "eeg" / f"sub-{sub}_task-rest_desc-spec2vol_spectrogram.npy")
        meta = json.loads((base / "eeg" / f"sub-{sub}_task-rest_desc-spec2vol_spectrogram.json").read_text())
        assert spec.shape == (n_windows, 63, 249)
        assert spec.dtype == np.float32
        assert "ECG" not in meta["Channels"] and meta["DroppedChannels"] == ["ECG"]
        assert meta["VolumeMarker"] == "Scanner/Scan Start"
        assert meta["RepetitionTime"] == 2.16 and meta["WindowSamples"] == 540
        # z-scored across channels per (window, bin)
        np.testing.assert_allclose(spec.mean(axis=1), 0, atol=1e-4)
        target = nib.load(base / "func" / f"sub-{sub}_task-rest_desc-target_bold.nii.gz")
        assert target.shape == (64, 64, 30, 300)
        assert target.header.get_zooms()[3] == pytest.approx(2.16)
        data = target.get_fdata(dtype=np.float32)
        assert data.min() == 0 and data.max() == 1
        assert (base / "figures").is_dir() and any((base / "figures").glob("*alignment*.svg"))
        assert (out / f"sub-{sub}.html").is_file()
        inventory = (base / f"sub-{sub}_runs.tsv").read_text()
        assert "paired" in inventory
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "spec2vol"
    assert (out / "logs" / "config.toml").is_file()


def test_noddi_fixture_raw_eeg_without_markers_is_refused_or_warned(noddi, tmp_path):
    """The raw 5 kHz recordings have no volume markers: refused, naming what was found."""
    proc = spec2vol(noddi, tmp_path / "out", "participant", "--participant-label", "32")
    assert proc.returncode == 65, proc.stderr
    assert "no trigger train fits the 300 BOLD volumes" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").rglob("*_spectrogram.npy"))


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return simulate_dataset(tmp_path_factory.mktemp("sim") / "bids", subjects=3, volumes=40,
                            channels=16, grid=(32, 32, 16), seed=3)


def _arrays(out: Path) -> dict:
    arrays = {p.relative_to(out): np.load(p).tobytes() for p in out.rglob("*.npy")}
    arrays |= {p.relative_to(out): np.asanyarray(nib.load(p).dataobj).tobytes()
               for p in out.rglob("*_bold.nii.gz")}
    return arrays


def test_idempotent_and_parallel_runs_are_byte_identical(small_dataset, tmp_path):
    opts = ["--discard-volumes", "2", "--context", "4", "--skip-bids-validation"]
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert spec2vol(small_dataset, serial, "participant", *opts).returncode == 0
    first = _arrays(serial)
    assert len(first) == 6
    outputs = [*serial.rglob("*.npy"), *serial.rglob("*_desc-target_bold.nii.gz")]
    assert len(outputs) == 6
    mtimes = {p: p.stat().st_mtime_ns for p in outputs}
    rerun = spec2vol(small_dataset, serial, "participant", *opts)
    assert rerun.returncode == 0 and "damaged" not in rerun.stderr, rerun.stderr
    assert rerun.stderr.count("spectrogram up to date, skipped") == 3
    assert rerun.stderr.count("BOLD target up to date, skipped") == 3
    assert {p: p.stat().st_mtime_ns for p in outputs} == mtimes
    assert _arrays(serial) == first
    proc = spec2vol(small_dataset, parallel, "participant", "--nprocs", "2", *opts)
    assert proc.returncode == 0, proc.stderr
    assert _arrays(parallel) == first
    # a changed option recomputes
    changed = spec2vol(small_dataset, serial, "participant", *opts, "--freq-bins", "60")
    assert changed.returncode == 0
    spec = np.load(next(serial.rglob("sub-01*_spectrogram.npy")))
    assert spec.shape[-1] == 60
