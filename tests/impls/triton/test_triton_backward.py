"""The `triton` layer's backward against float64 autograd through the oracle: gradients of
x, the routing weights, gate_up and down through the `moebench::fused_moe` op on both paths
and combines, every config a backward tuner can pick, and torch.compile.

T tokens, D model width, F expert hidden width, E experts, K experts per token, S = T*K.
"""

import pytest
import torch
from triton_cases import (
    CASES,
    DEVICE,
    FORCED,
    assert_grads_match,
    forced_runs,
    idle_experts,
    leaves,
    make_case,
    random_dy,
    reference_grads,
    rel_err,
    run,
    run_backward,
    tuners_and_configs,
)

import moebench.impls.triton as triton_layer
from moebench.bench.oracle import tolerance

# Weights wider than the interpreter's 64-wide weight-gradient tiles, in both dimensions.
GRAD_CASES = CASES | {"D72-F40": dict(T=9, D=72, F=40, E=3, K=2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradients_match_float64_reference(shape, dtype, path):
    case = make_case(**shape, dtype=dtype)
    dy_TD = random_dy(shape["T"], shape["D"], dtype)
    got = run_backward(case, dy_TD)
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], dtype)


@pytest.mark.parametrize("combine", triton_layer.COMBINES)
def test_every_gradient_element_is_written(monkeypatch, path, combine):
    """With every buffer the layer allocates poisoned, idle experts still get exact zeros."""
    new_empty, empty_like = torch.Tensor.new_empty, torch.empty_like
    nan = lambda t: t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: nan(new_empty(t, *a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
    case = make_case(T=3, D=16, F=16, E=16, K=2, dtype=torch.float32)
    dy_TD = torch.randn(3, 16, device=DEVICE)
    got = run_backward(case, dy_TD, combine=combine)
    assert idle_experts(case[1], 16).sum() >= 10
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], torch.float32)


@pytest.mark.parametrize("wanted", range(4), ids=["x", "weights", "gate_up", "down"])
def test_gradient_of_one_input_only(wanted):
    """Only the inputs that require grad get one; the others' kernels are skipped."""
    case = make_case(T=9, D=16, F=16, E=4, K=2, dtype=torch.float32)
    dy_TD = torch.randn(9, 16, device=DEVICE)
    got = run_backward(case, dy_TD, requires_grad=[i == wanted for i in range(4)])
    want = reference_grads(case, dy_TD)
    assert [g is not None for g in got] == [i == wanted for i in range(4)]
    assert rel_err(got[wanted], want[wanted]) < tolerance(torch.float32)


def test_no_autograd_when_nothing_needs_grad():
    case = make_case(T=9, D=16, F=16, E=4, K=2, dtype=torch.float32)
    out, _ = run(case)
    assert out.grad_fn is None
    with torch.no_grad():
        out, _ = run(leaves(case)[:1] + list(case[1:]))
    assert out.grad_fn is None


@pytest.mark.parametrize("T", [20, 100], ids=["decode", "prefill"])
def test_pairs_gradients_are_bitwise_reproducible(T):
    case = make_case(T=T, D=40, F=24, E=6, K=3, dtype=torch.float32)
    dy_TD = torch.randn(T, 40, device=DEVICE)
    first = run_backward(case, dy_TD)
    second = run_backward(case, dy_TD)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    atomic = run_backward(case, dy_TD, combine="atomic")
    # two orders of fp32 sums, no more
    assert all(rel_err(a, b.double().cpu()) < 1e-6 for a, b in zip(atomic, first, strict=True))


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 loads are wrong under the interpreter")
@pytest.mark.parametrize("T", [20, 300], ids=["decode", "prefill"])
def test_bf16_gradients_match_float64_reference(T):
    case = make_case(T=T, D=256, F=128, E=8, K=2, dtype=torch.bfloat16)
    dy_TD = torch.randn(T, 256, device=DEVICE, dtype=torch.bfloat16)
    got = run_backward(case, dy_TD)
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], torch.bfloat16)


BACKWARD_FORCED = {f"swiglu_backward-{name}": ("swiglu_backward", name) for name in FORCED}
BACKWARD_FORCED["expert_grad"] = ("expert_grad", "prefill")


@pytest.mark.parametrize(("kernel", "shape"), BACKWARD_FORCED.values(), ids=BACKWARD_FORCED.keys())
def test_every_backward_config_matches_reference(kernel, shape):
    """The weight-gradient kernel's configs do not depend on the expert width: one shape."""
    shape, dtype, tuners, space = tuners_and_configs(kernel, shape)
    case = make_case(**shape, dtype=dtype)
    dy_TD = random_dy(shape["T"], shape["D"], dtype)
    want = reference_grads(case, dy_TD)

    def run_one(config):
        assert_grads_match(run_backward(case, dy_TD), want, case[1], dtype)

    assert not forced_runs(tuners, space, run_one)


def test_torch_compile_keeps_forward_and_backward_ops_whole():
    """fullgraph=True: no graph break around the layer; each op is one node of its graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    seen = {"forward": set(), "backward": set()}

    def record(kind):
        def compiler(gm, example_inputs):
            seen[kind] |= {node.target for node in gm.graph.nodes}
            return make_boxed_func(gm.forward)

        return compiler

    def layer(x, ids, w, gate_up, down):
        return triton_layer.forward(x, ids, w, gate_up, down, torch.empty_like(x), None)

    backend = aot_autograd(fw_compiler=record("forward"), bw_compiler=record("backward"))
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    case = make_case(T=8, D=16, F=16, E=4, K=2, dtype=torch.float32)
    dy_TD = torch.randn(8, 16, device=DEVICE)
    x, w, gate_up, down = inputs = leaves(case)
    compiled(x, case[1], w, gate_up, down).backward(dy_TD)
    assert torch.ops.moebench.tile_schedule.default in seen["forward"]
    assert torch.ops.moebench.fused_moe.default in seen["forward"]
    assert torch.ops.moebench.fused_moe_backward.default in seen["backward"]
    eager = run_backward(case, dy_TD)
    # the same kernels: the eager gradients, up to the order of fp32 sums
    assert all(rel_err(t.grad, g.double().cpu()) < 1e-6 for t, g in zip(inputs, eager, strict=True))
