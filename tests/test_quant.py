"""Quantized expert weights (moebench/quant.py): quantize -> dequantize, the quantized
oracle, naive/padded/sorted against it, the checkpoint layouts and the clear errors.

T tokens, D model width, F expert hidden width, E experts, K experts per token, B block.
"""

import types

import pytest
import torch

import moebench as mb
from moebench import quant
from moebench.bench.grid import SKEWS
from moebench.bench.oracle import tolerance
from moebench.quant import QuantizedTensor, QuantizedWeights

# Awkward: T, E, K multiples of nothing; D and F 3 and 5 blocks of B = 16.
T, D, F, E, K, B = 37, 48, 80, 6, 3, 16


def layer(dtype=torch.float32, shared=0, seed=0):
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, num_shared_experts=shared)
    w = mb.ExpertWeights.random(cfg, dtype=dtype, seed=seed)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return cfg, w, x


def rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("fmt", mb.QUANTS)
def test_round_trip_within_a_half_step(fmt):
    """Each element comes back within half a quantization step of its block's scale (fp8:
    of its own magnitude, 3 mantissa bits, or of the subnormals' spacing)."""
    _, w, _ = layer()
    for original in (w.gate_up, w.down):
        q = quant.quantize_tensor(original, fmt, B)
        rows, cols = q.format.scale_block(B, q.shape[2])
        scale = q.scale.double().repeat_interleave(rows, 1).repeat_interleave(cols, 2)
        err = (q.dequantize(torch.float64) - original.double()).abs()
        if fmt == "fp8-block":
            bound = 2**-4 * original.double().abs() + 2**-10 * scale
        else:
            bound = scale / 2
        assert (err <= bound * (1 + 1e-4)).all(), (err / bound).max()  # fp32 division
        assert err.max() > 0  # it quantized something


def test_quantization_error_orders_formats():
    _, w, x = layer()
    r = mb.make_routing(T, mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K), seed=2)
    exact = mb.reference(x, r, w)
    errs = {fmt: rel(mb.reference(x, r, w.quantize(fmt, B)), exact) for fmt in mb.QUANTS}
    assert 0 < errs["int8"] < errs["fp8-block"] < errs["int4"] < 0.5, errs


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_integer_oracle_is_the_dequantized_layer(fmt):
    _, w, x = layer(torch.bfloat16, shared=1)
    r = mb.make_routing(T, mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K), seed=3)
    qw = w.quantize(fmt, B)
    assert qw.shared_gate_up is w.shared_gate_up
    dense = qw.dequantize(torch.float64)
    assert rel(mb.reference(x, r, qw), mb.reference(x, r, dense)) < 1e-12


def test_fp8_oracle_quantizes_activations():
    """fp8-block is w8a8: its oracle differs from the dequantized weights' layer by the
    activations' own quantization, and matches the layer with x and h quantized by hand."""
    _, w, x = layer()
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    r = mb.make_routing(T, cfg, seed=4)
    qw = w.quantize("fp8-block", B)
    dense = qw.dequantize(torch.float64)
    got = mb.reference(x, r, qw)
    assert 1e-3 < rel(got, mb.reference(x, r, dense)) < 0.1
    # By hand: one token's first expert.
    values, scale = quant.quantize_activations(x[:1], B)
    xq = (values.double().view(1, -1, B) * scale.double()[..., None]).view(1, D)
    e = r.ids[0, 0]
    gate, up = (xq @ dense.gate_up[e].T).chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate) * up).float()  # stored in x's dtype (fp32)
    hv, hs = quant.quantize_activations(h, B)
    hq = (hv.double().view(1, -1, B) * hs.double()[..., None]).view(1, F)
    one = mb.Routing(r.ids[:1, :1], torch.ones(1, 1, dtype=torch.float64))
    assert torch.allclose(mb.reference(x[:1], one, qw), hq @ dense.down[e].T, rtol=1e-12)


@pytest.mark.parametrize("skew", SKEWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["naive", "padded", "sorted"])
@pytest.mark.parametrize("fmt", mb.QUANTS)
def test_impls_match_the_quantized_oracle(fmt, impl, dtype, skew):
    cfg, w, x = layer(dtype, shared=1)
    r = mb.make_routing(T, cfg, skew=skew, seed=5)
    qw = w.quantize(fmt, B)
    options = {"capacity_factor": None} if impl == "padded" else {}
    y = mb.moe_forward(x, r, qw, impl=impl, **options)
    assert y.dtype == dtype
    assert rel(y, mb.reference(x, r, qw)) < tolerance(dtype, fmt)


