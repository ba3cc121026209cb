"""Configuration, presets, weights, and every error path of moe_forward."""

import math

import pytest
import torch

import moebench as mb
from moebench import registry

CFG = mb.MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2)
# Every registered impl whose packages are installed: its inputs are checked the same way.
INSTALLED = [name for name in mb.IMPLS if not registry.get(name).missing()]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("d_model", 0),
        ("d_ff", -8),
        ("num_experts", 2.5),
        ("top_k", 5),
        ("num_shared_experts", -1),
        ("shared_d_ff", 0),
        ("activation", "gelu"),
        ("scoring", "relu"),
        ("dtype", "int8"),
        ("num_shared_experts", True),
        ("shared_d_ff", True),
        ("renormalize", "no"),
        ("name", None),
    ],
)
def test_bad_config_field_is_named(field, value):
    with pytest.raises(ValueError, match=rf"{field}.*{value}|{value}.*{field}"):
        CFG.replace(**{field: value})


def test_presets_have_the_real_layer_shapes():
    ds = mb.preset("deepseek-v3")
    assert (ds.num_experts, ds.top_k, ds.d_model, ds.d_ff, ds.d_ff_shared) == (
        256,
        8,
        7168,
        2048,
        2048,
    )
    assert ds.scoring == "sigmoid"
    mv = mb.preset("llama4-maverick")
    assert (mv.num_experts, mv.top_k, mv.d_model, mv.d_ff, mv.d_ff_shared) == (
        128,
        1,
        5120,
        8192,
        8192,
    )
    assert mb.preset("mixtral-8x7b").d_ff == 14336 and mb.preset("qwen3-235b-a22b").d_ff == 1536
    assert sorted(mb.PRESETS) == [
        "deepseek-v3",
        "llama4-maverick",
        "mixtral-8x7b",
        "qwen3-235b-a22b",
    ]
    # FLOPs: 6*S*D*F routed + 6*T*D*Fs shared
    assert mv.flops(2) == 6 * 2 * 5120 * 8192 + 6 * 2 * 5120 * 8192


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt-5'.*deepseek-v3.*qwen3-235b-a22b"):
        mb.preset("gpt-5")


def test_weights_layout_and_checks():
    cfg = CFG.replace(num_shared_experts=2, shared_d_ff=4)
    w = mb.ExpertWeights.random(cfg, dtype="fp32", seed=1)
    assert w.gate_up.shape == (4, 16, 16) and w.down.shape == (4, 16, 8)
    assert w.shared_gate_up.shape == (16, 16) and w.shared_down.shape == (16, 8)
    assert torch.equal(w.down, mb.ExpertWeights.random(cfg, dtype="fp32", seed=1).down)
    assert not torch.equal(w.down, mb.ExpertWeights.random(cfg, dtype="fp32", seed=2).down)
    assert w.gate_up.std().item() == pytest.approx(16**-0.5, rel=0.2)
    with pytest.raises(ValueError, match=r"down must be \[E, D, F\]"):
        mb.ExpertWeights(w.gate_up, w.down[:, :, :4])
    with pytest.raises(ValueError, match=r"gate_up must be \[E, 2F, D\]"):
        mb.ExpertWeights(w.gate_up[0], w.down)
    with pytest.raises(ValueError, match="together"):
        mb.ExpertWeights(w.gate_up, w.down, shared_gate_up=w.shared_gate_up)
    with pytest.raises(ValueError, match="shared_down"):
        mb.ExpertWeights(w.gate_up, w.down, w.shared_gate_up, w.shared_down.T)
    with pytest.raises(ValueError, match="share dtype"):
        mb.ExpertWeights(w.gate_up, w.down.double())
    with pytest.raises(ValueError, match=r"E, F, D >= 1, got shape \(4, 0, 16\)"):
        mb.ExpertWeights(w.gate_up[:, :0], w.down[:, :, :0])
    with pytest.raises(ValueError, match="shared_gate_up must be"):
        mb.ExpertWeights(w.gate_up, w.down, w.shared_gate_up[:0], w.shared_down[:, :0])
    with pytest.raises(TypeError, match=r"ExpertWeights\.down must be a tensor, got NoneType"):
        mb.ExpertWeights(w.gate_up, None)
    with pytest.raises(ValueError, match=r"floating point, got torch\.int32"):
        mb.ExpertWeights.random(cfg, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"cfg must be a moebench\.MoEConfig"):
        mb.ExpertWeights.random("mixtral-8x7b")
    assert w.to(dtype="bf16").dtype == torch.bfloat16
    # Checked once, at construction: the fields cannot be swapped for unchecked ones.
    with pytest.raises(AttributeError):
        w.down = w.down[:, :, :4]


@pytest.fixture
def case():
    w = mb.ExpertWeights.random(CFG, dtype="fp32")
    r = mb.make_routing(6, CFG, seed=0)
    return torch.randn(6, 16), r, w


