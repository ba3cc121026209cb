"""The `triton` layer's tuning choices: the search spaces and their pruning, the big tiles'
fixed configs, the tuned-config cache, and the public seam (set_knobs, force_configs,
tuning_bench, clear_tuning) that the other tests use instead of patching.

T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

import pytest
import torch
import triton
from triton_cases import DEVICE, assert_matches, make_case, run

from moebench.impls.triton import configs
from moebench.impls.triton.kernels import _down_kernel, _gate_up_kernel
from moebench.impls.triton.kernels_bwd import _swiglu_backward_kernel


def compiled_space(path, kernel, tma=False):
    """The search space a GPU tunes over (the interpreter's is one small config)."""
    if kernel == "swiglu_backward":
        return configs.swiglu_backward_configs(path, interpreted=False)
    return configs.forward_configs(path, kernel, tma, interpreted=False)


@pytest.mark.parametrize("F", [8, 16, 24, 40, 4096])
@pytest.mark.parametrize("path", configs.PATHS)
def test_big_tiles_fit_narrow_experts(path, F):
    """The big tiles' fixed configs: gate_up's column block and down's reduction block are
    cut to F as a power of two (at least 16) where F is narrower; on the prefill path, those
    that F leaves whole read through TMA; nothing else changes."""
    base, got = configs.BIG_CONFIGS[path], configs.big_config(path, F)
    fit = max(16, 1 << (F - 1).bit_length())
    for kernel, dim in ((_gate_up_kernel, "BLOCK_N"), (_down_kernel, "BLOCK_K")):
        whole = base[kernel][dim] <= fit
        tma = {"TMA": True} if path == "prefill" and whole else {}
        assert got[kernel] == {**base[kernel], dim: min(base[kernel][dim], fit), **tma}
    assert got[_swiglu_backward_kernel] == base[_swiglu_backward_kernel]
    if F <= 16:
        assert got[_gate_up_kernel]["BLOCK_N"] == 16 < base[_gate_up_kernel]["BLOCK_N"]


def test_prune_loops_column_blocks_for_one_step_reductions_only():
    space = compiled_space("prefill", "down", tma=True)
    for F, block_m, offered in [(8, 16, True), (32, 32, True), (64, 16, False), (8, 64, False)]:
        kept = configs.prune("down")(space, {"F": F}, BLOCK_M=block_m)
        looped = [c for c in kept if c.kwargs.get("N_BLOCKS", 1) > 1]
        assert bool(looped) == offered, (F, block_m)
        assert all(c.kwargs["BLOCK_K"] >= F for c in looped)


def test_prune_offers_persistent_configs_with_tma_only():
    """The persistent configs are TMA configs, for tiles of 64 rows or more; their blocks
    over F (gate_up's 128 columns, down's 64-deep reduction) for wide experts only (near F);
    never on the decode path."""
    for kernel in ("gate_up", "down"):
        space = compiled_space("prefill", kernel, tma=True)
        persistent = [c for c in space if c.kwargs.get("PERSISTENT")]
        assert persistent and all(c.kwargs["TMA"] for c in persistent)
        assert not any(c.kwargs.get("PERSISTENT") for c in compiled_space("decode", kernel))
        assert not any(c.kwargs.get("PERSISTENT") for c in compiled_space("prefill", kernel))
        for F, block_m in [(1024, 128), (1024, 64), (1024, 32), (8, 128)]:
            kept = configs.prune(kernel)(space, {"F": F}, BLOCK_M=block_m)
            offered = any(c.kwargs.get("PERSISTENT") for c in kept)
            assert offered == (block_m >= 64 and F == 1024), (kernel, F, block_m)


def test_prune_keeps_blocks_near_the_expert_width():
    gate_up, down = compiled_space("prefill", "gate_up"), compiled_space("prefill", "down")
    block = lambda space, dim: {c.kwargs[dim] for c in space}
    prune_gate_up, prune_down = configs.prune("gate_up"), configs.prune("down")
    assert block(prune_gate_up(gate_up, {"F": 8}, BLOCK_M=16), "BLOCK_N") == {16}
    assert block(prune_gate_up(gate_up, {"F": 64}, BLOCK_M=16), "BLOCK_N") == {32, 64}
    wide = prune_gate_up(gate_up, {"F": 1024}, BLOCK_M=128)
    assert 16 not in block(wide, "BLOCK_N") and len(wide) > 4
    # 256-deep blocks (decode's) for short tiles only
    for block_m, deep in [(16, True), (32, True), (64, False), (128, False)]:
        kept = prune_gate_up(gate_up, {"F": 1024}, BLOCK_M=block_m)
        assert (256 in block(kept, "BLOCK_K")) == deep, block_m
    narrow_down = prune_down(down, {"F": 8}, BLOCK_M=16)
    assert block(narrow_down, "BLOCK_K") == {16} and 256 in block(narrow_down, "BLOCK_N")
    tall_down = prune_down(down, {"F": 1024}, BLOCK_M=128)
    assert 16 not in block(tall_down, "BLOCK_K")
    wide_tall = [c for c in tall_down if c.kwargs["BLOCK_N"] == 256]
    assert wide_tall and all(c.num_warps == 8 for c in wide_tall), "4-warp 256-wide spills at M=128"


def test_prune_offers_tma_to_tall_tiles_only():
    for kernel in ("gate_up", "down"):
        space = compiled_space("prefill", kernel, tma=True)
        assert not any(c.kwargs.get("TMA") for c in compiled_space("prefill", kernel))
        for block_m in (16, 32, 64, 128):
            kept = configs.prune(kernel)(space, {"F": 1024}, BLOCK_M=block_m)
            tma = [c for c in kept if c.kwargs.get("TMA")]
            assert bool(tma) == (block_m >= 64), (kernel, block_m)
            assert all(c.pre_hook is configs.fit_descriptors for c in kept)


@pytest.mark.parametrize("kernel", ["gate_up", "down", "swiglu_backward"])
def test_prune_keeps_accumulators_in_registers(kernel):
    """At every tile height and expert width, what is offered holds its fp32 accumulators
    in 128 registers a thread, and something is always offered."""
    accumulators = {"gate_up": 2, "down": 1, "swiglu_backward": 3}[kernel]
    for path in configs.PATHS:
        space = compiled_space(path, kernel)
        for block_m in (16, 32, 64, 128):
            for F in (8, 24, 64, 1024, 14336):
                kept = configs.prune(kernel)(space, {"F": F}, BLOCK_M=block_m)
                assert kept, (path, block_m, F)
                per_thread = [accumulators * block_m * c.kwargs["BLOCK_N"] / (32 * c.num_warps)
                              for c in kept]  # fmt: skip
                assert max(per_thread) <= 128, (path, block_m, F)


@pytest.mark.parametrize("kernel", ["gate_up", "down"])
def test_prune_fits_quantized_weights(kernel):
    """Quantized: a reduction block within one scale group (none deeper than 128), and the
    registers that the quantized kernels add (fp8: scaled dots beside the accumulators;
    integers: the converted weight block) within 128 a thread; something always offered."""
    projections = {"gate_up": 2, "down": 1}[kernel]
    for path in configs.PATHS:
        space = compiled_space(path, kernel)
        space = [c for c in space if not c.kwargs.get("TMA")]
        for quant, group in ((1, 0), (2, 128), (2, 256), (3, 128)):
            for block_m in (16, 64, 128):
                flags = {"BLOCK_M": block_m, "QUANT": quant, "GROUP_K": group}
                kept = configs.prune(kernel)(space, {"F": 2048}, **flags)
                assert kept, (path, quant, block_m)
                assert all(c.kwargs["BLOCK_K"] <= 128 for c in kept)
                accumulators = projections * block_m * (2 if quant == 3 else 1)
                converted = projections if quant < 3 else 0
                for c in kept:
                    regs = (accumulators + converted * c.kwargs["BLOCK_K"]) * c.kwargs["BLOCK_N"]
                    assert regs <= 128 * 32 * c.num_warps, (path, quant, block_m, c)
                if quant == 3 and block_m == 128 and path == "prefill":  # fewer: doubled acc.
                    plain = configs.prune(kernel)(space, {"F": 2048}, BLOCK_M=block_m)
                    assert len(kept) < len(plain), (path, kernel)


def test_tuned_launches_skip_the_autotuner(monkeypatch):
    """The second call of a problem launches with the remembered configs."""
    from triton.runtime.autotuner import Autotuner

    case = make_case(T=90, D=16, F=24, E=4, K=2, dtype=torch.float32)
    first, stats = run(case)
    tuner_calls = []
    tuner_run = Autotuner.run
    monkeypatch.setattr(
        Autotuner, "run", lambda self, *a, **k: tuner_calls.append(self) or tuner_run(self, *a, **k)
    )
    second, again = run(case)
    assert tuner_calls == [] and torch.equal(first, second)
    assert again["config"] == stats["config"]
    run(make_case(T=90, D=16, F=40, E=4, K=2, dtype=torch.float32))  # a new problem: tuned
    assert len(tuner_calls) == 2
    configs.clear_tuning()  # a known problem tunes again once forgotten
    run(case)
    assert len(tuner_calls) == 4


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter offers one config, untimed")
def test_tuners_time_their_candidates_on_the_gpu():
    """The conftest has the other GPU tests skip the timing; here the decode tuners time
    each candidate their pruning keeps with timed_bench, and keep the fastest."""
    tuners = [configs.TUNERS["gate_up"]["decode", False], configs.TUNERS["down"]["decode", False]]
    case = make_case(T=8, D=256, F=128, E=16, K=4, dtype=torch.bfloat16)
    configs.clear_tuning()
    try:
        with configs.tuning_bench(configs.timed_bench):
            out, stats = run(case)
    finally:
        configs.clear_tuning()  # the other tests' untimed choices from here on
    assert_matches(out, case, torch.bfloat16)
    for tuner, kernel in zip(tuners, ("gate_up", "down"), strict=True):
        timings = {c.all_kwargs().__repr__(): t[0] for c, t in tuner.configs_timings.items()}
        assert len(timings) > 1 and all(0 < t < float("inf") for t in timings.values()), timings
        assert timings[repr(stats["config"][kernel])] == min(timings.values())


def test_set_knobs_changes_the_next_call_and_restores():
    case = make_case(T=20, D=16, F=16, E=4, K=1, dtype=torch.float32)
    before = configs.DECODE_MAX_TOKENS
    with configs.set_knobs(DECODE_MAX_TOKENS=10):
        assert run(case)[1]["path"] == "prefill"
    assert before == configs.DECODE_MAX_TOKENS and run(case)[1]["path"] == "decode"
    with (
        pytest.raises(ValueError, match="unknown knobs \\['BLOCK_M'\\]"),
        configs.set_knobs(BLOCK_M=8),
    ):
        pass


def test_force_configs_offers_only_those_configs_and_restores():
    tuner = configs.TUNERS["down"]["prefill", False]
    space = list(tuner.configs)
    config = triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_SIZE_M": 1})
    case = make_case(T=100, D=16, F=16, E=2, K=2, dtype=torch.float32)
    with configs.force_configs("down", config, path="prefill", tma=False):
        assert tuner.configs == [config]
        assert configs.TUNERS["down"]["decode", False].configs != [config]
        out, stats = run(case)
        assert stats["config"]["down"] == config.all_kwargs()
        assert_matches(out, case, torch.float32)
    assert tuner.configs == space
    assert run(case)[1]["config"]["down"] != config.all_kwargs()  # tuned again, not kept
    assert configs.tuners("expert_grad") == list(configs.TUNERS["expert_grad"].values())
    with pytest.raises(ValueError, match="unknown kernel 'pair_sum'"):
        configs.tuners("pair_sum")


def test_tuning_bench_is_what_the_tuners_time_with():
    """Two candidates that the pruning keeps (32-deep blocks over F = 32), each timed by the
    bench given (here: the second one faster)."""
    times = iter([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
    calls = []

    def bench(kernel_call, quantiles):
        kernel_call()
        calls.append(quantiles)
        return next(times)

    pair = [
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_SIZE_M": 4}),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "GROUP_SIZE_M": 4}),
    ]
    case = make_case(T=100, D=16, F=32, E=2, K=2, dtype=torch.float32)
    with configs.force_configs("down", pair, path="prefill"), configs.tuning_bench(bench):
        out, stats = run(case)
    assert len(calls) == 2
    assert stats["config"]["down"] == pair[1].all_kwargs()
    assert_matches(out, case, torch.float32)
