"""Quality-control figures and the HTML reports (``sub-<label>.html``, ``group.html``).

The reports are single files that open offline: figures are embedded as ``data:`` URIs (SVG for
line plots, PNG for images), the stylesheet is inline, and there is no script, web font or
remote resource. They read only what the levels left in ``OUTPUT_DIR`` (see
``docs/interfaces.md``), so they can be rebuilt at any time and say plainly which parts have no
data yet; figures of data in a template space (``space-MNI152NLin2009cAsym``) are drawn over the
template's T1w image when TemplateFlow's home holds it, else over what is at hand, as the caption
says (see :func:`anatomical_underlay`).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import os
import tempfile
from pathlib import Path

import numpy as np

from spec2vol_bids import __version__
from spec2vol_bids.derivatives import atomic_path, read_json, write_text

METRICS = (("ssim", "SSIM", 3), ("psnr", "PSNR (dB)", 2), ("ssim3d", "SSIM 3-D", 3),
           ("dynamics", "dynamics r", 3))
# Channels shown in the spectrogram's time-frequency panel, first present wins: occipital
# sites carry the alpha rhythm most coupled to BOLD.
DISPLAY_CHANNELS = ("Oz", "O1", "O2", "POz", "Pz", "Cz")


def _pyplot():
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


def _save_svg(fig, path: str | Path) -> Path:
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="svg", metadata={"Date": None})
    finally:
        plt.close(fig)
    return Path(path)


def _png_uri(fig, dpi: int = 96) -> str:
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    finally:
        plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _svg_file_uri(path: Path) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _shrink(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Average consecutive elements along ``axis`` so that it has at most ``size`` of them."""
    n = array.shape[axis]
    if n <= size:
        return array
    edges = np.linspace(0, n, size + 1).astype(int)
    return np.add.reduceat(array, edges[:-1], axis=axis) / np.diff(edges).reshape(
        [-1 if a == axis % array.ndim else 1 for a in range(array.ndim)])


# --------------------------------------------------------------------------- QC figures

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
    plt = _pyplot()
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
    return _save_svg(fig, path)


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
    plt = _pyplot()
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
    return _save_svg(fig, path)


# --------------------------------------------------------------------------- HTML pieces

STYLE = """
body{font-family:Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fff}
nav{position:sticky;top:0;background:#2c3e50;padding:.5em 1em;z-index:1}
nav a{color:#ecf0f1;margin-right:1.2em;text-decoration:none;font-size:.95em}
main{max-width:1150px;margin:auto;padding:0 1em 3em}
h1{font-size:1.6em;margin:.8em 0 .2em}h2{border-bottom:2px solid #2c3e50;padding-top:.6em}
h3{font-size:1.05em;margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#ecf0f1}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:.8em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;margin-top:.3em}
.empty{color:#a94442;background:#f2dede;padding:.5em .8em;border-radius:3px}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.8em;overflow-x:auto;font-size:.85em}
.small{font-size:.85em;color:#555}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _empty(message: str) -> str:
    return f'<p class="empty">{_e(message)}</p>'


def _figure(uri: str, caption: str, alt: str) -> str:
    return (f'<figure><img src="{uri}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>"
            for i, v in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """A whole HTML document from (anchor, heading, body html) sections."""
    nav = "".join(f'<a href="#{a}">{_e(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_e(h)}</h2>{b}</section>' for a, h, b in sections)
    stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<nav>{nav}</nav><main><h1>{_e(title)}</h1>"
        f'<p class="small">spec2vol {_e(__version__)} &middot; report written {_e(stamp)}</p>'
        f"{body}</main></body></html>\n"
    )


def _fmt(value, digits: int) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"


def _read_tsv(path: Path):
    import pandas as pd

    return pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)


def _read_metrics(output_dir: Path):
    """``group_metrics.tsv`` as a DataFrame with numeric metric columns, or None."""
    import pandas as pd

    path = output_dir / "group_metrics.tsv"
    if not path.is_file():
        return None
    table = _read_tsv(path)
    for column, _, _ in METRICS + (("n_samples", "", 0),):
        if column in table:
            table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def _sub_id(label: str) -> str:
    return label if label.startswith("sub-") else f"sub-{label}"


def _run_key(name: str) -> str:
    """A run's entities without ``space``, ``desc`` and the suffix, for matching files."""
    name = name.split(".")[0]
    parts = [p for p in name.split("_") if "-" in p and not p.startswith(("space-", "desc-"))]
    return "_".join(parts)