def test_padded_drops_pairs_of_quantized_layers_too():
    cfg, w, x = layer()
    r = mb.make_routing(T, cfg, skew="collapse", seed=6)
    stats = {}
    y = mb.moe_forward(x, r, w.quantize("int8", B), impl="padded", stats=stats)
    assert stats["dropped"] > 0
    kept = mb.Routing(r.ids, r.weights.masked_fill(stats["dropped_mask"], 0))
    assert rel(y, mb.reference(x, kept, w.quantize("int8", B))) < tolerance(torch.float32)


def test_int4_packing_is_compressed_tensors():
    """Value k of a row at bits 4*(k % 8) of word k // 8, stored as v + 8."""
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2).view(1, 2, 16)
    words = quant.pack_int4(q)
    assert words.dtype == torch.int32 and words.shape == (1, 2, 2)
    assert words[0, 0, 0].item() == 0x76543210
    assert words[0, 0, 1].item() == 0xFEDCBA98 - 2**32  # the top nibble sets the sign bit
    t = QuantizedTensor("int4", words, torch.ones(1, 2, 1), 16, torch.float32)
    assert torch.equal(t.values(), q)


def test_int4_packing_matches_compressed_tensors_itself():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-8, 8, (3, 5, 64), dtype=torch.int8)
    assert torch.equal(quant.pack_int4(q), helpers.pack_to_int32(q, 4))


@pytest.mark.parametrize("fmt", mb.QUANTS)
def test_state_dict_round_trip(fmt):
    _, w, _ = layer(torch.bfloat16)
    qw = w.quantize(fmt, B)
    sd = qw.state_dict()
    names = {k.split(".", 3)[3] for k in sd}
    assert (
        names
        == {
            "fp8-block": {"weight", "weight_scale_inv"},
            "int8": {"weight", "weight_scale"},
            "int4": {"weight_packed", "weight_scale", "weight_shape"},
        }[fmt]
    )
    values = "weight_packed" if fmt == "int4" else "weight"
    assert sd[f"experts.0.gate_proj.{values}"].shape[0] == F
    back = QuantizedWeights.from_state_dict(sd, fmt, torch.bfloat16)
    assert back.block == (quant.BLOCK if fmt == "int8" else B)
    for a, b in ((qw.gate_up, back.gate_up), (qw.down, back.down)):
        assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale)


def test_fp8_loads_transformers_fused_experts():
    """transformers' FP8 experts: gate_up_proj [E, 2F, D] float8 with gate_up_proj_scale_inv
    [E, 2F/B, D/B], down_proj and down_proj_scale_inv, loaded as they are."""
    _, w, _ = layer()
    qw = w.quantize("fp8-block", B)
    tensors = {
        "gate_up_proj": qw.gate_up.data,
        "gate_up_proj_scale_inv": qw.gate_up.scale,
        "down_proj": qw.down.data,
        "down_proj_scale_inv": qw.down.scale,
    }
    back = QuantizedWeights.from_state_dict(tensors, "fp8-block", torch.float32)
    assert back.block == B and back.gate_up.data is qw.gate_up.data
    assert torch.equal(back.dequantize().gate_up, qw.dequantize().gate_up)


def test_fp8_loads_transformers_own_fp8_experts_module():
    """The same names, shapes and dtypes as the parameters of transformers' FP8Experts (the
    module its fine-grained FP8 quantizer puts in a DeepSeek-V3 layer), read unchanged."""
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    D2, F2, E2 = 256, 128, 4
    config = types.SimpleNamespace(
        hidden_size=D2, num_experts=E2, moe_intermediate_size=F2, hidden_act="silu"
    )
    module = fp8.FP8Experts(config, block_size=(128, 128))
    cfg = mb.MoEConfig(d_model=D2, d_ff=F2, num_experts=E2, top_k=2)
    qw = mb.ExpertWeights.random(cfg, dtype=torch.bfloat16).quantize("fp8-block")
    with torch.no_grad():
        for name, t in (("gate_up_proj", qw.gate_up), ("down_proj", qw.down)):
            getattr(module, name).copy_(t.data)
            getattr(module, name + "_scale_inv").copy_(t.scale)
    back = QuantizedWeights.from_state_dict(module.state_dict(), "fp8-block", torch.bfloat16)
    assert back.block == 128
    for a, b in ((qw.gate_up, back.gate_up), (qw.down, back.down)):
        assert a.data.dtype == b.data.dtype and torch.equal(a.scale, b.scale)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))


