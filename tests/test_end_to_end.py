"""The whole BIDS-App on a simulated dataset: participant, group, reports, derivative validity.

This is the main job of README in miniature (3 subjects, tiny models, one epoch); what it
checks is the shape of what a user gets, not the quality of the models.
"""

import html
import json
import re
import shutil
import subprocess
import sys
import tomllib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nilearn.masking import compute_epi_mask
from scipy import stats

from spec2vol_bids.simulate import simulate_dataset
from spec2vol_bids.synthesize import synthesize_from_checkpoint
from test_report import _check_images, _colours, _render

SMALL = ["--discard-volumes", "2", "--context", "4", "--freq-bins", "32",
         "--target-grid", "32", "32", "16"]


def spec2vol(*args):
    return subprocess.run([sys.executable, "-m", "spec2vol_bids", *map(str, args)],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("main")
    bids = simulate_dataset(root / "bids", subjects=3, volumes=30, channels=16, grid=(32, 32, 16),
                            eeg_only_subjects=1, seed=7)
    out = root / "out"
    participant = spec2vol(bids, out, "participant", *SMALL)
    assert participant.returncode == 0, participant.stderr
    group = spec2vol(bids, out, "group", "--model-config", "tiny", "--epochs", "1",
                     "--batch-size", "4", "--compare", "e2fnet", "ridge", "hrf-ridge")
    assert group.returncode == 0, group.stderr
    return bids, out, group.stderr


def test_group_outputs_and_log(main_job):
    _, out, log = main_job
    table = pd.read_csv(out / "group_metrics.tsv", sep="\t", dtype={"participant_id": str})
    # two subjects have BOLD (sub-03 is EEG-only): two folds, four models each
    assert sorted(table.participant_id.unique()) == ["sub-01", "sub-02"]
    assert sorted(table.model.unique()) == ["e2fnet", "hrf-ridge", "mean", "oracle", "ridge", "spec2vol"]
    assert (table.loc[table.model == "mean", "dynamics"] == 0).all()
    assert (out / "models" / "fold-01" / "ridge" / "model.pt").is_file()
    for model in ("spec2vol", "e2fnet", "ridge", "hrf-ridge", "mean", "oracle"):
        assert f"{model}:" in log  # mean ± std per model in the log
    synth = nib.load(out / "sub-01" / "func" / "sub-01_task-rest_desc-synth_bold.nii.gz")
    assert synth.shape == (32, 32, 16, 30 - 2 - 4)
    assert (out / "models" / "final" / "model.pt").is_file()
    assert (out / "group.html").is_file() and (out / "logs" / "config.toml").is_file()
    # each run's log file is named as its log folder (config.toml, provenance.json)
    folders = [p for p in (out / "logs").iterdir() if p.is_dir()]
    assert {p.name.split("-")[0] for p in folders} == {"participant", "group"}
    assert all(p.with_name(f"{p.name}.log").is_file() for p in folders)


def test_group_report_shows_the_participant_settings_the_derivatives_were_made_with(main_job):
    """Not the defaults of the group run (which does not use them): those of the participant
    run, as its log folder recorded them."""
    _, out, _ = main_job
    group_config = tomllib.loads((out / "logs" / "config.toml").read_text())
    assert "participant" not in group_config and group_config["training"]["epochs"] == 1
    report = (out / "group.html").read_text()
    shown = re.findall(r"Participant level, oldest run first: (logs/participant-[^ ]+/config\.toml) "
                       r"\(all participants\)\.</p><pre>(.*?)</pre>", report, flags=re.S)
    assert len(shown) == 1
    recorded = tomllib.loads(html.unescape(shown[0][1]))["participant"]
    participant_log = tomllib.loads((out / shown[0][0]).read_text())
    assert recorded == participant_log["participant"] and "training" not in participant_log
    assert recorded["context"] == 4 and recorded["discard_volumes"] == 2
    assert recorded["freq_bins"] == 32 and recorded["target_grid"] == [32, 32, 16]


def test_final_model_synthesises_for_the_eeg_only_subject(main_job, tmp_path):
    bids, out, _ = main_job
    proc = spec2vol(bids, out, "participant", "--participant-label", "03", *SMALL,
                    "--model", out / "models" / "final" / "model.pt")
    assert proc.returncode == 0, proc.stderr
    synth = nib.load(out / "sub-03" / "func" / "sub-03_task-rest_desc-synth_bold.nii.gz")
    assert synth.shape == (32, 32, 16, 30 - 2 - 4)
    side = json.loads((out / "sub-03" / "func" / "sub-03_task-rest_desc-synth_bold.json").read_text())
    assert side["RepetitionTime"] == pytest.approx(2.0)
    assert side["ModelFittedOnSubjects"] == ["01", "02"]  # sub-03 is unseen: no warning
    assert "is one of the subjects the model was fitted on" not in proc.stderr
    assert side["SubjectInModelTraining"] is False
    report = (out / "sub-03.html").read_text()
    assert "Applied model" in report and "in-sample" not in report
    # in the space of the training targets, as their scanner-space code (1) says
    target = nib.load(out / "sub-01" / "func" / "sub-01_task-rest_desc-target_bold.nii.gz")
    for image in (synth, target):
        assert (int(image.header["sform_code"]), int(image.header["qform_code"])) == (1, 1)
        np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-4)
    np.testing.assert_allclose(synth.affine, target.affine, atol=1e-6)
    meta = json.loads((out / "models" / "final" / "model.json").read_text())
    assert meta["TargetAffineFrom"] == "sub-01_task-rest"
    assert side["SpatialReference"].startswith("the target grid of the training run sub-01_task-rest")
    corners = np.array([[i, j, k, 1] for i in (0, 31) for j in (0, 31) for k in (0, 15)]).T
    other = nib.load(out / "sub-02" / "func" / "sub-02_task-rest_desc-target_bold.nii.gz")
    apart = np.linalg.norm(((other.affine - target.affine) @ corners)[:3], axis=0).max()
    assert meta["TargetGridSpreadMm"] == pytest.approx(apart, abs=1e-3)
    # its report says which model made it and does not send the user to the group level
    report = (out / "sub-03.html").read_text()
    model = out / "models" / "final" / "model.pt"
    assert f"synthesised by spec2vol ({model}) for volumes 6–29" in report
    assert "no measured BOLD for this participant" in report and "run the group level" not in report


