"""The model checkpoint format: one ``torch.save`` file that needs no pickled code.

A checkpoint is a dict of plain values and tensors::

    {"format": "spec2vol-model", "format_version": 1,
     "model_name": "spec2vol", "config": {...dataclasses.asdict(model.config)...},
     "state_dict": {name: tensor}, "channels": ["Fp1", ...],
     "norm_stats": {...plain floats and lists...}, "extra": {...} or None}

It is read with ``torch.load(weights_only=True)`` only, so a file that would run code when
unpickled is refused (:class:`~spec2vol_bids.errors.DataError`, exit 65), never executed.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import torch
from torch import nn

from ..derivatives import write_bytes
from ..errors import DataError, MissingInputError, one_line
from .registry import config_from_dict, model_from_config

FORMAT = "spec2vol-model"
FORMAT_VERSION = 1


def _plain(value):
    """Numbers, strings, lists and dicts only (numpy and torch values converted)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return _plain(value.tolist())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def save_checkpoint(path, model: nn.Module, *, model_name: str, channels, norm_stats,
                    extra=None) -> Path:
    """Write a model checkpoint atomically (a temporary file, then a rename).

    Parameters
    ----------
    path : str | Path
        Where to write (conventionally ``model.pt``); its folder must exist.
    model : torch.nn.Module
        A model from :func:`~.registry.build_model` (or a DDP wrapper of one).
    model_name : str
        The registry name; must match ``model.config.name``.
    channels : sequence of str
        The EEG channel order the model was trained with.
    norm_stats : dict
        Input and target normalisation statistics (numbers and lists).
    extra : dict | None
        Anything else worth keeping (fold, epoch, metrics), plain values only.

    Returns
    -------
    Path
        The written file.
    """
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    config = model.config
    if model_name != config.name:
        raise ValueError(f"model_name {model_name!r} does not match the model's config "
                         f"({config.name!r})")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "config": _plain(dataclasses.asdict(config)),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "channels": [str(c) for c in channels],
        "norm_stats": _plain(norm_stats),
        "extra": _plain(extra),
    }
    # Serialised in memory first: torch.save reports a failed write (a full disk) as a
    # RuntimeError; write_bytes reports it as exit 74 like any other write.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = write_bytes(path, buffer.getbuffer())
    return path


def unreadable_reason(error: BaseException, path: Path) -> str:
    """Why torch's safe loader could not read ``path``, in words (without its advice to load the
    file unsafely): an empty file or one of another format is named as such, since the
    loader's own message for them is a bare byte value."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as exc:  # not readable at all (permissions, a folder)
        return f"it cannot be read ({exc.strerror or exc})"
    if not head:
        return "the file is empty"
    if head != b"PK" and head[:1] != b"\x80":  # torch writes zip archives, once pickles
        return "not a PyTorch file (neither a zip archive nor a pickle)"
    text = str(error)
    if "PytorchStreamReader" in text or isinstance(error, EOFError):  # the file ends early
        return "the file is damaged or truncated"
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1]
        reason = reason.split(" Please use", 1)[0].split("Check the documentation", 1)[0]
        return one_line(reason) or "unsupported content"
    return one_line(text.split(". ", 1)[0] if "Weights only load failed" in text else text) \
        or type(error).__name__


def _finite_numbers(value) -> bool:
    """Whether every number inside ``value`` (nested dicts and lists) is finite."""
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite_numbers(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    if torch.is_tensor(value):
        return bool(torch.isfinite(value).all()) if value.is_floating_point() else True
    return True


def load_checkpoint(path, map_location="cpu") -> tuple[nn.Module, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str | Path
        The checkpoint file.
    map_location : str | torch.device
        Where to put the tensors.

    Returns
    -------
    model : torch.nn.Module
        The model with its weights, in eval mode.
    meta : dict
        ``model_name``, ``config`` (dict), ``channels``, ``norm_stats``, ``extra`` and
        ``format_version``.

    Raises
    ------
    MissingInputError
        The file does not exist.
    DataError
        The file is not a spec2vol checkpoint (including any pickle that needs code to be
        unpickled), or its weights do not fit its configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError("model checkpoint not found; pass a model.pt written by "
                                "spec2vol", path=path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means "not a safe checkpoint"
        raise DataError(f"not a readable spec2vol model checkpoint (refused by the safe "
                        f"loader: {unreadable_reason(error, path)}); use an intact model.pt written by "
                        "spec2vol",
                        path=path) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError("not a spec2vol model checkpoint (no 'spec2vol-model' format tag); "
                        "use a model.pt written by spec2vol", path=path)
    if payload.get("format_version") != FORMAT_VERSION:
        raise DataError(f"unsupported checkpoint format version "
                        f"{payload.get('format_version')!r} (this spec2vol reads "
                        f"{FORMAT_VERSION}); re-train or upgrade spec2vol", path=path)
    try:
        config = config_from_dict(dict(payload["config"]))
        model = model_from_config(config)
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise DataError(f"the checkpoint's configuration and weights do not fit together "
                        f"({one_line(error, 300)}); re-train the model", path=path) from error
    bad = [name for name, tensor in payload["state_dict"].items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise DataError(f"the model's weights hold NaN or infinite values ({len(bad)} tensors, e.g. "
                        f"{bad[0]}); re-train the model", path=path)
    if not _finite_numbers(payload.get("norm_stats")):
        raise DataError("the model's EEG normalisation statistics hold NaN or infinite values; "
                        "re-train the model", path=path)
    channels = payload.get("channels")
    if not isinstance(channels, list) or not channels or not all(isinstance(c, str) and c for c in channels):
        raise DataError("the model file lists no EEG channels (its 'channels' must be a non-empty "
                        "list of names); use a model.pt written by spec2vol", path=path)
    meta = {key: payload.get(key) for key in
            ("model_name", "config", "channels", "norm_stats", "extra", "format_version")}
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval(), meta
