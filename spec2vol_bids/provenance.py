"""Provenance: what ran, with which settings, software and seeds, and how to cite it.

Each run of a level leaves ``OUTPUT_DIR/logs/<level>-<YYYYmmdd-HHMMSS>-<pid>/`` with the
resolved configuration (``config.toml``) and ``provenance.json`` (command line, seeds, package
versions, start and end time of the run and of each stage). Because the folder name carries the
level, the start time and the process id, participant jobs of a SLURM array never write to the
same place. ``logs/config.toml`` always holds the configuration of the latest run (the group
report shows it) and ``logs/CITATION.md`` the references to cite.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from importlib import metadata
from pathlib import Path, PurePath
from typing import Any, Mapping

from spec2vol_bids import __version__
from spec2vol_bids.derivatives import container_info, write_json, write_text

# Distribution names (as pip knows them) whose versions a run records; the optional GPU
# extensions are recorded only where installed.
PACKAGES = ("numpy", "scipy", "torch", "mne", "mne-bids", "pybids", "nibabel", "nilearn",
            "pandas", "torchmetrics", "matplotlib")
OPTIONAL_PACKAGES = ("mamba-ssm", "causal-conv1d")

CITATION = """\
# Citing spec2vol

The results in `{out}` were produced with spec2vol {version}, an implementation of
Spec2VolCAMU-Net (He et al., 2025) packaged as a BIDS-App. EEG recordings were read with
MNE-Python (Gramfort et al., 2013) and MNE-BIDS (Appelhoff et al., 2019), the BIDS dataset was
queried with PyBIDS (Yarkoni et al., 2019), models were trained or applied with PyTorch (Paszke et
al., 2019) and figures were made with nilearn (Abraham et al., 2014). Please cite:

1. He D, Li S, Jiang B, Yan H. Spec2VolCAMU-Net: A Spectrogram-to-Volume Model for EEG-to-fMRI
   Reconstruction based on Multi-directional Time-Frequency Convolutional Attention Encoder and
   Vision-Mamba U-Net. arXiv:2505.09521 (2025). doi:10.48550/arXiv.2505.09521
2. Roos KG, Fukuda A, Cap QH. From brainwaves to brain scans: A robust neural network for
   EEG-to-fMRI synthesis (E2fNet). arXiv:2502.08025 (2025). doi:10.48550/arXiv.2502.08025
3. Ruan J, Li J, Xiang S. VM-UNet: Vision Mamba UNet for medical image segmentation.
   arXiv:2402.02491 (2024).
4. Gu A, Dao T. Mamba: Linear-time sequence modeling with selective state spaces.
   arXiv:2312.00752 (2023).
5. Yarkoni T, Markiewicz CJ, de la Vega A, Gorgolewski KJ, Salo T, Halchenko YO, et al. PyBIDS:
   Python tools for BIDS datasets. Journal of Open Source Software 4(40):1294 (2019).
   doi:10.21105/joss.01294
6. Gramfort A, Luessi M, Larson E, Engemann DA, Strohmeier D, Brodbeck C, Goj R, Jas M, Brooks T,
   Parkkonen L, Hämäläinen M. MEG and EEG data analysis with MNE-Python. Frontiers in
   Neuroscience 7:267 (2013). doi:10.3389/fnins.2013.00267
7. Appelhoff S, Sanderson M, Brooks TL, van Vliet M, Quentin R, Holdgraf C, et al. MNE-BIDS:
   Organizing electrophysiological data into the BIDS format and facilitating their analysis.
   Journal of Open Source Software 4(44):1896 (2019). doi:10.21105/joss.01896
8. Abraham A, Pedregosa F, Eickenberg M, Gervais P, Mueller A, Kossaifi J, Gramfort A,
   Thirion B, Varoquaux G. Machine learning for neuroimaging with scikit-learn (nilearn).
   Frontiers in Neuroinformatics 8:14 (2014). doi:10.3389/fninf.2014.00014
9. Paszke A, Gross S, Massa F, Lerer A, Bradbury J, Chanan G, et al. PyTorch: An imperative
   style, high-performance deep learning library. Advances in Neural Information Processing
   Systems 32:8024-8035 (2019).
10. Gorgolewski KJ, Auer T, Calhoun VD, et al. The brain imaging data structure, a format for
    organizing and describing outputs of neuroimaging experiments. Scientific Data 3:160044
    (2016). doi:10.1038/sdata.2016.44
