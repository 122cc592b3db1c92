"""The authors' parameter names, and conversion of their trained Spectrogram2fMRI models.

The authors' code (github.com/hdy6438/Spec2VolCAMU-Net: ``Spectrogram2fMRI.py``,
``vmunet/vmunet.py``, ``vmunet/vmamba.py``) nests its modules differently from ours: its
encoder blocks are attributes ``block1``, ``block2``, its convolutions sit inside
``nn.Sequential(conv, SiLU)`` (index ``.0``), and the VM-UNet is wrapped twice
(``decoder.model.vmunet``) with each stage's blocks in ``.blocks`` and the patch merging and
expansion inside the stages. The leaf names (``weight``, ``in_proj_weight``, ``x_proj_weight``,
``A_logs``, ...) and every tensor's shape and layout are the same, so a checkpoint converts by
renaming alone. :data:`KEY_RULES` is the whole map, one row per module kind::

    ours                                   authors'
    encoder.project.                       encoder.initial_conv.0.
    encoder.blocks.{i}.branch_h.           encoder.block{i+1}.multi_scale.branch1.0.
    encoder.blocks.{i}.branch_w.           encoder.block{i+1}.multi_scale.branch2.0.
    encoder.blocks.{i}.branch_hw.          encoder.block{i+1}.multi_scale.branch3.0.
    encoder.blocks.{i}.fuse.               encoder.block{i+1}.multi_scale.fusion.0.
    encoder.blocks.{i}.norm1. / norm2.     encoder.block{i+1}.ln1. / ln2.
    encoder.blocks.{i}.attention.          encoder.block{i+1}.attn.attn.
    encoder.blocks.{i}.down.               encoder.block{i+1}.downsample.
    decoder.patch_embed. / patch_norm.     decoder.model.vmunet.patch_embed.proj. / .norm.
    decoder.layers.{i}.{j}.                decoder.model.vmunet.layers.{i}.blocks.{j}.
    decoder.downsample.{i}.                decoder.model.vmunet.layers.{i}.downsample.
    decoder.layers_up.{i}.{j}.             decoder.model.vmunet.layers_up.{i}.blocks.{j}.
    decoder.upsample.{i}.                  decoder.model.vmunet.layers_up.{i+1}.upsample.
    decoder.final_up. / final_conv.        decoder.model.vmunet.final_up. / final_conv.

The authors' training script (``train_Spectrogram2fMRI.py``) saves ``model.state_dict()`` with
``torch.save`` (``latest.pth``, ``epoch_*_best_SSIM_*.pth``); its EEG min-max pair is printed
and kept as ``min_eeg`` / ``max_eeg`` in the experiment's ``commandline_args.txt``.
:func:`convert_authors_checkpoint` (command ``spec2vol-convert-authors``) turns such a file
into a spec2vol model file.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import EX_INTERRUPTED, DataError, MissingInputError, Spec2VolError, UsageError, one_line
from .checkpoint import save_checkpoint, unreadable_reason
from .encoder import encoded_bins
from .registry import build_model

PROG = "spec2vol-convert-authors"

# The authors' encoder pads its map to a fixed 64 x 64 grid (Spectrogram2fMRI.py).
AUTHORS_GRID = (64, 64)

_CONV = ("weight", "bias")
_NORM = ("weight", "bias")
_ATTENTION = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_VSS_BLOCK = ("ln_1.weight", "ln_1.bias") + tuple(
    "self_attention." + leaf for leaf in (
        "in_proj.weight", "conv2d.weight", "conv2d.bias", "x_proj_weight", "dt_projs_weight",
        "dt_projs_bias", "A_logs", "Ds", "out_norm.weight", "out_norm.bias", "out_proj.weight"))
_MERGE = ("norm.weight", "norm.bias", "reduction.weight")
_EXPAND = ("expand.weight", "norm.weight", "norm.bias")

_VM = "decoder.model.vmunet."

#: (our prefix, the authors' prefix, the leaf names below it). ``{i}`` and ``{j}`` are module
#: indices; ``{i+1}`` is the same index counted from 1 (the authors' ``block1``, and their
#: first expanding decoder stage ``layers_up.1`` holding our ``upsample.0``).
KEY_RULES = (
    ("encoder.project", "encoder.initial_conv.0", _CONV),
    ("encoder.blocks.{i}.branch_h", "encoder.block{i+1}.multi_scale.branch1.0", _CONV),
    ("encoder.blocks.{i}.branch_w", "encoder.block{i+1}.multi_scale.branch2.0", _CONV),
    ("encoder.blocks.{i}.branch_hw", "encoder.block{i+1}.multi_scale.branch3.0", _CONV),
    ("encoder.blocks.{i}.fuse", "encoder.block{i+1}.multi_scale.fusion.0", _CONV),
    ("encoder.blocks.{i}.norm1", "encoder.block{i+1}.ln1", _NORM),
    ("encoder.blocks.{i}.attention", "encoder.block{i+1}.attn.attn", _ATTENTION),
    ("encoder.blocks.{i}.norm2", "encoder.block{i+1}.ln2", _NORM),
    ("encoder.blocks.{i}.down", "encoder.block{i+1}.downsample", _CONV),
    ("decoder.patch_embed", _VM + "patch_embed.proj", _CONV),
    ("decoder.patch_norm", _VM + "patch_embed.norm", _NORM),
    ("decoder.layers.{i}.{j}", _VM + "layers.{i}.blocks.{j}", _VSS_BLOCK),
    ("decoder.downsample.{i}", _VM + "layers.{i}.downsample", _MERGE),
    ("decoder.layers_up.{i}.{j}", _VM + "layers_up.{i}.blocks.{j}", _VSS_BLOCK),
    ("decoder.upsample.{i}", _VM + "layers_up.{i+1}.upsample", _EXPAND),
    ("decoder.final_up", _VM + "final_up", _EXPAND),
    ("decoder.final_conv", _VM + "final_conv", _CONV),
)

_FIELD = re.compile(r"\{([a-z])(?:\+(\d+))?\}")
_INDEX = r"(0|[1-9][0-9]*)"  # no leading zeros: one key, one spelling


def _compile(template: str, leaves) -> tuple[re.Pattern, list[tuple[str, int]]]:
    """A regex for ``template.leaf`` and the (field, offset) of each index group in it."""
    pattern, fields, pos = "^", [], 0
    for match in _FIELD.finditer(template):
        pattern += re.escape(template[pos:match.start()]) + _INDEX
        fields.append((match.group(1), int(match.group(2) or 0)))
        pos = match.end()
    pattern += re.escape(template[pos:]) + r"\.(" + "|".join(map(re.escape, leaves)) + ")$"
    return re.compile(pattern), fields


def _render(template: str, values: dict[str, int]) -> str:
    return _FIELD.sub(lambda m: str(values[m.group(1)] + int(m.group(2) or 0)), template)


# Both directions, compiled once: (pattern, its index fields, the other side's template).
_OURS_TO_AUTHORS = [(*_compile(ours, leaves), authors) for ours, authors, leaves in KEY_RULES]
_AUTHORS_TO_OURS = [(*_compile(authors, leaves), ours) for ours, authors, leaves in KEY_RULES]


def _map_key(key: str, rules) -> str | None:
    for pattern, fields, target in rules:
        match = pattern.match(key)
        if match is None:
            continue
        values = {}
        for (name, offset), text in zip(fields, match.groups()[:-1]):
            values[name] = int(text) - offset
            if values[name] < 0:
                return None  # e.g. the authors' "block0"
        return _render(target, values) + "." + match.groups()[-1]
    return None


def to_authors_key(key: str) -> str:
    """The authors' name of one of our state-dict keys; :class:`DataError` if none."""
    mapped = _map_key(key, _OURS_TO_AUTHORS)
    if mapped is None:
        raise DataError(f"{key!r} is not a Spec2VolCAMU-Net parameter the authors' model has")
    return mapped


