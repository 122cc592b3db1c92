"""The participant report, ``OUTPUT_DIR/sub-<label>.html``: one subject's runs, EEG, QC figures,
measured and synthesised volumes, dynamics maps and metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spec2vol_bids.derivatives import read_json, write_text
from spec2vol_bids.naming import (SPECTROGRAM_SUFFIX, STATMAP_SUFFIX, SYNTH_SUFFIX, TARGET_SUFFIX,
                                  parse_name, run_key, sidecar_path)
from spec2vol_bids.report import figures, html
from spec2vol_bids.report.outputs import (METRICS, read_metrics, read_tsv, run_name, same_runs,
                                          subject_id)

SPECTROGRAM_SIDECAR = SPECTROGRAM_SUFFIX.removesuffix(".npy") + ".json"
# Captions of the QC figures, by their name's ``desc`` and suffix.
QC_CAPTIONS = {
    "alignment_qc": "Interval between consecutive volume markers (dots) against the "
                    "repetition time (line, with a ±1 % band). Points outside the band "
                    "mean missing or extra markers, or a TR that does not match the data.",
    "spectrogram_qc": "TR-window spectrogram (z-scored across channels): left, each "
                      "channel's mean over volumes; right, one channel over time.",
}


def _runs_section(sub_dir: Path, sub: str) -> str:
    path = sub_dir / f"{sub}_runs.tsv"
    if not path.is_file():
        return html.empty(f"no pairing inventory ({path.name}) yet: run the participant level")
    runs = read_tsv(path).fillna("n/a")
    columns = [c for c in ("run", "eeg", "bold", "status", "note") if c in runs]
    counts = runs["status"].value_counts() if "status" in runs else {}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return (f"<p>{len(runs)} run(s) found" + (f": {html.escape(summary)}" if summary else "")
            + ".</p>" + html.table(columns, runs[columns].values.tolist()))


def _eeg_section(sidecars: list[Path]) -> str:
    if not sidecars:
        return html.empty("no EEG spectrograms yet: run the participant level (a run it refused "
                          "has none; the Runs table gives the reason)")
    rows, details = [], []
    for path in sidecars:
        meta = read_json(path)
        used, dropped = meta.get("Channels") or [], meta.get("DroppedChannels") or []
        freqs = meta.get("FrequencyBinsHz") or []
        band = f"{freqs[0]:.2f}–{freqs[-1]:.1f} Hz ({len(freqs)} bins)" if freqs else "n/a"
        run = run_name(path)
        t0 = meta.get("VolumeOnsetSeconds")
        timing = meta.get("VolumeMarker") or (f"none: --eeg-offset {t0:g} s" if t0 is not None
                                              else "none")
        rows.append([run, meta.get("SamplingFrequency", "n/a"), meta.get("RepetitionTime", "n/a"),
                     meta.get("NumberOfWindows", "n/a"), timing,
                     "n/a" if t0 is None else round(float(t0), 3), band, len(used), len(dropped)])
        details.append(f"<h3>{html.escape(run)}</h3><p><b>used</b> ({len(used)}): "
                       f"{html.escape(', '.join(used))}<br><b>dropped</b> ({len(dropped)}): "
                       f"{html.escape(', '.join(dropped) or 'none')}</p>")
    header = ["run", "sampling rate (Hz)", "TR (s)", "windows", "volume marker",
              "first volume (s)", "frequencies", "channels used", "channels dropped"]
    return html.table(header, rows, numeric={1, 2, 3, 5, 7, 8}) + "".join(details)


def _qc_caption(path: Path) -> str:
    entities = parse_name(path)
    return QC_CAPTIONS.get(f"{entities.get('desc')}_{entities.get('suffix')}", path.name)


def _qc_section(fig_dir: Path) -> str:
    svgs = sorted(fig_dir.glob("*.svg")) if fig_dir.is_dir() else []
    if not svgs:
        return html.empty("no QC figures yet: run the participant level")
    parts, last_run = [], None
    for path in sorted(svgs, key=lambda p: (run_name(p), p.name)):
        run = run_name(path)
        if run != last_run:
            parts.append(f"<h3>{html.escape(run)}</h3>")
            last_run = run
        parts.append(html.figure(html.svg_file_uri(path), _qc_caption(path), path.name))
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


def _slices_png(target: Path, synth: Path | None, synth_meta: dict) -> tuple[bytes, list[int]]:
    """PNG of measured (and synthesised) volumes in three orientations."""
    import nibabel as nib

    plt = figures.pyplot()
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
    return figures.png_bytes(fig), volumes


def _run_slices(target: Path, synth: Path | None) -> str:
    """One run's slices figure, under its heading."""
    run = run_name(target)
    meta = {}
    sidecar = None if synth is None else sidecar_path(synth)
    if sidecar is not None and sidecar.is_file():
        meta = read_json(sidecar)
    png, volumes = _slices_png(target, synth, meta)
    what = "measured (left) and synthesised (right)" if synth is not None else "measured"
    return f"<h3>{html.escape(run)}</h3>" + html.figure(
        html.png_uri(png), f"Central slices of the {what} BOLD volume in three orientations at "
        f"volumes {', '.join(map(str, volumes))} (intensities scaled to [0, 1] per volume).",
        f"slices of {run}")


