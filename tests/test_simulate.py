"""Tests of ``spec2vol-simulate``: BIDS validity, read-back, EEG→BOLD coupling, layouts, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import signal

from spec2vol_bids.simulate import ECG_CHANNEL, channel_names, main, simulate_dataset

SMALL = dict(subjects=2, volumes=40, channels=16, grid=(32, 32, 16))
# each format with a different marker style, so that both styles are covered
FORMATS = {"vhdr": "R128", "edf": "Scan Start", "bdf": "R128", "set": "Scan Start"}
EXTENSIONS = {"vhdr": ".vhdr", "edf": ".edf", "bdf": ".bdf", "set": ".set"}


def _validate(root: Path) -> list[str]:
    """Errors of the official bids-validator (npm, 1.x); the Python filename check without it."""
    exe = shutil.which("bids-validator")
    if exe is None:
        from bids_validator import BIDSValidator

        validator = BIDSValidator()
        files = [p for p in root.rglob("*") if p.is_file() and "derivatives" not in p.relative_to(root).parts]
        names = ["/" + p.relative_to(root).as_posix() for p in files]
        return [f"not a BIDS name: {name}" for name in names if not validator.is_bids(name)]
    proc = subprocess.run([exe, str(root), "--json"], capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout)
    return [
        f"{issue['key']}: {[f['file']['relativePath'] for f in issue['files'] if f.get('file')][:3]}"
        for issue in report["issues"]["errors"]
    ]


def _read_eeg(root: Path, subject: str, **entities):
    from mne_bids import BIDSPath, read_raw_bids

    path = BIDSPath(root=root, subject=subject, task="rest", datatype="eeg", suffix="eeg", **entities)
    return read_raw_bids(path, verbose=False)


def _volume_onsets(raw) -> np.ndarray:
    markers = [a for a in raw.annotations if "R128" in a["description"] or "Scan Start" in a["description"]]
    return np.array([a["onset"] for a in markers])


@pytest.fixture(scope="module", params=list(FORMATS))
def dataset(request, tmp_path_factory):
    fmt = request.param
    root = tmp_path_factory.mktemp(fmt) / "bids"
    simulate_dataset(root, eeg_format=fmt, volume_marker=FORMATS[fmt], seed=3, **SMALL)
    return fmt, root


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_dataset_is_valid_and_reads_back(dataset):
    fmt, root = dataset
    assert _validate(root) == []

    from bids import BIDSLayout

    layout = BIDSLayout(root)
    assert layout.get_subjects() == ["01", "02"]
    bold = layout.get(suffix="bold", extension=".nii.gz")
    eeg = layout.get(suffix="eeg", extension=EXTENSIONS[fmt])
    assert len(bold) == 2 and len(eeg) == 2
    assert layout.get_metadata(bold[0].path)["RepetitionTime"] == 2.0
    assert layout.get_metadata(bold[0].path)["TaskName"] == "rest"

    img = nib.load(bold[0].path)
    assert img.shape == (32, 32, 16, 40)
    assert img.header.get_zooms()[3] == pytest.approx(2.0)
    assert img.header.get_xyzt_units() == ("mm", "sec")

    raw = _read_eeg(root, "02")
    assert raw.info["sfreq"] == 250.0
    assert raw.ch_names == channel_names(16) + [ECG_CHANNEL]
    types = raw.get_channel_types()
    assert types[-1] == "ecg" and set(types[:-1]) == {"eeg"}
    onsets = _volume_onsets(raw)
    assert len(onsets) == 40
    assert onsets[0] == pytest.approx(2.0)
    np.testing.assert_allclose(np.diff(onsets), 2.0, atol=1 / 250)
    # the EEG covers every volume plus at least one TR
    assert raw.times[-1] >= onsets[-1] + 2 * 2.0 - 1 / 250
    channels = pd.read_csv(next((root / "sub-02" / "eeg").glob("*_channels.tsv")), sep="\t")
    assert channels.set_index("name").loc[ECG_CHANNEL, "type"] == "ECG"
    sidecar = json.loads(next((root / "sub-02" / "eeg").glob("*_eeg.json")).read_text())
    assert sidecar["PowerLineFrequency"] == 50 and sidecar["SamplingFrequency"] == 250


def _band_power_per_volume(x, sfreq, band, onsets, tr):
    sos = signal.butter(4, band, btype="band", fs=sfreq, output="sos")
    power = signal.sosfiltfilt(sos, x) ** 2
    n = int(round(tr * sfreq))
    starts = np.rint(onsets * sfreq).astype(int)
    return np.sqrt([power[s : s + n].mean() for s in starts])


def _detrend(y):
    t = np.linspace(-1, 1, len(y))
    design = np.vstack([np.ones_like(t), t, t**2]).T
    return y - design @ np.linalg.lstsq(design, y, rcond=None)[0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_eeg_and_bold_follow_the_latent_sources(tmp_path):
    root = simulate_dataset(tmp_path / "bids", subjects=1, volumes=60, channels=32, grid=(32, 32, 16),
                            sources=8, eeg_dtype="int16", seed=11)
    truth = root / "derivatives" / "simulation"
    sources = json.loads((truth / "sources.json").read_text())["Sources"]
    topographies = pd.read_csv(truth / "topographies.tsv", sep="\t", index_col="name")
    volumes = pd.read_csv(truth / "sub-01" / "func" / "sub-01_task-rest_desc-volumes_timeseries.tsv", sep="\t")
    maps = nib.load(truth / "sub-01" / "func" / "sub-01_desc-sources_map.nii.gz").get_fdata()
    bold = nib.load(root / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz").get_fdata()

    raw = _read_eeg(root, "01").load_data()
    onsets = _volume_onsets(raw)  # alignment as a user would get it, from the written markers
    sfreq = raw.info["sfreq"]
    assert len(sources) == 8 and len(onsets) == 60

    eeg_r, bold_r = [], []
    for k, source in enumerate(sources, 1):
        name = f"source-{k}"
        peak = topographies[name].idxmax()
        x = raw.get_data(picks=[peak])[0]
        envelope = _band_power_per_volume(x, sfreq, source["FrequencyBand"], onsets, 2.0)
        eeg_r.append(np.corrcoef(envelope, volumes[f"amplitude_{name}"])[0, 1])

        m = maps[..., k - 1]
        voxel = np.unravel_index(np.argmax(np.abs(m)), m.shape)
        r = np.corrcoef(_detrend(bold[voxel]), _detrend(volumes[f"regressor_{name}"].to_numpy()))[0, 1]
        bold_r.append(np.sign(m[voxel]) * r)
    assert min(eeg_r) > 0.8, eeg_r
    assert min(bold_r) > 0.6, bold_r

    # and the coupling is specific: a source's band power does not track the other sources
    k_alpha = [s["Band"] for s in sources].index("alpha")
    peak = topographies[f"source-{k_alpha + 1}"].idxmax()
    alpha = _band_power_per_volume(raw.get_data(picks=[peak])[0], sfreq, sources[k_alpha]["FrequencyBand"], onsets, 2.0)
    others = [abs(np.corrcoef(alpha, volumes[f"amplitude_source-{j}"])[0, 1])
              for j in range(1, 9) if j != k_alpha + 1]
    assert max(others) < 0.6, others


def test_u_shaped_coupling_drives_bold_by_distance_from_the_typical_amplitude(tmp_path):
    """The regressors against an independent computation (scipy's gamma densities for SPM's
    HRF); the EEG side is the same as with the linear coupling; the dataset says which it is."""
    from scipy import stats

    from spec2vol_bids.simulate.latent import SOURCES, latent_timecourses, volume_truth
    times, amplitude, _ = latent_timecourses(np.random.default_rng(3), list(SOURCES[:3]), 300.0)
    onsets = np.arange(120) * 2.5
    means, regressors = volume_truth(times, amplitude, onsets, 2.5, "u-shaped")
    linear_means, linear = volume_truth(times, amplitude, onsets, 2.5)
    np.testing.assert_array_equal(means, linear_means)

    t = np.arange(0, 32, 0.1)
    hrf = stats.gamma.pdf(t, 6) - stats.gamma.pdf(t, 16) / 6
    drive = np.abs(np.log(amplitude) - np.log(amplitude).mean(axis=1, keepdims=True))
    for k in range(3):
        series = np.convolve(drive[k], hrf / hrf.sum())[: drive.shape[1]]
        expected = np.interp(onsets + 1.25, times, series)
        # the simulator centres log a_k on its expectation, this test on its sample mean
        assert np.corrcoef(expected, regressors[k])[0, 1] > 0.98
        # and the BOLD regressor is no linear function of the EEG amplitude's
        assert abs(np.corrcoef(linear[k], regressors[k])[0, 1]) < 0.8

    root = simulate_dataset(tmp_path / "bids", subjects=1, volumes=10, channels=4, grid=(12, 12, 8),
                            coupling="u-shaped")
    assert "--coupling u-shaped" in (root / "README").read_text()


def test_hrf_delay_shifts_the_bold_response_of_every_source(tmp_path):
    """With --hrf-delay d the regressors are the amplitudes convolved with scipy's SPM HRF
    evaluated d seconds later; the EEG side does not change."""
    from scipy import stats

    from spec2vol_bids.simulate.latent import SOURCES, latent_timecourses, volume_truth
    times, amplitude, _ = latent_timecourses(np.random.default_rng(4), list(SOURCES[:3]), 300.0)
    onsets = np.arange(100) * 2.0
    means, regressors = volume_truth(times, amplitude, onsets, 2.0, hrf_delay=2.5)
    canonical_means, canonical = volume_truth(times, amplitude, onsets, 2.0)
    np.testing.assert_array_equal(means, canonical_means)
    t = np.arange(0, 34.5, 0.1) - 2.5
    hrf = np.where(t > 0, stats.gamma.pdf(t, 6) - stats.gamma.pdf(t, 16) / 6, 0)
    for k in range(3):
        series = np.convolve(amplitude[k], hrf / hrf.sum())[: amplitude.shape[1]]
        expected = np.interp(onsets + 1.0, times, series)
        expected = (expected - expected.mean()) / expected.std()
        np.testing.assert_allclose(regressors[k], expected, atol=1e-9)
        # 2.5 s is more than a TR: the canonical regressor is a different series
        assert np.corrcoef(canonical[k], regressors[k])[0, 1] < 0.95
    root = simulate_dataset(tmp_path / "bids", subjects=1, volumes=10, channels=4, grid=(12, 12, 8),
                            hrf_delay=2.5)
    assert "--hrf-delay 2.5" in (root / "README").read_text()
    assert "delayed by 2.5 s" in (root / "README").read_text()


def test_sessions_runs_and_partial_subjects(tmp_path):
    root = simulate_dataset(tmp_path / "bids", subjects=3, sessions=2, runs=2, volumes=12, channels=8,
                            grid=(12, 12, 8), eeg_only_subjects=1, bold_only_subjects=1, eeg_format="edf",
                            volume_marker="none")
    assert _validate(root) == []
    for ses in ("1", "2"):
        for run in ("1", "2"):
            stem = f"task-rest_run-{run}"
            assert (root / "sub-01" / f"ses-{ses}" / "eeg" / f"sub-01_ses-{ses}_{stem}_eeg.edf").is_file()
            assert (root / "sub-01" / f"ses-{ses}" / "func" / f"sub-01_ses-{ses}_{stem}_bold.nii.gz").is_file()
            assert (root / "sub-02" / f"ses-{ses}" / "eeg" / f"sub-02_ses-{ses}_{stem}_eeg.edf").is_file()
            assert (root / "sub-03" / f"ses-{ses}" / "func" / f"sub-03_ses-{ses}_{stem}_bold.nii.gz").is_file()
            truth = root / "derivatives" / "simulation" / "sub-02" / f"ses-{ses}"
            assert (truth / "func" / f"sub-02_ses-{ses}_{stem}_desc-volumes_timeseries.tsv").is_file()
    assert not list(root.glob("sub-02/*/func")) and not list(root.glob("sub-03/*/eeg"))
    participants = pd.read_csv(root / "participants.tsv", sep="\t")
    assert participants["participant_id"].tolist() == ["sub-01", "sub-02", "sub-03"]
    assert participants["recordings"].tolist() == ["eeg+bold", "eeg", "bold"]
    scans = pd.read_csv(root / "sub-01" / "ses-2" / "sub-01_ses-2_scans.tsv", sep="\t")
    assert sorted(scans["filename"]) == [
        "eeg/sub-01_ses-2_task-rest_run-1_eeg.edf", "eeg/sub-01_ses-2_task-rest_run-2_eeg.edf",
        "func/sub-01_ses-2_task-rest_run-1_bold.nii.gz", "func/sub-01_ses-2_task-rest_run-2_bold.nii.gz",
    ]
    # without markers the EEG starts with the first volume
    import mne

    raw = mne.io.read_raw_edf(root / "sub-02" / "ses-1" / "eeg" / "sub-02_ses-1_task-rest_run-1_eeg.edf", verbose=False)
    assert len(raw.annotations) == 0
    onsets = pd.read_csv(root / "derivatives" / "simulation" / "sub-02" / "ses-1" / "func"
                         / "sub-02_ses-1_task-rest_run-1_desc-volumes_timeseries.tsv", sep="\t")["onset"]
    assert onsets.iloc[0] == 0.0 and raw.times[-1] >= onsets.iloc[-1] + 2.0
    # runs differ from each other: amplitudes are run-specific
    a = [pd.read_csv(root / "derivatives" / "simulation" / "sub-01" / "ses-1" / "func"
                     / f"sub-01_ses-1_task-rest_run-{r}_desc-volumes_timeseries.tsv", sep="\t") for r in (1, 2)]
    assert not np.allclose(a[0]["amplitude_source-1"], a[1]["amplitude_source-1"])


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["set", "bdf"])
def test_same_seed_same_bytes(tmp_path, fmt):
    tiny = dict(subjects=1, volumes=10, channels=4, grid=(12, 12, 8), eeg_format=fmt)
    first = _tree(simulate_dataset(tmp_path / "a", seed=5, **tiny))
    second = _tree(simulate_dataset(tmp_path / "b", seed=5, **tiny))
    other = _tree(simulate_dataset(tmp_path / "c", seed=6, **tiny))
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    data = [name for name in first if name.endswith((".nii.gz", f".{fmt}"))]
    assert len(data) >= 3 and all(first[name] != other[name] for name in data)
    names = {json.loads(tree["dataset_description.json"])["Name"] for tree in (first, second, other)}
    assert len(names) == 2  # an OUTPUT_DIR tells datasets apart by Name: one per seed and settings
    longer = simulate_dataset(tmp_path / "d", seed=5, **{**tiny, "volumes": 12})
    assert json.loads((longer / "dataset_description.json").read_text())["Name"] not in names


def _run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "spec2vol_bids.simulate", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--eeg-format", "gdf"], "--eeg-format"),
        (["--grid", "32", "32"], "--grid"),
        (["--subjects", "two"], "--subjects"),
        (["--sources", "9"], "--sources"),
        (["--sfreq", "100"], "--sfreq"),
        (["--eeg-dtype", "int16", "--eeg-format", "edf"], "--eeg-dtype"),
        (["--subjects", "2", "--eeg-only-subjects", "2", "--bold-only-subjects", "1"], "--eeg-only-subjects"),
        (["--tr", "-1"], "--tr"),
        (["--coupling", "cubic"], "--coupling"),
        (["--hrf-delay", "5"], "--hrf-delay"),
        (["--hrf-delay", "nan"], "--hrf-delay"),
    ],
)
def test_cli_usage_errors(tmp_path, capsys, args, needle):
    assert main([str(tmp_path / "out"), *args]) == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_process_writes_refuses_and_overwrites(tmp_path):
    out = tmp_path / "out"
    tiny = ["--subjects", "1", "--volumes", "8", "--channels", "4", "--grid", "12", "12", "8"]

    code, stdout, stderr = _run_cli(out, "--volume-marker", "bogus", *tiny)
    assert code == 64 and stderr.count("\n") == 1 and "Traceback" not in stderr

    code, stdout, _ = _run_cli(out, *tiny)
    assert code == 0 and str(out) in stdout and " s " in stdout
    assert (out / "dataset_description.json").is_file()

    code, _, stderr = _run_cli(out, *tiny)
    assert code == 73 and "--overwrite" in stderr and stderr.count("\n") == 1

    before = (out / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz").read_bytes()
    code, _, _ = _run_cli(out, "--overwrite", "--seed", "1", *tiny)
    assert code == 0
    assert (out / "sub-01" / "func" / "sub-01_task-rest_bold.nii.gz").read_bytes() != before

    # --overwrite never deletes a folder this command did not write
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("irreplaceable")
    code, _, stderr = _run_cli(foreign, "--overwrite", *tiny)
    assert code == 73 and "Traceback" not in stderr
    assert (foreign / "thesis.txt").read_text() == "irreplaceable"
    # no half-built dataset is left next to the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]
