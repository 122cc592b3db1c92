"""Tests of the memory-mapped paired dataset; also home of the simulated-derivatives helper.

:func:`write_derivatives` writes participant-level derivatives (spectrogram ``.npy`` + JSON,
target NIfTI + JSON, exactly as ``docs/interfaces.md`` names them) of a simulated study in
which EEG band power predicts BOLD: latent regressors drive each channel's spectrum with a fixed
topography and, delayed by a haemodynamic response, fixed spatial maps of the BOLD signal.
The other group-level test modules import it from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from spec2vol_bids import data
from spec2vol_bids.errors import DataError

CHANNELS = ["Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz", "C4", "T8",
            "P7", "P3", "Pz", "P4", "P8", "O1", "Oz", "O2"]
GRID = (32, 32, 16)  # (X, Y, Z): model order (D, H, W) = (16, 32, 32)
TR = 2.0
DISCARD, CONTEXT = 6, 20
HRF = np.array([0.0, 0.3, 0.8, 1.0, 0.7, 0.35, 0.1])  # response at lags 0..6 windows
AFFINE = np.array([[3.0, 0, 0, -48], [0, 3.0, 0, -60], [0, 0, 4.0, -30], [0, 0, 0, 1]])


def _study(seed: int, n_latent: int, freq_bins: int):
    """What all subjects share: channel topographies, spectra, spatial maps, the brain."""
    rng = np.random.default_rng(seed)
    # a fixed (alpha-like) pattern keeps the modulations' size visible after z-scoring
    topo = rng.normal(size=(n_latent + 1, len(CHANNELS)))
    spectra = np.abs(rng.normal(size=(n_latent + 1, freq_bins))) + 0.2
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in GRID], indexing="ij")
    brain = ((x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.9) ** 2 < 1).astype(float)
    template = brain * (0.6 + 0.4 * np.exp(-((x - 0.2) ** 2 + y ** 2 + z ** 2) / 0.3))
    maps = []
    for _ in range(n_latent):
        centre = rng.uniform(-0.5, 0.5, size=3)
        maps.append(brain * np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2
                                     + (z - centre[2]) ** 2) / 0.15))
    return topo, spectra, template, np.array(maps)


def write_derivatives(out_dir, subjects=("01", "02", "03"), *, n_volumes: int = 60,
                      freq_bins: int = 16, n_latent: int = 2, seed: int = 0, channels=None,
                      bold: bool = True, session: str | None = None, noise: float = 0.05) -> Path:
    """Write simulated participant-level derivatives for ``subjects`` under ``out_dir``.

    ``channels`` (default :data:`CHANNELS`) selects which electrodes a subject's files keep,
    in their order; ``bold=False`` writes EEG-only subjects.
    """
    out_dir = Path(out_dir)
    topo, spectra, template, maps = _study(seed, n_latent, freq_bins)
    keep = [CHANNELS.index(c) for c in (channels or CHANNELS)]
    for subject in subjects:
        rng = np.random.default_rng([seed, int(subject)])
        latent = rng.normal(size=(n_latent, n_volumes + 8))
        for _ in range(2):  # mildly smooth, still changing from one TR to the next
            latent[:, 1:] = 0.6 * latent[:, 1:] + 0.4 * latent[:, :-1]
        latent = latent[:, 8:]
        latent /= latent.std(axis=1, keepdims=True)
        drive = np.concatenate([np.full((1, n_volumes), 3.0), latent])
        power = 3.0 + np.einsum("kv,kc,kf->vcf", drive, topo, spectra)
        power += noise * rng.normal(size=power.shape)
        spec = (power - power.mean(axis=1, keepdims=True)) / power.std(axis=1, keepdims=True)
        spec = spec[:, keep].astype(np.float32)
        ents = f"sub-{subject}" + (f"_ses-{session}" if session else "") + "_task-rest"
        base = out_dir / f"sub-{subject}" / (f"ses-{session}" if session else "")
        eeg_dir = base / "eeg"
        eeg_dir.mkdir(parents=True, exist_ok=True)
        np.save(eeg_dir / f"{ents}_desc-spec2vol_spectrogram.npy", spec)
        (eeg_dir / f"{ents}_desc-spec2vol_spectrogram.json").write_text(json.dumps({
            "SamplingFrequency": 250.0, "RepetitionTime": TR, "WindowSamples": 500,
            "FrequencyBinsHz": list(np.arange(1, freq_bins + 1) / TR),
            "Channels": [CHANNELS[i] for i in keep], "DroppedChannels": [],
            "VolumeOnsetSeconds": 0.0, "VolumeMarker": None, "NumberOfWindows": n_volumes,
            "DiscardVolumes": DISCARD, "Context": CONTEXT, "Sources": [], "InputHash": "sim"}))
        if not bold:
            continue
        # BOLD follows the latent regressors through a haemodynamic delay of a few TRs
        response = np.stack([np.convolve(l, HRF)[:n_volumes] for l in latent])
        vols = template[..., None] * (1 + 0.5 * np.einsum("kxyz,kv->xyzv", maps, response))
        vols += noise * 0.2 * rng.normal(size=vols.shape) * (template[..., None] > 0)
        lo = vols.min(axis=(0, 1, 2), keepdims=True)
        hi = vols.max(axis=(0, 1, 2), keepdims=True)
        vols = ((vols - lo) / (hi - lo)).astype(np.float32)
        func_dir = base / "func"
        func_dir.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(vols, AFFINE)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_zooms(img.header.get_zooms()[:3] + (TR,))
        nib.save(img, func_dir / f"{ents}_desc-target_bold.nii.gz")
        (func_dir / f"{ents}_desc-target_bold.json").write_text(json.dumps({
            "RepetitionTime": TR, "SkullStripped": False, "Sources": [], "TargetGrid": list(GRID),
            "OriginalShape": list(GRID) + [n_volumes], "InputHash": "sim"}))
    return out_dir


@pytest.fixture
def deriv(tmp_path):
    return write_derivatives(tmp_path / "out", subjects=("01", "02", "03"))


def test_find_runs_pairs_and_filters(deriv, tmp_path):
    write_derivatives(deriv, subjects=("04",), bold=False)
    runs = data.find_runs(deriv)
    assert [r.subject for r in runs] == ["01", "02", "03", "04"]
    assert [r.target is not None for r in runs] == [True, True, True, False]
    assert runs[0].n_volumes == 60 and runs[0].first_sample == DISCARD + CONTEXT
    assert list(runs[0].sample_volumes) == list(range(26, 60))
    assert [r.subject for r in data.find_runs(deriv, participant_label=["sub-02", "03"])] == ["02", "03"]
    assert data.find_runs(deriv, task="other") == []


def test_samples_match_the_files(deriv, tmp_path):
    runs = data.find_runs(deriv)
    norm = data.norm_stats(runs, CHANNELS)
    ds = data.PairedDataset(runs, CHANNELS, norm, tmp_path / "work")
    assert len(ds) == 3 * (60 - 26)
    x, y = ds[40]  # second run, its 7th sample: source volume 26 + 6
    assert ds.sample(40) == (1, 32)
    spec = np.load(runs[1].spectrogram)
    expected = (spec[12:32] - norm["min"]) / (norm["max"] - norm["min"])
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-6)
    vol = nib.load(runs[1].target).get_fdata(dtype=np.float32)[..., 32]
    np.testing.assert_array_equal(y.numpy(), vol.transpose(2, 0, 1))
    assert x.shape == (CONTEXT, len(CHANNELS), 16) and y.shape == (16, 32, 32)
    assert ds.target_shape() == (16, 32, 32)
    # the inputs' range over all samples is exactly [0, 1]: the stats cover the used windows only
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    assert float(xs.min()) == pytest.approx(0.0, abs=1e-6)
    assert float(xs.max()) == pytest.approx(1.0, abs=1e-6)


def test_norm_stats_ignore_discarded_and_unused_windows(deriv):
    run = data.find_runs(deriv)[0]
    spec = np.load(run.spectrogram, mmap_mode="r+")
    spec[:DISCARD] = 1e6  # discarded windows: never model input
    spec[-1] = -1e6  # the last window: only a (non-existent) next volume would use it
    spec.flush()
    del spec
    stats = data.norm_stats([run], CHANNELS)
    assert stats["max"] < 100 and stats["min"] > -100


def test_target_cache_is_reused_and_renewed(deriv, tmp_path):
    run = data.find_runs(deriv)[0]
    first = data.cache_target(run.target, tmp_path / "work")
    assert np.load(first).shape == (60, 16, 32, 32)
    assert data.cache_target(run.target, tmp_path / "work") == first
    img = nib.load(run.target)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., :50], img.affine, img.header), run.target)
    second = data.cache_target(run.target, tmp_path / "work")
    assert second != first and np.load(second).shape == (50, 16, 32, 32)
    assert not list((tmp_path / "work" / "targets").glob(".*"))  # no temporary files left


def test_different_channel_sets_are_refused_unless_named(tmp_path):
    out = write_derivatives(tmp_path / "out", subjects=("01",))
    write_derivatives(out, subjects=("02",), channels=CHANNELS[::-1][:18])
    runs = data.find_runs(out)
    with pytest.raises(DataError, match="different EEG channel sets.*sub-02_task-rest.*--channels"):
        data.resolve_channels(runs)
    common = ["Cz", "Fz", "Pz", "Oz"]
    assert data.resolve_channels(runs, common) == common
    with pytest.raises(DataError, match="lacks channel.*Fp1"):
        data.resolve_channels(runs, ["Cz", "Fp1"])
    # channels are selected by name and z-scored again across the common set in either file
    norm = {"min": -5.0, "max": 5.0}
    ds = data.PairedDataset(runs, common, norm, tmp_path / "work")
    chosen = np.load(runs[1].spectrogram)[39:59][:, [runs[1].channels.index(c) for c in common]]
    np.testing.assert_allclose(ds[len(ds) - 1][0].numpy(), (_zscore(chosen) + 5) / 10, atol=1e-5)


def _zscore(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(axis=1, keepdims=True)) / a.std(axis=1, keepdims=True)


def test_a_channel_subset_is_z_scored_across_the_channels_read(deriv, tmp_path):
    """The participant level z-scores across every channel of the recording; a model that reads
    fewer sees the z-score of their amplitudes, whatever the channels it leaves out held."""
    from spec2vol_bids import synthesize

    run = data.find_runs(deriv)[0]
    amplitude = np.random.default_rng(5).gamma(2.0, size=np.load(run.spectrogram).shape)
    np.save(run.spectrogram, _zscore(amplitude).astype(np.float32))
    subset = ["Cz", "O1", "Fp1", "T7", "F4"]
    index = [CHANNELS.index(c) for c in subset]
    norm = {"kind": "minmax", "min": -3.0, "max": 3.0}
    x = data.PairedDataset([run], subset, norm, tmp_path / "work")[0][0].numpy()
    j = run.sample_volumes[0]
    np.testing.assert_allclose(x, (_zscore(amplitude[j - run.context:j][:, index]) + 3) / 6, atol=1e-5)
    stats = data.run_norm(run, subset, {"kind": "run"})
    used = _zscore(amplitude[run.discard:run.n_volumes - 1][:, index])
    np.testing.assert_allclose(stats["mean"], used.mean(axis=0), atol=1e-5)
    # at synthesis from a recording with more channels than the model: the same input
    np.testing.assert_allclose(synthesize.match_channels(_zscore(amplitude), CHANNELS, subset),
                               _zscore(amplitude[:, index]), atol=1e-5)
    # all of them in another order: only reordered
    order = list(reversed(CHANNELS))
    np.testing.assert_array_equal(
        data.PairedDataset([run], order, norm, tmp_path / "work")[0][0].numpy(),
        data.PairedDataset([run], CHANNELS, norm, tmp_path / "work")[0][0].numpy()[:, ::-1])


def test_dataset_pickles_without_maps_and_recycles_them(deriv, tmp_path, monkeypatch):
    import pickle

    runs = data.find_runs(deriv)
    ds = data.PairedDataset(runs, CHANNELS, {"min": -5.0, "max": 5.0}, tmp_path / "work")
    first = ds[0][0]
    assert ds._maps
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps == {}
    torch.testing.assert_close(clone[0][0], first)
    monkeypatch.setattr(data, "MAP_RECYCLE_BYTES", 1)
    for i in range(len(ds)):
        ds[i]
    assert len(ds._maps) <= 2  # mappings are dropped as reading goes on
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    assert sum(len(x) for x, _ in loader) == len(ds)


def test_mean_target(deriv, tmp_path):
    runs = data.find_runs(deriv)
    ds = data.PairedDataset(runs, CHANNELS, {"min": -5.0, "max": 5.0}, tmp_path / "work")
    expected = np.mean([ds[i][1].numpy() for i in range(len(ds))], axis=0)
    np.testing.assert_allclose(ds.mean_target(), expected, rtol=1e-5, atol=1e-6)


def test_runs_without_target_cannot_train(tmp_path):
    out = write_derivatives(tmp_path / "out", subjects=("01",), bold=False)
    runs = data.find_runs(out)
    with pytest.raises(DataError, match="without a BOLD target"):
        data.PairedDataset(runs, CHANNELS, {"min": 0, "max": 1}, tmp_path / "work")
    ds = data.PairedDataset(runs, CHANNELS, {"min": 0, "max": 1})
    assert ds[0].shape == (CONTEXT, len(CHANNELS), 16)