# --------------------------------------------------------------------------- participant

def _runs_section(sub_dir: Path, sub: str) -> str:
    path = sub_dir / f"{sub}_runs.tsv"
    if not path.is_file():
        return _empty(f"no pairing inventory ({path.name}) yet: run the participant level")
    table = _read_tsv(path).fillna("n/a")
    columns = [c for c in ("run", "eeg", "bold", "status", "note") if c in table]
    counts = table["status"].value_counts() if "status" in table else {}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return (f"<p>{len(table)} run(s) found" + (f": {_e(summary)}" if summary else "") + ".</p>"
            + _table(columns, table[columns].values.tolist()))


def _eeg_section(sidecars: list[Path]) -> str:
    if not sidecars:
        return _empty("no EEG spectrograms yet: run the participant level")
    rows, details = [], []
    for path in sidecars:
        meta = read_json(path)
        used, dropped = meta.get("Channels") or [], meta.get("DroppedChannels") or []
        freqs = meta.get("FrequencyBinsHz") or []
        band = f"{freqs[0]:.2f}–{freqs[-1]:.1f} Hz ({len(freqs)} bins)" if freqs else "n/a"
        run = _run_key(path.name)
        rows.append([run, meta.get("SamplingFrequency", "n/a"), meta.get("RepetitionTime", "n/a"),
                     meta.get("NumberOfWindows", "n/a"), meta.get("VolumeMarker") or "none (sample 0)",
                     band, len(used), len(dropped)])
        details.append(f"<h3>{_e(run)}</h3><p><b>used</b> ({len(used)}): {_e(', '.join(used))}<br>"
                       f"<b>dropped</b> ({len(dropped)}): {_e(', '.join(dropped) or 'none')}</p>")
    header = ["run", "sampling rate (Hz)", "TR (s)", "windows", "volume marker", "frequencies",
              "channels used", "channels dropped"]
    return _table(header, rows, numeric={1, 2, 3, 6, 7}) + "".join(details)


def _qc_section(fig_dir: Path) -> str:
    figures = sorted(fig_dir.glob("*.svg")) if fig_dir.is_dir() else []
    if not figures:
        return _empty("no QC figures yet: run the participant level")
    captions = {
        "alignment_qc": "Interval between consecutive volume markers (dots) against the "
                        "repetition time (line, with a ±1 % band). Points outside the band "
                        "mean missing or extra markers, or a TR that does not match the data.",
        "spectrogram_qc": "TR-window spectrogram (z-scored across channels): left, each "
                          "channel's mean over volumes; right, one channel over time.",
    }
    parts, last_run = [], None
    for path in sorted(figures, key=lambda p: (_run_key(p.name), p.name)):
        run = _run_key(path.name)
        if run != last_run:
            parts.append(f"<h3>{_e(run)}</h3>")
            last_run = run
        kind = next((k for k in captions if f"desc-{k}" in path.name), None)
        parts.append(_figure(_svg_file_uri(path), captions.get(kind, path.name), path.name))
    return "".join(parts)


def _volume_map(n_target: int, n_synth: int | None, meta: dict) -> tuple[int, int, int]:
    """(first, last, offset): target volumes to show and synth index = target index - offset.

    The synthesised series omits the volumes without a prediction (the first discard +
    context); its sidecar's ``SourceVolumes`` says which target volumes it covers.
    """
    if n_synth is None:
        return 0, n_target - 1, 0
    span = meta.get("SourceVolumes")
    if isinstance(span, (list, tuple)) and len(span) == 2 and int(span[1]) - int(span[0]) + 1 == n_synth:
        first = int(span[0])
        return first, min(n_target, first + n_synth) - 1, first
    return 0, min(n_target, n_synth) - 1, 0


def _n_volumes(img) -> int:
    return img.shape[3] if len(img.shape) == 4 else 1