"""


def toml_ready(value: Any) -> Any:
    """Convert a configuration value to types TOML can hold.

    ``None`` has no TOML form, so keys and list items holding it are left out; paths become
    strings, tuples and sets lists, NumPy scalars and arrays plain Python values. Anything else
    unknown is written as its ``str``.
    """
    if isinstance(value, Mapping):
        return {str(k): toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [toml_ready(v) for v in value if v is not None]
    if isinstance(value, (set, frozenset)):
        return sorted(toml_ready(v) for v in value if v is not None)
    if isinstance(value, (bool, int, float, str, dt.datetime, dt.date, dt.time)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist"):  # NumPy and torch scalars or arrays
        return toml_ready(value.tolist())
    return str(value)


def config_toml(config: Mapping) -> str:
    """The TOML text of a configuration mapping (see :func:`toml_ready`)."""
    import tomli_w

    return tomli_w.dumps(toml_ready(config))


def package_versions() -> dict[str, str]:
    """Versions of Python, spec2vol and the packages whose behaviour shapes the results."""
    versions = {"python": platform.python_version(), "spec2vol": __version__}
    for name in PACKAGES + OPTIONAL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in PACKAGES:
                versions[name] = "not installed"
    # CUDA details only where the run already loaded torch: importing it here would cost
    # seconds for levels that never touch it.
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch.cuda"] = str(torch.version.cuda)
        cudnn = getattr(torch.backends, "cudnn", None)
        if cudnn is not None and torch.cuda.is_available():
            versions["cudnn"] = str(cudnn.version())
    return versions


def _timestamp(value: dt.datetime | float | str | None) -> str | None:
    """ISO 8601 with the UTC offset, from a datetime, a POSIX time or an ISO string."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    elif not isinstance(value, dt.datetime):
        value = dt.datetime.fromtimestamp(float(value))
    if value.tzinfo is None:
        value = value.astimezone()  # naive times are local times
    return value.isoformat(timespec="seconds")


def _as_datetime(value: dt.datetime | float | str) -> dt.datetime:
    return dt.datetime.fromisoformat(_timestamp(value))


def _span(started, finished) -> dict:
    span = {"started": _timestamp(started), "finished": _timestamp(finished)}
    if started is not None and finished is not None:
        seconds = (_as_datetime(finished) - _as_datetime(started)).total_seconds()
        span["seconds"] = round(seconds, 3)
    return span


def _is_time(value) -> bool:
    if value is None or isinstance(value, (dt.datetime, int, float)):
        return not isinstance(value, bool)
    if isinstance(value, str):
        try:
            dt.datetime.fromisoformat(value)
        except ValueError:
            return False
        return True
    return False


def _stage_record(value):
    """A stage's ``(started, finished)`` or ``{"started", "finished", ...}`` as a time span with
    its duration; any other record (e.g. a list of per-run results) is kept as given."""
    if isinstance(value, Mapping) and ("started" in value or "finished" in value):
        extra = {k: _jsonable(v) for k, v in value.items() if k not in ("started", "finished")}
        return {**_span(value.get("started"), value.get("finished")), **extra}
    if (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_time, value))
            and any(v is not None for v in value)):
        return _span(*value)
    return _jsonable(value)


def _jsonable(value):
    """``value`` with dates, paths, sets and NumPy values turned into JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=str)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)


def run_log_dir(output_dir: str | Path, level: str, started: dt.datetime | float | str) -> Path:
    """``OUTPUT_DIR/logs/<level>-<YYYYmmdd-HHMMSS>-<pid>`` for a run that began at ``started``."""
    # local time, like the names of the log files the command line writes next to it
    stamp = _as_datetime(started).astimezone().strftime("%Y%m%d-%H%M%S")
    return Path(output_dir) / "logs" / f"{level}-{stamp}-{os.getpid()}"


def write_provenance(output_dir: str | Path, *, level: str, argv: list[str], config: Mapping,
                     seeds: Any, started, finished, stages: Mapping) -> Path:
    """Record how a run of ``level`` was made, under ``OUTPUT_DIR/logs``.

    Parameters
    ----------
    output_dir : str | Path
        The derivative dataset.
    level : str
        ``"participant"`` or ``"group"`` (names the run's log folder).
    argv : list of str
        The command line, program name first.
    config : dict
        The resolved configuration; written as TOML (``None`` values left out).
    seeds : int | dict | list
        The random seeds used (stored as given).
    started, finished : datetime | float | str
        Start and end of the run (datetimes, POSIX times or ISO strings; naive means local).
    stages : dict
        Stage name -> ``(started, finished)`` or ``{"started": ..., "finished": ..., ...}``
        (recorded with the duration in seconds), or any other record, e.g. a list of per-run
        results (recorded as given, made JSON-able).

    Returns
    -------
    Path
        The run's log folder, holding ``config.toml`` and ``provenance.json``.
    """
    output_dir = Path(output_dir)
    run_dir = run_log_dir(output_dir, level, started)
    toml_text = config_toml(config)
    record = {
        "Level": level,
        "CommandLine": [str(a) for a in argv],
        "Seeds": _jsonable(seeds),
        **{k.capitalize(): v for k, v in _span(started, finished).items()},
        "Stages": {str(name): _stage_record(value) for name, value in stages.items()},
        "Versions": package_versions(),
        "Platform": platform.platform(),
        "Host": platform.node(),
        "Container": container_info(),
    }
    write_text(run_dir / "config.toml", toml_text)
    write_json(run_dir / "provenance.json", record)
    write_text(output_dir / "logs" / "config.toml", toml_text)
    write_text(output_dir / "logs" / "CITATION.md",
               CITATION.format(out=output_dir.name, version=__version__))
    return run_dir
