"""Tests specific to the `triton` layer: its tile schedule, both paths, the two combines.

T tokens, D model width, F expert hidden width, E experts, K experts per token, S = T*K.
Without a GPU the kernels run under TRITON_INTERPRET=1, so shapes stay small.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moebench import fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# ||out - ref|| / ||ref|| against float64; fp16 rounds x, weights and h to 11 bits.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}


def make_case(T, D, F, E, K, dtype, *, hot_expert=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if hot_expert is not None:
        # Put hot_expert first in every token's list, keeping each token's K ids distinct.
        rest = [
            torch.tensor([e for e in row.tolist() if e != hot_expert][: K - 1], dtype=torch.long)
            for row in ids_TK
        ]
        ids_TK = torch.stack([torch.cat([torch.tensor([hot_expert]), r]) for r in rest])
    weights_TK = torch.rand(T, K, generator=g)
    x_TD = torch.randn(T, D, generator=g)
    gate_up_E2FD = torch.randn(E, 2 * F, D, generator=g) / D**0.5
    down_EDF = torch.randn(E, D, F, generator=g) / F**0.5
    to = dict(device=DEVICE)
    return (
        x_TD.to(dtype=dtype, **to),
        ids_TK.to(**to),
        weights_TK.to(**to),
        gate_up_E2FD.to(dtype=dtype, **to),
        down_EDF.to(dtype=dtype, **to),
    )


def reference(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """Float64 loop over experts."""
    x, w, gate_up, down = (t.double().cpu() for t in (x_TD, weights_TK, gate_up_E2FD, down_EDF))
    ids = ids_TK.cpu()
    F = down.shape[2]
    y = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        t, j = (ids == e).nonzero(as_tuple=True)
        gate, up = (x[t] @ gate_up[e].T).split(F, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        y.index_add_(0, t, (h @ down[e].T) * w[t, j, None])
    return y


def run(case, combine="pairs"):
    """Call forward on a NaN-poisoned output; return it and the stats."""
    x_TD = case[0]
    out_TD = torch.full_like(x_TD, float("nan"))
    stats = {}
    assert fused.forward(*case, out_TD, stats, combine=combine) is out_TD
    assert not out_TD.isnan().any(), "some output elements were not written"
    return out_TD, stats


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(
    "block_m, big_m, tall_over",
    [(4, 0, 0), (16, 0, 0), (4, 8, 0), (16, 32, 0), (4, 8, 4), (16, 64, 16)],
)
@pytest.mark.parametrize(
    "T, E, K, hot",
    [
        (1, 8, 1, False),
        (1, 8, 8, False),
        (37, 12, 3, False),
        (50, 12, 2, True),
        (5, 8192, 2, False),
        (5, 2**15 - 1, 2, False),  # the most experts sorted as int16 keys
        (5, 2**15, 2, False),  # int32 keys
    ],
    ids=["T1-K1", "T1-K=E", "T37-E12-K3", "hot-expert", "E8192", "E32767", "E32768"],
)
def test_tile_schedule_covers_every_pair_once(T, E, K, hot, block_m, big_m, tall_over):
    """Big tiles over full blocks (and, with tall_over, over a longer rest), small ones over
    the rest; each sorted row in one tile of its expert."""
    g = torch.Generator().manual_seed(1)
    # Only some experts receive pairs, with uneven counts; the rest are empty.
    used = torch.randperm(E, generator=g)[: max(K, E // 3)]
    ids_TK = torch.stack([used[torch.randperm(used.numel(), generator=g)[:K]] for _ in range(T)])
    if hot:
        ids_TK[:, 0] = used[0]
        ids_TK[:, 1] = used[1 + torch.arange(T) % (used.numel() - 1)]
    S = T * K
    sched = fused.tile_schedule(ids_TK.to(DEVICE), E, block_m, big_m, tall_over)
    sched = fused.TileSchedule(*(t.cpu() for t in sched))
    ids_S = ids_TK.reshape(-1)
    sorted_ids = ids_S[sched.order_S]

    assert sorted(sched.order_S.tolist()) == list(range(S))
    assert (sorted_ids.diff() >= 0).all()
    same_expert = sorted_ids[1:] == sorted_ids[:-1]
    assert (sched.order_S.diff()[same_expert] > 0).all(), "sort is not stable"

    counts_E = torch.bincount(ids_S, minlength=E)
    assert sched.offsets_E1.tolist() == [0, *counts_E.cumsum(0).tolist()]
    big_slots = (S // big_m + (S // (tall_over + 1) if tall_over else 0)) if big_m else 0
    assert sched.expert_N.numel() == big_slots + -(-S // block_m) + min(E, S)
    covered = torch.zeros(S, dtype=torch.long)
    tiles = {"big": 0, "small": 0}
    per_tile = (sched.expert_N, sched.start_N, sched.end_N)
    for n, (e, start, end) in enumerate(zip(*(t.tolist() for t in per_tile), strict=True)):
        if start == end:
            continue
        big = n < big_slots
        tiles["big" if big else "small"] += 1
        if big:
            full = end - start == big_m
            assert full or tall_over < end - start < big_m, "a big tile is neither full nor a rest"
        else:
            assert 0 < end - start <= block_m
        assert (sorted_ids[start:end] == e).all(), "a tile mixes experts"
        covered[start:end] += 1
    assert (covered == 1).all(), "a sorted row is not covered exactly once"
    full_E = counts_E // big_m if big_m else torch.zeros_like(counts_E)
    rest_E = counts_E - full_E * big_m
    tall_E = rest_E > tall_over if tall_over else torch.zeros_like(rest_E, dtype=torch.bool)
    assert tiles["big"] == int((full_E + tall_E).sum())
    small_E = torch.where(tall_E, 0, -(-rest_E // block_m))
    assert tiles["small"] == int(small_E.sum()), "empty experts got tiles"
    assert sched.count_2.tolist() == [tiles["big"], tiles["small"]]
    if hot and big_m:
        assert tiles["big"] > 0, "the hot expert's rows should fill big tiles"


@pytest.mark.parametrize("block_m", [4, 16])
@pytest.mark.parametrize(
    "T, E, K",
    [(1, 8, 1), (1, 8, 8), (3, 4, 4), (37, 12, 3), (5, 8192, 2), (64, 1, 1), (64, 64, 8)],
)
@pytest.mark.parametrize("routing", ["distinct", "few-experts", "one-expert"])
def test_counted_schedule_equals_sorted(monkeypatch, T, E, K, block_m, routing):
    # The one-launch schedule of decode against the sort-based one, bit for bit; ids may
    # repeat within a token, and 64 * 8 pairs is the largest counted schedule.
    g = torch.Generator().manual_seed(T * E + K)
    if routing == "distinct":
        ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    elif routing == "few-experts":
        ids_TK = torch.randint(0, min(E, 3), (T, K), generator=g)
    else:
        ids_TK = torch.full((T, K), E - 1)
    assert T * K <= fused.COUNTED_MAX_PAIRS
    assert_counted_equals_sorted(monkeypatch, ids_TK, E, block_m)


def assert_counted_equals_sorted(monkeypatch, ids_TK, E, block_m):
    counted = fused.tile_schedule(ids_TK.to(DEVICE), E, block_m)
    with monkeypatch.context() as m:
        m.setattr(fused, "COUNTED_MAX_PAIRS", 0)
        sorted_ = fused.tile_schedule(ids_TK.to(DEVICE), E, block_m)
    for name, a, b in zip(fused.TileSchedule._fields, counted, sorted_, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("T, E, K", [(37, 12, 3), (20, 300, 4), (33, 2, 2)])
def test_counted_schedule_in_the_gpu_blocks(monkeypatch, T, E, K):
    """The interpreter counts in one wide step; the GPU's blocks take several programs and
    steps (and the triangular inner loop), checked here on fewer, smaller cases."""
    blocks = fused.SCHEDULE_BLOCKS | {fused._counted_schedule_kernel: fused._COUNTED_BLOCKS}
    monkeypatch.setattr(fused, "SCHEDULE_BLOCKS", blocks)
    g = torch.Generator().manual_seed(T)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids_TK[:, 0] = ids_TK[0, 0]  # a hot expert with more than one 16-row tile
    assert 2 * fused._COUNTED_BLOCKS["CHUNK"] < T * K  # several steps
    assert_counted_equals_sorted(monkeypatch, ids_TK, E, 16)


def test_decode_counts_instead_of_sorting(monkeypatch):
    def no_sort(*args, **kwargs):
        raise AssertionError("the decode schedule sorted")

    monkeypatch.setattr(torch, "sort", no_sort)
    case = make_case(T=8, D=16, F=32, E=16, K=4, dtype=torch.float32)
    out_TD, stats = run(case)
    assert stats["path"] == "decode"
    assert rel_err(out_TD, reference(*case)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "ids", [[5, 1, 6, 3], [2, 2, 7, 2], [0, 9, 4, 1, 6, 11, 3, 8]], ids=["K4", "repeats", "K8"]
)
def test_one_token_needs_no_schedule_launch(monkeypatch, ids, dtype):
    """T = 1 without autograd: a one-row tile per pair, in pair order, made of constants.
    Its output is the sorted schedule's, bit for bit (ids repeated within the token too);
    with autograd the layer takes the sorted schedule, whose offsets the backward reads."""
    K = len(ids)
    case = make_case(T=1, D=40, F=24, E=12, K=K, dtype=dtype)
    # A strided view of the ids: the kernels read expert_N as a contiguous slot array.
    ids_TK = torch.tensor([[e for i in ids for e in (i, 11)]], device=DEVICE)[:, ::2]
    case = (case[0], ids_TK, *case[2:])
    with_grad = [t.clone().requires_grad_() for t in (case[0], case[3])]
    sorted_out = torch.empty_like(case[0])
    fused.forward(with_grad[0], ids_TK, case[2], with_grad[1], case[4], sorted_out, None)

    def no_schedule(*args, **kwargs):
        raise AssertionError("one token built a sorted or counted schedule")

    monkeypatch.setattr(fused, "tile_schedule", no_schedule)
    out, stats = run(case)
    assert (stats["path"], stats["tile_slots"]) == ("decode", K)
    assert rel_err(out, reference(*case)) < TOLERANCE[dtype]
    assert torch.equal(out, sorted_out.detach())


def test_programs_loop_where_most_slots_stay_empty():
    """A section launches a program per slot's items, or as many as its S rows make in full
    tiles where that is fewer, but never fewer than the device holds at once."""
    # scale-out at E=8192 (S=32768, 16-row tiles, 8 column blocks) on a 132-SM GPU
    section = fused.Section(0, 10240, 16, None, 1, packed=2048, floor=132 * 32, sms=132)
    assert section.loop and section.programs(8) == 2048 * 8
    assert section.programs(1) == 132 * 32  # narrow experts: the floor
    one_token = section._replace(slots=8, packed=1)  # K = 8 one-row tiles, all real
    assert one_token.loop and one_token.programs(48) == 8 * 48
    sonic = section._replace(slots=1088, block_m=128, packed=1024)  # T=32768, E=64, K=4
    assert not sonic.loop and sonic.programs(16) == 1088 * 16
    tall = section._replace(block_m=64, packed=512)  # taller tiles never loop
    assert not tall.loop and tall.programs(8) == 10240 * 8
    # a persistent config: a program an SM, fewer where there are fewer items than SMs
    assert sonic.programs(16, persistent=True) == 132
    assert one_token.programs(8, persistent=True) == 8 * 8


def test_tile_heights_are_checked():
    ids_TK = torch.zeros(4, 1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="big_m=16 must exceed block_m=16"):
        fused.tile_schedule(ids_TK, 2, 16, 16)


CASES = {
    "T1-K1": dict(T=1, D=32, F=16, E=4, K=1),
    "K=E": dict(T=5, D=16, F=32, E=4, K=4),
    "T37-D40-F24": dict(T=37, D=40, F=24, E=6, K=2),
    "hot-expert": dict(T=37, D=24, F=40, E=5, K=2, hot_expert=2),
}


@pytest.fixture(params=["decode", "prefill"])
def path(request, monkeypatch):
    monkeypatch.setattr(fused, "DECODE_MAX_TOKENS", 1 << 30 if request.param == "decode" else 0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", CASES.values(), ids=CASES.keys())
def test_matches_float64_reference(shape, dtype, path):
    case = make_case(**shape, dtype=dtype)
    out, stats = run(case)
    assert stats["path"] == path
    assert out.dtype == dtype
    assert rel_err(out, reference(*case)) < TOLERANCE[dtype]


def test_strided_routing(path):
    """ids and weights as column views of wider tensors: the kernels index them by pair."""
    case = make_case(T=9, D=16, F=16, E=6, K=3, dtype=torch.float32)
    ids_TK, weights_TK = (torch.stack([t, -t - 1], dim=2).flatten(1)[:, ::2] for t in case[1:3])
    assert not ids_TK.is_contiguous() and torch.equal(ids_TK, case[1])
    out, _ = run((case[0], ids_TK, weights_TK, *case[3:]))
    assert rel_err(out, reference(*case)) < TOLERANCE[torch.float32]
    got = run_backward((case[0], ids_TK, weights_TK, *case[3:]), torch.ones_like(case[0]))
    assert_grads_match(got, reference_grads(case, torch.ones_like(case[0])), ids_TK, torch.float32)


def test_routing_weights_in_x_dtype(path):
    case = make_case(T=9, D=16, F=16, E=4, K=2, dtype=torch.float16)
    case = (*case[:2], case[2].half(), *case[3:])
    out, _ = run(case)
    assert rel_err(out, reference(*case)) < TOLERANCE[torch.float16]


def test_many_experts_few_tokens(path):
    case = make_case(T=64, D=16, F=16, E=1024, K=2, dtype=torch.float32)
    out, stats = run(case)
    # decode: room for a tall tile per expert with more than block_m rows
    tall = 128 // (stats["block_m"] + 1) if path == "decode" else 0
    big_slots = 128 // stats["big_m"] + tall if stats["big_m"] else 0
    assert stats["tile_slots"] == big_slots + -(-128 // stats["block_m"]) + 128
    assert rel_err(out, reference(*case)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    ("K", "combine"), [(2, "pairs"), (2, "atomic"), (1, "pairs")], ids=["pairs", "atomic", "K1"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_two_tile_heights_match_reference(monkeypatch, dtype, K, combine):
    """A hot expert among light ones (with K=1: every token on it): its full blocks run as
    tall tiles, its rest as short; each combine adds both launches' rows."""
    monkeypatch.setattr(fused, "BIG_M", 32)  # 128 would need hundreds of tokens per test
    case = make_case(T=100, D=24, F=40, E=16, K=K, dtype=dtype, hot_expert=3)
    out, stats = run(case, combine)
    assert (stats["path"], stats["block_m"], stats["big_m"]) == ("prefill", 16, 32)
    assert rel_err(out, reference(*case)) < TOLERANCE[dtype]
    dy_TD = torch.randn(100, 24, generator=torch.Generator().manual_seed(5))
    dy_TD = dy_TD.to(dtype=dtype, device=DEVICE)
    got = run_backward(case, dy_TD, combine)
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_decode_gives_a_crowded_expert_one_tall_tile(dtype):
    """Decode past 16 tokens: an expert with more than 16 rows (here all 40) runs as one
    DECODE_BIG_M-row tile, so its weights are read once; the others as 16-row tiles."""
    T, E = 40, 16
    case = make_case(T=T, D=24, F=40, E=E, K=2, dtype=dtype, hot_expert=3)
    out, stats = run(case)
    assert (stats["path"], stats["block_m"], stats["big_m"]) == ("decode", 16, fused.DECODE_BIG_M)
    assert rel_err(out, reference(*case)) < TOLERANCE[dtype]
    sched = fused.tile_schedule(case[1], E, 16, fused.DECODE_BIG_M, 16)
    tiles = [
        (e, end - start)
        for e, start, end in zip(*(t.tolist() for t in sched[2:5]), strict=True)
        if end > start
    ]
    assert [rows for e, rows in tiles if e == 3] == [T]
    assert all(rows <= 16 for e, rows in tiles if e != 3)
    dy_TD = torch.randn(T, 24, generator=torch.Generator().manual_seed(5))
    dy_TD = dy_TD.to(dtype=dtype, device=DEVICE)
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
    assert (stats["block_m"], stats["big_m"]) == (16, fused.BIG_M)
    assert rel_err(out, reference(*case)) < TOLERANCE[torch.float32]
    dy_TD = torch.randn(300, 16, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = run_backward(case, dy_TD)
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], torch.float32)


