"""The selective-scan backends agree with the step-by-step definition."""

import pytest
import torch

from spec2vol_bids.models.selective_scan import resolve_backend, selective_scan

# Every backend that can run here; "mamba" needs CUDA and mamba-ssm.
FAST_BACKENDS = ["fast"] + (["mamba"] if torch.cuda.is_available() and
                            resolve_backend(None, torch.device("cuda")) == "mamba" else [])

# Typical magnitudes of delta * A (A = -exp(A_log), delta = softplus(...)): the decay per step
# from ~1 (near 0) to ~exp(-500) (very negative).
REGIMES = {"near_zero": (1e-4, 1e-3), "typical": (0.5, 2.0), "very_negative": (20.0, 50.0)}


def _inputs(length, regime, *, batch=2, channels=6, states=4, groups=2, seed=0,
            dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    a_scale, delta_scale = REGIMES[regime]

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return dict(
        u=rand(batch, channels, length),
        delta=rand(batch, channels, length) * 0.5,
        A=-(torch.rand(channels, states, generator=gen, dtype=dtype) + 0.5) * a_scale,
        B=rand(batch, groups, states, length),
        C=rand(batch, groups, states, length),
        D=rand(channels),
        delta_bias=rand(channels) * 0.5 + torch.log(torch.expm1(torch.tensor(delta_scale,
                                                                             dtype=dtype))),
    )


def _run(backend, inputs, grad_out):
    """Output and gradients of every differentiable input, for one backend."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                       leaves["D"], delta_bias=leaves["delta_bias"], delta_softplus=True,
                       backend=backend)
    (y * grad_out).sum().backward()
    return {"y": y.detach(), **{k: v.grad for k, v in leaves.items()}}


def _assert_close(got, want, rtol=1e-4):
    for key in want:
        err = (got[key] - want[key]).norm()
        assert err <= rtol * want[key].norm() + 1e-12, (key, err.item(), want[key].norm().item())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("length", [1, 7, 256, 1024])
def test_backend_matches_sequential(backend, regime, length):
    # The L = 1024 reference loops 1024 times in Python: keep its channels few.
    small = dict(batch=1, channels=4, states=4) if length == 1024 else {}
    inputs = _inputs(length, regime, **small)
    grad_out = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(1))
    _assert_close(_run(backend, inputs, grad_out), _run("sequential", inputs, grad_out))


def test_decay_regimes_are_what_they_claim():
    # Guard the test data itself: near_zero and very_negative must reach their extremes.
    for regime, (low, high) in [("near_zero", (0, 1e-2)), ("very_negative", (5, 1e4))]:
        inputs = _inputs(64, regime)
        delta = torch.nn.functional.softplus(inputs["delta"] + inputs["delta_bias"][:, None])
        log_decay = -(delta[..., None] * inputs["A"][:, None, :])
        assert low <= log_decay.median() <= high


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_ungrouped_projections_gate_and_skip(backend):
    gen = torch.Generator().manual_seed(3)
    u, delta, z = (torch.randn(2, 5, 37, generator=gen) for _ in range(3))
    A = -torch.rand(5, 3, generator=gen) - 0.1
    B, C = (torch.randn(2, 3, 37, generator=gen) for _ in range(2))
    D = torch.randn(5, generator=gen)
    want = selective_scan(u, delta.exp(), A, B, C, D, z=z, backend="sequential")
    got = selective_scan(u, delta.exp(), A, B, C, D, z=z, backend=backend)
    assert got.shape == (2, 5, 37)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The gate is silu(z); the skip is D * u.
    bare = selective_scan(u, delta.exp(), A, B, C, backend=backend)
    torch.testing.assert_close(got, (bare + D[:, None] * u) * torch.nn.functional.silu(z),
                               rtol=1e-5, atol=1e-6)


def test_sequential_is_the_recurrence():
    # A hand-computed scan: 1 channel, 1 state, 3 steps.
    u = torch.tensor([[[1.0, 2.0, 3.0]]])
    delta = torch.tensor([[[0.5, 1.0, 0.25]]])
    A = torch.tensor([[-2.0]])
    B = torch.tensor([[[1.0, -1.0, 2.0]]])
    C = torch.tensor([[[3.0, 1.0, 0.5]]])
    h, want = 0.0, []
    for l in range(3):
        h = torch.exp(delta[0, 0, l] * A[0, 0]) * h + delta[0, 0, l] * B[0, 0, l] * u[0, 0, l]
        want.append(C[0, 0, l] * h)
    for backend in ["sequential", "fast"]:
        y = selective_scan(u, delta, A, B, C, backend=backend)
        torch.testing.assert_close(y[0, 0], torch.stack(want))


@pytest.mark.parametrize("length", [1, 5, 17])
def test_fast_gradcheck_float64(length):
    inputs = _inputs(length, "typical", batch=2, channels=4, states=3, dtype=torch.float64)
    z = torch.randn(2, 4, length, dtype=torch.float64)
    leaves = [inputs[k].clone().requires_grad_() for k in
              ("u", "delta", "A", "B", "C", "D", "delta_bias")] + [z.requires_grad_()]

    def scan(u, delta, A, B, C, D, delta_bias, z):
        return selective_scan(u, delta, A, B, C, D, z=z, delta_bias=delta_bias,
                              delta_softplus=True, backend="fast")

    assert torch.autograd.gradcheck(scan, leaves)


def test_half_precision_inputs_are_scanned_in_float32():
    inputs = _inputs(64, "typical")
    want = selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                          backend="fast")
    low = {k: v.bfloat16() for k, v in inputs.items()}
    got = selective_scan(low["u"], low["delta"], low["A"], low["B"], low["C"], backend="fast")
    assert got.dtype == torch.bfloat16
    # bf16 inputs carry ~3 significant digits; the scan itself must not add to that.
    assert ((got.float() - want).norm() / want.norm()) < 2e-2


def test_backend_choice_and_override(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SPEC2VOL_SCAN", raising=False)
    assert resolve_backend(None, cpu) == "fast"
    monkeypatch.setenv("SPEC2VOL_SCAN", "sequential")
    assert resolve_backend(None, cpu) == "sequential"
    assert resolve_backend("fast", cpu) == "fast"  # an explicit argument wins
    monkeypatch.setenv("SPEC2VOL_SCAN", "parallel")
    with pytest.raises(ValueError, match="unknown selective-scan backend 'parallel'"):
        resolve_backend(None, cpu)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("mamba", cpu)
