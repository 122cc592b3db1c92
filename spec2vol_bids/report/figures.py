"""Figures: the QC figures the participant level draws, and the brain maps of the reports.

:func:`plot_alignment_qc` and :func:`plot_spectrogram_qc` write deterministic SVG files next to
the derivatives while a run is processed; the reports embed them later. Brain maps are drawn
over :func:`anatomical_underlay`. Matplotlib is imported on first use only, on the Agg backend.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

from spec2vol_bids.derivatives import atomic_path
from spec2vol_bids.naming import parse_name

# Channels shown in the spectrogram's time-frequency panel, first present wins: occipital
# sites carry the alpha rhythm most coupled to BOLD.
DISPLAY_CHANNELS = ("Oz", "O1", "O2", "POz", "Pz", "Cz")


def pyplot():
    """Matplotlib's pyplot on the Agg backend, with a writable configuration folder.

    Containers run with a read-only image and often a read-only or missing HOME, where
    matplotlib would warn and rebuild its font cache on every call.
    """
    if not os.environ.get("MPLCONFIGDIR"):
        os.environ["MPLCONFIGDIR"] = str(Path(tempfile.gettempdir()) / f"spec2vol-mpl-{os.getuid()}")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    # A fixed salt and no date make the SVG files identical from run to run.
    plt.rcParams.update({"svg.hashsalt": "spec2vol", "svg.fonttype": "path", "font.size": 9})
    return plt


def save_svg(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (atomically) as an SVG without a date, and close it."""
    plt = pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="svg", metadata={"Date": None})
    finally:
        plt.close(fig)
    return Path(path)


def png_bytes(fig, dpi: int = 96) -> bytes:
    """Render ``fig`` as PNG (keeping its face colour) and close it."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    return buf.getvalue()


def _shrink(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Average consecutive elements along ``axis`` so that it has at most ``size`` of them."""
    n = array.shape[axis]
    if n <= size:
        return array
    edges = np.linspace(0, n, size + 1).astype(int)
    return np.add.reduceat(array, edges[:-1], axis=axis) / np.diff(edges).reshape(
        [-1 if a == axis % array.ndim else 1 for a in range(array.ndim)])


def plot_alignment_qc(timing, path: str | Path, *, title: str = "") -> Path:
    """Plot how the EEG was aligned to the volumes; write an SVG.

    Top: the interval between consecutive volume onsets against the TR (±1 % band), with the
    volumes whose trigger was filled in marked. Bottom: the time line of the trigger series
    used, its strays (dropped) and the TR windows kept. The title line gives the trigger
    series, the counts and the clock drift.

    Parameters
    ----------
    timing : spec2vol_bids.triggers.VolumeTiming
        The timing the spectrogram was computed with.
    path : str | Path
        The SVG file to write (atomically).
    title : str
        Figure title, e.g. the run's name.
    """
    plt = pyplot()
    fs, tr = timing.sfreq, timing.tr
    onsets = np.asarray(timing.starts, dtype=float) / fs
    fig, (ax, line) = plt.subplots(2, 1, figsize=(8.5, 4.2), height_ratios=(3, 1))
    fig.subplots_adjust(left=0.08, right=0.78, bottom=0.11, top=0.86, hspace=0.45)
    ax.axhspan(0.99 * tr, 1.01 * tr, color="tab:green", alpha=0.2, lw=0, label="TR ± 1 %")
    ax.axhline(tr, color="tab:green", lw=1, label=f"TR = {tr:g} s")
    train = timing.train
    if onsets.size >= 2:
        intervals = np.diff(onsets)
        index = np.arange(1, onsets.size)
        ax.plot(index, intervals, ".", ms=3, color="tab:blue", label="onset interval")
        if train is not None:
            filled = np.asarray(timing.sidecar()["VolumeTiming"]["FilledVolumes"], dtype=int)
            if filled.size:
                ax.plot(filled, np.full(filled.size, tr), "|", ms=12, color="tab:orange",
                        label=f"{filled.size} trigger(s) filled")
        lo, hi = min(intervals.min(), 0.97 * tr), max(intervals.max(), 1.03 * tr)
        pad = 0.05 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlim(0, onsets.size)
    ax.set_xlabel("volume")
    ax.set_ylabel("time since previous volume (s)")
    # outside the axes, so that it never hides an outlying interval
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)

    line.plot(onsets, np.zeros_like(onsets), "|", ms=10, color="tab:blue", label="windows kept")
    if train is not None:
        strays = np.asarray(train.strays, dtype=float) / fs
        if strays.size:
            line.plot(strays, np.zeros_like(strays), "x", ms=6, color="tab:red",
                      label=f"{strays.size} stray marker(s)")
    line.set_yticks([])
    line.set_xlabel("time in the EEG recording (s)")
    line.legend(loc="upper left", bbox_to_anchor=(1.01, 1.2), fontsize=7, frameon=False)

    if train is None:
        how = f"--eeg-offset: first volume at {timing.t0:.3f} s, then one every TR"
    else:
        meta = timing.sidecar()["VolumeTiming"]
        how = (f"trigger '{meta['Marker']}' ({meta['MarkerSource']}): {meta['TriggersObserved']} of "
               f"{timing.n_volumes} volumes observed, {len(meta['FilledVolumes'])} filled, "
               f"{len(meta['StrayMarkersSeconds'])} strays, drift {meta['ClockDriftPPM']:+.1f} ppm")
    ax.set_title(f"{title or 'Volume timing'}\n{how}", fontsize=8)
    return save_svg(fig, path)


