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
import errno
import io
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import EX_IOERR, DataError, MissingInputError, OutputError
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
    path = Path(path)
    # The temporary file sits next to the target so that os.replace is an atomic rename.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # Serialised in memory first: torch.save reports a failed write (a full disk) as a
        # RuntimeError, a plain file write as the OSError handled below.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        full = error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        raise OutputError(f"cannot write the model checkpoint ({error.strerror or error})",
                          path=path, code=EX_IOERR if full else None) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"not a readable spec2vol model checkpoint (refused by the safe "
                        f"loader: {reason[:200]}); use a model.pt written by spec2vol",
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
        reason = " ".join(str(error).split())[:300]
        raise DataError(f"the checkpoint's configuration and weights do not fit together "
                        f"({reason}); re-train the model", path=path) from error
    meta = {key: payload.get(key) for key in
            ("model_name", "config", "channels", "norm_stats", "extra", "format_version")}
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval(), meta