@pytest.mark.parametrize("F", [8, 16, 24, 40, 4096])
@pytest.mark.parametrize("path", fused.PATHS)
def test_big_tiles_fit_narrow_experts(path, F):
    """The big tiles' fixed configs: gate_up's column block and down's reduction block are
    cut to F as a power of two (at least 16) where F is narrower; on the prefill path, those
    that F leaves whole read through TMA; nothing else changes."""
    base, got = fused._BIG_CONFIG[path], fused._big_config(path, F)
    fit = max(16, 1 << (F - 1).bit_length())
    for kernel, dim in ((fused._gate_up_kernel, "BLOCK_N"), (fused._down_kernel, "BLOCK_K")):
        whole = base[kernel][dim] <= fit
        tma = {"TMA": True} if path == "prefill" and whole else {}
        assert got[kernel] == {**base[kernel], dim: min(base[kernel][dim], fit), **tma}
    assert got[fused._swiglu_backward_kernel] == base[fused._swiglu_backward_kernel]
    if F <= 16:
        assert got[fused._gate_up_kernel]["BLOCK_N"] == 16 < base[fused._gate_up_kernel]["BLOCK_N"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_big_tiles_read_through_tma_where_the_tensors_allow(monkeypatch, dtype):
    """Prefill's big tiles launch gate_up and down with TMA and their descriptors where the
    tensors allow it (16-bit), through pointers without (fp32: no descriptor); the output
    is the reference's either way."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    monkeypatch.setattr(fused, "BIG_M", 32)
    launches, direct = [], fused._run

    def spy(fn, grid, args, meta):
        if meta.get("BLOCK_M") == 32:
            has_desc = any(isinstance(a, TensorDescriptor) for a in args)
            launches.append((fn, bool(meta.get("TMA")), has_desc))
        direct(fn, grid, args, meta)

    monkeypatch.setattr(fused, "_run", spy)
    case = make_case(T=100, D=48, F=40, E=16, K=2, dtype=dtype, hot_expert=2)
    out, stats = run(case)
    assert (stats["block_m"], stats["big_m"]) == (16, 32)
    want = dtype == torch.float16
    assert {fn for fn, *_ in launches} == {fused._gate_up_kernel, fused._down_kernel}
    assert all(tma == want and has_desc == want for _, tma, has_desc in launches), launches
    assert rel_err(out, reference(*case)) < TOLERANCE[dtype]


@pytest.fixture
def tma_only(monkeypatch):
    """The prefill TMA tuners offer one TMA config (the interpreter reads descriptors too)."""
    import triton

    config = triton.Config(
        {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_SIZE_M": 4, "TMA": True},
        pre_hook=fused._fit_descriptors,
    )
    for tuners in (fused._GATE_UP, fused._DOWN):
        monkeypatch.setattr(tuners["prefill", True], "configs", [config])
    monkeypatch.setattr(fused, "_TUNED", {})


@pytest.mark.parametrize("two_heights", [False, True], ids=["one-height", "two-heights"])
@pytest.mark.parametrize("combine", fused.COMBINES)
def test_tma_configs_match_reference(monkeypatch, tma_only, combine, two_heights):
    """TMA boxes run past a tile's rows (into other experts' rows), past the gate half of
    an expert (into its up half), past D and F: none of that reaches the output. D = 48 and
    F = 40 are not multiples of the 32-wide blocks; the second call takes the cached path,
    which fits the boxes itself. TMA is for 16-bit inputs (bf16 is wrong under the
    interpreter, so fp16 here)."""
    dtype = torch.float16
    if two_heights:  # a hot expert among 16, with 32-row big tiles
        monkeypatch.setattr(fused, "BIG_M", 32)
        case = make_case(T=100, D=48, F=40, E=16, K=2, dtype=dtype, hot_expert=2)
    else:  # two experts of 100 rows each, in 128-row tiles
        case = make_case(T=100, D=48, F=40, E=2, K=2, dtype=dtype)
    out, stats = run(case, combine)
    assert stats["path"] == "prefill" and (stats["big_m"] > 0) == two_heights
    assert stats["config"]["gate_up"]["TMA"] and stats["config"]["down"]["TMA"]
    assert rel_err(out, reference(*case)) < TOLERANCE[dtype]
    again, _ = run(case, combine)
    assert combine == "atomic" or torch.equal(again, out)
    if combine == "pairs":
        dy_TD = torch.randn(100, 48, generator=torch.Generator().manual_seed(5))
        dy_TD = dy_TD.to(dtype=dtype, device=DEVICE)
        got = run_backward(case, dy_TD, combine)
        assert_grads_match(got, reference_grads(case, dy_TD), case[1], dtype)


@pytest.mark.parametrize(
    ("D", "K", "combine", "two_heights"),
    [(80, 2, "pairs", False), (150, 2, "atomic", False), (150, 1, "pairs", False),
     (80, 2, "pairs", True)],
    ids=["D80-pairs", "D150-atomic", "D150-K1", "two-heights"],
)  # fmt: skip
def test_down_programs_looping_over_column_blocks(monkeypatch, D, K, combine, two_heights):
    """Three 32-wide column blocks a program: D = 80 is one group, the last block partial;
    D = 150 is two groups, the second with a block past D. dx takes the same kernel."""
    import triton

    config = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_SIZE_M": 4, "N_BLOCKS": 3})
    for tma in (False, True):
        monkeypatch.setattr(fused._DOWN["prefill", tma], "configs", [config])
    monkeypatch.setattr(fused, "_TUNED", {})
    if two_heights:
        monkeypatch.setattr(fused, "BIG_M", 32)
    hot = 3 if two_heights else None
    case = make_case(T=100, D=D, F=24, E=16, K=K, dtype=torch.float32, hot_expert=hot)
    out, stats = run(case, combine)
    assert stats["path"] == "prefill" and stats["config"]["down"]["N_BLOCKS"] == 3
    assert not two_heights or stats["big_m"] == 32
    assert rel_err(out, reference(*case)) < TOLERANCE[torch.float32]
    dy_TD = torch.randn(100, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = run_backward(case, dy_TD, combine)
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], torch.float32)


def test_prune_loops_column_blocks_for_one_step_reductions_only(monkeypatch):
    monkeypatch.setattr(fused, "_INTERPRET", False)  # the compiled search spaces
    configs = fused._configs("prefill", "down", tma=True)
    for F, block_m, offered in [(8, 16, True), (32, 32, True), (64, 16, False), (8, 64, False)]:
        kept = fused._prune("down")(configs, {"F": F}, BLOCK_M=block_m)
        looped = [c for c in kept if c.kwargs.get("N_BLOCKS", 1) > 1]
        assert bool(looped) == offered, (F, block_m)
        assert all(c.kwargs["BLOCK_K"] >= F for c in looped)


def test_prune_offers_persistent_configs_with_tma_only(monkeypatch):
    """The persistent configs are TMA configs, for tiles of 64 rows or more; their blocks
    over F (gate_up's 128 columns, down's 64-deep reduction) for wide experts only (near F);
    never on the decode path."""
    monkeypatch.setattr(fused, "_INTERPRET", False)  # the compiled search spaces
    for kernel in ("gate_up", "down"):
        configs = fused._configs("prefill", kernel, tma=True)
        persistent = [c for c in configs if c.kwargs.get("PERSISTENT")]
        assert persistent and all(c.kwargs["TMA"] for c in persistent)
        assert not any(c.kwargs.get("PERSISTENT") for c in fused._configs("decode", kernel))
        assert not any(c.kwargs.get("PERSISTENT") for c in fused._configs("prefill", kernel))
        for F, block_m in [(1024, 128), (1024, 64), (1024, 32), (8, 128)]:
            kept = fused._prune(kernel)(configs, {"F": F}, BLOCK_M=block_m)
            offered = any(c.kwargs.get("PERSISTENT") for c in kept)
            assert offered == (block_m >= 64 and F == 1024), (kernel, F, block_m)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("combine", fused.COMBINES)
def test_persistent_configs_match_the_one_item_programs(monkeypatch, tma, combine):
    """A persistent config runs the same items in programs that loop over them (two
    programs under the interpreter, each taking several items at both tile heights): the
    output is the reference's, and with the pairs combine the one-item-a-program config's
    bit for bit; so are the gradients, whose dx goes through the down kernel. The search
    space's persistent configs read through TMA; the pointer case checks the loop in fp32."""
    import triton

    dtype = torch.float16 if tma else torch.float32
    monkeypatch.setattr(fused, "BIG_M", 32)
    case = make_case(T=100, D=48, F=40, E=16, K=2, dtype=dtype, hot_expert=2)
    dy_TD = torch.randn(100, 48, generator=torch.Generator().manual_seed(5))
    dy_TD = dy_TD.to(dtype=dtype, device=DEVICE)
    outs = []
    for persistent in (False, True):
        flags = {"TMA": True} if tma else {}
        flags |= {"PERSISTENT": True} if persistent else {}
        config = triton.Config(
            {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_SIZE_M": 4, **flags},
            pre_hook=fused._fit_descriptors,
        )
        for tuners in (fused._GATE_UP, fused._DOWN):
            monkeypatch.setattr(tuners["prefill", tma], "configs", [config])
        monkeypatch.setattr(fused, "_TUNED", {})
        out, stats = run(case, combine)
        assert stats["path"] == "prefill" and stats["big_m"] == 32
        assert stats["config"]["gate_up"].get("PERSISTENT", False) == persistent
        assert stats["config"]["down"].get("PERSISTENT", False) == persistent
        again, _ = run(case, combine)  # the tuned, direct path
        assert combine == "atomic" or torch.equal(again, out)
        outs.append(out)
        got = run_backward(case, dy_TD, combine)
        assert_grads_match(got, reference_grads(case, dy_TD), case[1], dtype)
    assert rel_err(outs[1], reference(*case)) < TOLERANCE[dtype]
    if combine == "pairs":
        assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 loads are wrong under the interpreter")
@pytest.mark.parametrize("pick", [0, -1], ids=["first", "last"])
def test_persistent_search_configs_match_the_one_item_programs(monkeypatch, pick):
    """The search space's persistent configs (each kernel's first, then its last: gate_up
    has two), compiled with their loops flattened, at bf16 and 128-row tiles: the output is
    that of the same blocks one item a program, bit for bit."""
    import triton

    case = make_case(T=1024, D=512, F=256, E=8, K=2, dtype=torch.bfloat16)
    outs = []
    for persistent in (False, True):
        for kernel, tuners in (("gate_up", fused._GATE_UP), ("down", fused._DOWN)):
            configs = fused._configs("prefill", kernel, tma=True)
            config = [c for c in configs if c.kwargs.get("PERSISTENT")][pick]
            kwargs = {k: v for k, v in config.kwargs.items() if persistent or k != "PERSISTENT"}
            config = triton.Config(
                kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
                pre_hook=config.pre_hook,
            )  # fmt: skip
            monkeypatch.setattr(tuners["prefill", True], "configs", [config])
        monkeypatch.setattr(fused, "_TUNED", {})
        out, stats = run(case)
        assert (stats["block_m"], stats["big_m"]) == (128, 0)
        assert stats["config"]["down"].get("PERSISTENT", False) == persistent
        outs.append(out)
    assert rel_err(outs[1], reference(*case)) < 1e-2
    assert torch.equal(outs[0], outs[1])


def test_tma_only_where_tensors_allow_it(tma_only):
    """A descriptor needs 16-bit elements, a unit last stride and 16-byte aligned rows and
    base; without one, the kernel takes the pointer tuner."""
    rows = torch.zeros(4, 16, dtype=torch.float16)
    assert fused._descriptor(rows) is not None
    assert fused._descriptor(rows.float()) is None  # fp32
    assert fused._descriptor(torch.zeros(4, 12, dtype=torch.float16)) is None  # 24-byte rows
    assert fused._descriptor(rows[:, 1:9]) is None  # base 2 bytes past alignment
    assert fused._descriptor(rows[:, :8].T) is None  # strided last dimension
    # D = 12: gate_up's [E * 2F, D] rows are 24 bytes; down's [E * D, F] rows are 80.
    case = make_case(T=100, D=12, F=40, E=6, K=2, dtype=torch.float16)
    out, stats = run(case)
    assert "TMA" not in stats["config"]["gate_up"] and stats["config"]["down"]["TMA"]
    assert rel_err(out, reference(*case)) < TOLERANCE[torch.float16]


def test_one_tile_height_when_tiles_are_tall():
    _, stats = run(make_case(T=200, D=16, F=16, E=2, K=1, dtype=torch.float32))
    assert (stats["block_m"], stats["big_m"]) == (fused.BIG_M, 0)


def test_prune_keeps_blocks_near_the_expert_width(monkeypatch):
    monkeypatch.setattr(fused, "_INTERPRET", False)  # the compiled search spaces
    gate_up, down = fused._configs("prefill", "gate_up"), fused._configs("prefill", "down")
    block = lambda configs, dim: {c.kwargs[dim] for c in configs}
    assert block(fused._prune("gate_up")(gate_up, {"F": 8}, BLOCK_M=16), "BLOCK_N") == {16}
    assert block(fused._prune("gate_up")(gate_up, {"F": 64}, BLOCK_M=16), "BLOCK_N") == {32, 64}
    wide = fused._prune("gate_up")(gate_up, {"F": 1024}, BLOCK_M=128)
    assert 16 not in block(wide, "BLOCK_N") and len(wide) > 4
    # 256-deep blocks (decode's) for short tiles only
    for block_m, deep in [(16, True), (32, True), (64, False), (128, False)]:
        kept = fused._prune("gate_up")(gate_up, {"F": 1024}, BLOCK_M=block_m)
        assert (256 in block(kept, "BLOCK_K")) == deep, block_m
    narrow_down = fused._prune("down")(down, {"F": 8}, BLOCK_M=16)
    assert block(narrow_down, "BLOCK_K") == {16} and 256 in block(narrow_down, "BLOCK_N")
    tall_down = fused._prune("down")(down, {"F": 1024}, BLOCK_M=128)
    assert 16 not in block(tall_down, "BLOCK_K")
    wide_tall = [c for c in tall_down if c.kwargs["BLOCK_N"] == 256]
    assert wide_tall and all(c.num_warps == 8 for c in wide_tall), "4-warp 256-wide spills at M=128"


def test_prune_offers_tma_to_tall_tiles_only(monkeypatch):
    monkeypatch.setattr(fused, "_INTERPRET", False)  # the compiled search spaces
    for kernel in ("gate_up", "down"):
        configs = fused._configs("prefill", kernel, tma=True)
        assert not any(c.kwargs.get("TMA") for c in fused._configs("prefill", kernel))
        for block_m in (16, 32, 64, 128):
            kept = fused._prune(kernel)(configs, {"F": 1024}, BLOCK_M=block_m)
            tma = [c for c in kept if c.kwargs.get("TMA")]
            assert bool(tma) == (block_m >= 64), (kernel, block_m)
            assert all(c.pre_hook is fused._fit_descriptors for c in kept)


@pytest.mark.parametrize("kernel", ["gate_up", "down", "swiglu_backward"])
def test_prune_keeps_accumulators_in_registers(monkeypatch, kernel):
    """At every tile height and expert width, what is offered holds its fp32 accumulators
    in 128 registers a thread, and something is always offered."""
    monkeypatch.setattr(fused, "_INTERPRET", False)
    accumulators = {"gate_up": 2, "down": 1, "swiglu_backward": 3}[kernel]
    for path in fused.PATHS:
        configs = (
            fused._swiglu_backward_configs(path)
            if kernel == "swiglu_backward"
            else fused._configs(path, kernel)
        )
        for block_m in (16, 32, 64, 128):
            for F in (8, 24, 64, 1024, 14336):
                kept = fused._prune(kernel)(configs, {"F": F}, BLOCK_M=block_m)
                assert kept, (path, block_m, F)
                per_thread = [accumulators * block_m * c.kwargs["BLOCK_N"] / (32 * c.num_warps)
                              for c in kept]  # fmt: skip
                assert max(per_thread) <= 128, (path, block_m, F)


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


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter launches through triton")
@pytest.mark.parametrize("T", [1, 8, 300], ids=["one-token", "counted", "two-heights"])
def test_direct_launches_give_the_first_calls_output(monkeypatch, T):
    """From the third call on every kernel is launched straight (fused._run); the output
    stays the first call's, bit for bit (tests/test_launch.py checks the arguments)."""
    monkeypatch.setattr(fused, "_COMPILED", {})
    case = make_case(T=T, D=64, F=32, E=16, K=2, dtype=torch.bfloat16, hot_expert=1)
    outputs = [run(case)[0] for _ in range(3)]
    assert fused._COMPILED, "no kernel was armed for direct launches"
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
    assert rel_err(first, atomic.double().cpu()) < 1e-6


def test_unknown_combine_is_refused():
    case = make_case(T=4, D=16, F=16, E=4, K=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown combine 'tree'"):
        run(case, combine="tree")


def test_path_is_chosen_by_token_count():
    limit = fused.DECODE_MAX_TOKENS
    for T, expected in ((limit, "decode"), (limit + 1, "prefill")):
        _, stats = run(make_case(T=T, D=16, F=16, E=2, K=1, dtype=torch.float32))
        assert stats["path"] == expected


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the refusal on CPU tensors")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(fused, "_INTERPRET", False)
    case = make_case(T=2, D=16, F=16, E=2, K=1, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="needs a CUDA device, or TRITON_INTERPRET=1"):
        fused.forward(*case, torch.empty_like(case[0]), None)


# Backward: gradients of x, the routing weights, gate_up and down through the autograd op.
GRAD_TOLERANCE = TOLERANCE | {torch.bfloat16: 3e-2}
# Weights wider than the interpreter's 64-wide weight-gradient tiles, in both dimensions.
GRAD_CASES = CASES | {"D72-F40": dict(T=9, D=72, F=40, E=3, K=2)}


def leaves(case):
    """Fresh leaf copies of the differentiable inputs: x, weights, gate_up, down."""
    return [t.detach().clone().requires_grad_() for t in (case[0], *case[2:])]


def reference_grads(case, dy_TD):
    """Float64 autograd through the reference loop."""
    x, w, gate_up, down = leaves([t.double().cpu() for t in case])
    reference(x, case[1].cpu(), w, gate_up, down).backward(dy_TD.double().cpu())
    return [t.grad for t in (x, w, gate_up, down)]


def run_backward(case, dy_TD, combine="pairs", requires_grad=(True,) * 4):
    """forward into a NaN-poisoned out, then backward(dy); the four grads (None if not asked)."""
    x, w, gate_up, down = inputs = leaves(case)
    for t, flag in zip(inputs, requires_grad, strict=True):
        t.requires_grad_(flag)
    out = torch.full_like(x, float("nan"))
    fused.forward(x, case[1], w, gate_up, down, out, None, combine=combine)
    out.backward(dy_TD)
    return [t.grad for t in inputs]


def idle_experts(ids_TK, E):
    idle = torch.ones(E, dtype=torch.bool)
    idle[ids_TK.flatten().cpu()] = False
    return idle


def assert_grads_match(got, want, ids_TK, dtype):
    for name, g, w in zip(("x", "weights", "gate_up", "down"), got, want, strict=True):
        assert g.dtype == (torch.float32 if name == "weights" else dtype), name
        assert rel_err(g, w) < GRAD_TOLERANCE[dtype], name
    idle = idle_experts(ids_TK, got[2].shape[0]).to(got[2].device)
    assert (got[2][idle] == 0).all() and (got[3][idle] == 0).all(), "idle expert gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradients_match_float64_reference(shape, dtype, path):
    case = make_case(**shape, dtype=dtype)
    dy_TD = torch.randn(shape["T"], shape["D"], generator=torch.Generator().manual_seed(5))
    dy_TD = dy_TD.to(dtype=dtype, device=DEVICE)
    got = run_backward(case, dy_TD)
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], dtype)