def from_authors_key(key: str) -> str:
    """Our name of one of the authors' state-dict keys; :class:`DataError` if none."""
    mapped = _map_key(key, _AUTHORS_TO_OURS)
    if mapped is None:
        raise DataError(f"{key!r} is not a parameter of the authors' Spectrogram2fMRI model "
                        "(no renaming rule maps it)")
    return mapped


def _reference_shapes(reference) -> dict[str, tuple[int, ...]] | None:
    if reference is None:
        return None
    if isinstance(reference, nn.Module):
        reference = reference.state_dict()
    return {k: tuple(v.shape) for k, v in reference.items()}


def _convert(state: Mapping, rules, reference, side: str) -> dict:
    """Rename every key of ``state`` with ``rules``; check against ``reference`` if given."""
    if not isinstance(state, Mapping):
        raise DataError(f"expected a state dict (names to tensors), got a {type(state).__name__}")
    out, original, unknown = {}, {}, []
    for key, value in state.items():
        mapped = _map_key(key, rules) if isinstance(key, str) else None
        if mapped is None:
            unknown.append(str(key))
            continue
        if not torch.is_tensor(value):
            raise DataError(f"{key!r} holds a {type(value).__name__}, not a tensor")
        out[mapped], original[mapped] = value, key
    if unknown:
        raise DataError(f"{len(unknown)} {side} name(s) map to nothing, e.g. {unknown[0]!r}; "
                        "is this a Spec2VolCAMU-Net (Spectrogram2fMRI) state dict?")
    shapes = _reference_shapes(reference)
    if shapes is not None:
        extra = [original[k] for k in out if k not in shapes]
        if extra:
            raise DataError(f"{len(extra)} parameter(s) the model does not have, e.g. {extra[0]!r} "
                            "(a deeper model than the one built?)")
        missing = [k for k in shapes if k not in out]
        if missing:
            raise DataError(f"{len(missing)} of the model's parameters are missing, e.g. "
                            f"{missing[0]!r} (a shallower model than the one built?)")
        for key, value in out.items():
            if tuple(value.shape) != shapes[key]:
                raise DataError(f"{original[key]!r} has shape {tuple(value.shape)} but the model's "
                                f"{key!r} is {shapes[key]} (another width, output depth D or "
                                "context?)")
    return out


