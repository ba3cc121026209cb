"""The `triton` layer's forward against the float64 oracle: both paths, both combines, two
tile heights, TMA and persistent configs, every config a forward tuner can pick.

T tokens, D model width, F expert hidden width, E experts, K experts per token, S = T*K.
Backward checks ride along where a forward feature (two heights, TMA, looping programs)
also carries dx; tests/impls/triton/test_triton_backward.py holds the rest.
"""

import pytest
import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor
from triton_cases import (
    CASES,
    DEVICE,
    assert_grads_match,
    assert_matches,
    forced_runs,
    make_case,
    random_dy,
    reference,
    reference_grads,
    rel_err,
    run,
    run_backward,
    tuners_and_configs,
)

import moebench.impls.triton as triton_layer
from moebench.bench.oracle import tolerance
from moebench.impls.triton import configs, launch, schedule
from moebench.impls.triton.kernels import _down_kernel, _gate_up_kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", CASES.values(), ids=CASES.keys())
def test_matches_float64_reference(shape, dtype, path):
    case = make_case(**shape, dtype=dtype)
    out, stats = run(case)
    assert stats["path"] == path
    assert out.dtype == dtype
    assert_matches(out, case, dtype)


def test_strided_routing(path):
    """ids and weights as column views of wider tensors: the kernels index them by pair."""
    case = make_case(T=9, D=16, F=16, E=6, K=3, dtype=torch.float32)
    ids_TK, weights_TK = (torch.stack([t, -t - 1], dim=2).flatten(1)[:, ::2] for t in case[1:3])
    assert not ids_TK.is_contiguous() and torch.equal(ids_TK, case[1])
    out, _ = run((case[0], ids_TK, weights_TK, *case[3:]))
    assert_matches(out, case, torch.float32)
    got = run_backward((case[0], ids_TK, weights_TK, *case[3:]), torch.ones_like(case[0]))
    assert_grads_match(got, reference_grads(case, torch.ones_like(case[0])), ids_TK, torch.float32)


def test_routing_weights_in_x_dtype(path):
    case = make_case(T=9, D=16, F=16, E=4, K=2, dtype=torch.float16)
    case = (*case[:2], case[2].half(), *case[3:])
    out, _ = run(case)
    assert_matches(out, case, torch.float16)


