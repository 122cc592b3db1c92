"""spec2vol in fMRIPrep-style workflows: preprocessed BOLD in a template space from a derivative
dataset (``--bold-derivatives``/``--bold-space``), brain masks from the derivative or TemplateFlow,
the template's T1w from TemplateFlow as the reports' background, spec2vol's own template-space
outputs as the next run's input, and fMRIPrep's ``--bids-filter-file`` format."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import (
    GROUP_OPTIONS,
    PARTICIPANT_OPTIONS,
    SIMULATION,
    assert_clean_failure,
    cli_env,
    run_spec2vol,
    spec2vol_command,
)

from spec2vol_bids.errors import DataError, UsageError
from spec2vol_bids.bids.metadata import repetition_time
from spec2vol_bids.bids.pairing import find_run_pairs

SPACE = "MNI152NLin2009cAsym"
#: the crop of nilearn's 2 mm MNI grid the simulated fMRIPrep BOLD lies on: the simulated grid's
#: shape, at the left edge of the field of view so that the brain mask has voxels on both sides
CROP = (slice(8, 8 + SIMULATION["grid"][0]), slice(40, 72), slice(40, 40 + SIMULATION["grid"][2]))


def _mni():
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    return load_mni152_template(resolution=2), load_mni152_brain_mask(resolution=2)


def _crop_affine(affine: np.ndarray) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.array([s.start for s in CROP]) + affine[:3, 3]
    return out


def _fmriprep(bids: Path, root: Path, *, masks: bool = True, extra_space: bool = False,
              space: str = SPACE) -> Path:
    """An fMRIPrep-like derivative dataset of the simulated runs, in ``space`` (with its
    ``cohort-`` entity, e.g. ``MNIPediatricAsym_cohort-2``) at res-2, on a crop of the MNI grid."""
    template, mask = _mni()
    affine = _crop_affine(template.affine)
    anatomy = np.asarray(template.dataobj, dtype=np.float32)[CROP]
    brain = np.asarray(mask.dataobj)[CROP] > 0
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "fMRIPrep - fMRI PREProcessing workflow", "BIDSVersion": "1.9.0",
        "DatasetType": "derivative", "GeneratedBy": [{"Name": "fMRIPrep", "Version": "24.1.1"}]}))
    for raw in sorted(bids.glob("sub-*/func/*_bold.nii.gz")):
        stem = raw.name.replace("_bold.nii.gz", "")
        func = root / raw.parent.relative_to(bids)
        func.mkdir(parents=True, exist_ok=True)
        data = np.asarray(nib.load(raw).dataobj, dtype=np.float32)
        # template anatomy modulated by the simulated (EEG-coupled) dynamics
        bold = (anatomy[..., None] + 1.0) * (data / data.mean())
        prefix = func / f"{stem}_space-{space}_res-2"
        img = nib.Nifti1Image(bold.astype(np.float32), affine)
        img.set_sform(affine, 4)  # MNI, as fMRIPrep writes its template-space series
        img.set_qform(affine, 4)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, f"{prefix}_desc-preproc_bold.nii.gz")
        Path(f"{prefix}_desc-preproc_bold.json").write_text(json.dumps(
            {"RepetitionTime": SIMULATION.get("tr", 2.0), "SkullStripped": False}))
        if masks:
            nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), f"{prefix}_desc-brain_mask.nii.gz")
        if extra_space and stem.startswith("sub-01"):
            other = func / f"{stem}_space-T1w"
            nib.save(nib.Nifti1Image(data, np.eye(4)), f"{other}_desc-preproc_bold.nii.gz")
            Path(f"{other}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": 1.5}))
            # fMRIPrep's "func": the run's own space, without a space entity
            nib.save(nib.Nifti1Image(data, np.eye(4)), func / f"{stem}_desc-preproc_bold.nii.gz")
    return root


def test_choosing_the_space(simulated_bids_source, tmp_path):
    deriv = _fmriprep(simulated_bids_source, tmp_path / "fmriprep", extra_space=True)
    with pytest.raises(UsageError, match=f"several spaces .*{SPACE}:res-2, T1w"):
        find_run_pairs(simulated_bids_source, bold_derivatives=[deriv])
    with pytest.raises(UsageError, match="no preprocessed BOLD in that space.*T1w"):
        find_run_pairs(simulated_bids_source, bold_derivatives=[deriv], bold_space=f"{SPACE}:res-1")

    pairs, _ = find_run_pairs(simulated_bids_source, bold_derivatives=[deriv],
                              bold_space=f"{SPACE}:res-02")
    assert [(p.space, p.res) for p in pairs] == [(SPACE, "2")] * 3
    assert all(p.bold.is_relative_to(deriv) and p.bold_mask.is_file() for p in pairs)
    assert pairs[0].entities == {"subject": "01", "task": "rest", "space": SPACE, "res": "2"}

    pairs, _ = find_run_pairs(simulated_bids_source, bold_derivatives=[deriv], bold_space="T1w")
    t1w = [p for p in pairs if p.bold is not None]
    assert [p.subject for p in t1w] == ["01"] and t1w[0].bold_mask is None
    assert repetition_time(t1w[0]) == 1.5  # the derivative's sidecar, not the raw one
    assert [p.bold for p in pairs if p.subject != "01"] == [None, None]

    with pytest.raises(UsageError, match=r"several spaces .*, func \(no space entity\)"):
        find_run_pairs(simulated_bids_source, bold_derivatives=[deriv])
    pairs, _ = find_run_pairs(simulated_bids_source, bold_derivatives=[deriv], bold_space="func")
    assert pairs[0].bold.name == "sub-01_task-rest_desc-preproc_bold.nii.gz" and pairs[0].space is None
    # a space filter chooses as --bold-space does
    pairs, _ = find_run_pairs(simulated_bids_source, bold_derivatives=[deriv],
                              bids_filters={"bold": {"space": "T1w"}})
    assert [p.bold.name for p in pairs if p.bold] == ["sub-01_task-rest_space-T1w_desc-preproc_bold.nii.gz"]
    with pytest.raises(UsageError, match="--bold-space T1w chooses among the spaces of preprocessed "
                                         "BOLD in --bold-derivatives; give --bold-derivatives"):
        find_run_pairs(simulated_bids_source, bold_space="T1w")
    twice = shutil.copytree(deriv, tmp_path / "fmriprep-again")
    with pytest.raises(DataError, match=f"BOLD of this run is in 2 folders \\({deriv}, {twice}\\); "
                                        "give only one of them"):
        find_run_pairs(simulated_bids_source, bold_derivatives=[deriv, twice], bold_space="T1w")


def test_fmriprep_derivatives_participant_and_group(simulated_bids_source, tmp_path):
    deriv = _fmriprep(simulated_bids_source, tmp_path / "fmriprep")
    # the T1w only: the masks must come from the derivative
    env = cli_env(TEMPLATEFLOW_HOME=str(_templateflow_home(tmp_path / "templateflow", mask=False)))
    out = tmp_path / "out"
    proc = run_spec2vol(simulated_bids_source, out, "participant", *PARTICIPANT_OPTIONS,
                        "--bold-derivatives", deriv, "--bold-space", f"{SPACE}:res-2", env=env)
    assert proc.returncode == 0, proc.stderr
    template, mask = _mni()
    for sub in ("01", "02", "03"):
        func = out / f"sub-{sub}" / "func"
        target = nib.load(func / f"sub-{sub}_task-rest_space-{SPACE}_res-2_desc-target_bold.nii.gz")
        np.testing.assert_allclose(target.affine, _crop_affine(template.affine), atol=1e-5)
        written = nib.load(func / f"sub-{sub}_task-rest_space-{SPACE}_res-2_desc-brain_mask.nii.gz")
        np.testing.assert_array_equal(np.asarray(written.dataobj) > 0, np.asarray(mask.dataobj)[CROP] > 0)
        assert (out / f"sub-{sub}" / "eeg" / f"sub-{sub}_task-rest_desc-spec2vol_spectrogram.npy").is_file()
        assert json.loads((func / f"sub-{sub}_task-rest_space-{SPACE}_res-2_desc-target_bold.json")
                          .read_text())["RepetitionTime"] == 2.0
    assert not list(out.glob("sub-*/eeg/*space-*"))

    # chaining: these outputs are the next run's preprocessed BOLD, space, res and mask included
    chained = tmp_path / "chained"
    proc = run_spec2vol(simulated_bids_source, chained, "participant", *PARTICIPANT_OPTIONS,
                        "--participant-label", "02", "--bold-derivatives", out, env=env)
    assert proc.returncode == 0, proc.stderr
    name = f"sub-02_task-rest_space-{SPACE}_res-2_desc-%s.nii.gz"
    for desc in ("target_bold", "brain_mask"):
        first, second = (nib.load(d / "sub-02" / "func" / (name % desc)) for d in (out, chained))
        np.testing.assert_allclose(second.get_fdata(), first.get_fdata(), atol=1e-6)
        np.testing.assert_allclose(second.affine, first.affine, atol=1e-6)
    sources = json.loads((chained / "sub-02" / "func" / (name % "target_bold")).with_suffix("")
                         .with_suffix(".json").read_text())["Sources"]
    assert sources == [str(out / "sub-02" / "func" / (name % d)) for d in ("target_bold", "brain_mask")]

    # a group node without the template's T1w trains all the same: the T1w is a background
    empty = tmp_path / "empty-home"
    empty.mkdir()
    proc = run_spec2vol(simulated_bids_source, out, "group", *GROUP_OPTIONS, "--epochs", "1",
                        "--no-final", "--folds", "01", "--skip-bids-validation",
                        env=cli_env(TEMPLATEFLOW_HOME=str(empty)))
    assert proc.returncode == 0, proc.stderr
    assert not list(empty.iterdir())  # nothing was fetched
    func = out / "sub-01" / "func"
    synth = nib.load(func / f"sub-01_task-rest_space-{SPACE}_res-2_desc-synth_bold.nii.gz")
    np.testing.assert_allclose(synth.affine, _crop_affine(template.affine), atol=1e-5)
    stat = np.asarray(nib.load(func / f"sub-01_task-rest_space-{SPACE}_res-2_desc-dynamics_statmap.nii.gz")
                      .dataobj)
    outside = np.asarray(mask.dataobj)[CROP] == 0
    assert outside.any() and np.all(stat[outside] == 0) and np.any(stat[~outside] != 0)
    # every image keeps the template space's code (4, MNI) in both its sform and qform
    for image in [synth, *(nib.load(func / f"sub-01_task-rest_space-{SPACE}_res-2_desc-{d}.nii.gz")
                           for d in ("target_bold", "brain_mask", "dynamics_statmap"))]:
        assert (int(image.header["sform_code"]), int(image.header["qform_code"])) == (4, 4)
        np.testing.assert_allclose(image.get_qform(), image.get_sform(), atol=1e-4)

    # the report says what it drew on instead, and how to get the template's own T1w ...
    text = (out / "group.html").read_text(encoding="utf-8")
    assert f"on the MNI152 2009 symmetric template shipped with nilearn, standing in for the {SPACE} T1w" in text
    assert f"TEMPLATEFLOW_HOME={empty} python -c" in text and "suffix=&#x27;T1w&#x27;" in text
    # ... and, once TemplateFlow's home holds it, draws the dynamics maps over the template's T1w
    proc = run_spec2vol(simulated_bids_source, out, "participant", *PARTICIPANT_OPTIONS,
                        "--participant-label", "01", "--bold-derivatives", deriv,
                        "--bold-space", f"{SPACE}:res-2", env=env)
    assert proc.returncode == 0, proc.stderr
    text = (out / "sub-01.html").read_text(encoding="utf-8")
    assert f"on the {SPACE} T1w template from TemplateFlow (tpl-{SPACE}_res-02_T1w.nii.gz)" in text
    # ...resampled to the map's grid: a crop of the template's own grid, so its voxels (up to
    # the spline interpolation of float32 affines)
    statmap = func / f"sub-01_task-rest_space-{SPACE}_res-2_desc-dynamics_statmap.nii.gz"
    code = ("import sys, nibabel as nib, numpy as np; from pathlib import Path; "
            "from spec2vol_bids.report import anatomical_underlay; "
            "bg, src = anatomical_underlay(nib.load(sys.argv[1]), Path(sys.argv[1]), []); "
            "np.save(sys.argv[2], bg.get_fdata())")
    proc = subprocess.run([sys.executable, "-c", code, statmap, tmp_path / "underlay.npy"], check=False,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = template.get_fdata()[CROP]
    np.testing.assert_allclose(np.load(tmp_path / "underlay.npy"), expected,
                               atol=1e-2 * expected.max())


def test_one_model_learns_from_one_kind_of_target(simulated_bids_source, tmp_path):
    """sub-01's target from fMRIPrep's series in the run's own space (no space entity, so the
    raw target's name), the others' from the raw BOLD: a voxel of one is not a voxel of the
    other, and the group level refuses to train on both."""
    deriv = _fmriprep(simulated_bids_source, tmp_path / "fmriprep", extra_space=True)
    out = tmp_path / "out"
    proc = run_spec2vol(simulated_bids_source, out, "participant", *PARTICIPANT_OPTIONS)
    assert proc.returncode == 0, proc.stderr
    proc = run_spec2vol(simulated_bids_source, out, "participant", *PARTICIPANT_OPTIONS,
                        "--participant-label", "01", "--bold-derivatives", deriv, "--bold-space", "func")
    assert proc.returncode == 0, proc.stderr
    proc = run_spec2vol(simulated_bids_source, out, "group", *GROUP_OPTIONS, "--epochs", "1",
                        "--no-final", "--skip-bids-validation")
    assert_clean_failure(proc, 65, "the runs' derivatives differ in their BOLD source (preprocessed "
                         "BOLD: sub-01; raw BOLD: sub-02 sub-03)")


def _templateflow_home(home: Path, *, mask: bool = True) -> Path:
    """A TemplateFlow home holding the MNI152NLin2009cAsym res-2 T1w image (and brain mask),
    laid out as TemplateFlow lays it out."""
    template, brain = _mni()
    tpl = home / f"tpl-{SPACE}"
    tpl.mkdir(parents=True)
    (tpl / "template_description.json").write_text(json.dumps({"Name": SPACE, "Identifier": SPACE}))
    nib.save(template, tpl / f"tpl-{SPACE}_res-02_T1w.nii.gz")
    if mask:
        nib.save(brain, tpl / f"tpl-{SPACE}_res-02_desc-brain_mask.nii.gz")
    return home


def test_templateflow_mask_and_fmriprep_filter_file(simulated_bids_source, tmp_path):
    deriv = _fmriprep(simulated_bids_source, tmp_path / "fmriprep", masks=False)
    home = _templateflow_home(tmp_path / "templateflow")
    filters = tmp_path / "filters.json"
    # fMRIPrep's format, with a query (t1w) that only fMRIPrep uses
    filters.write_text(json.dumps({"t1w": {"reconstruction": None},
                                   "bold": {"subject": "02", "space": SPACE, "res": "2"}}))
    out = tmp_path / "out"
    proc = run_spec2vol(simulated_bids_source, out, "participant", *PARTICIPANT_OPTIONS,
                        "--bold-derivatives", deriv, "--bids-filter-file", filters,
                        env=cli_env(TEMPLATEFLOW_HOME=str(home)))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.glob("sub-*/func/*_desc-target_bold.nii.gz")) == [
        f"sub-02_task-rest_space-{SPACE}_res-2_desc-target_bold.nii.gz"]
    written = nib.load(out / "sub-02" / "func" / f"sub-02_task-rest_space-{SPACE}_res-2_desc-brain_mask.nii.gz")
    _, mask = _mni()
    np.testing.assert_array_equal(np.asarray(written.dataobj) > 0, np.asarray(mask.dataobj)[CROP] > 0)
    sources = json.loads((out / "sub-02" / "func" / f"sub-02_task-rest_space-{SPACE}_res-2_desc-target_bold.json")
                         .read_text())["Sources"]
    assert any(str(home) in s for s in sources)
    assert sorted(p.name for p in home.rglob("*") if p.is_file()) == [  # nothing fetched
        "template_description.json", f"tpl-{SPACE}_res-02_T1w.nii.gz",
        f"tpl-{SPACE}_res-02_desc-brain_mask.nii.gz"]


def test_offline_node_needs_templateflow_only_for_a_missing_mask(simulated_bids_source, tmp_path):
    """Derivatives without brain masks need the template's (exit 66 up front, with the pre-fetch
    command); derivatives with masks need nothing from TemplateFlow."""
    for masks in (True, False):
        home = tmp_path / f"empty-home-{masks}"
        home.mkdir()
        deriv = _fmriprep(simulated_bids_source, tmp_path / f"fmriprep-{masks}", masks=masks)
        out = tmp_path / f"out-{masks}"
        command = spec2vol_command(simulated_bids_source, out, "participant", *PARTICIPANT_OPTIONS,
                                   "--participant-label", "01", "--bold-derivatives", deriv)
        # no network namespace where unshare is allowed; the sandbox cannot reach S3 either way
        if shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"]).returncode == 0:
            command = ["unshare", "--net", *command]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env=cli_env(TEMPLATEFLOW_HOME=str(home)))
        if masks:
            assert proc.returncode == 0, proc.stderr
            assert not list(home.iterdir())  # TemplateFlow was not even asked
        else:
            assert_clean_failure(proc, 66, "pre-fetch", f"TEMPLATEFLOW_HOME={home}",
                                 f"tf.get('{SPACE}', resolution=2, desc='brain', suffix='mask')")
            assert "requests" not in proc.stderr
            assert not out.exists()  # found before anything was written


def _pediatric_home(home: Path) -> Path:
    """TemplateFlow's MNIPediatricAsym with two cohorts whose brain masks differ (the MNI mask
    cropped as the series, cut in two halves along x)."""
    _, mask = _mni()
    brain = np.asarray(mask.dataobj)[CROP] > 0
    affine = _crop_affine(mask.affine)
    tpl = home / "tpl-MNIPediatricAsym"
    tpl.mkdir(parents=True)
    (tpl / "template_description.json").write_text(json.dumps({"Name": "MNIPediatricAsym",
                                                               "Identifier": "MNIPediatricAsym"}))
    half = brain.shape[0] // 2
    for cohort, keep in (("1", slice(0, half)), ("2", slice(half, None))):
        data = np.zeros_like(brain, dtype=np.uint8)
        data[keep] = brain[keep]
        (tpl / f"cohort-{cohort}").mkdir()
        nib.save(nib.Nifti1Image(data, affine),
                 tpl / f"cohort-{cohort}" / f"tpl-MNIPediatricAsym_cohort-{cohort}_res-02_desc-brain_mask.nii.gz")
    return home


def test_the_cohorts_of_a_template(simulated_bids_source, tmp_path):
    """fMRIPrep's MNIPediatricAsym:cohort-N outputs: a space of their own, chosen in fMRIPrep's
    syntax or by a filter, kept in the output names, and masked by their own cohort's brain."""
    deriv = tmp_path / "fmriprep"
    for cohort in ("1", "2"):
        _fmriprep(simulated_bids_source, deriv, masks=False, space=f"MNIPediatricAsym_cohort-{cohort}")
    with pytest.raises(UsageError, match=r"several spaces \(MNIPediatricAsym:cohort-1:res-2, "
                                         r"MNIPediatricAsym:cohort-2:res-2\)"):
        find_run_pairs(simulated_bids_source, bold_derivatives=[deriv])
    with pytest.raises(UsageError, match=r"MNIPediatricAsym:res-2: it matches MNIPediatricAsym:"
                                         r"cohort-1:res-2, MNIPediatricAsym:cohort-2:res-2; add :cohort-N$"):
        find_run_pairs(simulated_bids_source, bold_derivatives=[deriv], bold_space="MNIPediatricAsym:res-2")
    pairs, _ = find_run_pairs(simulated_bids_source, bold_derivatives=[deriv],
                              bids_filters={"bold": {"cohort": "2"}})
    assert {p.cohort for p in pairs} == {"2"}
    home = _pediatric_home(tmp_path / "templateflow")
    out = tmp_path / "out"
    proc = run_spec2vol(simulated_bids_source, out, "participant", *PARTICIPANT_OPTIONS,
                        "--participant-label", "01", "--bold-derivatives", deriv,
                        "--bold-space", "MNIPediatricAsym:cohort-2:res-2",
                        env=cli_env(TEMPLATEFLOW_HOME=str(home)))
    assert proc.returncode == 0, proc.stderr
    stem = out / "sub-01" / "func" / "sub-01_task-rest_space-MNIPediatricAsym_cohort-2_res-2"
    assert Path(f"{stem}_desc-target_bold.nii.gz").is_file()
    cohort_2 = home / "tpl-MNIPediatricAsym" / "cohort-2" / "tpl-MNIPediatricAsym_cohort-2_res-02_desc-brain_mask.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(f"{stem}_desc-brain_mask.nii.gz").dataobj),
                                  np.asarray(nib.load(cohort_2).dataobj))
    # a series in a template with cohorts that names none: whose brain is unknown
    plain = _fmriprep(simulated_bids_source, tmp_path / "plain", masks=False, space="MNIPediatricAsym")
    proc = run_spec2vol(simulated_bids_source, tmp_path / "out-plain", "participant", *PARTICIPANT_OPTIONS,
                        "--participant-label", "01", "--bold-derivatives", plain,
                        env=cli_env(TEMPLATEFLOW_HOME=str(home)))
    assert_clean_failure(proc, 65, "the series names no cohort, but the MNIPediatricAsym template's "
                         "brain mask differs between its cohorts (cohort-1, cohort-2)")