@pytest.mark.parametrize("combine", fused.COMBINES)
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
    assert rel_err(got[wanted], want[wanted]) < GRAD_TOLERANCE[torch.float32]


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
    assert all(rel_err(a, b.double().cpu()) < 1e-6 for a, b in zip(atomic, first, strict=True))


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 loads are wrong under the interpreter")
@pytest.mark.parametrize("T", [20, 300], ids=["decode", "prefill"])
def test_bf16_gradients_match_float64_reference(T):
    case = make_case(T=T, D=256, F=128, E=8, K=2, dtype=torch.bfloat16)
    dy_TD = torch.randn(T, 256, device=DEVICE, dtype=torch.bfloat16)
    got = run_backward(case, dy_TD)
    assert_grads_match(got, reference_grads(case, dy_TD), case[1], torch.bfloat16)


# Each config an autotuner can pick, forced in turn, at decode, at prefill in 128-row tiles
# (the TMA configs) and at narrow experts in 16-row tiles. On a GPU every config runs (the
# conftest has the other tests take each tuner's first); the interpreter, whose cost is per
# program and op, runs the last of each list (at prefill, a TMA config).
FORCED = {
    "decode": dict(T=16, D=128, F=128, E=8, K=2),
    "prefill": dict(T=256, D=64, F=128, E=4, K=2),
    "narrow": dict(T=128, D=64, F=16, E=64, K=2),
}
FORCED_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def tuners_and_configs(kernel, shape):
    """The tuners a call at `shape` uses for `kernel`, and the configs they can pick there."""
    path = "decode" if shape["T"] <= fused.DECODE_MAX_TOKENS else "prefill"
    block_m = fused._block_m(path, fused._pow2(shape["T"]), shape["K"], shape["E"])
    tma = path == "prefill"  # 16-bit, aligned inputs: the TMA tuners
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fused, "_INTERPRET", False)  # the compiled search spaces
        if kernel == "expert_grad":
            return list(fused._EXPERT_GRAD.values()), fused._expert_grad_configs()
        if kernel == "swiglu_backward":
            tuners, configs = [fused._SWIGLU_BACKWARD[path]], fused._swiglu_backward_configs(path)
        else:
            tuners = [(fused._GATE_UP if kernel == "gate_up" else fused._DOWN)[path, tma]]
            configs = fused._configs(path, kernel, tma)
    kept = fused._prune(kernel)(configs, {"F": shape["F"]}, BLOCK_M=block_m)
    return tuners, kept if DEVICE == "cuda" else kept[-1:]


