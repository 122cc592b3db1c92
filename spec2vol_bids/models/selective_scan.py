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
  and any length. Its backward is hand-written (:class:`_ChunkedScan`): it keeps only the
  inputs and recomputes the states, then runs the adjoint recurrence backwards with the
  same chunking.
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
    chunk = max(1, math.isqrt(length - 1) + 1) if length > 1 else 1
    return chunk, -(-length // chunk)


def _to_chunks(x, chunk, n_chunks):
    """(batch, c, L) -> (T, batch, c, nc), zero-padded at the end."""
    pad = chunk * n_chunks - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.unflatten(-1, (n_chunks, chunk)).permute(3, 0, 1, 2)


def _from_chunks(x, length):
    """(T, batch, c, nc) -> (batch, c, L)."""
    return x.permute(1, 2, 3, 0).flatten(-2)[..., :length]


def _grouped(x, chunk, n_chunks):
    """(batch, groups, states, L) -> (T, batch, groups, 1, nc, states)."""
    x = _to_chunks(x.flatten(1, 2), chunk, n_chunks)  # (T, batch, groups*states, nc)
    return x.unflatten(2, (-1, x.shape[2] // x.shape[2] if False else None) if False else
                       (-1, 1)).squeeze(-1) if False else x


def _scan_states(decay, drive, chunk_first=None):
    """Run h[t] = decay[t] * h[t-1] + drive[t] over the leading axis of chunked tensors.

    ``decay`` and ``drive`` are (T, batch, channels, nc, states): position t of every chunk.
    Returns the states at every position, (T, batch, channels, nc, states), with each chunk
    starting from the state carried over from the end of the previous chunk.
    """
    chunk = decay.shape[0]
    # Pass 1: every chunk from a zero state, keeping only the chunk ends.
    h = drive[0].clone()
    for t in range(1, chunk):
        h = torch.addcmul(drive[t], decay[t], h)
    # The decay over a whole chunk is the product of its per-step decays.
    total = decay.prod(0)
    # Across chunks: carry[c] is the true state just before chunk c.
    n_chunks = decay.shape[3]
    carry = torch.zeros_like(h)
    for c in range(1, n_chunks):
        carry[:, :, c] = torch.addcmul(h[:, :, c - 1], total[:, :, c - 1], carry[:, :, c - 1])
    # Pass 2: the chunks again, from the carried states, keeping every state.
    states = torch.empty_like(drive)
    torch.addcmul(drive[0], decay[0], carry, out=states[0])
    for t in range(1, chunk):
        torch.addcmul(drive[t], decay[t], states[t - 1], out=states[t])
    return states


class _ChunkedScan(torch.autograd.Function):
    """Chunked selective scan (see the module docstring) with a recomputing backward.

    Shapes: u, delta (batch, channels, L); A (channels, states); B, C (batch, groups,
    states, L). Returns y without the D skip and the gate, (batch, channels, L).
    """

    @staticmethod
    def _prepare(u, delta, A, B, C):
        batch, channels, length = u.shape
        groups, states = B.shape[1], B.shape[2]
        chunk, n_chunks = _chunking(length)
        per_group = channels // groups
        # (T, batch, groups, per_group, nc, 1) views of the per-channel sequences ...
        delta_c = _to_chunks(delta, chunk, n_chunks).unflatten(2, (groups, per_group))[..., None]
        du_c = _to_chunks(delta * u, chunk, n_chunks).unflatten(2, (groups, per_group))[..., None]
        # ... and (T, batch, groups, 1, nc, states) views of the per-group projections.
        B_c = _to_chunks(B.flatten(1, 2), chunk, n_chunks).unflatten(2, (groups, states))
        B_c = B_c.permute(0, 1, 2, 4, 3)[:, :, :, None]
        C_c = _to_chunks(C.flatten(1, 2), chunk, n_chunks).unflatten(2, (groups, states))
        C_c = C_c.permute(0, 1, 2, 4, 3)[:, :, :, None]
        A_c = A.unflatten(0, (groups, per_group))[:, :, None, :]  # (groups, per_group, 1, states)
        decay = torch.exp(delta_c * A_c)  # (T, batch, groups, per_group, nc, states)
        drive = du_c * B_c
        return chunk, n_chunks, delta_c, du_c, A_c, B_c, C_c, decay, drive

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        chunk, n_chunks, _, _, _, _, C_c, decay, drive = _ChunkedScan._prepare(u, delta, A, B, C)
        shape = decay.shape
        states = _scan_states(decay.flatten(2, 3), drive.flatten(2, 3)).view(shape)
        y = (states * C_c).sum(-1).flatten(2, 3)  # (T, batch, channels, nc)
        ctx.save_for_backward(u, delta, A, B, C)
        return _from_chunks(y, u.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B, C = ctx.saved_tensors
        length = u.shape[-1]
        chunk, n_chunks, delta_c, du_c, A_c, B_c, C_c, decay, drive = _ChunkedScan._prepare(
            u, delta, A, B, C)
        shape = decay.shape
        states = _scan_states(decay.flatten(2, 3), drive.flatten(2, 3)).view(shape)
        gy = _to_chunks(grad_y.contiguous(), chunk, n_chunks).unflatten(
            2, (delta_c.shape[2], delta_c.shape[3]))[..., None]
        # Adjoint recurrence: g[t] = gy[t] * C[t] + decay[t + 1] * g[t + 1], run backwards by
        # flipping the whole sequence (positions within chunks and the chunk order).
        seed = gy * C_c
        flip = (lambda x: x.flip(0).flip(4))  # noqa: E731 - reverse the sequence order
        next_decay = flip(decay)  # decay[t + 1] aligned with position t after the flip ...
        next_decay = _shift_sequence(next_decay)  # ... by moving each element one step later
        gstates = flip(_scan_states(next_decay.flatten(2, 3),
                                    flip(seed).flatten(2, 3)).view(shape))
        prev_states = flip(_shift_sequence(flip(states)))  # h[t - 1], zero at t = 0
        # d/d decay[t] = g[t] * h[t - 1]; decay = exp(delta * A).
        g_log_decay = gstates * prev_states * decay  # d/d (delta * A)
        g_drive = gstates  # d/d (delta * u * B)
        g_delta_c = (g_log_decay * A_c).sum(-1)
        gBu = (g_drive * B_c).sum(-1)  # d/d (delta * u)
        g_A = (g_log_decay * delta_c).sum((0, 1, 4))  # (groups, per_group, states)
        g_B_c = (g_drive * du_c).sum(3)  # (T, batch, groups, nc, states)
        g_C_c = (states * gy).sum(3)
        g_delta_c = g_delta_c + gBu * u_chunks(u, chunk, n_chunks, delta_c)
        g_u_c = gBu * delta_c[..., 0]
        g_delta = _from_chunks(g_delta_c.flatten(2, 3), length)
        g_u = _from_chunks(g_u_c.flatten(2, 3), length)

        def back(g):  # (T, batch, groups, nc, states) -> (batch, groups, states, L)
            g = g.permute(0, 1, 2, 4, 3).flatten(2, 3)
            return _from_chunks(g, length).unflatten(1, (B.shape[1], B.shape[2]))

        return g_u, g_delta, g_A.flatten(0, 1), back(g_B_c), back(g_C_c)