def test_a_model_never_replaces_the_group_levels_held_out_synthesis(main_job):
    """sub-01's series in OUT is its fold's held-out prediction, which group.html and the
    metrics describe: applying the final model (trained on sub-01) there is refused."""
    bids, out, _ = main_job
    synth = out / "sub-01" / "func" / "sub-01_task-rest_desc-synth_bold.nii.gz"
    before = synth.read_bytes()
    proc = spec2vol(bids, out, "participant", "--participant-label", "01", *SMALL,
                    "--model", out / "models" / "final" / "model.pt")
    assert proc.returncode == 64, proc.stderr
    assert "group level's held-out synthesis of this run (fold 01)" in proc.stderr
    assert str(synth) in proc.stderr and synth.read_bytes() == before
    # a name of a model, not a file, at the participant level
    proc = spec2vol(bids, out / "other", "participant", "--participant-label", "03", *SMALL,
                    "--model", "ridge")
    assert proc.returncode == 66 and "a name such as ridge is for the group level" in proc.stderr
    proc = spec2vol(bids, out / "other", "participant", "--participant-label", "03", *SMALL,
                    "--model", out / "models" / "final")
    assert proc.returncode == 66 and "a folder, not a model file; give the model.pt in it" in proc.stderr
    assert not (out / "other").exists()


