"""Model registry: names and sizes to configured, freshly initialised models."""

from __future__ import annotations

import dataclasses

from torch import nn

from .baselines import MeanConfig, MeanVolume
from .config import ModelConfig
from .e2fnet import E2fNet, E2fNetConfig
from .residual import ResidualOutput
from .ridge import HrfRidgeConfig, Ridge, RidgeConfig
from .spec2vol import Spec2Vol, Spec2VolConfig

# name -> (config class, model class, {size: hyper-parameters that differ from the defaults})
# "tiny" sizes train a few hundred steps on two CPU cores in seconds (tests and demos).
_MODELS = {
    "spec2vol": (Spec2VolConfig, Spec2Vol, {
        "full": {},
        "tiny": dict(width=32, branch_width=8, heads=4, dims=(32, 64, 128, 256),
                     depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1), drop_path=0.0),
    }),
    "e2fnet": (E2fNetConfig, E2fNet, {
        "full": {},
        "tiny": dict(encoder_widths=(8, 16, 32, 32), decoder_widths=(16, 16, 8),
                     norm_groups=8, attention_head_dim=8),
    }),
    "mean": (MeanConfig, MeanVolume, {"full": {}, "tiny": {}}),
    # ridge predicts standardised deviations: it always comes wrapped in ResidualOutput
    "ridge": (RidgeConfig, lambda config: ResidualOutput(Ridge(config)), {"full": {}, "tiny": {}}),
    "hrf-ridge": (HrfRidgeConfig, lambda config: ResidualOutput(Ridge(config)), {"full": {}, "tiny": {}}),
}

SIZES = ("full", "tiny")


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(_MODELS)


def build_model(name: str, *, eeg_channels: int, freq_bins: int, out_shape, context: int = 20,
                size: str = "full", **overrides) -> nn.Module:
    """Build a freshly initialised model.

    Parameters
    ----------
    name : str
        ``"spec2vol"``, ``"e2fnet"``, ``"ridge"``, ``"hrf-ridge"`` or ``"mean"`` (see :func:`list_models`).
    eeg_channels, freq_bins : int
        Input channels and frequency bins per TR window.
    out_shape : tuple of int
        Output volume (D, H, W).
    context : int
        TR windows per sample.
    size : str
        ``"full"`` (the published hyper-parameters) or ``"tiny"`` (for tests and demos).
    **overrides
        Any other field of the model's config dataclass.

    Returns
    -------
    torch.nn.Module
        Maps (batch, context, eeg_channels, freq_bins) float32 to (batch, *out_shape); its
        configuration is ``model.config``.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {SIZES}")
    config_class, _, sizes = _MODELS[name]
    fields = {f.name for f in dataclasses.fields(config_class)} - {"name"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"{name} has no hyper-parameter {sorted(unknown)}; "
                         f"known: {sorted(fields)}")
    params = {**sizes[size], **overrides}
    config = config_class(context=context, eeg_channels=eeg_channels, freq_bins=freq_bins,
                          out_shape=out_shape, **params)
    return model_from_config(config)


def config_from_dict(values: dict) -> ModelConfig:
    """Rebuild a config from ``dataclasses.asdict`` output (e.g. read back from JSON)."""
    name = values.get("name")
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    config_class = _MODELS[name][0]
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"{name} has no hyper-parameter {sorted(unknown)}")
    return config_class(**values)


def model_from_config(config: ModelConfig) -> nn.Module:
    """A freshly initialised model for ``config`` (wrapped in :class:`ResidualOutput` when its
    ``readout_components`` ask for the residual protocol's output)."""
    model = _MODELS[config.name][1](config)
    if config.readout_components and config.name in ("spec2vol", "e2fnet"):
        return ResidualOutput(model, config.readout_components, config.readout_kernels)
    return model