def bad_inputs():
    """(name, edit of (x, routing, weights), message the error must contain)."""
    ids = lambda r, v: mb.Routing(torch.full_like(r.ids, v), r.weights)

    def poison(r, value):
        weights = r.weights.clone()
        weights[3, 1] = value
        return mb.Routing(r.ids, weights)

    return [
        ("x rank", lambda x, r, w: (x[None], r, w), r"x must be \[T, D=16\]"),
        ("x width", lambda x, r, w: (x[:, :8], r, w), r"x must be \[T, D=16\]"),
        ("routing tokens", lambda x, r, w: (x[:5], r, w), "routing has 6 tokens, x has 5"),
        ("id too large", lambda x, r, w: (x, ids(r, 4), w), r"expert ids must be in \[0, 4\)"),
        ("id negative", lambda x, r, w: (x, ids(r, -1), w), r"expert ids must be in \[0, 4\)"),
        (
            "nan weights",
            lambda x, r, w: (x, mb.Routing(r.ids, torch.full_like(r.weights, math.nan)), w),
            "routing weights must be finite: 12 NaN and 0 inf of 12",
        ),
        ("inf weight", lambda x, r, w: (x, poison(r, math.inf), w), "0 NaN and 1 inf of 12"),
        ("-inf weight", lambda x, r, w: (x, poison(r, -math.inf), w), "0 NaN and 1 inf of 12"),
        ("dtype", lambda x, r, w: (x.double(), r, w), "x is torch.float64, weights are"),
        ("device", lambda x, r, w: (x, r.to("meta"), w), "x is on cpu, routing on meta"),
        (
            "K > E",
            lambda x, r, w: (x, mb.Routing(r.ids.repeat(1, 3), r.weights.repeat(1, 3)), w),
            "K=6 experts per token, there are E=4",
        ),
        ("not a routing", lambda x, r, w: (x, (r.ids, r.weights), w), "moebench.Routing"),
    ]


@pytest.mark.parametrize("impl", INSTALLED)
@pytest.mark.parametrize(
    ("edit", "message"), [b[1:] for b in bad_inputs()], ids=[b[0] for b in bad_inputs()]
)
def test_bad_input_is_refused_before_any_kernel_runs(impl, edit, message, case, monkeypatch):
    x, r, w = edit(*case)
    with pytest.raises((ValueError, TypeError), match=message):
        mb.moe_forward(x, r, w, impl=impl)


def test_bad_out_impl_and_options(case):
    x, r, w = case
    with pytest.raises(ValueError, match="out must be"):
        mb.moe_forward(x, r, w, out=torch.empty(6, 8))
    with pytest.raises(TypeError, match="out must be a tensor, got list"):
        mb.moe_forward(x, r, w, out=[1])
    with pytest.raises(ValueError, match="unknown impl 'fast'; known: naive, padded, sorted"):
        mb.moe_forward(x, r, w, impl="fast")
    with pytest.raises(ValueError, match=r"unknown impl \['naive'\]"):
        mb.moe_forward(x, r, w, impl=["naive"])
    with pytest.raises(ValueError, match=r"unknown impl \['x'\]"):
        mb.impl_options(["x"])
    with pytest.raises(ValueError, match=r"unknown preset \['a'\]"):
        mb.preset(["a"])
    with pytest.raises(TypeError, match="stats must be a dict"):
        mb.moe_forward(x, r, w, stats=[])
    with pytest.raises(TypeError, match=r"no option.*capacity_factor"):
        mb.moe_forward(x, r, w, impl="sorted", capacity_factor=2.0)
    for factor in (0, math.inf, "1.0", True):
        with pytest.raises(ValueError, match="capacity_factor must be a number > 0 or None"):
            mb.moe_forward(x, r, w, impl="padded", capacity_factor=factor)
    assert mb.impl_options("padded") == {"capacity_factor": 1.25}


@pytest.mark.parametrize("impl", INSTALLED)
def test_out_may_not_alias_x(impl):
    # With a shared expert every layer reads x after writing its routed output.
    cfg = CFG.replace(num_shared_experts=1)
    w = mb.ExpertWeights.random(cfg, dtype="fp32")
    x = torch.randn(6, 16)
    r = mb.make_routing(6, cfg, seed=0)
    for alias in (x, x.view(3, 2, 16).view(6, 16)):
        with pytest.raises(ValueError, match="out shares memory with x"):
            mb.moe_forward(x, r, w, impl=impl, out=alias)


def test_routing_cannot_be_changed_after_its_checks(case):
    _, r, _ = case
    with pytest.raises(AttributeError):
        r.weights = r.weights[:, :1]


def test_triton_refuses_bf16_under_the_interpreter(case):
    import moebench.impls.triton as triton_layer

    x, r, w = case
    message = "wrong bfloat16 results under TRITON_INTERPRET=1"
    with pytest.raises(ValueError, match=message):
        triton_layer.check_runnable(x.bfloat16(), interpreted=True)
    if triton_layer.configs.INTERPRET:  # the layer itself refuses (no GPU here)
        with pytest.raises(ValueError, match=message):
            mb.moe_forward(x.bfloat16(), r, w.to(dtype="bf16"), impl="triton")


def test_triton_refuses_float64(case):
    x, r, w = case
    with pytest.raises(ValueError, match=r"does not support torch.float64"):
        mb.moe_forward(x.double(), r, w.to(dtype=torch.float64), impl="triton")


def test_zero_tokens_give_an_empty_output(case):
    x, r, w = case
    y = mb.moe_forward(x[:0], mb.Routing(r.ids[:0], r.weights[:0]), w, impl="naive")
    assert y.shape == (0, 16)
