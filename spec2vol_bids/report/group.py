"""The group report, ``OUTPUT_DIR/group.html``: metrics by model and subject (networks next to
ridge and the mean volume), learning curves, the mean dynamics map, measured and synthesised
series at the best and worst voxel, and the configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spec2vol_bids.derivatives import write_text
from spec2vol_bids.naming import STATMAP_SUFFIX, TARGET_SUFFIX
from spec2vol_bids.report import figures, html
from spec2vol_bids.report.outputs import METRICS, read_metrics, read_tsv, same_runs, subject_id
from spec2vol_bids.report.voxels import voxel_series_section


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


def _metrics_png(metrics) -> bytes:
    plt = figures.pyplot()
    present = [m for m in METRICS if m[0] in metrics and m[0] != "ssim3d"]
    models = list(dict.fromkeys(metrics["model"]))
    colors = plt.get_cmap("tab10")(np.arange(len(models)) % 10)
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.6),
                             squeeze=False, layout="constrained")
    for ax, (column, label, _) in zip(axes[0], present):
        groups = [metrics.loc[metrics["model"] == m, column].to_numpy(dtype=float) for m in models]
        _half_violins(ax, groups, models, colors)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    return figures.png_bytes(fig)


def _summary_table(metrics) -> str:
    present = [m for m in METRICS if m[0] in metrics]
    rows = []
    for model, part in metrics.groupby("model", sort=False):
        cells = [model, part["participant_id"].nunique()]
        for column, _, digits in present:
            vals = part[column].dropna()
            cells.append(f"{html.fmt(vals.mean(), digits)} ± {html.fmt(vals.std(ddof=0), digits)}")
        rows.append(cells)
    return html.table(["model", "subjects"] + [label for _, label, _ in present], rows,
                      numeric=set(range(1, 2 + len(present))))


def _subjects_table(output_dir: Path, metrics) -> str:
    """One row per subject and model; the subject links to its report when there is one."""
    present = [m for m in METRICS + (("n_samples", "samples", 0),) if m[0] in metrics]
    header = "".join(f"<th>{html.escape(h)}</th>" for h in ["participant", "model", "fold"]
                     + [label for _, label, _ in present])
    body = []
    for _, row in metrics.sort_values(["participant_id", "model"]).iterrows():
        sub = subject_id(str(row["participant_id"]))
        name = html.escape(sub)
        if (output_dir / f"{sub}.html").is_file():
            name = f'<a href="{html.escape(sub)}.html">{name}</a>'
        cells = [f"<td>{name}</td>", f"<td>{html.escape(row['model'])}</td>",
                 f"<td>{html.escape(row.get('fold', 'n/a'))}</td>"]
        cells += [f'<td class="num">{html.escape(html.fmt(row[c], d))}</td>' for c, _, d in present]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _metrics_section(metrics) -> str:
    n_sub = metrics["participant_id"].nunique()
    split = ("a fixed split" if "fold" in metrics and set(metrics["fold"].astype(str)) == {"fixed"}
             else "leave-one-subject-out")
    caption = (f"Per-subject scores of each model over {n_sub} held-out subject(s) "
               f"({split}): distribution on the left, one point per subject on the "
               "right, black bar at the mean. Dynamics is the voxel-wise correlation of "
               "synthesised and measured time series, which anatomy alone cannot score on.")
    return (html.figure(html.png_uri(_metrics_png(metrics)), caption, "metrics by model")
            + "<h3>Mean ± standard deviation over subjects</h3>" + _summary_table(metrics))


def _curves_png(histories: list[Path]) -> bytes:
    """Loss, validation SSIM and validation dynamics over epochs, one colour per fold."""
    import pandas as pd

    plt = figures.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    palette = "tab10" if len(histories) <= 10 else "tab20"
    colors = plt.get_cmap(palette)(np.arange(len(histories)) % 20)
    for path, color in zip(histories, colors):
        fold = path.parent.name
        hist = read_tsv(path).apply(pd.to_numeric, errors="coerce")
        x = hist["epoch"] if "epoch" in hist else np.arange(len(hist))
        for column, style, ax, label in (("train_loss", "-", axes[0], f"{fold} train"),
                                         ("val_loss", "--", axes[0], f"{fold} validation"),
                                         ("val_ssim", "-", axes[1], fold),
                                         ("val_dynamics", "-", axes[2], fold)):
            if column in hist and hist[column].notna().any():
                ok = hist[column].notna()
                ax.plot(x[ok], hist[column][ok], style, color=color, lw=1.2, label=label)
    # the protocol's loss: 0.5 (1 − SSIM) + 0.5 MSE (published) or masked MSE in SD units (residual)
    for ax, ylabel, title in zip(axes, ("loss (the protocol's)", "SSIM", "mean voxel-wise r"),
                                 ("training (solid) and validation (dashed) loss",
                                  "validation SSIM", "validation dynamics")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(histories) <= 8 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    return figures.png_bytes(fig)


def _curves_section(output_dir: Path, metrics) -> str:
    histories = sorted((output_dir / "models").glob("fold-*/history.tsv"))
    if metrics is not None and "fold" in metrics:
        # the folds the table scores: a folder of an earlier plan (a subject since dropped,
        # another split) is not this run's
        scored = {f"fold-{fold}" for fold in metrics["fold"].astype(str)}
        histories = [path for path in histories if path.parent.name in scored]
    if not histories:
        return html.empty("no training history yet (models/fold-*/history.tsv): run the group "
                          "level")
    return html.figure(html.png_uri(_curves_png(histories)),
                       f"Learning curves of {len(histories)} fold(s); validation uses held-out "
                       "training subjects, never the test subject.", "learning curves")


def _dynamics_section(output_dir: Path) -> str:
    stats = sorted(output_dir.glob(f"sub-*/**/func/*{STATMAP_SUFFIX}"))
    if not stats:
        return html.empty("no voxel-wise dynamics maps yet (desc-dynamics_statmap): run the "
                          "group level")
    stat, n_stat = figures.mean_image(stats, reduce_time=False)
    targets = same_runs(stats, sorted(output_dir.glob(f"sub-*/**/func/*{TARGET_SUFFIX}")))
    background, source = figures.anatomical_underlay(stat, stats[0], targets)
    caption = (f"Voxel-wise Pearson correlation between synthesised and measured BOLD time "
               f"series (each voxel's mean removed), averaged over {n_stat} run(s), on {source}.")
    png = figures.stat_map_png(stat, background, f"mean voxel-wise r over {n_stat} run(s)")
    return html.figure(html.png_uri(png), caption, "voxel-wise dynamics map")


def _config_section(output_dir: Path, config) -> str:
    if config is not None:
        from spec2vol_bids.provenance import config_toml

        text, source = config_toml(config), "the configuration of this run"
    elif (output_dir / "logs" / "config.toml").is_file():
        text = (output_dir / "logs" / "config.toml").read_text(encoding="utf-8")
        source = "logs/config.toml (the latest run's resolved configuration)"
    else:
        return html.empty("no configuration recorded yet (logs/config.toml is missing)")
    shown = f'<p class="small">From {html.escape(source)}.</p><pre>{html.escape(text)}</pre>'
    return shown + _participant_settings(output_dir)


def _participant_settings(output_dir: Path) -> str:
    """The ``[participant]`` settings recorded by the participant-level runs of ``output_dir``
    (the ones its spectrograms and targets were made with), each distinct set once."""
    import tomllib

    from spec2vol_bids.provenance import config_toml

    runs = sorted((output_dir / "logs").glob("participant-*/config.toml"),
                  key=lambda p: p.parent.name.split("-")[1:3])
    if not runs:
        return html.empty("no participant-level run is recorded in logs/ (the derivatives were "
                          "made elsewhere): their settings are in each spectrogram's sidecar")
    distinct: dict[str, list[str]] = {}
    for path in runs:
        source = path.relative_to(output_dir).as_posix()
        try:
            recorded = tomllib.loads(path.read_text(encoding="utf-8"))
            text = config_toml({"participant": recorded.get("participant", {})})
            labels = recorded.get("inputs", {}).get("participant_label")
            source += f" ({'sub-' + ' sub-'.join(labels) if labels else 'all participants'})"
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            text = "(unreadable)"
        distinct.setdefault(text, []).append(source)
    return "".join(f'<p class="small">Participant level, oldest run first: '
                   f'{html.escape("; ".join(sources))}.</p><pre>{html.escape(text)}</pre>'
                   for text, sources in distinct.items())


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
    metrics = read_metrics(output_dir)
    if metrics is None or metrics.empty or not {"participant_id", "model"} <= set(metrics):
        scores = html.empty("no group metrics yet (group_metrics.tsv is missing or empty): "
                            "run the group level")
        subjects = scores
    else:
        scores, subjects = _metrics_section(metrics), _subjects_table(output_dir, metrics)
    sections = [
        ("metrics", "Metrics", scores),
        ("subjects", "Subjects", subjects),
        ("training", "Training", _curves_section(output_dir, metrics)),
        ("dynamics", "Dynamics map", _dynamics_section(output_dir)),
        ("voxels", "Time series", voxel_series_section(output_dir)),
        ("config", "Configuration", _config_section(output_dir, config)),
    ]
    return write_text(output_dir / "group.html", html.page("spec2vol: group report", sections))