@pytest.mark.parametrize("fault", ["empty", "elsewhere", "scanner space"])
def test_a_brain_mask_that_does_not_fit_its_series(simulated_bids_source, tmp_path, fault):
    """Every score is computed inside the brain mask: an empty one, one that lies beside the
    series, or one in scanner space beside an MNI series would score 0 or the wrong voxels."""
    deriv = _fmriprep(simulated_bids_source, tmp_path / "fmriprep")
    mask_path = next(deriv.glob("sub-01/func/*_desc-brain_mask.nii.gz"))
    mask = nib.load(mask_path)
    data, affine, code = np.asarray(mask.dataobj), mask.affine.copy(), 4
    if fault == "empty":
        data = np.zeros_like(data)
    elif fault == "elsewhere":
        affine[:3, 3] += 300.0
    else:
        code = 1
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code)
    nib.save(img, mask_path)
    out = tmp_path / "out"
    proc = run_spec2vol(simulated_bids_source, out, "participant", *PARTICIPANT_OPTIONS,
                        "--participant-label", "01", "--bold-derivatives", deriv)
    expected = ("the brain mask's space code is 1 but its BOLD series' is 4" if fault == "scanner space"
                else "the brain mask covers none of its BOLD series' voxels")
    assert_clean_failure(proc, 65, mask_path.name, expected, out_dir=out)
