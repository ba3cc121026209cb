"""Gradients of every implementation against float64 autograd through the naive oracle."""

import pytest
import torch

import moebench as mb
from moebench import registry
from moebench.bench.oracle import tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The layers run in float32, the oracle in float64.
TOLERANCE = tolerance(torch.float32)

SHAPES = {
    # name: (T, D, F, E, K, shared experts)
    "T1": (1, 32, 16, 8, 2, 0),
    "odd": (37, 40, 24, 6, 3, 0),
    "KeqE": (16, 32, 16, 4, 4, 0),
    "empty-experts": (12, 32, 16, 64, 2, 0),
    "shared": (32, 48, 32, 8, 2, 1),
}
NAMES = ("gate_up", "down", "shared_gate_up", "shared_down")


def leaves(x, r, w, dtype):
    """Fresh leaf copies of every differentiable input, in `dtype`."""
    grad = lambda t: None if t is None else t.detach().to(dtype).requires_grad_()
    w = mb.ExpertWeights(*(grad(getattr(w, n)) for n in NAMES))
    return grad(x), mb.Routing(r.ids, grad(r.weights)), w


def grads(x, r, w):
    return {"x": x.grad, "routing": r.weights.grad} | {
        n: getattr(w, n).grad for n in NAMES if getattr(w, n) is not None
    }


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def backward_both(impl, shape, skew, seed, **options):
    T, D, F, E, K, shared = SHAPES[shape]
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, num_shared_experts=shared)
    w = mb.ExpertWeights.random(cfg, dtype=torch.float64, device=DEVICE, seed=seed)
    r = mb.make_routing(T, cfg, skew=skew, seed=seed, device=DEVICE)
    x = torch.randn(T, D, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(T, D, dtype=torch.float64, device=DEVICE)

    ref_in = leaves(x, r, w, torch.float64)
    mb.moe_forward(*ref_in, impl="naive").backward(dy)
    test_in = leaves(x, r, w, torch.float32)
    stats = {}
    mb.moe_forward(*test_in, impl=impl, stats=stats, **options).backward(dy.float())
    return grads(*ref_in), grads(*test_in), r, stats


@pytest.mark.parametrize("skew", ["random", "collapse"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", registry.OWN)
def test_gradients_match_float64_autograd(impl, shape, skew):
    options = {"capacity_factor": None} if impl == "padded" else {}
    want, got, r, _ = backward_both(impl, shape, skew, seed=len(shape), **options)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name] is not None, f"no gradient for {name}"
        assert torch.isfinite(got[name]).all(), name
        assert rel(got[name], want[name]) < TOLERANCE, name
    # Experts that received no token get exactly zero gradient, never stale memory.
    idle = torch.ones(SHAPES[shape][3], dtype=torch.bool, device=DEVICE)
    idle[r.ids.flatten()] = False
    if idle.any():
        assert (got["gate_up"][idle] == 0).all() and (got["down"][idle] == 0).all()


def test_padded_gradients_ignore_dropped_pairs():
    want, got, r, stats = backward_both("padded", "odd", "zipf:1.2", seed=9, capacity_factor=0.75)
    dropped = stats["dropped_mask"]
    assert dropped.any() and (got["routing"][dropped] == 0).all()
    # The reference on the same routing with dropped pairs weighted by zero.
    T, D, F, E, K, _ = SHAPES["odd"]
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    w = mb.ExpertWeights.random(cfg, dtype=torch.float64, device=DEVICE, seed=9)
    kept = mb.Routing(r.ids, torch.where(dropped, 0.0, r.weights))
    x = torch.randn(T, D, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(T, D, dtype=torch.float64, device=DEVICE)
    ref_in, pad_in = leaves(x, kept, w, torch.float64), leaves(x, r, w, torch.float32)
    mb.moe_forward(*ref_in, impl="naive").backward(dy)
    mb.moe_forward(*pad_in, impl="padded", capacity_factor=0.75).backward(dy.float())
    want, got = grads(*ref_in), grads(*pad_in)
    for name in ("x", "gate_up", "down"):
        assert rel(got[name], want[name]) < TOLERANCE, name
    assert rel(got["routing"][~dropped], want["routing"][~dropped]) < TOLERANCE