def test_byte_counts():
    _, w, _ = layer(torch.bfloat16)
    per_expert = 3 * D * F
    sizes = {fmt: w.quantize(fmt, B).expert_nbytes for fmt in mb.QUANTS}
    assert sizes["int8"] == per_expert + (2 * F + D) * 2  # a bf16 scale a row
    assert sizes["int4"] == per_expert // 2 + per_expert // B * 2
    assert sizes["fp8-block"] == per_expert + per_expert // B**2 * 4
    assert sizes["int4"] < sizes["fp8-block"] < sizes["int8"] < w.expert_nbytes


def test_clear_errors():
    _, w, x = layer()
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    with pytest.raises(ValueError, match="unknown quantization format 'nf4'"):
        w.quantize("nf4")
    with pytest.raises(ValueError, match=r"blocks of 32x32 do not divide a \[N=160, K=48\]"):
        w.quantize("fp8-block", 32)
    with pytest.raises(ValueError, match="int4 packs 8 values a word: block 12"):
        w.quantize("int4", 12)
    qw = w.quantize("int4", B)
    with pytest.raises(ValueError, match=r"scales .* must be \(6, 160, 3\), got \(6, 160, 2\)"):
        QuantizedTensor("int4", qw.gate_up.data, qw.gate_up.scale[..., :2], B, torch.float32)
    with pytest.raises(ValueError, match=r"int4 values must be torch\.int32, got torch\.int8"):
        QuantizedTensor("int4", qw.gate_up.values(), qw.gate_up.scale, B, torch.float32)
    with pytest.raises(ValueError, match=r"x is torch\.float16, weights are torch\.float32"):
        mb.moe_forward(x.half(), mb.make_routing(T, cfg), qw)
    with pytest.raises(ValueError, match=r"has no 'experts\.0\.up_proj\.weight_scale'"):
        sd = qw.state_dict()
        del sd["experts.0.up_proj.weight_scale"]
        QuantizedWeights.from_state_dict(sd, "int4")
    sd = qw.state_dict()
    sd["experts.1.down_proj.weight_shape"] = torch.tensor([D, F + 8])
    with pytest.raises(ValueError, match=r"experts.1.down_proj: weight_shape \[48, 88\]"):
        QuantizedWeights.from_state_dict(sd, "int4")
    with pytest.raises(ValueError, match="both projections share one format"):
        QuantizedWeights(qw.gate_up, w.quantize("int8", B).down, torch.float32)


def test_a_plug_in_declares_its_formats():
    """An outside kernel registered with quant=("int8",) gets QuantizedTensor projections."""
    cfg, w, x = layer()
    r = mb.make_routing(T, cfg, seed=7)
    seen = []

    def forward(x_TD, ids_TK, weights_TK, gate_up, down):
        seen.append(type(gate_up).__name__)
        dense = mb.ExpertWeights(gate_up.dequantize(), down.dequantize())
        return mb.moe_forward(x_TD, mb.Routing(ids_TK, weights_TK), dense, impl="sorted")

    mb.register_impl("int8-only", forward, quant=("int8",))
    try:
        qw = w.quantize("int8", B)
        y = mb.moe_forward(x, r, qw, impl="int8-only")
        assert seen == ["QuantizedTensor"]
        assert rel(y, mb.reference(x, r, qw)) < tolerance(torch.float32, "int8")
        with pytest.raises(ValueError, match=r"'int8-only' does not take int4 .* it takes int8"):
            mb.moe_forward(x, r, w.quantize("int4", B), impl="int8-only")
        with pytest.raises(ValueError, match=r"unknown quant formats \['int3'\]"):
            mb.register_impl("bad", forward, quant=("int3",))
    finally:
        mb.unregister_impl("int8-only")


def test_impls_that_do_not_take_a_format_refuse_it():
    _, w, x = layer()
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    calls = []
    mb.register_impl("dense-only", lambda x, ids, wts, gu, dn: calls.append(1) or x.clone())
    try:
        with pytest.raises(ValueError, match="'dense-only' does not take int8 quantized weights"):
            mb.moe_forward(x, mb.make_routing(T, cfg), w.quantize("int8", B), impl="dense-only")
    finally:
        mb.unregister_impl("dense-only")
    assert not calls