def forced_runs(monkeypatch, tuners, configs, run_one):
    """run_one() under each config in turn; the configs that failed, with why."""
    from triton.runtime.errors import OutOfResources

    failures = []
    for config in configs:
        for tuner in tuners:
            monkeypatch.setattr(tuner, "configs", [config])
        monkeypatch.setattr(fused, "_TUNED", {})
        try:
            run_one(config)
        except OutOfResources:  # what the autotuner skips on this device
            continue
        except AssertionError as e:
            failures.append((config.all_kwargs(), str(e).splitlines()[0]))
    return failures


@pytest.mark.parametrize("shape", FORCED.values(), ids=FORCED.keys())
@pytest.mark.parametrize("kernel", ["gate_up", "down"])
def test_every_forward_config_matches_reference(monkeypatch, kernel, shape):
    case = make_case(**shape, dtype=FORCED_DTYPE)
    want = reference(*case)
    tuners, configs = tuners_and_configs(kernel, shape)

    def run_one(config):
        out, stats = run(case)
        assert stats["config"][kernel] == config.all_kwargs(), "the config was not forced"
        assert rel_err(out, want) < GRAD_TOLERANCE[FORCED_DTYPE], rel_err(out, want)

    assert not forced_runs(monkeypatch, tuners, configs, run_one)


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter offers one config, untimed")
def test_tuners_time_their_candidates_on_the_gpu(monkeypatch):
    """The conftest has the other GPU tests skip the timing; here the decode tuners time
    each candidate their pruning keeps with _tuning_bench, and keep the fastest."""
    tuners = [fused._GATE_UP["decode", False], fused._DOWN["decode", False]]
    for tuner in tuners:
        monkeypatch.setattr(tuner, "_do_bench", fused._tuning_bench)
        monkeypatch.delitem(tuner.__dict__, "do_bench", raising=False)  # a cached_property
        monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(fused, "_TUNED", {})
    case = make_case(T=8, D=256, F=128, E=16, K=4, dtype=torch.bfloat16)
    out, stats = run(case)
    assert rel_err(out, reference(*case)) < GRAD_TOLERANCE[torch.bfloat16]
    for tuner, kernel in zip(tuners, ("gate_up", "down"), strict=True):
        timings = {c.all_kwargs().__repr__(): t[0] for c, t in tuner.configs_timings.items()}
        assert len(timings) > 1 and all(0 < t < float("inf") for t in timings.values()), timings
        assert timings[repr(stats["config"][kernel])] == min(timings.values())