def test_many_experts_few_tokens(path):
    case = make_case(T=64, D=16, F=16, E=1024, K=2, dtype=torch.float32)
    out, stats = run(case)
    # decode: room for a tall tile per expert with more than block_m rows
    tall = 128 // (stats["block_m"] + 1) if path == "decode" else 0
    big_slots = 128 // stats["big_m"] + tall if stats["big_m"] else 0
    assert stats["tile_slots"] == big_slots + -(-128 // stats["block_m"]) + 128
    assert_matches(out, case, torch.float32)


@pytest.mark.parametrize(
    ("K", "combine"), [(2, "pairs"), (2, "atomic"), (1, "pairs")], ids=["pairs", "atomic", "K1"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_two_tile_heights_match_reference(knobs, dtype, K, combine):
    """A hot expert among light ones (with K=1: every token on it): its full blocks run as
    tall tiles, its rest as short; each combine adds both launches' rows."""
    knobs(BIG_M=32)  # 128 would need hundreds of tokens per test
    case = make_case(T=100, D=24, F=40, E=16, K=K, dtype=dtype, hot_expert=3)
    out, stats = run(case, combine)
    assert (stats["path"], stats["block_m"], stats["big_m"]) == ("prefill", 16, 32)
    assert_matches(out, case, dtype)
    dy_TD = random_dy(100, 24, dtype)
    got = run_backward(case, dy_TD, combine)
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_gives_a_crowded_expert_one_tall_tile(dtype):
    """Decode past 16 tokens: an expert with more than 16 rows (here all 40) runs as one
    DECODE_BIG_M-row tile, so its weights are read once; the others as 16-row tiles."""
    T, E = 40, 16
    case = make_case(T=T, D=24, F=40, E=E, K=2, dtype=dtype, hot_expert=3)
    out, stats = run(case)
    assert (stats["path"], stats["block_m"], stats["big_m"]) == ("decode", 16, configs.DECODE_BIG_M)
    assert_matches(out, case, dtype)
    sched = schedule.tile_schedule(case[1], E, 16, configs.DECODE_BIG_M, 16)
    tiles = [
        (e, end - start)
        for e, start, end in zip(*(t.tolist() for t in sched[2:5]), strict=True)
        if end > start
    ]
    assert [rows for e, rows in tiles if e == 3] == [T]
    assert all(rows <= 16 for e, rows in tiles if e != 3)
    dy_TD = random_dy(T, 24, dtype)
    assert_grads_match(run_backward(case, dy_TD), reference_grads(case, dy_TD), case[1], dtype)


def test_short_decode_keeps_one_tile_height():
    """Up to 16 tokens no expert fills more than one 16-row tile: one height, counted."""
    _, stats = run(make_case(T=16, D=16, F=16, E=2, K=1, dtype=torch.float32))
    assert (stats["path"], stats["big_m"]) == ("decode", 0)


def test_collapse_runs_tall_tiles():
    """The real BIG_M: every token on the same two of 64 experts (the `collapse` skew); the
    tall tiles' blocks over F cut to its 16 (a 2F = 32 deep reduction for dx)."""
    case = make_case(T=300, D=16, F=16, E=64, K=2, dtype=torch.float32)
    case = (case[0], torch.tensor([[5, 9]], device=DEVICE).expand(300, 2), *case[2:])
    out, stats = run(case)
    assert (stats["block_m"], stats["big_m"]) == (16, configs.BIG_M)
    assert_matches(out, case, torch.float32)
    dy_TD = torch.randn(300, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = run_backward(case, dy_TD)
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_big_tiles_read_through_tma_where_the_tensors_allow(monkeypatch, knobs, dtype):
    """Prefill's big tiles launch gate_up and down with TMA and their descriptors where the
    tensors allow it (16-bit), through pointers without (fp32: no descriptor); the output
    is the reference's either way."""
    knobs(BIG_M=32)
    launches, direct = [], launch._run

    def spy(fn, grid, args, meta):  # watches the launches, changes nothing
        if meta.get("BLOCK_M") == 32:
            has_desc = any(isinstance(a, TensorDescriptor) for a in args)
            launches.append((fn, bool(meta.get("TMA")), has_desc))
        direct(fn, grid, args, meta)

    monkeypatch.setattr(launch, "_run", spy)
    case = make_case(T=100, D=48, F=40, E=16, K=2, dtype=dtype, hot_expert=2)
    out, stats = run(case)
    assert (stats["block_m"], stats["big_m"]) == (16, 32)
    want = dtype == torch.float16
    assert {fn for fn, *_ in launches} == {_gate_up_kernel, _down_kernel}
    assert all(tma == want and has_desc == want for _, tma, has_desc in launches), launches
    assert_matches(out, case, dtype)


def interpreted_config(**flags):
    """The interpreter's blocks (32 x 32), with flags (TMA, PERSISTENT, N_BLOCKS)."""
    config = {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_SIZE_M": 4, **flags}
    return triton.Config(config, pre_hook=configs.fit_descriptors)


@pytest.fixture
def tma_only(forced):
    """The prefill TMA tuners offer one TMA config (the interpreter reads descriptors too)."""
    config = interpreted_config(TMA=True)
    for kernel in ("gate_up", "down"):
        forced(kernel, config, path="prefill", tma=True)


@pytest.mark.parametrize("two_heights", [False, True], ids=["one-height", "two-heights"])
@pytest.mark.parametrize("combine", triton_layer.COMBINES)
def test_tma_configs_match_reference(knobs, tma_only, combine, two_heights):
    """TMA boxes run past a tile's rows (into other experts' rows), past the gate half of
    an expert (into its up half), past D and F: none of that reaches the output. D = 48 and
    F = 40 are not multiples of the 32-wide blocks; the second call takes the cached path,
    which fits the boxes itself. TMA is for 16-bit inputs (bf16 is wrong under the
    interpreter, so fp16 here)."""
    dtype = torch.float16
    if two_heights:  # a hot expert among 16, with 32-row big tiles
        knobs(BIG_M=32)
        case = make_case(T=100, D=48, F=40, E=16, K=2, dtype=dtype, hot_expert=2)
    else:  # two experts of 100 rows each, in 128-row tiles
        case = make_case(T=100, D=48, F=40, E=2, K=2, dtype=dtype)
    out, stats = run(case, combine)
    assert stats["path"] == "prefill" and (stats["big_m"] > 0) == two_heights
    assert stats["config"]["gate_up"]["TMA"] and stats["config"]["down"]["TMA"]
    assert_matches(out, case, dtype)
    again, _ = run(case, combine)
    assert combine == "atomic" or torch.equal(again, out)
    if combine == "pairs":
        dy_TD = random_dy(100, 48, dtype)
        got = run_backward(case, dy_TD, combine)
        assert_grads_match(got, reference_grads(case, dy_TD), case[1], dtype)


@pytest.mark.parametrize(
    ("D", "K", "combine", "two_heights"),
    [(80, 2, "pairs", False), (150, 2, "atomic", False), (150, 1, "pairs", False),
     (80, 2, "pairs", True)],
    ids=["D80-pairs", "D150-atomic", "D150-K1", "two-heights"],
)  # fmt: skip
def test_down_programs_looping_over_column_blocks(knobs, forced, D, K, combine, two_heights):
    """Three 32-wide column blocks a program: D = 80 is one group, the last block partial;
    D = 150 is two groups, the second with a block past D. dx takes the same kernel."""
    forced("down", interpreted_config(N_BLOCKS=3), path="prefill")
    if two_heights:
        knobs(BIG_M=32)
    hot = 3 if two_heights else None
    case = make_case(T=100, D=D, F=24, E=16, K=K, dtype=torch.float32, hot_expert=hot)
    out, stats = run(case, combine)
    assert stats["path"] == "prefill" and stats["config"]["down"]["N_BLOCKS"] == 3
    assert not two_heights or stats["big_m"] == 32
    assert_matches(out, case, torch.float32)
    dy_TD = random_dy(100, D, torch.float32)
    got = run_backward(case, dy_TD, combine)
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], torch.float32)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("combine", triton_layer.COMBINES)
def test_persistent_configs_match_the_one_item_programs(knobs, tma, combine):
    """A persistent config runs the same items in programs that loop over them (two
    programs under the interpreter, each taking several items at both tile heights): the
    output is the reference's, and with the pairs combine the one-item-a-program config's
    bit for bit; so are the gradients, whose dx goes through the down kernel. The search
    space's persistent configs read through TMA; the pointer case checks the loop in fp32."""
    dtype = torch.float16 if tma else torch.float32
    knobs(BIG_M=32)
    case = make_case(T=100, D=48, F=40, E=16, K=2, dtype=dtype, hot_expert=2)
    dy_TD = random_dy(100, 48, dtype)
    outs = []
    for persistent in (False, True):
        flags = {"TMA": True} if tma else {}
        flags |= {"PERSISTENT": True} if persistent else {}
        config = interpreted_config(**flags)
        with (
            configs.force_configs("gate_up", config, path="prefill", tma=tma),
            configs.force_configs("down", config, path="prefill", tma=tma),
        ):
            out, stats = run(case, combine)
            assert stats["path"] == "prefill" and stats["big_m"] == 32
            assert stats["config"]["gate_up"].get("PERSISTENT", False) == persistent
            assert stats["config"]["down"].get("PERSISTENT", False) == persistent
            again, _ = run(case, combine)  # the tuned, direct path
            assert combine == "atomic" or torch.equal(again, out)
            outs.append(out)
            got = run_backward(case, dy_TD, combine)
            assert_grads_match(got, reference_grads(case, dy_TD), case[1], dtype)
    assert_matches(outs[1], case, dtype)
    if combine == "pairs":
        assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 loads are wrong under the interpreter")
@pytest.mark.parametrize("pick", [0, -1], ids=["first", "last"])
def test_persistent_search_configs_match_the_one_item_programs(pick):
    """The search space's persistent configs (each kernel's first, then its last: gate_up
    has two), compiled with their loops flattened, at bf16 and 128-row tiles: the output is
    that of the same blocks one item a program, bit for bit."""
    case = make_case(T=1024, D=512, F=256, E=8, K=2, dtype=torch.bfloat16)
    outs = []
    for persistent in (False, True):
        chosen = {}
        for kernel in ("gate_up", "down"):
            space = configs.forward_configs("prefill", kernel, tma=True, interpreted=False)
            config = [c for c in space if c.kwargs.get("PERSISTENT")][pick]
            kwargs = {k: v for k, v in config.kwargs.items() if persistent or k != "PERSISTENT"}
            chosen[kernel] = triton.Config(
                kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
                pre_hook=config.pre_hook,
            )  # fmt: skip
        with (
            configs.force_configs("gate_up", chosen["gate_up"], path="prefill", tma=True),
            configs.force_configs("down", chosen["down"], path="prefill", tma=True),
        ):
            out, stats = run(case)
        assert (stats["block_m"], stats["big_m"]) == (128, 0)
        assert stats["config"]["down"].get("PERSISTENT", False) == persistent
        outs.append(out)
    assert_matches(outs[1], case, torch.bfloat16)
    assert torch.equal(outs[0], outs[1])


def test_tma_only_where_tensors_allow_it(tma_only):
    """A descriptor needs 16-bit elements, a unit last stride and 16-byte aligned rows and
    base; without one, the kernel takes the pointer tuner."""
    rows = torch.zeros(4, 16, dtype=torch.float16)
    assert launch.descriptor(rows) is not None
    assert launch.descriptor(rows.float()) is None  # fp32
    assert launch.descriptor(torch.zeros(4, 12, dtype=torch.float16)) is None  # 24-byte rows
    assert launch.descriptor(rows[:, 1:9]) is None  # base 2 bytes past alignment
    assert launch.descriptor(rows[:, :8].T) is None  # strided last dimension
    # D = 12: gate_up's [E * 2F, D] rows are 24 bytes; down's [E * D, F] rows are 80.
    case = make_case(T=100, D=12, F=40, E=6, K=2, dtype=torch.float16)
    out, stats = run(case)
    assert "TMA" not in stats["config"]["gate_up"] and stats["config"]["down"]["TMA"]
    assert_matches(out, case, torch.float16)


def test_one_tile_height_when_tiles_are_tall():
    _, stats = run(make_case(T=200, D=16, F=16, E=2, K=1, dtype=torch.float32))
    assert (stats["block_m"], stats["big_m"]) == (configs.BIG_M, 0)


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter launches through triton")
@pytest.mark.parametrize("T", [1, 8, 300], ids=["one-token", "counted", "two-heights"])
def test_direct_launches_give_the_first_calls_output(monkeypatch, T):
    """From the third call on every kernel is launched straight (launch._run); the output
    stays the first call's, bit for bit (tests/test_launch.py checks the arguments)."""
    monkeypatch.setattr(launch, "_COMPILED", {})  # a fresh compiled-kernel cache to watch
    case = make_case(T=T, D=64, F=32, E=16, K=2, dtype=torch.bfloat16, hot_expert=1)
    outputs = [run(case)[0] for _ in range(3)]
    assert launch._COMPILED, "no kernel was armed for direct launches"
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])


@pytest.mark.parametrize("T", [20, 100], ids=["decode", "prefill"])
def test_pairs_combine_is_bitwise_reproducible(T):
    case = make_case(T=T, D=40, F=24, E=6, K=3, dtype=torch.float32)
    first, stats = run(case)
    second, _ = run(case)
    assert stats["combine"] == "store-pairs"
    assert torch.equal(first, second)
    atomic, stats = run(case, combine="atomic")
    assert stats["combine"] == "atomic"
    assert rel_err(first, atomic.double().cpu()) < 1e-6  # two orders of fp32 sums, no more


def test_unknown_combine_is_refused():
    case = make_case(T=4, D=16, F=16, E=4, K=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown combine 'tree'"):
        run(case, combine="tree")


def test_path_is_chosen_by_token_count():
    limit = configs.DECODE_MAX_TOKENS
    for T, expected in ((limit, "decode"), (limit + 1, "prefill")):
        _, stats = run(make_case(T=T, D=16, F=16, E=2, K=1, dtype=torch.float32))
        assert stats["path"] == expected


def test_cpu_tensors_need_the_interpreter():
    case = make_case(T=2, D=16, F=16, E=2, K=1, dtype=torch.float32)
    x_TD = case[0].cpu()
    with pytest.raises(RuntimeError, match="needs a CUDA device, or TRITON_INTERPRET=1"):
        triton_layer.check_runnable(x_TD, interpreted=False)
    triton_layer.check_runnable(x_TD, interpreted=True)  # fp32 runs under the interpreter


@pytest.mark.parametrize("shape", ["decode", "prefill", "narrow"])
@pytest.mark.parametrize("kernel", ["gate_up", "down"])
def test_every_forward_config_matches_reference(kernel, shape):
    """Each config the kernel's tuner can pick at the shape, forced in turn (on a GPU every
    one; under the interpreter, the last of the list, a TMA config at prefill)."""
    shape, dtype, tuners, space = tuners_and_configs(kernel, shape)
    case = make_case(**shape, dtype=dtype)
    want = reference(case)

    def run_one(config):
        out, stats = run(case)
        assert stats["config"][kernel] == config.all_kwargs(), "the config was not forced"
        assert rel_err(out, want) < tolerance(dtype), rel_err(out, want)

    assert not forced_runs(tuners, space, run_one)
