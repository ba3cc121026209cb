"""The conformance kit: it passes correct implementations and names the cases of broken ones."""

import outside_kernels as kernels
import pytest
import torch

from moebench import cli
from moebench.bench.grid import SKEWS
from moebench.testing import SHAPES, check_impl

FP32 = (torch.float32,)


def failing(report):
    return {(r.case.shape, r.case.skew) for r in report.failed}


def test_a_correct_outside_implementation_conforms():
    report = check_impl(kernels.correct)
    assert not report.failed
    cases = report.results
    # what it declared: float32 and float64, and gradients
    assert {r.case.dtype for r in cases} == {torch.float32, torch.float64}
    assert any(r.case.grad for r in cases)
    assert {r.case.ids for r in cases} == {torch.int32, torch.int64}
    assert any(not r.case.contiguous for r in cases)
    assert {r.case.shape for r in cases} == set(SHAPES) - {"quant"}  # it declares no format
    assert {r.case.skew for r in cases} == set(SKEWS)


def test_a_quantized_kernel_is_checked_in_the_formats_it_declares():
    report = check_impl(kernels.forgets_scales, raise_on_failure=False)
    assert {r.case.quant for r in report.failed} == {"int8", "int4"}
    assert {r.case.quant for r in report.results} == {None, "int8", "int4"}
    assert all(r.case.quant for r in report.failed)  # the float cases pass
    assert "quant (T=37 D=256 F=128 E=6 K=3), random, float32, int4 weights: rel_err" in str(report)


def test_ignoring_the_routing_weights_fails_and_says_where():
    with pytest.raises(AssertionError) as raised:
        check_impl(kernels.ignores_weights, dtypes=FP32)
    text = str(raised.value)
    assert "FAIL awkward (T=37 D=44 F=20 E=6 K=3), balanced, float32: rel_err" in text
    assert "does not conform" in text


def test_dropping_the_tail_past_a_multiple_of_16_fails_on_awkward_t():
    report = check_impl(kernels.drops_tail, dtypes=FP32, raise_on_failure=False)
    shapes = {shape for shape, _ in failing(report)}
    assert {"awkward", "T1", "K1"} <= shapes
    T0 = [r for r in report.results if r.case.shape == "T0"]
    assert T0 and all(r.error is None for r in T0)  # nothing to drop: no false alarm


def test_a_hidden_capacity_fails_only_under_skew():
    report = check_impl(kernels.drops_past_capacity, dtypes=FP32, raise_on_failure=False)
    bad = failing(report)
    assert ("awkward", "collapse") in bad and ("awkward", "hot:0.5") in bad
    assert not any(skew == "balanced" for _, skew in bad)


def test_a_gradient_that_does_not_flow_is_named():
    detached = lambda x, ids, w, gu, d: kernels.correct(x, ids, w.detach(), gu, d)
    report = check_impl(detached, dtypes=FP32, differentiable=True, raise_on_failure=False)
    errors = [r.error for r in report.failed]
    assert errors and all(r.case.grad for r in report.failed)
    assert all("no gradient for weights" in e for e in errors)


def test_moebench_own_layers_conform():
    # padded drops pairs past its capacity by design; without one it must conform too.
    for impl, options in (("naive", {}), ("sorted", {}), ("padded", {"capacity_factor": None})):
        assert not check_impl(impl, options=options).failed, impl
    assert check_impl("padded", raise_on_failure=False).failed  # capacity 1.25 drops


def test_the_triton_layer_conforms_where_it_runs():
    report = check_impl("triton", dtypes=(torch.float32, torch.float16))
    assert not report.failed and len(report.results) > 30


@pytest.mark.parametrize(
    ("target", "code"),
    [("outside_kernels:correct", 0), ("outside_kernels:drops_tail", 1)],
)
def test_check_impl_command_exit_codes(target, code, capsys):
    assert cli.main(["check-impl", target, "--dtypes", "fp32"]) == code
    out = capsys.readouterr().out
    assert ("conforms" if code == 0 else "FAIL awkward") in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nothing_here:f"], "cannot import 'nothing_here'"),
        (["outside_kernels:nope"], "has no 'nope'"),
        (["not-an-impl"], "unknown impl 'not-an-impl'"),
        (["outside_kernels:correct", "--dtypes", "fp8"], "unknown dtype 'fp8'"),
    ],
)
def test_check_impl_command_refuses_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["check-impl", *argv])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