def from_authors_state_dict(state: Mapping, *, reference=None) -> dict:
    """The authors' state dict under our names (the same tensors, not copied).

    Parameters
    ----------
    state : mapping
        ``Spectrogram2fMRI.state_dict()`` of the authors' code.
    reference : torch.nn.Module | mapping | None
        Our model (or its state dict): when given, the result must hold exactly its keys, at
        its shapes.

    Raises
    ------
    DataError
        A key no rule maps, a value that is not a tensor, or (with ``reference``) a missing or
        surplus key or a shape that does not fit.
    """
    return _convert(state, _AUTHORS_TO_OURS, reference, "of the authors'")


def to_authors_state_dict(state: Mapping, *, reference=None) -> dict:
    """Our state dict under the authors' names (the inverse of :func:`from_authors_state_dict`).

    ``reference`` is an authors' state dict to check keys and shapes against.
    """
    return _convert(state, _OURS_TO_AUTHORS, reference, "of our")


def _read_authors_file(src: Path) -> dict:
    """The state dict in a file of the authors' training script, read without running code."""
    if not src.is_file():
        raise MissingInputError("the authors' checkpoint does not exist", path=src)
    try:
        payload = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - anything else means "not a plain state dict"
        raise DataError(f"not a readable PyTorch state dict (the safe loader refused it: "
                        f"{unreadable_reason(error, src)})", path=src) from error
    if isinstance(payload, Mapping) and not any(torch.is_tensor(v) for v in payload.values()):
        # A dict holding one, e.g. {"state_dict": ...} or {"model": ...}.
        held = [v for k, v in payload.items() if k in ("state_dict", "model") and isinstance(v, Mapping)]
        if len(held) == 1:
            payload = held[0]
    if not isinstance(payload, Mapping) or not payload:
        raise DataError("expected a state dict (torch.save(model.state_dict()) of the authors' "
                        "Spectrogram2fMRI)", path=src)
    keys = [k for k in payload if isinstance(k, str)]
    # A model wrapped in DistributedDataParallel (multi-GPU accelerate) saves "module.<name>".
    if keys and len(keys) == len(payload) and all(k.startswith("module.") for k in keys):
        payload = {k[len("module."):]: v for k, v in payload.items()}
    return dict(payload)


