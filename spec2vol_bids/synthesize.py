"""Apply a trained model to preprocessed EEG and write synthetic BOLD as 4-D NIfTI.

A run's synthetic series covers source volumes ``discard + context`` … ``n − 1``: the first
volumes have no full EEG context and are omitted (the sidecar's ``SourceVolumes`` says which
volumes the series covers). Volumes are written in the target grid (its affine), float32, with
the repetition time in ``pixdim[4]`` (units: seconds) and in the sidecar.

For a run recorded with other electrodes than the model's, channels are matched by name; up to
20 % of the model's channels may be missing and are interpolated from the others with MNE's
spherical splines on the standard 10-05 montage, per (window, frequency bin).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import mne
import nibabel as nib
import numpy as np
import torch

from spec2vol_bids.bold import spatial_code, with_spatial_code
from spec2vol_bids.config import Participant
from spec2vol_bids.data import apply_norm, window_stats
from spec2vol_bids.derivatives import read_spectrogram, source_dataset_name, write_json, write_nifti
from spec2vol_bids.devices import autocast
from spec2vol_bids.eeg import standard_montage
from spec2vol_bids.errors import DataError, MissingInputError
from spec2vol_bids.models import load_checkpoint
from spec2vol_bids.naming import dataset_root, parse_name, sidecar_path, source_uri
from spec2vol_bids.spectra import select_channels

logger = logging.getLogger(__name__)

#: the largest fraction of the model's channels that may be missing and interpolated
MAX_MISSING = 0.2


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> np.ndarray:
    """Run ``model`` over batches of inputs (tensors, or ``(x, y)`` pairs); ``(N, D, H, W)``.
    ``dtype``: the autocast dtype (None: float32), as :func:`~spec2vol_bids.devices.autocast_dtype`
    chooses it for training."""
    device = torch.device(device)
    model.eval().to(device)
    out = []
    for batch in batches:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        with autocast(device, dtype):
            out.append(model(x.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def write_synth(pred: np.ndarray, path: str | Path, *, affine: np.ndarray, tr: float,
                first_volume: int, sidecar: dict, spatial_code: int = 0) -> Path:
    """Write ``(N, D, H, W)`` predictions as a 4-D NIfTI ``(X, Y, Z, N)`` with its sidecar.

    ``first_volume`` is the source volume index of the first prediction; the series covers
    source volumes ``first_volume`` … ``first_volume + N − 1``. ``spatial_code`` is the
    target's (:func:`~spec2vol_bids.bold.spatial_code`; 4 for MNI space, say).
    """
    data = np.ascontiguousarray(np.asarray(pred, dtype=np.float32).transpose(2, 3, 1, 0))
    if not np.isfinite(data).all():
        raise DataError(f"model {sidecar.get('Model')} (fold {sidecar.get('Fold')}) produced NaN or "
                        "infinite values; nothing was written (check the model file and the run's "
                        "spectrogram)", path=path)
    img = with_spatial_code(nib.Nifti1Image(data, affine), spatial_code)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms(img.header.get_zooms()[:3] + (float(tr),))
    img.header.set_data_dtype(np.float32)
    write_nifti(path, img)
    write_json(sidecar_path(path), {
        "RepetitionTime": float(tr), "SkullStripped": False,
        "SourceVolumes": [int(first_volume), int(first_volume + len(pred) - 1)],
        **sidecar})
    return Path(path)


def write_statmap(rmap: np.ndarray, path: str | Path, *, affine: np.ndarray, sidecar: dict,
                  spatial_code: int = 0) -> Path:
    """Write a ``(D, H, W)`` map as a 3-D float32 NIfTI ``(X, Y, Z)`` with its sidecar."""
    img = with_spatial_code(nib.Nifti1Image(np.ascontiguousarray(rmap.astype(np.float32).transpose(1, 2, 0)),
                                            affine), spatial_code)
    img.header.set_xyzt_units("mm")
    write_nifti(path, img)
    write_json(sidecar_path(path), sidecar)
    return Path(path)


#: Electrode sites the 10-10 system renamed (their positions on the standard montage are the
#: same): a recording that uses the other name of a model's site gives that channel as it is.
SAME_SITE = {"t3": "t7", "t4": "t8", "t5": "p7", "t6": "p8"}
SAME_SITE.update({new: old for old, new in list(SAME_SITE.items())})


def locate_channels(channels: Sequence[str],
                    model_channels: Sequence[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Where each of the model's channels is in a recording with ``channels``: matched by name
    (case-insensitively), else by the other name of its site (T3 for T7, ...). Returns the
    index of every channel found and, for those found under the other name, that name."""
    lower = {name.lower(): i for i, name in enumerate(channels)}
    wanted = {name.lower() for name in model_channels}
    found, renamed = {}, {}
    for name in model_channels:
        other = SAME_SITE.get(name.lower())
        if name.lower() in lower:
            found[name] = lower[name.lower()]
        elif other in lower and other not in wanted:
            found[name] = lower[other]
            renamed[name] = channels[found[name]]
    return found, renamed


