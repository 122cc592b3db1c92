"""The ground truth of a simulation, a derivative dataset under ``derivatives/simulation/``.

It holds what the simulated recordings were made from: the parameters and sources
(``sources.json``), the scalp topographies, each subject's BOLD maps and brain mask, and per
run the latent amplitudes and the volumes' mean amplitudes and HRF regressors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spec2vol_bids.derivatives import write_json, write_text
from spec2vol_bids.naming import build_name, run_dir
from spec2vol_bids.simulate.bold import Anatomy, grid_affine
from spec2vol_bids.simulate.latent import COARSE_RATE, MAP_WIDTH

_MODEL = {
    "Amplitude": "a_k = exp(0.5 z - 0.125), z standardised Gaussian noise low-passed at 0.08 Hz "
                 "(mean 1); subject- and run-specific",
    "HRF": "SPM canonical double gamma (gamma densities of shapes 6 and 16, unit scale, ratio "
           "1/6: peak at 5 s, undershoot around 15 s), later by "
           "Parameters.hrf_delay seconds; the regressor of a volume is (a_k * HRF) at the middle "
           "of its acquisition, standardised per run",
    "BOLD": "anatomy * (1 + sum_k map_k * regressor_k + global + drift) + thermal noise (magnitude)",
    "EEG": "sum_k topography_k * EEGAmplitude_k * a_k(t) * cos(phase_k(t)) + 1/f background "
           "+ white amplifier noise + 50 Hz line noise; ECG channel separate",
}


def _names(sources) -> list[str]:
    return [f"source-{k}" for k in range(1, len(sources) + 1)]


def write_truth_files(truth: Path, params: dict, sources, ch_names, topographies, generated_by) -> None:
    """The ground truth's dataset-level files: description, ``sources.json``, topographies.

    Parameters
    ----------
    truth : Path
        The derivative dataset's folder.
    params : dict
        The simulation's options, as JSON values.
    sources : list of Source
    ch_names : list of str
    topographies : ndarray, shape (channels, sources)
    generated_by : list of dict
        The ``GeneratedBy`` of the raw dataset's description.
    """
    write_json(
        truth / "dataset_description.json",
        {
            "Name": "Ground truth of the spec2vol simulation",
            "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": generated_by,
        },
    )
    described = [
        {
            "Name": name,
            "Band": s.band_name,
            "FrequencyBand": list(s.band),
            "EEGAmplitude": s.eeg_uv,
            "EEGAmplitudeUnits": "µV at the topography peak for a_k = 1",
            "TopographyCentre": s.electrode,
            "MapCentreMNI": list(s.mni),
            "MapSigma": MAP_WIDTH,
            "BOLDChange": s.bold_change,
        }
        for name, s in zip(_names(sources), sources)
    ]
    write_json(truth / "sources.json", {"Parameters": params, "Sources": described, **_MODEL})
    header = "name\t" + "\t".join(_names(sources))
    rows = [name + "\t" + "\t".join(f"{w:.6f}" for w in row) for name, row in zip(ch_names, topographies)]
    write_text(truth / "topographies.tsv", "\n".join([header] + rows) + "\n")


def write_maps(truth: Path, label: str, anatomy: Anatomy, grid, sources) -> None:
    """A subject's source maps (one volume per source) and brain mask on the EPI grid."""
    import nibabel as nib

    subject = {"subject": label}
    folder = run_dir(truth, subject, "func")
    folder.mkdir(parents=True, exist_ok=True)
    affine = grid_affine(grid)
    maps = nib.Nifti1Image(anatomy.maps, affine)
    maps.header.set_xyzt_units("mm")
    nib.save(maps, folder / build_name(subject, "map", ".nii.gz", desc="sources"))
    write_json(
        folder / build_name(subject, "map", ".json", desc="sources"),
        {
            "Description": "Signed fractional BOLD change per unit regressor, one volume per source",
            "Sources": _names(sources),
            "HeadShift": anatomy.shift,
        },
    )
    nib.save(nib.Nifti1Image(anatomy.mask.astype(np.uint8), affine),
             folder / build_name(subject, "mask", ".nii.gz", desc="brain"))


def write_run_truth(truth: Path, entities: dict, sources, times, amplitude, onsets, means, regressors,
                    tr: float) -> None:
    """A run's latent amplitudes (EEG clock) and its volumes' mean amplitudes and regressors."""
    names = _names(sources)
    eeg_dir = run_dir(truth, entities, "eeg")
    eeg_dir.mkdir(parents=True, exist_ok=True)
    name = build_name(entities, "timeseries", ".tsv", desc="amplitudes")
    _write_table(eeg_dir / name, ["time"] + names, np.vstack([times, amplitude]).T)
    write_json(
        eeg_dir / name.replace(".tsv", ".json"),
        {
            "Description": "Latent source amplitudes a_k(t) on the EEG clock (0 = first EEG sample); "
                           "negative times precede the recording and feed the HRF of the first volumes",
            "SamplingFrequency": COARSE_RATE,
            "StartTime": float(times[0]),
        },
    )
    func_dir = run_dir(truth, entities, "func")
    func_dir.mkdir(parents=True, exist_ok=True)
    name = build_name(entities, "timeseries", ".tsv", desc="volumes")
    columns = ["onset"] + [f"amplitude_{n}" for n in names] + [f"regressor_{n}" for n in names]
    _write_table(func_dir / name, columns, np.vstack([onsets, means, regressors]).T)
    write_json(
        func_dir / name.replace(".tsv", ".json"),
        {
            "onset": {"Description": "Start of the volume on the EEG clock", "Units": "s"},
            "amplitude": "amplitude_<source>: mean a_k over the volume's TR window [onset, onset + TR)",
            "regressor": "regressor_<source>: (a_k * HRF) at onset + TR/2, standardised over the run",
            "RepetitionTime": tr,
        },
    )


def _write_table(path: Path, columns, values) -> None:
    lines = ["\t".join(columns)] + ["\t".join(f"{x:.6g}" for x in row) for row in values]
    write_text(path, "\n".join(lines) + "\n")
