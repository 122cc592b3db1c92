"""Where training computes: the device, torchrun's ranks, the arithmetic precision, determinism.

``--precision auto`` trains and predicts in bfloat16 autocast on a GPU that does bfloat16 in
hardware (NVIDIA Ampere and newer) and in float32 everywhere else: on a CPU (bf16 autocast is
10–20 times slower than float32 on CPUs without AVX-512 BF16, docs/model.md) and on GPUs
without native bfloat16 (V100, T4), where autocast would refuse or emulate it.

``--deterministic`` makes two runs of one command on one GPU give the same numbers: PyTorch's
deterministic algorithms, and cuBLAS with a fixed workspace. Without it, kernels that add in
whatever order their threads finish change metrics in the fourth decimal from run to run
(measured on an H200: docs/gpu.md). A CPU run is already reproducible on the same machine and
thread count.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from spec2vol_bids.config import PRECISIONS
from spec2vol_bids.errors import UsageError

#: cuBLAS's workspace setting under which its results do not depend on the stream's history
#: (NVIDIA's cuBLAS documentation, "Results reproducibility")
CUBLAS_WORKSPACE = ":4096:8"


def distributed() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment (``(0, 1, 0)`` without it)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    return distributed()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resolve_device(name: str) -> torch.device:
    """The torch device for ``--device auto|cpu|cuda``; starts the process group under torchrun."""
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    _, world, local_rank = distributed()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device`` (None: float32 throughout).

    Raises
    ------
    UsageError (64)
        An unknown precision, or ``bf16`` on a GPU without native bfloat16.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    native = _native_bf16(device)
    if precision == "fp32" or (precision == "auto" and not native):
        return None
    if device.type == "cuda" and not native:
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native "
                         "bfloat16; use --precision fp32 (or auto, which chooses it there)")
    return torch.bfloat16


def _native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 in hardware: an NVIDIA GPU of compute capability
    8.0 or higher (what ``torch.cuda.is_bf16_supported(including_emulation=False)`` tests, a
    keyword torch 2.3 lacks), or a ROCm GPU that torch says supports it."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_properties(device).major >= 8


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context that runs the forward pass in ``dtype`` (nothing changes for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_deterministic(on: bool) -> None:
    """Turn PyTorch's deterministic algorithms on or off for this process; on, also fix cuBLAS's
    workspace (read when the first cuBLAS handle is made, so call this before any GPU work).
    An operation with no deterministic implementation then raises instead of running."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on)