def _check_norm_stats(norm_stats) -> dict:
    if not isinstance(norm_stats, Mapping) or norm_stats.get("kind", "minmax") != "minmax":
        raise UsageError("norm_stats must be the authors' min-max pair, "
                         "{'kind': 'minmax', 'min': ..., 'max': ...}")
    try:
        low, high = float(norm_stats["min"]), float(norm_stats["max"])
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError("norm_stats needs numbers 'min' and 'max' (the authors' min_eeg and "
                         "max_eeg)") from error
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UsageError(f"the EEG input range needs finite min < max, got {low:g} and {high:g}")
    return {"kind": "minmax", "min": low, "max": high}


def convert_authors_checkpoint(src, dst, *, eeg_channels: int, freq_bins: int, out_shape,
                               channels, norm_stats, context: int = 20, size: str = "full",
                               extra: dict | None = None) -> Path:
    """Convert a ``.pth`` of the authors' ``train_Spectrogram2fMRI.py`` to a spec2vol model file.

    Parameters
    ----------
    src : str | Path
        The authors' file (``torch.save(model.state_dict())``, or a dict holding one under
        ``state_dict`` or ``model``); read with ``torch.load(weights_only=True)`` only.
    dst : str | Path
        The spec2vol model file to write (conventionally ``model.pt``).
    eeg_channels, freq_bins, out_shape, context
        The model's input and output sizes: at most 64 channels and 64 encoded bins (their
        encoder pads the map to 64 x 64), and out_shape ``(D, 64, 64)``.
    channels : sequence of str
        The EEG channel names in the order the authors' input had them (one per input row).
    norm_stats : dict
        The EEG scaling the model was trained with: ``{"kind": "minmax", "min": ..., "max":
        ...}`` (their ``min_eeg`` and ``max_eeg``). Required: the weights are meaningless
        without it.
    size : str
        ``"full"`` (the only size the authors' code builds); ``"tiny"`` for tests.
    extra : dict | None
        More plain values to store with the model (e.g. ``{"RepetitionTime": 2.0}``).

    Returns
    -------
    Path
        ``dst``.

    Raises
    ------
    UsageError
        Sizes or channels the authors' model cannot have, or no valid EEG range.
    MissingInputError
        ``src`` does not exist.
    DataError
        ``src`` is not a state dict, needs code to unpickle, or its names or shapes do not fit.
    """
    src = Path(src)
    out_shape = tuple(int(n) for n in out_shape)
    channels = [str(c) for c in channels]
    norm_stats = _check_norm_stats(norm_stats)
    if len(out_shape) != 3 or out_shape[1:] != AUTHORS_GRID:
        raise UsageError(f"the authors' model outputs {AUTHORS_GRID[0]} x {AUTHORS_GRID[1]} slices; "
                         f"give out_shape (D, 64, 64), not {out_shape}")
    if len(channels) != eeg_channels:
        raise UsageError(f"{len(channels)} channel names for {eeg_channels} EEG channels; name "
                         "every input channel, in the model's order")
    if len(set(channels)) != len(channels) or not all(channels):
        raise UsageError("the channel names must be non-empty and distinct")
    if eeg_channels > AUTHORS_GRID[0] or encoded_bins(freq_bins) > AUTHORS_GRID[1]:
        raise UsageError(f"the authors' encoder fits at most {AUTHORS_GRID[0]} channels and "
                         f"{4 * AUTHORS_GRID[1]} bins into its 64 x 64 grid; got {eeg_channels} "
                         f"channels and {freq_bins} bins")
    try:
        model = build_model("spec2vol", eeg_channels=eeg_channels, freq_bins=freq_bins,
                            out_shape=out_shape, context=context, size=size)
    except ValueError as error:
        raise UsageError(one_line(error)) from error
    authors_state = _read_authors_file(src)
    try:
        state = from_authors_state_dict(authors_state, reference=model)
        model.load_state_dict(state, strict=True)
    except DataError as error:
        raise DataError(str(error), path=src) from error
    except RuntimeError as error:  # e.g. a tensor that cannot be copied into the model
        raise DataError(f"the weights do not load ({one_line(error)})", path=src) from error
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DataError(f"{len(bad)} tensors hold NaN or infinite values, e.g. {bad[0]!r}", path=src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    info = {"ConvertedFrom": src.name, "ConvertedFromSHA256": digest,
            "ConvertedBy": PROG, "Source": "Spec2VolCAMU-Net authors' code (Spectrogram2fMRI)"}
    return save_checkpoint(dst, model, model_name="spec2vol", channels=channels,
                           norm_stats=norm_stats, extra={**info, **(extra or {})})


def _finite_float(text: str) -> float:
    import argparse

    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _parser():
    from spec2vol_bids import __version__
    from spec2vol_bids.cli.parser import ArgumentParser, positive_int

    p = ArgumentParser(
        prog=PROG,
        description="Convert a model trained with the authors' Spec2VolCAMU-Net code "
                    "(train_Spectrogram2fMRI.py's .pth state dict) to a spec2vol model file "
                    "for 'spec2vol ... participant --model'.")
    p.add_argument("src", metavar="SRC", type=Path, help="the authors' .pth file")
    p.add_argument("dst", metavar="DST", type=Path, help="the spec2vol model file to write")
    p.add_argument("--channels", nargs="+", required=True, metavar="NAME",
                   help="the EEG channel names, in the order of the authors' input rows")
    p.add_argument("--eeg-channels", type=positive_int, metavar="N",
                   help="EEG channels (default: the number of --channels names)")
    p.add_argument("--freq-bins", type=positive_int, required=True, metavar="F",
                   help="frequency bins per window (the authors' data: 249)")
    p.add_argument("--out-shape", type=positive_int, nargs=3, required=True, metavar=("D", "H", "W"),
                   help="output volume: slices D (their --fmri_channel), then 64 64")
    p.add_argument("--input-min", type=_finite_float, required=True, metavar="X",
                   help="the EEG minimum the model was trained with (min_eeg in their "
                        "commandline_args.txt)")
    p.add_argument("--input-max", type=_finite_float, required=True, metavar="Y",
                   help="the EEG maximum (max_eeg)")
    p.add_argument("--context", type=positive_int, default=20, metavar="N",
                   help="TR windows per sample (default: 20, the authors')")
    p.add_argument("--model-config", choices=["full", "tiny"], default="full",
                   help="'full' is the published size, the only one the authors' code builds; "
                        "'tiny' is for tests (default: full)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``spec2vol-convert-authors``; returns the exit code (0, 64, 65, 66, 73,
    74 or 130) after one line on stderr for any error."""
    try:
        args = _parser().parse_args(argv)
        if args.dst.exists() and not args.overwrite:
            raise UsageError("exists; pass --overwrite to replace it", path=args.dst)
        if args.src.exists() and args.dst.exists() and args.src.resolve() == args.dst.resolve():
            raise UsageError("SRC and DST are the same file")
        eeg_channels = args.eeg_channels if args.eeg_channels is not None else len(args.channels)
        out = convert_authors_checkpoint(
            args.src, args.dst, eeg_channels=eeg_channels, freq_bins=args.freq_bins,
            out_shape=args.out_shape, channels=args.channels, context=args.context,
            size=args.model_config, norm_stats={"kind": "minmax", "min": args.input_min, "max": args.input_max})
    except Spec2VolError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EX_INTERRUPTED
    print(f"wrote {out} (spec2vol model converted from {args.src.name})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