def _display_channel(channels: list[str]) -> int:
    lower = [c.lower() for c in channels]
    for name in DISPLAY_CHANNELS:
        if name.lower() in lower:
            return lower.index(name.lower())
    return 0


def plot_spectrogram_qc(spectrogram, freqs_hz, channels, path: str | Path, *,
                        title: str = "") -> Path:
    """Plot a run's TR-window spectrogram; write an SVG.

    Left: the z-score of each channel and frequency averaged over volumes (which channels are
    loud or quiet at which frequencies). Right: one channel's z-score over volumes and
    frequencies (an occipital channel where there is one).

    Parameters
    ----------
    spectrogram : array-like, shape (V, C, F)
        Spectrogram windows, z-scored across channels.
    freqs_hz : array-like, shape (F,)
        Frequency of each bin.
    channels : list of str, length C
        Channel names in the spectrogram's order.
    path : str | Path
        The SVG file to write (atomically).
    title : str
        Figure title, e.g. the run's name.
    """
    plt = pyplot()
    spec = np.asarray(spectrogram, dtype=np.float32)
    freqs = np.asarray(freqs_hz, dtype=float).ravel()
    channels = [str(c) for c in channels]
    if spec.ndim != 3 or spec.shape[1] != len(channels) or spec.shape[2] != freqs.size:
        raise ValueError(f"spectrogram of shape {spec.shape} does not match {len(channels)} "
                         f"channels and {freqs.size} frequencies")
    n_vol, n_chan, _ = spec.shape
    profile = spec.mean(axis=0)
    ch = _display_channel(channels)
    over_time = _shrink(spec[:, ch, :], 0, 600).T  # (F, volumes shown)
    # fixed margins, as in plot_alignment_qc
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=[1, 1.5])
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.85, wspace=0.22)
    lim = float(np.nanpercentile(np.abs(profile), 99)) or 1.0
    extent = (freqs[0], freqs[-1], n_chan - 0.5, -0.5)
    im0 = ax0.imshow(profile, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim,
                     extent=extent, interpolation="nearest")
    step = max(1, int(np.ceil(n_chan / 32)))
    ax0.set_yticks(range(0, n_chan, step), channels[::step], fontsize=6)
    ax0.set_xlabel("frequency (Hz)")
    ax0.set_title("mean z-score over volumes")
    fig.colorbar(im0, ax=ax0, shrink=0.8)
    lim = float(np.nanpercentile(np.abs(over_time), 99)) or 1.0
    im1 = ax1.imshow(over_time, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim,
                     vmax=lim, extent=(0, n_vol, freqs[0], freqs[-1]), interpolation="nearest")
    ax1.set_xlabel("volume")
    ax1.set_ylabel("frequency (Hz)")
    ax1.set_title(f"z-score at {channels[ch]}")
    fig.colorbar(im1, ax=ax1, shrink=0.8)
    fig.suptitle(title or "Spectrogram")
    return save_svg(fig, path)


