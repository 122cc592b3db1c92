"""The group report's time-series figure: measured and synthesised BOLD at the best and the
worst voxel of the held-out runs (by the voxel-wise dynamics r of the main model)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from spec2vol_bids.naming import STATMAP_SUFFIX, SYNTH_SUFFIX, TARGET_SUFFIX
from spec2vol_bids.report import figures, html


def extreme_voxels(output_dir: Path) -> list[dict]:
    """The voxels of highest and lowest r over every held-out run's dynamics map.

    Returns
    -------
    list of dict
        ``[best, worst]`` (empty without maps), each with ``label``, ``run`` (the map's
        name), ``voxel`` (x, y, z), ``r`` and the ``measured`` and ``synthesised`` series.
    """
    found = {}
    for stat in sorted(Path(output_dir).glob(f"sub-*/**/func/*{STATMAP_SUFFIX}")):
        if not all(path.is_file() for path in _companions(stat)):
            continue  # a run still being written, or one whose outputs were removed
        rmap = np.asarray(nib.load(stat).dataobj, dtype=np.float64)
        inside = rmap != 0  # the map is 0 outside the brain mask and where a series is constant
        if not inside.any():
            continue
        for label, pick, outside in (("best", np.argmax, -np.inf), ("worst", np.argmin, np.inf)):
            voxel = np.unravel_index(pick(np.where(inside, rmap, outside)), rmap.shape)
            r = float(rmap[voxel])
            if label not in found or (r > found[label]["r"]) == (label == "best"):
                found[label] = {"label": label, "stat": stat, "voxel": tuple(int(v) for v in voxel),
                                "r": r}
    return [_with_series(found[k]) for k in ("best", "worst") if k in found]


def _companions(stat: Path) -> tuple[Path, Path, Path]:
    """The synthesised series' sidecar (its ``SourceVolumes``), the series itself and the
    measured target of the map's run."""
    name = stat.name[: -len(STATMAP_SUFFIX)]
    return (stat.with_name(name + SYNTH_SUFFIX.replace(".nii.gz", ".json")),
            stat.with_name(name + SYNTH_SUFFIX), stat.with_name(name + TARGET_SUFFIX))


def _with_series(item: dict) -> dict:
    stat = item.pop("stat")
    sidecar, synth, target = _companions(stat)
    first, last = json.loads(sidecar.read_text(encoding="utf-8"))["SourceVolumes"]
    x, y, z = item["voxel"]
    return {**item, "run": stat.name[: -len(STATMAP_SUFFIX)],
            "measured": np.asarray(nib.load(target).dataobj[x, y, z, first:last + 1], dtype=np.float64),
            "synthesised": np.asarray(nib.load(synth).dataobj[x, y, z, :], dtype=np.float64)}


def _zscore(series: np.ndarray) -> np.ndarray:
    std = series.std()
    return (series - series.mean()) / (std if std > 0 else 1.0)


def voxel_series_section(output_dir: Path) -> str:
    """The figure (two panels: best and worst voxel), or a note when there are no maps yet."""
    voxels = extreme_voxels(Path(output_dir))
    if not voxels:
        return html.empty("no dynamics map with its synthesised and measured series yet "
                          "(desc-dynamics_statmap, desc-synth_bold, desc-target_bold): run the "
                          "group level")
    plt = figures.pyplot()
    fig, axes = plt.subplots(len(voxels), 1, figsize=(10, 2.4 * len(voxels)), squeeze=False,
                             layout="constrained")
    for ax, item in zip(axes[:, 0], voxels):
        ax.plot(_zscore(item["measured"]), color="black", lw=1.1, label="measured")
        ax.plot(_zscore(item["synthesised"]), color="tab:red", lw=1.1, label="synthesised")
        ax.set_title(f"{item['label']} voxel {item['voxel']} of {item['run']}: r = {item['r']:.3f}",
                     fontsize=9)
        ax.set_ylabel("z-score")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, frameon=False, loc="upper right")
    axes[-1, 0].set_xlabel("sample (volume after the discarded and context volumes)")
    caption = ("Measured and synthesised BOLD (each z-scored over the run) at the voxel of the "
               "highest and of the lowest voxel-wise r over all held-out runs of the main model: "
               + "; ".join(f"{v['label']} r = {v['r']:.3f} at voxel {v['voxel']} of {v['run']}"
                           for v in voxels) + ".")
    return html.figure(html.png_uri(figures.png_bytes(fig)), caption, "best and worst voxel")