def _slices_uri(target: Path, synth: Path | None, synth_meta: dict) -> tuple[str, list[int]]:
    """PNG of measured (and synthesised) volumes in three orientations."""
    import nibabel as nib

    plt = _pyplot()
    tgt = nib.load(target)
    syn = nib.load(synth) if synth is not None else None
    first, last, offset = _volume_map(_n_volumes(tgt), None if syn is None else _n_volumes(syn),
                                      synth_meta)
    volumes = sorted({int(round(v)) for v in np.linspace(first, last, 5)[1:-1]})
    zooms = tgt.header.get_zooms()[:3]
    sources = [("measured", tgt, 0)] + ([("synthesised", syn, offset)] if syn is not None else [])
    orientations = (("axial", 2), ("coronal", 1), ("sagittal", 0))
    ncols = len(orientations) * len(sources)
    fig, axes = plt.subplots(len(volumes), ncols, figsize=(1.9 * ncols, 1.9 * len(volumes) + 0.3),
                             squeeze=False, layout="constrained", facecolor="black")
    for r, v in enumerate(volumes):
        data = [np.asanyarray(img.dataobj[..., v - shift] if len(img.shape) == 4 else img.dataobj)
                for _, img, shift in sources]
        for o, (oname, axis) in enumerate(orientations):
            keep = [a for a in range(3) if a != axis]
            aspect = zooms[keep[1]] / zooms[keep[0]]
            for s, (sname, _, _) in enumerate(sources):
                vol = data[s]
                ax = axes[r, o * len(sources) + s]
                ax.imshow(np.take(vol, vol.shape[axis] // 2, axis=axis).T, cmap="gray",
                          origin="lower", vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{oname}\n{sname}", color="white", fontsize=8)
                if o == 0 and s == 0:
                    ax.set_ylabel(f"volume {v}", color="white", fontsize=8)
    return _png_uri(fig), volumes


def _slices_section(func_files: list[Path]) -> str:
    targets = [p for p in func_files if p.name.endswith("_desc-target_bold.nii.gz")]
    synths = {_run_key(p.name): p for p in func_files if p.name.endswith("_desc-synth_bold.nii.gz")}
    if not targets and not synths:
        return _empty("no measured or synthesised BOLD yet: run the participant level")
    parts = []
    if not synths:
        parts.append(_empty("no synthesised BOLD yet: run the group level (or the participant "
                            "level with --model); measured volumes are shown alone"))
    for target in targets:
        run = _run_key(target.name)
        synth = synths.get(run)
        meta = {}
        if synth is not None and synth.with_name(synth.name.replace(".nii.gz", ".json")).is_file():
            meta = read_json(synth.with_name(synth.name.replace(".nii.gz", ".json")))
        uri, volumes = _slices_uri(target, synth, meta)
        what = "measured (left) and synthesised (right)" if synth is not None else "measured"
        parts.append(f"<h3>{_e(run)}</h3>" + _figure(
            uri, f"Central slices of the {what} BOLD volume in three orientations at volumes "
                 f"{', '.join(map(str, volumes))} (intensities scaled to [0, 1] per volume).",
            f"slices of {run}"))
    for run, synth in sorted(synths.items()):
        if not any(_run_key(t.name) == run for t in targets):
            parts.append(f"<p>{_e(synth.name)}: synthesised without a measured target "
                         "(EEG-only run).</p>")
    return "".join(parts)


def _metrics_section(output_dir: Path, sub: str) -> str:
    table = _read_metrics(output_dir)
    if table is None or "participant_id" not in table:
        return _empty("no metrics yet: run the group level")
    mine = table[table["participant_id"].map(_sub_id) == sub]
    if mine.empty:
        return _empty("no metrics for this subject in group_metrics.tsv: run the group level")
    present = [m for m in METRICS if m[0] in table]
    rows = []
    for _, row in mine.iterrows():
        others = table[table["model"] == row["model"]]
        cells = [row.get("model", "n/a"), row.get("fold", "n/a")]
        for column, _, digits in present:
            vals = others[column].dropna()
            cells.append(f"{_fmt(row[column], digits)}  ({_fmt(vals.mean(), digits)} ± "
                         f"{_fmt(vals.std(ddof=0), digits)})")
        rows.append(cells)
    return (_table(["model", "fold"] + [label for _, label, _ in present], rows,
                   numeric=set(range(2, 2 + len(present))))
            + '<p class="small">Each cell: this subject (mean ± std over all subjects for the '
              "same model). Baselines (e.g. the training subjects' mean volume) are rows of "
              "their own: a model is useful where it beats them, above all on dynamics.</p>")


def write_participant_report(output_dir: str | Path, subject: str) -> Path:
    """Write ``OUTPUT_DIR/sub-<label>.html`` from the subject's derivatives.

    Parameters
    ----------
    output_dir : str | Path
        The derivative dataset.
    subject : str
        The participant label, with or without ``sub-``.

    Returns
    -------
    Path
        The report.
    """
    output_dir = Path(output_dir)
    sub = _sub_id(subject)
    sub_dir = output_dir / sub
    sidecars = sorted(sub_dir.glob("**/eeg/*_desc-spec2vol_spectrogram.json"))
    func_files = sorted(sub_dir.glob("**/func/*.nii.gz"))
    sections = [
        ("runs", "Runs", _runs_section(sub_dir, sub)),
        ("eeg", "EEG channels", _eeg_section(sidecars)),
        ("qc", "Alignment and spectrogram", _qc_section(sub_dir / "figures")),
        ("slices", "Measured vs synthesised", _slices_section(func_files)),
        ("dynamics", "Dynamics map", _subject_dynamics_section(func_files)),
        ("metrics", "Metrics", _metrics_section(output_dir, sub)),
    ]
    path = output_dir / f"{sub}.html"
    return write_text(path, _page(f"spec2vol: {sub}", sections))


# --------------------------------------------------------------------------- group

def _half_violins(ax, groups: list[np.ndarray], labels: list[str], colors) -> None:
    """Left half: the distribution; right half: the subjects as jittered points."""
    rng = np.random.default_rng(0)  # the same jitter every time the report is rebuilt
    for i, (vals, color) in enumerate(zip(groups, colors)):
        vals = vals[np.isfinite(vals)]
        if vals.size >= 2 and np.ptp(vals) > 0:
            body = ax.violinplot([vals], positions=[i], widths=0.8, showextrema=False)["bodies"][0]
            verts = body.get_paths()[0].vertices
            verts[:, 0] = np.minimum(verts[:, 0], i)
            body.set_facecolor(color)
            body.set_edgecolor(color)
            body.set_alpha(0.45)
        if vals.size:
            ax.scatter(i + rng.uniform(0.06, 0.3, vals.size), vals, s=14, color=color,
                       edgecolor="black", linewidth=0.3, zorder=3)
            ax.hlines(vals.mean(), i - 0.35, i + 0.35, color="black", lw=1.2, zorder=4)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_xlim(-0.6, len(labels) - 0.4)


def _metrics_figure(table) -> str:
    plt = _pyplot()
    present = [m for m in METRICS if m[0] in table and m[0] != "ssim3d"]
    models = list(dict.fromkeys(table["model"]))
    colors = plt.get_cmap("tab10")(np.arange(len(models)) % 10)
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.6),
                             squeeze=False, layout="constrained")
    for ax, (column, label, _) in zip(axes[0], present):
        groups = [table.loc[table["model"] == m, column].to_numpy(dtype=float) for m in models]
        _half_violins(ax, groups, models, colors)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    return _png_uri(fig)