def mean_image(paths: list[Path], reduce_time: bool):
    """Average same-grid images voxel-wise; return (nibabel image, number used)."""
    import nibabel as nib

    total, ref, used = None, None, 0
    for path in paths:
        img = nib.load(path)
        if ref is None:
            ref = img
        elif img.shape[:3] != ref.shape[:3] or not np.allclose(img.affine, ref.affine, atol=1e-3):
            continue  # another grid: averaging would mix unrelated voxels
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        if reduce_time and data.ndim == 4:
            data = data.mean(axis=3)
        data = np.nan_to_num(data.reshape(data.shape[:3]))
        total = data if total is None else total + data
        used += 1
    if ref is None:
        return None, 0
    return nib.Nifti1Image(total / used, ref.affine), used


def anatomical_underlay(reference, reference_path: Path, targets: list[Path]):
    """The anatomical background of a figure on ``reference``'s grid, and where it comes from.

    In a template space (a ``space-`` entity naming a TemplateFlow template, e.g.
    ``space-MNI152NLin2009cAsym_res-2``) the background is the template's T1w image when
    ``TEMPLATEFLOW_HOME`` holds it; it is never downloaded (a figure must not decide whether a
    participant is processed on a node without network). Without it, an MNI space is drawn over
    the MNI152 template nilearn ships, and any other space over the mean of the measured volumes
    ``targets`` on the same grid; the caption then says so and how to get the template's own.
    Outside template spaces the background is that mean volume. Backgrounds are resampled to
    the reference grid.

    Parameters
    ----------
    reference : nibabel image
        A 3-D image whose grid (shape and affine) the background must share.
    reference_path : Path
        The file ``reference`` comes from (or stands for): its name gives the space.
    targets : list of Path
        ``*_desc-target_bold`` series of the same runs.

    Returns
    -------
    background : nibabel image | None
        ``None`` when there is neither a template nor a target on the reference grid.
    source : str
        A phrase naming the background, for captions.
    """
    from spec2vol_bids import templates
    from spec2vol_bids.bids.spaces import is_template_space

    entities = parse_name(reference_path)
    space, res, cohort = (entities.get(k) for k in ("space", "res", "cohort"))
    missing = ""
    if is_template_space(space):
        from nilearn.image import resample_to_img

        path = templates.local_template_anatomy(space, res, cohort)
        missing = (f"the {space} T1w is not in TEMPLATEFLOW_HOME; to draw on it, run "
                   f"TEMPLATEFLOW_HOME={templates.templateflow_home()} "
                   f"{templates.prefetch_command(space, res, 'T1w', cohort)}")
        template, source = None, None
        if path is not None:
            template, source = path, f"the {space} T1w template from TemplateFlow ({path.name})"
        elif space.startswith("MNI152"):
            from nilearn.datasets import load_mni152_template

            template = load_mni152_template(resolution=2)  # in nilearn's package data
            source = (f"the MNI152 2009 symmetric template shipped with nilearn, standing in for "
                      f"the {space} T1w ({missing})")
        if template is not None:
            background = resample_to_img(template, reference, interpolation="continuous",
                                         force_resample=True, copy_header=True)
            return background, source
    background, n_bg = mean_image(targets, reduce_time=True) if targets else (None, 0)
    note = f" ({missing})" if missing else ""
    if background is None or background.shape != reference.shape[:3]:
        return None, f"no background (no measured targets on the same grid){note}"
    return background, f"the mean measured volume of {n_bg} run(s){note}"


def stat_map_png(stat, background, title: str) -> bytes:
    """PNG of a voxel-wise r map in axial slices over its background."""
    from nilearn import plotting

    plt = pyplot()
    nz = stat.shape[2]
    ks = np.linspace(0.15 * (nz - 1), 0.85 * (nz - 1), min(8, nz))
    centre = np.array(stat.shape[:2]) / 2
    cuts = [float((stat.affine @ [centre[0], centre[1], k, 1])[2]) for k in ks]
    vmax = float(np.nanmax(np.abs(stat.get_fdata()))) or 1.0
    fig = plt.figure(figsize=(12, 2.6), facecolor="black")
    plotting.plot_stat_map(stat, bg_img=background, display_mode="z", cut_coords=cuts,
                           figure=fig, colorbar=True, cmap="RdBu_r", vmax=vmax,
                           symmetric_cbar=True, black_bg=True, draw_cross=False, title=title)
    return png_bytes(fig)