BACKWARD_FORCED = {f"swiglu_backward-{name}": ("swiglu_backward", s) for name, s in FORCED.items()}
BACKWARD_FORCED["expert_grad"] = ("expert_grad", FORCED["prefill"])


@pytest.mark.parametrize(("kernel", "shape"), BACKWARD_FORCED.values(), ids=BACKWARD_FORCED.keys())
def test_every_backward_config_matches_reference(monkeypatch, kernel, shape):
    """The weight-gradient kernel's configs do not depend on the expert width: one shape."""
    case = make_case(**shape, dtype=FORCED_DTYPE)
    dy_TD = torch.randn(shape["T"], shape["D"], generator=torch.Generator().manual_seed(5))
    dy_TD = dy_TD.to(dtype=FORCED_DTYPE, device=DEVICE)
    want = reference_grads(case, dy_TD)
    tuners, configs = tuners_and_configs(kernel, shape)

    def run_one(config):
        assert_grads_match(run_backward(case, dy_TD), want, case[1], FORCED_DTYPE)

    assert not forced_runs(monkeypatch, tuners, configs, run_one)


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
        return fused.forward(x, ids, w, gate_up, down, torch.empty_like(x), None)

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
    assert all(rel_err(t.grad, g.double().cpu()) < 1e-6 for t, g in zip(inputs, eager, strict=True))