@pytest.mark.parametrize("name", ["ridge", "hrf-ridge"])
def test_linear_model_synthesises_an_eeg_only_run_with_its_own_statistics(main_job, tmp_path, name):
    """The ridge (hrf-ridge) model file applied to sub-03 (no BOLD): each window standardised
    with sub-03's own EEG statistics, then mean + scale * (band features @ weights @ components),
    hrf-ridge's band features first summed over the context with SPM's canonical HRF at each
    window's lag (4, 3, 2 and 1 TRs of 2 s)."""
    _, out, _ = main_job
    model_path = out / "models" / "fold-01" / name / "model.pt"
    spec_path = next((out / "sub-03" / "eeg").glob("*_desc-spec2vol_spectrogram.npy"))
    synth = synthesize_from_checkpoint(model_path, spec_path, tmp_path / "sub-03_desc-synth_bold.nii.gz")
    got = np.asarray(nib.load(synth).dataobj, dtype=np.float64)  # (X, Y, Z, N)
    state = torch.load(model_path, weights_only=True)["state_dict"]
    spec = np.load(spec_path).astype(np.float64)
    discard, context = 2, 4
    windows = spec[discard:len(spec) - 1]
    z = (spec - windows.mean(0)) / windows.std(0)
    bands = z[..., : z.shape[2] // 4 * 4].reshape(*z.shape[:2], -1, 4).mean(-1)
    lagged = np.stack([bands[j - context:j] for j in range(discard + context, len(spec))])
    if name == "hrf-ridge":
        lags = 2.0 * np.arange(context, 0, -1)
        h = stats.gamma.pdf(lags, 6) - stats.gamma.pdf(lags, 16) / 6
        lagged = np.einsum("l,nl...->n...", h / np.linalg.norm(h), lagged)
    features = lagged.reshape(len(lagged), -1)
    deviations = features @ state["net.weights"].double().numpy() @ state["net.components"].double().numpy()
    mean, scale = state["mean"].double().numpy(), state["scale"].double().numpy()
    expected = mean + scale * deviations.reshape(len(features), *mean.shape)  # (N, D, H, W)
    np.testing.assert_allclose(got, expected.transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4)


def test_oracle_is_the_in_sample_fit_on_the_simulations_regressors(main_job):
    """sub-01's oracle row, recomputed with numpy from the simulation's ground truth, the
    participant-level target and its brain mask."""
    bids, out, _ = main_job
    table = pd.read_csv(out / "group_metrics.tsv", sep="\t").set_index(["participant_id", "model"])
    truth = pd.read_csv(bids / "derivatives" / "simulation" / "sub-01" / "func"
                        / "sub-01_task-rest_desc-volumes_timeseries.tsv", sep="\t")
    first = 2 + 4  # --discard-volumes + --context
    target = nib.load(out / "sub-01" / "func" / "sub-01_task-rest_desc-target_bold.nii.gz").get_fdata()
    img = nib.load(out / "sub-01" / "func" / "sub-01_task-rest_desc-target_bold.nii.gz")
    # no fMRIPrep mask here: the group level masks the measured mean volume with nilearn
    mean = nib.Nifti1Image(target[..., first:].mean(-1), img.affine)
    mask = np.asarray(compute_epi_mask(mean).dataobj) > 0
    y = target[..., first:][mask].T  # (samples, voxels in the mask)
    x = truth[[c for c in truth if c.startswith("regressor_")]].to_numpy()[first:target.shape[3]]
    design = np.c_[x - x.mean(0), np.ones(len(x))]
    fitted = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    # constant voxels count as r = 0, as in the dynamics score
    r = [np.corrcoef(fitted[:, v], y[:, v])[0, 1] if y[:, v].std() > 0 else 0.0
         for v in range(y.shape[1])]
    assert table.loc[("sub-01", "oracle"), "dynamics"] == pytest.approx(np.mean(r), abs=1e-3)
    assert table.loc[("sub-01", "oracle"), "dynamics"] > table.loc[("sub-01", "ridge"), "dynamics"]


def test_group_report_plots_the_best_and_worst_voxel(main_job):
    """The voxel of highest r over the held-out runs' dynamics maps, found here with numpy, and
    its r recomputed from the synthesised and measured series, is the one group.html names."""
    _, out, _ = main_job
    best = (-np.inf, None, None)
    for stat in sorted(out.glob("sub-*/func/*_desc-dynamics_statmap.nii.gz")):
        rmap = nib.load(stat).get_fdata()
        r = np.where(rmap != 0, rmap, -np.inf).max()
        if r > best[0]:
            best = (r, stat, np.unravel_index(np.argmax(np.where(rmap != 0, rmap, -np.inf)), rmap.shape))
    r, stat, voxel = best
    first, last = json.loads(stat.with_name(stat.name.replace(".nii.gz", ".json")).read_text())["SourceVolumes"]
    synth = nib.load(str(stat).replace("desc-dynamics_statmap", "desc-synth_bold")).get_fdata()[voxel]
    measured = nib.load(str(stat).replace("desc-dynamics_statmap", "desc-target_bold")).get_fdata()[voxel]
    assert np.corrcoef(synth, measured[first:last + 1])[0, 1] == pytest.approx(r, abs=1e-4)
    run = stat.name.replace("_desc-dynamics_statmap.nii.gz", "")
    report = (out / "group.html").read_text()
    assert f"best r = {r:.3f} at voxel {tuple(int(v) for v in voxel)} of {run}" in report


def test_reports_are_embedded_and_render(main_job, tmp_path):
    _, out, _ = main_job
    for page in (out / "sub-01.html", out / "group.html"):
        assert _check_images(page) >= 3
        console, shot = _render(page, tmp_path)
        assert console == [], f"{page.name}: {console}"
        assert _colours(shot) > 50, f"{page.name}: the screenshot is (nearly) blank"


def test_derivative_dataset_passes_the_bids_validator(main_job):
    """The official (schema-based) validator, which knows the derivative rules."""
    _, out, _ = main_job
    validator = shutil.which("bids-validator-deno")
    assert validator, "bids-validator-deno (the test extra) is needed"
    proc = subprocess.run([validator, str(out), "--json"], capture_output=True, text=True,
                          timeout=300)
    report = json.loads(proc.stdout)
    errors = [(i["code"], i.get("location")) for i in report["issues"]["issues"]
              if i["severity"] == "error"]
    assert errors == []