def match_channels(spec: np.ndarray, channels: Sequence[str], model_channels: Sequence[str], *,
                   path: str | Path | None = None) -> np.ndarray:
    """Reorder a ``(V, C, F)`` spectrogram to the model's channels, interpolating missing ones.

    Channels are found by :func:`locate_channels`; extra channels are dropped, and the rest
    z-scored again across channels per (window, bin), as the model's training runs were read
    (:func:`~spec2vol_bids.spectra.select_channels`). Missing ones (at most 20 % of the
    model's) are interpolated with spherical splines on the standard 10-05 montage from the
    present channels that lie on it, then z-scored the same way.

    Raises
    ------
    DataError
        More than 20 % missing, or a missing channel that is not on the montage.
    """
    found, renamed = locate_channels(channels, model_channels)
    missing = [name for name in model_channels if name not in found]
    if renamed:
        logger.info("%s: the model's channel(s) %s taken from %s (the same sites' other names)",
                    path, ", ".join(renamed), ", ".join(renamed.values()))
    if not missing:
        return select_channels(spec, [found[name] for name in model_channels])
    if len(missing) > MAX_MISSING * len(model_channels):
        hint = _naming_hint(channels, missing) or "; apply a model trained on this recording's channels"
        raise DataError(f"{len(missing)} of the model's {len(model_channels)} EEG channels are missing "
                        f"({', '.join(missing)}); at most {MAX_MISSING:.0%} can be interpolated"
                        f"{hint}", path=path)
    montage = standard_montage()
    on_montage = {name.lower() for name in montage.ch_names}
    off = [name for name in missing if name.lower() not in on_montage]
    if off:
        raise DataError(f"missing channel(s) {', '.join(off)} are not on the standard 10-05 montage "
                        "and cannot be interpolated", path=path)
    logger.warning("%s: interpolating %d missing EEG channel(s) with spherical splines: %s",
                   path, len(missing), ", ".join(missing))
    # the interpolation uses the present channels that have a standard position
    donors = [name for name in model_channels if name in found and name.lower() in on_montage]
    names = donors + missing
    V, _, F = spec.shape
    data = np.zeros((len(names), V * F))
    for k, name in enumerate(donors):
        data[k] = np.asarray(spec[:, found[name]], dtype=np.float64).reshape(-1)
    info = mne.create_info(names, sfreq=1.0, ch_types="eeg")
    raw = mne.io.RawArray(data, info, verbose="error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw.set_montage(montage, match_case=False, verbose="error")
        raw.info["bads"] = list(missing)
        raw.interpolate_bads(reset_bads=True, origin="auto", verbose="error")
    filled = dict(zip(names, raw.get_data()))
    out = np.empty((V, len(model_channels), F), dtype=np.float64)
    for k, name in enumerate(model_channels):
        out[:, k] = (filled[name] if name in filled else
                     np.asarray(spec[:, found[name]], dtype=np.float64).reshape(-1)).reshape(V, F)
    out -= out.mean(axis=1, keepdims=True)
    std = out.std(axis=1, keepdims=True)
    out /= np.where(std > 0, std, 1.0)
    return out.astype(np.float32)


def _naming_hint(channels: Sequence[str], missing: Sequence[str]) -> str:
    """A pointer for recordings whose names carry a prefix or suffix ("EEG Fp1-REF")."""
    plain = {re.sub(r"^eeg[\s_-]*|[\s_-]*(ref|avg|ar|le|a1|a2|m1|m2)$", "", name.strip().lower())
             for name in channels}
    hits = [name for name in missing if name.lower() in plain]
    if len(hits) < len(missing) / 2:
        return ""
    return (f"; the recording names them otherwise ({', '.join(list(channels)[:3])}, ...): give "
            "the channels the model's names in channels.tsv and the header")


#: Training grids further apart than this (mm) make an EEG-only series' placement worth a warning.
GRID_SPREAD_WARNING_MM = 1.0


def _placement(extra: dict) -> dict:
    """Where the volumes of a series without its own BOLD go: on the grid of the training run
    the model names, for the sidecar (and the log, when the training grids differ)."""
    source, spread = extra.get("TargetAffineFrom"), extra.get("TargetGridSpreadMm") or 0.0
    text = (f"the target grid of the training run {source}" if source
            else "the target grid of a training run (the model does not record which)")
    if spread > GRID_SPREAD_WARNING_MM:
        text += (f"; the training runs' grids lie up to {spread:g} mm from it, so the volumes sit "
                 "where that run's head was, not where this recording's was")
    return {"SpatialReference": text}


def context_batches(spec: np.ndarray, volumes: np.ndarray, context: int, norm: dict,
                    batch_size: int) -> Iterable[torch.Tensor]:
    """Batches of scaled ``(B, context, C, F)`` inputs for the given volume indices."""
    for start in range(0, len(volumes), batch_size):
        x = np.stack([spec[j - context:j] for j in volumes[start:start + batch_size]])
        yield torch.from_numpy(apply_norm(x.astype(np.float32), norm))


def synthesize_from_checkpoint(model_path: str | Path, spectrogram: str | Path, out_path: str | Path,
                               *, target: str | Path | None = None, tr: float | None = None,
                               sources: Sequence[str] = (), device: str = "cpu",
                               batch_size: int = 16) -> Path:
    """Synthesise a run's BOLD series from its spectrogram with a stored model.

    Parameters
    ----------
    model_path : path
        A ``model.pt`` written by the group level (e.g. ``OUT/models/final/model.pt``).
    spectrogram : path
        The run's ``*_desc-spec2vol_spectrogram.npy`` (its JSON sidecar next to it).
    out_path : path
        The ``*_desc-synth_bold.nii.gz`` to write (a JSON sidecar is written next to it).
    target : path | None
        The run's ``*_desc-target_bold.nii.gz``: its affine is used and the series stops at its
        last volume. Without it (EEG-only runs) the grid the model was trained on is used.
    tr : float | None
        Repetition time in seconds (default: the spectrogram sidecar's ``RepetitionTime``).
    sources : list of str
        Extra ``Sources`` for the sidecar (e.g. the raw EEG file's BIDS URI).
    device : str
        Torch device.
    batch_size : int
        Volumes per forward pass.

    Returns
    -------
    out_path : Path

    Notes
    -----
    Channels are matched by name to the model's list; missing ones are interpolated (with a
    warning naming them) and more than 20 % missing is refused (see :func:`match_channels`).
    A run whose TR differs from the model's training runs' is refused: its bins and context
    windows would be other frequencies and another span of time.
    """
    spectrogram = Path(spectrogram)
    if not Path(model_path).is_file():
        raise MissingInputError("the model file does not exist", path=model_path)
    model, meta = load_checkpoint(model_path, map_location=device)
    extra = meta.get("extra") or {}
    spec, side = read_spectrogram(spectrogram, finite=True)
    config = meta["config"]
    if spec.shape[2] != config["freq_bins"]:
        raise DataError(f"the model was trained on {config['freq_bins']} frequency bins but "
                        f"{spectrogram.name} has {spec.shape[2]}; rerun the participant level with "
                        f"--freq-bins {config['freq_bins']} and without --fmax (or leave both out "
                        "with --model)", path=model_path)
    model_tr, run_tr = extra.get("RepetitionTime"), float(side["RepetitionTime"])
    if model_tr is not None and not np.isclose(float(model_tr), run_tr, rtol=1e-3):
        # bin k is k / TR Hz and the context spans context · TR s: another TR means other inputs
        raise DataError(f"the model was trained on runs of TR {float(model_tr):g} s but "
                        f"{spectrogram.name} has {run_tr:g} s windows: its frequency bins and "
                        f"context would mean other frequencies and another span of time; apply a "
                        f"model trained on runs of TR {run_tr:g} s", path=model_path)
    spec = match_channels(spec, side["Channels"], meta["channels"], path=spectrogram)
    found, renamed = locate_channels(side["Channels"], meta["channels"])
    # The windows do not depend on the context length: the model's own context is what it needs.
    context = int(config["context"])
    first = int(side.get("DiscardVolumes", Participant.discard_volumes)) + context
    n_volumes = spec.shape[0]
    placement: dict = {}
    if target is not None:
        ref = nib.load(target)
        affine, n_volumes = ref.affine, min(n_volumes, ref.shape[3])
        code = spatial_code(ref.header)
        grid = extra.get("TargetShape")
        if grid and list(ref.shape[:3]) != list(grid):  # its affine would misplace the volumes
            raise DataError(f"the model synthesises volumes on a {'x'.join(map(str, grid))} grid "
                            f"but the run's target is {'x'.join(map(str, ref.shape[:3]))}; rerun the "
                            f"participant level with --target-grid {' '.join(map(str, grid))}",
                            path=target)
    elif "TargetAffine" in extra:
        affine = np.asarray(extra["TargetAffine"], dtype=float)
        code = int(extra.get("TargetSpatialCode", 0))
        placement = _placement(extra)
        if (extra.get("TargetGridSpreadMm") or 0.0) > GRID_SPREAD_WARNING_MM:
            logger.warning("%s: %s", spectrogram, placement["SpatialReference"])
    else:
        raise DataError("the model stores no target grid; give the run's target", path=model_path)
    volumes = np.arange(first, n_volumes)
    if not len(volumes):
        raise DataError(f"the run has {spec.shape[0]} EEG windows, too few for discard + context "
                        f"({first}) + 1", path=spectrogram)
    norm = meta["norm_stats"]
    if norm.get("kind") == "run":  # this run's own statistics, over the windows its samples use
        norm = window_stats(spec[first - context:n_volumes - 1])
    pred = predict(model, context_batches(spec, volumes, context, norm, batch_size), device)
    fitted_on = sorted({*extra.get("TrainSubjects", []), *extra.get("ValSubjects", [])})
    subject = parse_name(Path(spectrogram).name).get("subject")
    trained_on, dataset = extra.get("TrainingDataset"), source_dataset_name(dataset_root(spectrogram))
    in_sample = subject in fitted_on and (trained_on is None or dataset is None or trained_on == dataset)
    if in_sample:
        known = trained_on is not None and dataset is not None
        logger.warning("%s: sub-%s is one of the subjects the model was fitted on%s; the series is "
                       "no prediction for unseen EEG", spectrogram, subject,
                       f", in this dataset (\"{dataset}\")" if known else
                       " (if this is the dataset it was trained on, which the model does not record)")
    return write_synth(pred, out_path, affine=affine,
                       tr=float(tr if tr is not None else side["RepetitionTime"]),
                       first_volume=first, spatial_code=code, sidecar={
                           "Model": meta.get("model_name"), "Fold": extra.get("Fold", "final"),
                           "ModelFittedOnSubjects": fitted_on,
                           "ModelTrainingDataset": trained_on,
                           # the subject's own BOLD shaped the model: no prediction for unseen EEG
                           "SubjectInModelTraining": in_sample,
                           "InterpolatedChannels": [name for name in meta["channels"]
                                                    if name not in found],
                           "ChannelsFoundAs": renamed,
                           **(placement if target is None else {}),
                           "Sources": [source_uri(spectrogram, dataset_root(spectrogram), dataset=""), *sources,
                                       str(model_path)],
                       })
