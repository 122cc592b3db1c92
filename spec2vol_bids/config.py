"""Every setting of a spec2vol run, in one object: built once, validated in one place.

The command line (:mod:`spec2vol_bids.cli.parser`) and ``--config-file`` give option values;
:func:`build` turns them into a :class:`Config` of four frozen parts (inputs, participant,
training, execution) and checks them, for both levels alike. The defaults live here and only
here: the parser shows them in ``--help`` from these classes, and the resolved configuration
written to ``OUTPUT_DIR/logs/`` is :meth:`Config.as_dict`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from spec2vol_bids.errors import UsageError
from spec2vol_bids.naming import clean_labels

#: Frequency bins kept per TR window when nothing else decides: the authors' 249.
FREQ_BINS = 249
#: TR windows of EEG before each volume when no ``--model`` decides: the authors' 20.
CONTEXT = 20
#: The largest target grid axis: a volume of an fMRI run, not an image to upsample.
MAX_GRID = 256
#: The linear baselines, fitted in closed form (spec2vol_bids.linear).
LINEAR_MODELS = ("ridge", "hrf-ridge")
#: What ``--model`` can name at the group level (its final model is what ``participant --model``
#: applies), and what ``--compare`` trains beside it on every fold (the mean volume always is).
MODELS = COMPARE = ("spec2vol", "e2fnet", *LINEAR_MODELS)
#: ``--eeg-normalisation``: one min-max pair (published), per channel and bin from the training
#: subjects, or every run standardised with its own statistics (spec2vol_bids.data.norm_stats).
NORMALISATIONS = ("minmax", "standard", "run")
#: ``--protocol``: what a network learns (docs/model.md). "residual": each voxel's deviation
#: from the training subjects' mean volume in units of its temporal SD, within the span of their
#: responses' leading components, with a linear readout beside the network, every run's EEG
#: standardised on its own, masked MSE; "published": the volume itself, as the authors train it.
PROTOCOLS = ("residual", "published")
#: The EEG scaling of each protocol when ``--eeg-normalisation`` is not given.
PROTOCOL_NORMALISATION = {"residual": "run", "published": "minmax"}
#: Response components the residual protocol keeps a network's output to.
READOUT_COMPONENTS = 64
#: Lag profiles of the residual protocol's linear readout, learned and shared by every band
#: feature (spec2vol_bids.models.residual.KernelReadout): a response shape and one that shifts it.
READOUT_KERNELS = 2
#: The SGD step size of that readout (spec2vol_bids.optimisers): of its lag profiles, and of its
#: maps to the components for a brain mask of READOUT_MASK_VOXELS voxels; the network keeps AdamW
#: at --lr. The maps' step grows with the mask and their weight decay shrinks, so that they train
#: alike on every grid (optimisers.optimiser says why; docs/model.md).
READOUT_LR = 0.1
#: The mask size READOUT_LR is given for: about the demo's (3 960 voxels of 32 × 32 × 16).
READOUT_MASK_VOXELS = 4000
SIZES = ("full", "tiny")
#: ``--precision``: "auto" is bfloat16 autocast on a GPU with native bfloat16, float32 elsewhere
#: (spec2vol_bids.devices.autocast_dtype)
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Inputs:
    """What is read and where the derivatives go."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_label: tuple[str, ...] | None = None
    session_label: tuple[str, ...] | None = None
    task: str | None = None
    bids_filter_file: Path | None = None
    eeg_derivatives: Path | None = None
    bold_derivatives: tuple[Path, ...] = ()
    bold_space: str | None = None
    skip_bids_validation: bool = False


@dataclass(frozen=True)
class Participant:
    """How a run's EEG and BOLD become a spectrogram and a target (docs/design.md)."""

    volume_marker: str | None = None
    first_volume_trigger: int | None = None
    eeg_offset: float | None = None
    #: None: :data:`FREQ_BINS`, unless a reused spectrogram or ``--model`` decides
    freq_bins: int | None = None
    fmax: float | None = None
    target_grid: tuple[int, int, int] | None = None
    discard_volumes: int = 6
    #: None only at the participant level with ``--model`` and no ``--context``: the model's
    context: int | None = None
    model_path: Path | None = None

    @property
    def bins_requested(self) -> bool:
        """Whether the frequency bins were asked for, rather than left to the default."""
        return self.fmax is not None or self.freq_bins is not None

    def spectrogram_bins(self) -> int | None:
        """The bin count to compute: none with ``--fmax``, else ``--freq-bins`` or the default."""
        return None if self.fmax is not None else self.freq_bins or FREQ_BINS


