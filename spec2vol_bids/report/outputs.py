"""What the reports read from ``OUTPUT_DIR``: the metric table, TSV files and runs' files.

File names are read with :mod:`spec2vol_bids.naming`, as the levels write them.
"""

from __future__ import annotations

from pathlib import Path

from spec2vol_bids.naming import RUN_ENTITIES, parse_name, run_key, run_label

#: The metrics of ``group_metrics.tsv`` the reports show: (column, label, decimals).
METRICS = (("ssim", "SSIM", 3), ("psnr", "PSNR (dB)", 2), ("ssim3d", "SSIM 3-D", 3),
           ("dynamics", "dynamics r", 3))


def read_tsv(path: Path):
    """A TSV file as a DataFrame of strings, ``n/a`` (and only it) read as missing."""
    import pandas as pd

    return pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)


def read_metrics(output_dir: Path):
    """``group_metrics.tsv`` as a DataFrame with numeric metric columns, or None."""
    import pandas as pd

    path = output_dir / "group_metrics.tsv"
    if not path.is_file():
        return None
    metrics = read_tsv(path)
    for column, _, _ in METRICS + (("n_samples", "", 0),):
        if column in metrics:
            metrics[column] = pd.to_numeric(metrics[column], errors="coerce")
    return metrics


def subject_id(label: str) -> str:
    """``sub-<label>`` from a participant label with or without ``sub-``."""
    return label if label.startswith("sub-") else f"sub-{label}"


def run_name(path: str | Path) -> str:
    """The run a file belongs to, as a name stem (``sub-01_task-rest_run-1``), for headings.

    A run's EEG figures have no ``space``/``res`` and its BOLD outputs do; leaving them out
    gives the run one name in every section of a report.
    """
    entities = parse_name(path)
    return run_label({name: entities.get(name) for name in RUN_ENTITIES})


def same_runs(paths: list[Path], candidates: list[Path]) -> list[Path]:
    """The ``candidates`` that belong to a run of one of ``paths``."""
    runs = {run_key(parse_name(p)) for p in paths}
    return [p for p in candidates if run_key(parse_name(p)) in runs]
