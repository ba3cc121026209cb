"""Liger-Kernel's fused MoE (the `liger` peer) against the float64 oracle.

On a GPU as users run it; on the CPU under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 there), where a call takes about 2 s whatever its size (liger's routing
kernel sorts 1024 keys, slow to interpret), hence one small awkward shape.
"""

import pytest
import torch

import moebench as mb
from moebench.bench.grid import SKEWS
from moebench.bench.oracle import tolerance
from moebench.peers import liger

pytest.importorskip("liger_kernel")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
# T, D, F, E, K: no multiple of any block size; E=6 leaves experts idle under skew.
SHAPE = (37, 44, 20, 6, 3)
# bf16 loads are wrong under the interpreter: bf16 is checked on a GPU only.
DTYPES = [torch.float16] if INTERPRETED else [torch.float16, torch.bfloat16]


def make_case(skew, dtype, seed):
    T, D, F, E, K = SHAPE
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    w = mb.ExpertWeights.random(cfg, dtype=dtype, device=DEVICE, seed=seed)
    r = mb.make_routing(T, cfg, skew=skew, seed=seed, device=DEVICE)
    r = mb.Routing(r.ids.to(torch.int32), r.weights)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    x = torch.randn(T, D, generator=gen, device=DEVICE).to(dtype)
    return x, r, w


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("skew", SKEWS)
def test_matches_float64_reference(skew, dtype):
    x, r, w = make_case(skew, dtype, seed=SKEWS.index(skew))
    y = mb.moe_forward(x, r, w, impl="liger", out=torch.full_like(x, torch.nan))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel_err(y, mb.reference(x, r, w)) < tolerance(dtype)


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU liger's fp32 matmuls run in TF32")
def test_float32_layout_is_exact_under_the_interpreter():
    """The registry leaves fp32 out (TF32 on GPUs); the interpreter computes it in full fp32,
    which checks the layout mapping at fp32's tight tolerance."""
    x, r, w = make_case("zipf:1.2", torch.float32, seed=7)
    y = liger.forward(x, r.ids, r.weights, w.gate_up, w.down)
    assert rel_err(y, mb.reference(x, r, w)) < tolerance(torch.float32)


@pytest.mark.parametrize("skew", ["random", "collapse"])
def test_gradients_match_float64_autograd(skew):
    x, r, w = make_case(skew, torch.float64, seed=11)
    dy = torch.randn(x.shape, dtype=torch.float64, device=DEVICE)

    def backward(impl, dtype):
        leaf = lambda t: t.detach().to(dtype).requires_grad_()
        xs, rs = leaf(x), mb.Routing(r.ids, leaf(r.weights))
        ws = mb.ExpertWeights(leaf(w.gate_up), leaf(w.down))
        mb.moe_forward(xs, rs, ws, impl=impl).backward(dy.to(dtype))
        return {"x": xs.grad, "weights": rs.weights.grad, "gate_up": ws.gate_up.grad,
                "down": ws.down.grad}  # fmt: skip

    want, got = backward("naive", torch.float64), backward("liger", torch.float16)
    for name, ref in want.items():
        assert got[name] is not None and got[name].dtype == torch.float16, name
        assert rel_err(got[name], ref) < tolerance(torch.float16), name
    idle = torch.ones(SHAPE[3], dtype=torch.bool, device=DEVICE)
    idle[r.ids.flatten().long()] = False
    assert idle.any() or skew == "random"
    assert (got["gate_up"][idle] == 0).all() and (got["down"][idle] == 0).all()


@pytest.mark.skipif(not INTERPRETED, reason="bf16 runs on a GPU")
def test_bf16_under_the_interpreter_is_unavailable_not_wrong():
    x, r, w = make_case("random", torch.bfloat16, seed=3)
    with pytest.raises(mb.Unavailable, match="TRITON_INTERPRET"):
        mb.moe_forward(x, r, w, impl="liger")