def _slices_section(func_files: list[Path]) -> str:
    targets = [p for p in func_files if p.name.endswith(TARGET_SUFFIX)]
    synths = {run_key(parse_name(p)): p for p in func_files if p.name.endswith(SYNTH_SUFFIX)}
    if not targets and not synths:
        return html.empty("no measured or synthesised BOLD yet: run the participant level")
    parts = []
    if not synths:
        parts.append(html.empty("no synthesised BOLD yet: run the group level (or the participant "
                                "level with --model); measured volumes are shown alone"))
    for target in targets:
        parts.append(_run_slices(target, synths.get(run_key(parse_name(target)))))
    measured = {run_key(parse_name(t)) for t in targets}
    for synth in sorted((s for k, s in synths.items() if k not in measured), key=run_name):
        parts.append(f"<p>{html.escape(synth.name)}: {html.escape(_synthesised_by(synth))}, "
                     "without a measured target (EEG-only run).</p>")
    return "".join(parts)


def _synthesised_by(synth: Path) -> str:
    """Which model made a synthesised series, from which file, for which volumes."""
    try:
        meta = read_json(sidecar_path(synth))
    except (OSError, ValueError):
        return "synthesised (its sidecar is unreadable)"
    model = next((s for s in meta.get("Sources", []) if str(s).endswith(".pt")), None)
    volumes = meta.get("SourceVolumes") or ["?", "?"]
    return (f"synthesised by {meta.get('Model', 'an unrecorded model')}"
            f"{f' ({model})' if model else ''} for volumes {volumes[0]}–{volumes[-1]}")


def _metrics_section(output_dir: Path, sub: str) -> str:
    metrics = read_metrics(output_dir)
    if metrics is None or "participant_id" not in metrics:
        return html.empty("no metrics yet: run the group level")
    mine = metrics[metrics["participant_id"].map(subject_id) == sub]
    if mine.empty:
        return html.empty("no metrics for this subject in group_metrics.tsv: run the group level")
    present = [m for m in METRICS if m[0] in metrics]
    rows = []
    for _, row in mine.iterrows():
        others = metrics[metrics["model"] == row["model"]]
        cells = [row.get("model", "n/a"), row.get("fold", "n/a")]
        for column, _, digits in present:
            vals = others[column].dropna()
            cells.append(f"{html.fmt(row[column], digits)}  ({html.fmt(vals.mean(), digits)} ± "
                         f"{html.fmt(vals.std(ddof=0), digits)})")
        rows.append(cells)
    return (html.table(["model", "fold"] + [label for _, label, _ in present], rows,
                       numeric=set(range(2, 2 + len(present))))
            + '<p class="small">Each cell: this subject (mean ± std over all subjects for the '
              "same model). Baselines (e.g. the training subjects' mean volume) are rows of "
              "their own: a model is useful where it beats them, above all on dynamics.</p>")