def _summary_table(table) -> str:
    present = [m for m in METRICS if m[0] in table]
    rows = []
    for model, part in table.groupby("model", sort=False):
        cells = [model, part["participant_id"].nunique()]
        for column, _, digits in present:
            vals = part[column].dropna()
            cells.append(f"{_fmt(vals.mean(), digits)} ± {_fmt(vals.std(ddof=0), digits)}")
        rows.append(cells)
    return _table(["model", "subjects"] + [label for _, label, _ in present], rows,
                  numeric=set(range(1, 2 + len(present))))


def _subjects_table(output_dir: Path, table) -> str:
    present = [m for m in METRICS + (("n_samples", "samples", 0),) if m[0] in table]
    header = "".join(f"<th>{_e(h)}</th>" for h in ["participant", "model", "fold"]
                     + [label for _, label, _ in present])
    body = []
    for _, row in table.sort_values(["participant_id", "model"]).iterrows():
        sub = _sub_id(str(row["participant_id"]))
        name = _e(sub)
        if (output_dir / f"{sub}.html").is_file():
            name = f'<a href="{_e(sub)}.html">{name}</a>'
        cells = [f"<td>{name}</td>", f"<td>{_e(row['model'])}</td>",
                 f"<td>{_e(row.get('fold', 'n/a'))}</td>"]
        cells += [f'<td class="num">{_e(_fmt(row[c], d))}</td>' for c, _, d in present]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _curves_section(output_dir: Path) -> str:
    import pandas as pd

    histories = sorted((output_dir / "models").glob("fold-*/history.tsv"))
    if not histories:
        return _empty("no training history yet (models/fold-*/history.tsv): run the group level")
    plt = _pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    palette = "tab10" if len(histories) <= 10 else "tab20"
    colors = plt.get_cmap(palette)(np.arange(len(histories)) % 20)
    for path, color in zip(histories, colors):
        fold = path.parent.name
        hist = _read_tsv(path).apply(pd.to_numeric, errors="coerce")
        x = hist["epoch"] if "epoch" in hist else np.arange(len(hist))
        for column, style, ax, label in (("train_loss", "-", ax0, f"{fold} train"),
                                         ("val_loss", "--", ax0, f"{fold} validation"),
                                         ("val_ssim", "-", ax1, fold)):
            if column in hist and hist[column].notna().any():
                ok = hist[column].notna()
                ax.plot(x[ok], hist[column][ok], style, color=color, lw=1.2, label=label)
    ax0.set_xlabel("epoch")
    ax0.set_ylabel("loss: 0.5 (1 − SSIM) + 0.5 MSE")
    ax0.set_title("training (solid) and validation (dashed) loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("SSIM")
    ax1.set_title("validation SSIM")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
        if len(histories) <= 8 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    return _figure(_png_uri(fig), f"Learning curves of {len(histories)} fold(s); validation "
                   "uses held-out training subjects, never the test subject.", "learning curves")


def _mean_image(paths: list[Path], reduce_time: bool):
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
    from spec2vol_bids.layout import is_template_space

    entities = dict(part.split("-", 1) for part in reference_path.name.split(".")[0].split("_")
                    if "-" in part)
    space, res = entities.get("space"), entities.get("res")
    missing = ""
    if is_template_space(space):
        from nilearn.image import resample_to_img

        path = templates.local_template_anatomy(space, res)
        missing = (f"the {space} T1w is not in TEMPLATEFLOW_HOME; to draw on it, run "
                   f"TEMPLATEFLOW_HOME={templates.templateflow_home()} "
                   f"{templates.prefetch_command(space, res, 'T1w')}")
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
    background, n_bg = _mean_image(targets, reduce_time=True) if targets else (None, 0)
    note = f" ({missing})" if missing else ""
    if background is None or background.shape != reference.shape[:3]:
        return None, f"no background (no measured targets on the same grid){note}"
    return background, f"the mean measured volume of {n_bg} run(s){note}"


def _stat_map_uri(stat, background, title: str) -> str:
    """PNG of a voxel-wise r map in axial slices over its background."""
    from nilearn import plotting

    plt = _pyplot()
    nz = stat.shape[2]
    ks = np.linspace(0.15 * (nz - 1), 0.85 * (nz - 1), min(8, nz))
    centre = np.array(stat.shape[:2]) / 2
    cuts = [float((stat.affine @ [centre[0], centre[1], k, 1])[2]) for k in ks]
    vmax = float(np.nanmax(np.abs(stat.get_fdata()))) or 1.0
    fig = plt.figure(figsize=(12, 2.6), facecolor="black")
    plotting.plot_stat_map(stat, bg_img=background, display_mode="z", cut_coords=cuts,
                           figure=fig, colorbar=True, cmap="RdBu_r", vmax=vmax,
                           symmetric_cbar=True, black_bg=True, draw_cross=False, title=title)
    return _png_uri(fig)


def _targets_of(stats: list[Path], candidates: list[Path]) -> list[Path]:
    runs = {_run_key(p.name) for p in stats}
    return [p for p in candidates if _run_key(p.name) in runs]


def _dynamics_section(output_dir: Path) -> str:
    stats = sorted(output_dir.glob("sub-*/**/func/*_desc-dynamics_statmap.nii.gz"))
    if not stats:
        return _empty("no voxel-wise dynamics maps yet (desc-dynamics_statmap): run the group level")
    stat, n_stat = _mean_image(stats, reduce_time=False)
    targets = _targets_of(stats, sorted(output_dir.glob("sub-*/**/func/*_desc-target_bold.nii.gz")))
    background, source = anatomical_underlay(stat, stats[0], targets)
    caption = (f"Voxel-wise Pearson correlation between synthesised and measured BOLD time "
               f"series (each voxel's mean removed), averaged over {n_stat} run(s), on {source}.")
    return _figure(_stat_map_uri(stat, background, f"mean voxel-wise r over {n_stat} run(s)"),
                   caption, "voxel-wise dynamics map")


def _subject_dynamics_section(func_files: list[Path]) -> str:
    """One voxel-wise r map per run of a participant, over its anatomical background."""
    import nibabel as nib

    stats = [p for p in func_files if p.name.endswith("_desc-dynamics_statmap.nii.gz")]
    if not stats:
        return _empty("no voxel-wise dynamics maps yet (desc-dynamics_statmap): run the group level")
    parts = []
    for path in stats:
        stat = nib.load(path)
        targets = _targets_of([path], [p for p in func_files
                                       if p.name.endswith("_desc-target_bold.nii.gz")])
        background, source = anatomical_underlay(stat, path, targets)
        run = _run_key(path.name)
        parts.append(f"<h3>{_e(run)}</h3>" + _figure(
            _stat_map_uri(stat, background, f"{run}: voxel-wise r"),
            "Voxel-wise Pearson correlation between synthesised and measured BOLD time series "
            f"(each voxel's mean removed), on {source}.", f"dynamics map of {run}"))
    return "".join(parts)


def _config_section(output_dir: Path, config) -> str:
    if config is not None:
        from spec2vol_bids.provenance import config_toml

        text, source = config_toml(config), "the configuration of this run"
    elif (output_dir / "logs" / "config.toml").is_file():
        text = (output_dir / "logs" / "config.toml").read_text(encoding="utf-8")
        source = "logs/config.toml (the latest run's resolved configuration)"
    else:
        return _empty("no configuration recorded yet (logs/config.toml is missing)")
    return f'<p class="small">From {_e(source)}.</p><pre>{_e(text)}</pre>'


def write_group_report(output_dir: str | Path, *, config: dict | None = None) -> Path:
    """Write ``OUTPUT_DIR/group.html`` from the group-level outputs.

    Parameters
    ----------
    output_dir : str | Path
        The derivative dataset.
    config : dict | None
        The resolved configuration to show; by default ``logs/config.toml``.

    Returns
    -------
    Path
        The report.
    """
    output_dir = Path(output_dir)
    table = _read_metrics(output_dir)
    if table is None or table.empty or not {"participant_id", "model"} <= set(table):
        metrics = _empty("no group metrics yet (group_metrics.tsv is missing or empty): "
                         "run the group level")
        subjects = metrics
    else:
        n_sub = table["participant_id"].nunique()
        metrics = (_figure(_metrics_figure(table),
                           f"Per-subject scores of each model over {n_sub} held-out subject(s) "
                           "(leave-one-subject-out): distribution on the left, one point per "
                           "subject on the right, black bar at the mean. Dynamics is the "
                           "voxel-wise correlation of synthesised and measured time series, "
                           "which anatomy alone cannot score on.", "metrics by model")
                   + "<h3>Mean ± standard deviation over subjects</h3>" + _summary_table(table))
        subjects = _subjects_table(output_dir, table)
    sections = [
        ("metrics", "Metrics", metrics),
        ("subjects", "Subjects", subjects),
        ("training", "Training", _curves_section(output_dir)),
        ("dynamics", "Dynamics map", _dynamics_section(output_dir)),
        ("config", "Configuration", _config_section(output_dir, config)),
    ]
    return write_text(output_dir / "group.html", _page("spec2vol: group report", sections))