@dataclass(frozen=True)
class Training:
    """The group level's protocol and evaluation plan (``protocol="published"`` with the
    other defaults: as the authors train)."""

    model: str = "spec2vol"
    protocol: str = "residual"
    size: str = "full"
    epochs: int = 50
    batch_size: int = 16
    grad_accum: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    restart_epochs: int = 10
    clip_grad: float = 1.0
    device: str = "auto"
    precision: str = "auto"
    #: PyTorch's deterministic algorithms and a fixed cuBLAS workspace (reproducible on a GPU)
    deterministic: bool = False
    select: str = "last"
    #: None: the protocol's (:data:`PROTOCOL_NORMALISATION`)
    eeg_normalisation: str | None = None
    split: str = "loso"
    test_subjects: tuple[str, ...] | None = None
    folds: tuple[str, ...] | None = None
    no_final: bool = False
    compare: tuple[str, ...] = ()
    channels: tuple[str, ...] | None = None
    seed: int = 0
    #: progress bars on the console (off with ``-v`` 0 in library use)
    progress: bool = True
    num_workers: int = 0

    def __post_init__(self):
        if self.eeg_normalisation is None:
            object.__setattr__(self, "eeg_normalisation",
                               PROTOCOL_NORMALISATION.get(self.protocol, "minmax"))

    @property
    def readout_components(self) -> int:
        """The networks' ``readout_components`` under this protocol (0: volumes, as published)."""
        return READOUT_COMPONENTS if self.protocol == "residual" else 0

    @property
    def readout_kernels(self) -> int:
        """The learned lag profiles of the residual protocol's readout (0 without a readout)."""
        return READOUT_KERNELS if self.protocol == "residual" else 0


@dataclass(frozen=True)
class Execution:
    """Where intermediate files go and how much of the machine a run uses."""

    work_dir: Path
    nprocs: int = 1
    omp_nthreads: int = 1
    verbose: int = 0
    config_file: Path | None = None
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """A run's whole configuration."""

    inputs: Inputs
    participant: Participant = field(default_factory=Participant)
    training: Training = field(default_factory=Training)
    execution: Execution | None = None

    def as_dict(self, level: str | None = None) -> dict:
        """Every setting by part, paths as strings: what ``logs/config.toml`` records.

        Given the analysis ``level``, the other level's part is left out: the participant level
        trains nothing, and the group level's derivatives were made with the participant
        settings its participant runs recorded, not with this run's defaults.
        """
        unused = {"participant": "training", "group": "participant"}.get(level)
        return {part.name: _plain(dataclasses.asdict(getattr(self, part.name)))
                for part in dataclasses.fields(self) if part.name != unused}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "argv"}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


#: The option names that belong to each part (the command line's ``dest`` names, except
#: ``--model-config`` -> ``size`` and the participant level's ``--model`` -> ``model_path``).
_PARTS = {name: [f.name for f in dataclasses.fields(cls)]
          for name, cls in (("inputs", Inputs), ("participant", Participant),
                            ("training", Training), ("execution", Execution))}


def defaults(part: type) -> dict:
    """The default of every field of a part that has one (for ``--help`` and the parser)."""
    return {f.name: f.default for f in dataclasses.fields(part)
            if f.default is not dataclasses.MISSING}