def _dynamics_section(func_files: list[Path]) -> str:
    """One voxel-wise r map per run of a participant, over its anatomical background."""
    import nibabel as nib

    stats = [p for p in func_files if p.name.endswith(STATMAP_SUFFIX)]
    if not stats:
        return html.empty("no voxel-wise dynamics maps yet (desc-dynamics_statmap): run the "
                          "group level")
    all_targets = [p for p in func_files if p.name.endswith(TARGET_SUFFIX)]
    parts = []
    for path in stats:
        stat = nib.load(path)
        background, source = figures.anatomical_underlay(stat, path, same_runs([path], all_targets))
        run = run_name(path)
        parts.append(f"<h3>{html.escape(run)}</h3>" + html.figure(
            html.png_uri(figures.stat_map_png(stat, background, f"{run}: voxel-wise r")),
            "Voxel-wise Pearson correlation between synthesised and measured BOLD time series "
            f"(each voxel's mean removed), on {source}.", f"dynamics map of {run}"))
    return "".join(parts)


def _applied_models(func_files: list[Path]) -> dict[str, dict]:
    """The sidecars of the runs synthesised by ``participant --model``, by run name."""
    applied = {}
    for path in func_files:
        if path.name.endswith(SYNTH_SUFFIX):
            try:
                side = read_json(sidecar_path(path))
            except (OSError, ValueError):  # a damaged sidecar: the runs section says so
                continue
            if isinstance(side, dict) and "ModelFittedOnSubjects" in side:  # not the group's
                applied[run_name(path)] = side
    return applied


def _applied_section(applied: dict[str, dict], label: str) -> str:
    """Which model synthesised each run, and whether this subject (``label``) was among its
    training ones (sidecars written before ``SubjectInModelTraining`` existed: its label among
    ``ModelFittedOnSubjects``, whatever the dataset)."""
    rows = [[run, side.get("Model"), side.get("Fold"), side.get("ModelTrainingDataset") or "not recorded",
             ", ".join(side.get("InterpolatedChannels") or []) or "none"]
            for run, side in applied.items()]
    inside = [run for run, side in applied.items() if side.get(
        "SubjectInModelTraining", label in (side.get("ModelFittedOnSubjects") or []))]
    warning = html.empty(f"in-sample: the model was fitted on this subject's own data ("
                         f"{', '.join(inside)}); the series are no prediction for unseen EEG") \
        if inside else ""
    return warning + html.table(["run", "model", "fold", "trained on dataset", "interpolated channels"],
                                rows)


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
    sub = subject_id(subject)
    sub_dir = output_dir / sub
    sidecars = sorted(sub_dir.glob(f"**/eeg/*{SPECTROGRAM_SIDECAR}"))
    func_files = sorted(sub_dir.glob("**/func/*.nii.gz"))
    # EEG processed, no BOLD target: an EEG-only participant, not one awaiting the group level
    eeg_only = bool(sidecars) and not any(p.name.endswith(TARGET_SUFFIX) for p in func_files)
    unscored = html.empty("no measured BOLD for this participant (EEG-only runs): there is "
                          "nothing to score a synthesis against")
    applied = _applied_models(func_files)
    if applied and not eeg_only:
        unscored = html.empty("not scored: participant --model synthesises without scoring; the "
                              "group level scores models on held-out subjects")
    sections = [
        ("runs", "Runs", _runs_section(sub_dir, sub)),
        ("eeg", "EEG channels", _eeg_section(sidecars)),
        ("qc", "Alignment and spectrogram", _qc_section(sub_dir / "figures")),
        ("slices", "Measured vs synthesised", _slices_section(func_files)),
        ("dynamics", "Dynamics map", unscored if eeg_only or applied else _dynamics_section(func_files)),
        ("metrics", "Metrics", unscored if eeg_only or applied else _metrics_section(output_dir, sub)),
    ]
    if applied:
        sections.insert(1, ("model", "Applied model", _applied_section(applied, sub.removeprefix("sub-"))))
    path = output_dir / f"{sub}.html"
    return write_text(path, html.page(f"spec2vol: {sub}", sections))
