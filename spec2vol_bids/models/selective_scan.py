"""The selective scan of Mamba, with interchangeable backends.

For every batch element, channel ``d`` and state ``n`` the scan runs the recurrence

    h[l] = exp(delta[l] * A[d, n]) * h[l - 1] + delta[l] * B[n, l] * u[l]
    y[l] = sum_n C[n, l] * h[l, n] + D[d] * u[l]

over the sequence index ``l`` (``h[-1] = 0``), optionally gated as ``y * silu(z)``. The
arguments follow mamba-ssm's ``selective_scan_fn`` so that its CUDA kernel can be a drop-in
backend:

* ``"sequential"`` -- one Python step per sequence element: the readable definition, used as
  the reference in the tests.
* ``"fast"`` -- pure PyTorch, for the CPU (and any device). The sequence is cut into ``nc``
  chunks of ``T`` steps (``T ~ sqrt(L)``). The recurrence runs over the ``T`` positions of all
  chunks at once, then over the ``nc`` chunk ends to carry the state from chunk to chunk, and
  once more over the ``T`` positions from the carried states: ``2T + nc`` Python steps instead
  of ``L``. Every product is the same ``exp(delta * A) * h + ...`` as in the sequential scan,
  never a ratio of cumulative decays, so it is exact for any ``delta * A`` (from 0 to -inf)
  and any length. Its backward is hand-written (:class:`_ChunkedScan`): it keeps the
  per-step decays and the states (not autograd's dozens of intermediate tensors) and runs
  the adjoint recurrence backwards with the same chunking.
* ``"mamba"`` -- mamba-ssm's fused CUDA kernel; needs the package and CUDA tensors.

The automatic choice is ``"mamba"`` for CUDA tensors when mamba-ssm imports, ``"fast"``
otherwise; the environment variable ``SPEC2VOL_SCAN`` (``sequential``, ``fast`` or ``mamba``)
overrides it.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

BACKENDS = ("sequential", "fast", "mamba")


def _mamba_scan_fn():
    """Return mamba-ssm's ``selective_scan_fn``, or None when it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - a missing or broken CUDA build is the same as absent
        return None
    return selective_scan_fn


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Pick the scan backend for tensors on ``device``.

    Parameters
    ----------
    backend : str | None
        An explicit choice; None means ``$SPEC2VOL_SCAN`` or else the automatic choice.
    device : torch.device
        Where the tensors live.

    Returns
    -------
    str
        One of :data:`BACKENDS`.
    """
    backend = backend or os.environ.get("SPEC2VOL_SCAN") or None
    if backend is None:
        if device.type == "cuda" and _mamba_scan_fn() is not None:
            return "mamba"
        return "fast"
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective-scan backend {backend!r}; choose one of {BACKENDS}")
    if backend == "mamba":
        if device.type != "cuda":
            raise ValueError("the 'mamba' selective-scan backend needs CUDA tensors")
        if _mamba_scan_fn() is None:
            raise ValueError("the 'mamba' selective-scan backend needs the mamba-ssm package")
    return backend


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   backend=None):
    """Run the selective scan (mamba-ssm's argument convention).

    Parameters
    ----------
    u, delta : torch.Tensor
        Inputs and step sizes, shape (batch, channels, L).
    A : torch.Tensor
        State matrix (diagonal), shape (channels, states); negative for a stable scan.
    B, C : torch.Tensor
        Input and output projections, shape (batch, states, L) or (batch, groups, states, L);
        with groups, channel ``d`` uses group ``d // (channels // groups)``.
    D : torch.Tensor | None
        Skip weights, shape (channels,).
    z : torch.Tensor | None
        Gate, shape (batch, channels, L); the output becomes ``y * silu(z)``.
    delta_bias : torch.Tensor | None
        Added to ``delta`` per channel, shape (channels,).
    delta_softplus : bool
        Pass ``delta`` (after the bias) through softplus.
    backend : str | None
        ``"sequential"``, ``"fast"`` or ``"mamba"``; None picks one (see the module docstring).

    Returns
    -------
    torch.Tensor
        Shape (batch, channels, L), the dtype of ``u``.
    """
    backend = resolve_backend(backend, u.device)
    if backend == "mamba":
        return _mamba_scan_fn()(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                delta_softplus=delta_softplus)
    dtype = u.dtype
    # Like mamba-ssm's kernel, the recurrence runs in float32 (or float64) whatever the
    # activations are: exp(delta * A) products lose too much in half precision.
    work = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B = B[:, None]
    if C.dim() == 3:
        C = C[:, None]
    # Autocast would run the contractions over states in half precision: keep it off.
    with torch.autocast(u.device.type, enabled=False):
        if backend == "sequential":
            y = _sequential(u, delta, A, B, C)
        else:
            y = _ChunkedScan.apply(u, delta, A, B, C)
    if D is not None:
        y = y + u * D.to(work)[:, None]
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype)


def _sequential(u, delta, A, B, C):
    """The recurrence one step at a time (the definition; B, C with a group axis)."""
    batch, channels, length = u.shape
    groups, states = B.shape[1], B.shape[2]
    # Expand the group axis to channels: (batch, channels, states, L).
    B = B.repeat_interleave(channels // groups, dim=1)
    C = C.repeat_interleave(channels // groups, dim=1)
    h = u.new_zeros(batch, channels, states)
    ys = []
    for step in range(length):
        decay = torch.exp(delta[:, :, step, None] * A)
        h = decay * h + (delta[:, :, step] * u[:, :, step])[..., None] * B[..., step]
        ys.append((h * C[..., step]).sum(-1))
    return torch.stack(ys, dim=-1)


def _chunking(length: int) -> tuple[int, int]:
    """Chunk length T and chunk count nc for a sequence of ``length`` steps (T * nc >= L)."""
    chunk = math.isqrt(length - 1) + 1 if length > 1 else 1
    return chunk, -(-length // chunk)


# Chunked layout: (T, batch, groups, nc, per_group, states). Position t of chunk c is
# x[t, :, :, c]; a slice x[t] is contiguous for the recurrences, and every sum over states or
# over the channels of a group is a batched matrix product over (T, batch, groups, nc).


def _to_chunks(x, groups, chunk, n_chunks):
    """(batch, groups * k, L) -> (T, batch, groups, nc, k), zero-padded at the end."""
    pad = chunk * n_chunks - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    x = x.view(x.shape[0], groups, -1, n_chunks, chunk)
    return x.permute(4, 0, 1, 3, 2).contiguous()


def _from_chunks(x, length):
    """(T, batch, groups, nc, k) -> (batch, groups * k, L)."""
    x = x.permute(1, 2, 4, 3, 0)
    return x.reshape(x.shape[0], -1, x.shape[3] * x.shape[4])[..., :length]


def _scan_states(decay, drive):
    """Run h[t] = decay[t] * h[t - 1] + drive[t] (h[-1] = 0) over chunked tensors.

    Returns the states at every position, in the chunked layout.
    """
    chunk, n_chunks = decay.shape[0], decay.shape[3]
    # Pass 1: every chunk from a zero state, keeping only the chunk ends.
    h = drive[0]
    for t in range(1, chunk):
        h = torch.addcmul(drive[t], decay[t], h)
    # Across chunks: carry[:, :, c] is the true state just before chunk c; the decay over a
    # whole chunk is the product of its per-step decays.
    total = decay.prod(0)
    carry = torch.zeros_like(h)
    for c in range(1, n_chunks):
        torch.addcmul(h[:, :, c - 1], total[:, :, c - 1], carry[:, :, c - 1],
                      out=carry[:, :, c])
    # Pass 2: the chunks again, from the carried states, keeping every state.
    states = torch.empty_like(drive)
    torch.addcmul(drive[0], decay[0], carry, out=states[0])
    for t in range(1, chunk):
        torch.addcmul(drive[t], decay[t], states[t - 1], out=states[t])
    return states


def _scan_adjoint(decay, seed):
    """Run g[t] = seed[t] + decay[t + 1] * g[t + 1] (zero past the end) backwards.

    The adjoint of :func:`_scan_states`: the same passes, from the last position to the first.
    """
    chunk, n_chunks = decay.shape[0], decay.shape[3]
    g = seed[chunk - 1]
    for t in range(chunk - 2, -1, -1):
        g = torch.addcmul(seed[t], decay[t + 1], g)
    # carry[:, :, c] is what flows into the last position of chunk c from the right: the
    # decay at the first position of chunk c + 1 times the true adjoint there.
    total = decay.prod(0)
    carry = torch.zeros_like(g)
    for c in range(n_chunks - 1, 0, -1):
        torch.addcmul(decay[0, :, :, c] * g[:, :, c], total[:, :, c], carry[:, :, c],
                      out=carry[:, :, c - 1])
    adjoint = torch.empty_like(seed)
    torch.add(seed[chunk - 1], carry, out=adjoint[chunk - 1])
    for t in range(chunk - 2, -1, -1):
        torch.addcmul(seed[t], decay[t + 1], adjoint[t + 1], out=adjoint[t])
    return adjoint


class _ChunkedScan(torch.autograd.Function):
    """Chunked selective scan (see the module docstring) with a hand-written backward.

    Shapes: u, delta (batch, channels, L); A (channels, states); B, C (batch, groups,
    states, L). Returns y without the D skip and the gate, (batch, channels, L).
    """

    @staticmethod
    def _prepare(u, delta, A, B, C):
        groups, states = B.shape[1], B.shape[2]
        chunk, n_chunks = _chunking(u.shape[-1])
        u_c, delta_c = (_to_chunks(x, groups, chunk, n_chunks)[..., None] for x in (u, delta))
        B_c, C_c = (_to_chunks(x.flatten(1, 2), groups, chunk, n_chunks)[..., None, :]
                    for x in (B, C))  # (T, batch, groups, nc, 1, states)
        A_c = A.view(groups, 1, -1, states)  # (groups, 1, per_group, states)
        decay = (delta_c * A_c).exp_()
        drive = (delta_c * u_c) * B_c
        return u_c, delta_c, A_c, B_c, C_c, decay, drive

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        u_c, delta_c, A_c, B_c, C_c, decay, drive = _ChunkedScan._prepare(u, delta, A, B, C)
        states = _scan_states(decay, drive)
        y = torch.matmul(states, C_c.transpose(-1, -2))  # sum over the states
        # The decays and states are kept (the backward needs them and not the drive):
        # recomputing them would cost more time than they take memory.
        ctx.save_for_backward(u_c, delta_c, A_c, B_c, C_c, decay, states)
        ctx.length = u.shape[-1]
        return _from_chunks(y.squeeze(-1), u.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        u_c, delta_c, A_c, B_c, C_c, decay, states = ctx.saved_tensors
        length, groups = ctx.length, B_c.shape[2]
        chunk, n_chunks = decay.shape[0], decay.shape[3]
        gy = _to_chunks(grad_y, groups, chunk, n_chunks)[..., None]  # (..., per_group, 1)
        gstates = _scan_adjoint(decay, gy * C_c)
        g_delta_u = torch.matmul(gstates, B_c.transpose(-1, -2))  # d/d (delta * u)
        g_B_c = torch.matmul((delta_c * u_c).transpose(-1, -2), gstates)  # (..., 1, states)
        g_C_c = torch.matmul(gy.transpose(-1, -2), states)
        # h[t] = decay[t] * h[t - 1] + drive[t] with decay = exp(delta * A), so the gradient
        # with respect to delta * A is g[t] * decay[t] * h[t - 1]. (Not g[t] * (h[t] - drive[t]):
        # that difference cancels catastrophically where the decay is tiny.) It is built in
        # gstates' memory, which is not needed any more: fresh large tensors cost page faults.
        g_log_decay = gstates.mul_(decay)
        g_log_decay[1:] *= states[:-1]
        # The state before the first position of chunk c is the last one of chunk c - 1.
        g_log_decay[0, :, :, 1:] *= states[-1, :, :, :-1]
        g_log_decay[0, :, :, 0] = 0
        # Summing the leading axes first is 3x faster than one reduction over (0, 1, 3).
        g_A = (g_log_decay * delta_c).flatten(0, 1).sum(0).sum(1)  # (groups, per_group, states)
        g_delta_c = g_log_decay.mul_(A_c).sum(-1, keepdim=True) + g_delta_u * u_c
        g_u_c = g_delta_u * delta_c

        def channels(g):  # (T, batch, groups, nc, per_group, 1) -> (batch, channels, L)
            return _from_chunks(g.squeeze(-1), length)

        def projections(g):  # (T, batch, groups, nc, 1, states) -> (batch, groups, states, L)
            return _from_chunks(g.squeeze(-2), length).unflatten(1, (groups, -1))

        return (channels(g_u_c), channels(g_delta_c), g_A.flatten(0, 1), projections(g_B_c),
                projections(g_C_c))