def build(values: dict) -> Config:
    """The :class:`Config` of a run from option values (``None`` or absent: the default).

    Parameters
    ----------
    values : dict
        Option values by the command line's ``dest`` names, as the parser gives them (lists
        for repeatable options), plus ``argv``.

    Raises
    ------
    UsageError (64)
        An option value is not allowed, or options contradict each other.
    """
    values = {k: v for k, v in values.items() if v is not None}
    level = values["analysis_level"]
    model = values.pop("model", None)
    if level == "group":
        values["model"] = model or Training.model
    elif model is not None:
        values["model_path"] = Path(model).expanduser().absolute()
    if "model_path" not in values:
        values.setdefault("context", CONTEXT)
    if "model_config" in values:
        values["size"] = values.pop("model_config")
    for name, prefix in (("participant_label", "sub"), ("test_subjects", "sub"), ("folds", "sub"),
                         ("session_label", "ses")):
        if name in values:
            what = f"--{name.replace('_', '-')}"
            values[name] = tuple(sorted(clean_labels(values[name], prefix, what)))
    for name in ("compare", "channels", "target_grid"):
        if name in values:
            values[name] = tuple(values[name])
    for name in ("bids_dir", "output_dir", "bids_filter_file", "eeg_derivatives", "config_file"):
        if name in values:
            values[name] = Path(values[name]).expanduser().absolute()
    derivatives = values.get("bold_derivatives", ())
    if isinstance(derivatives, (str, Path)):
        derivatives = [derivatives]
    values["bold_derivatives"] = tuple(Path(p).expanduser().absolute() for p in derivatives)
    if "bold_space" in values:
        values["bold_space"] = _space(values["bold_space"])
    output = values["output_dir"]
    values["work_dir"] = Path(values.get("work_dir", output.parent / f".{output.name}_work")) \
        .expanduser().absolute()
    values.setdefault("nprocs", Execution.nprocs)
    values.setdefault("omp_nthreads", max(1, (os.cpu_count() or 1) // values["nprocs"]))
    values["progress"] = values.get("verbose", 0) > 0
    values["argv"] = tuple(values.get("argv", ()))
    parts = {name: {k: values[k] for k in fields if k in values} for name, fields in _PARTS.items()}
    config = Config(inputs=Inputs(**parts["inputs"]), participant=Participant(**parts["participant"]),
                    training=Training(**parts["training"]), execution=Execution(**parts["execution"]))
    check_training(config.training)
    return config


def check_training(training: Training) -> None:
    """Refuse a protocol that cannot run (library callers build :class:`Training` directly)."""
    for name in ("epochs", "batch_size", "grad_accum", "restart_epochs"):
        if getattr(training, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not (training.lr > 0 and math.isfinite(training.lr)) or training.weight_decay < 0 \
            or training.warmup_steps < 0 or training.clip_grad < 0:
        raise UsageError("--lr must be a positive number; --weight-decay, --warmup-steps and "
                         "--clip-grad must not be negative")
    if training.split == "fixed" and not training.test_subjects:
        raise UsageError("--split fixed needs --test-subjects")
    if training.split != "fixed" and training.test_subjects:
        # leave-one-subject-out tests every subject: the list would be ignored without a word
        raise UsageError("--test-subjects is for --split fixed; add --split fixed, or leave out "
                         "--test-subjects (leave-one-subject-out tests every subject; --folds "
                         "chooses which of its folds run)")
    choices = {"select": ("last", "val"), "split": ("loso", "fixed"), "size": SIZES,
               "device": ("auto", "cpu", "cuda"), "precision": PRECISIONS,
               "eeg_normalisation": NORMALISATIONS,
               "protocol": PROTOCOLS}
    if training.model not in MODELS:
        raise UsageError(f"--model {training.model!r}: the group level trains one of "
                         f"{', '.join(MODELS)}")
    if training.model in LINEAR_MODELS and training.protocol == "published":
        raise UsageError(f"--model {training.model} with --protocol published: the linear models "
                         f"always predict deviations from the mean volume; leave out --protocol, "
                         f"or train a network")
    if training.model in LINEAR_MODELS and training.eeg_normalisation != "run":
        raise UsageError(f"--model {training.model} with --eeg-normalisation "
                         f"{training.eeg_normalisation}: the linear models standardise each run's "
                         f"EEG on its own; leave out --eeg-normalisation, or train a network")
    unknown = [name for name in training.compare if name not in COMPARE]
    if unknown:
        raise UsageError(f"--compare {' '.join(unknown)}: choose from {', '.join(COMPARE)}")
    for name, allowed in choices.items():
        if getattr(training, name) not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                             f"not {getattr(training, name)!r}")


def _space(text: str) -> str:
    """``--bold-space`` in fMRIPrep's ``SPACE[:cohort-N][:res-N]`` syntax, normalised."""
    from spec2vol_bids.bids.spaces import parse_space, unparse_space

    name, res, cohort = parse_space(text)
    return unparse_space(name, res, cohort)
