"""The `triton` layer over quantized weights (moebench/quant.py) against the quantized
float64 oracle: every format on both paths, every skew, both combines; and its refusals.
fp8's tl.dot runs under the interpreter (triton 3.9); bf16 is left to the GPU tests, as
elsewhere.

T tokens, D model width, F expert hidden width, E experts, K experts per token, B block.
"""

import pytest
import torch
from triton_cases import DEVICE

import moebench as mb
from moebench.bench.grid import SKEWS
from moebench.bench.oracle import tolerance
from moebench.impls.triton import ops
from moebench.quant import QuantizedTensor, QuantizedWeights, quantize_activations

# D and F: the layer's blocks must be multiples of 128 (QUANT_BLOCK); the interpreter's
# 32-wide reduction blocks cross several scale groups of a row.
D, F, E, K, B = 256, 128, 6, 3, 128
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def case(T, dtype, fmt, skew="zipf:1.2", seed=0):
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    w = mb.ExpertWeights.random(cfg, dtype=dtype, device=DEVICE, seed=seed)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    x = torch.randn(T, D, generator=gen, device=DEVICE).to(dtype)
    r = mb.make_routing(T, cfg, skew=skew, seed=seed + 2, device=DEVICE)
    return x, r, w.quantize(fmt, B)


def rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("fmt", mb.QUANTS)
def test_matches_the_quantized_oracle(fmt, dtype, T, path):
    x, r, qw = case(T, dtype, fmt)
    stats = {}
    y = mb.moe_forward(x, r, qw, impl="triton", out=torch.full_like(x, float("nan")), stats=stats)
    assert stats["path"] == path and set(stats["config"]) == {"gate_up", "down"}
    assert not y.isnan().any()
    assert rel(y, mb.reference(x, r, qw)) < tolerance(dtype, fmt)


@pytest.mark.parametrize("skew", SKEWS)
@pytest.mark.parametrize("fmt", mb.QUANTS)
def test_every_skew(fmt, skew, path):
    x, r, qw = case(29, torch.float16, fmt, skew=skew, seed=3)
    y = mb.moe_forward(x, r, qw, impl="triton")
    assert rel(y, mb.reference(x, r, qw)) < tolerance(torch.float16, fmt)


@pytest.mark.parametrize("fmt", mb.QUANTS)
def test_atomic_combine_and_shared_expert(fmt):
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, num_shared_experts=1)
    w = mb.ExpertWeights.random(cfg, dtype=torch.float32, device=DEVICE)
    x = torch.randn(70, D, device=DEVICE)
    r = mb.make_routing(70, cfg, seed=4, device=DEVICE)
    qw = w.quantize(fmt, B)
    y = mb.moe_forward(x, r, qw, impl="triton", combine="atomic")
    assert rel(y, mb.reference(x, r, qw)) < tolerance(torch.float32, fmt)


def test_a_wrong_kernel_would_be_caught():
    """The check above sees a layer that skips the scales: the unscaled int8 layer is far
    from the oracle (the test's power), while the layer itself is within tolerance."""
    x, r, qw = case(9, torch.float32, "int8")
    ref = mb.reference(x, r, qw)
    ones = torch.ones_like(qw.gate_up.scale)
    unscaled = QuantizedWeights(
        QuantizedTensor("int8", qw.gate_up.data, ones, B, torch.float32), qw.down, torch.float32
    )
    assert rel(mb.moe_forward(x, r, unscaled, impl="triton"), ref) > 0.5
    assert rel(mb.moe_forward(x, r, qw, impl="triton"), ref) < tolerance(torch.float32)


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter converts fp32 to fp8 wrongly")
def test_activation_quantization_kernel_matches_torch():
    """The fp8 activations' kernel against moebench.quant's torch code (what runs under the
    interpreter and in the oracle): equal scales, values at most one fp8 step apart, few."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    a = torch.randn(300, 384, generator=gen, device=DEVICE) * torch.rand(300, 1, device=DEVICE)
    a[7] = 0  # an all-zero row: its scale is 1e-10 / 448
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q, s = ops.quantize_rows(a.to(dtype), 128)
        want_q, want_s = quantize_activations(a.to(dtype), 128)
        assert torch.equal(s, want_s)
        got, want = q.float(), want_q.float()
        assert (got != want).float().mean() < 1e-3
        assert ((got - want).abs() <= want.abs() / 8).all()


def test_refusals():
    x, r, qw = case(5, torch.float32, "int4")
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    small = mb.ExpertWeights.random(cfg, torch.float32, DEVICE).quantize("int4", 64)
    with pytest.raises(ValueError, match="int4 blocks that are multiples of 128"):
        mb.moe_forward(x, r, small, impl="triton")
    with pytest.raises(ValueError, match="quantized weights forward only"):
        mb.moe_forward(x.requires_grad_(), r, qw, impl="triton")
