"""The `triton` layer's tile schedule: every pair in one tile of its expert, the counting
schedule of decode equal to the sorted one, one token with no schedule launch, and the
sections' program counts.

T tokens, E experts, K experts per token, S = T*K.
"""

import pytest
import torch
from triton_cases import DEVICE, assert_matches, make_case, run

import moebench.impls.triton as triton_layer
from moebench.impls.triton import configs, launch, schedule
from moebench.impls.triton.schedule import TileSchedule


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
    sched = schedule.tile_schedule(ids_TK.to(DEVICE), E, block_m, big_m, tall_over)
    sched = TileSchedule(*(t.cpu() for t in sched))
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
def test_counted_schedule_equals_sorted(T, E, K, block_m, routing):
    # The one-launch schedule of decode against the sort-based one, bit for bit; ids may
    # repeat within a token, and 64 * 8 pairs is the largest counted schedule.
    g = torch.Generator().manual_seed(T * E + K)
    if routing == "distinct":
        ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    elif routing == "few-experts":
        ids_TK = torch.randint(0, min(E, 3), (T, K), generator=g)
    else:
        ids_TK = torch.full((T, K), E - 1)
    assert T * K <= configs.COUNTED_MAX_PAIRS
    assert_counted_equals_sorted(ids_TK, E, block_m)


def assert_counted_equals_sorted(ids_TK, E, block_m):
    counted = schedule.tile_schedule(ids_TK.to(DEVICE), E, block_m)
    with configs.set_knobs(COUNTED_MAX_PAIRS=0):
        sorted_ = schedule.tile_schedule(ids_TK.to(DEVICE), E, block_m)
    for name, a, b in zip(TileSchedule._fields, counted, sorted_, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("T, E, K", [(37, 12, 3), (20, 300, 4), (33, 2, 2)])
def test_counted_schedule_in_the_gpu_blocks(T, E, K):
    """The interpreter counts in one wide step; the GPU's blocks take several programs and
    steps (and the triangular inner loop), checked here on fewer, smaller cases."""
    blocks = configs.SCHEDULE_BLOCKS | {"counted": configs.COUNTED_BLOCKS}
    g = torch.Generator().manual_seed(T)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids_TK[:, 0] = ids_TK[0, 0]  # a hot expert with more than one 16-row tile
    assert 2 * configs.COUNTED_BLOCKS["CHUNK"] < T * K  # several steps
    with configs.set_knobs(SCHEDULE_BLOCKS=blocks):
        assert configs.SCHEDULE_BLOCKS["counted"] == configs.COUNTED_BLOCKS
        assert_counted_equals_sorted(ids_TK, E, 16)


def test_decode_counts_instead_of_sorting(monkeypatch):
    def no_sort(*args, **kwargs):
        raise AssertionError("the decode schedule sorted")

    monkeypatch.setattr(torch, "sort", no_sort)
    case = make_case(T=8, D=16, F=32, E=16, K=4, dtype=torch.float32)
    out_TD, stats = run(case)
    assert stats["path"] == "decode"
    assert_matches(out_TD, case, torch.float32)


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
    triton_layer.forward(with_grad[0], ids_TK, case[2], with_grad[1], case[4], sorted_out, None)

    def no_schedule(*args, **kwargs):
        raise AssertionError("one token built a sorted or counted schedule")

    monkeypatch.setattr(schedule, "tile_schedule", no_schedule)
    out, stats = run(case)
    assert (stats["path"], stats["tile_slots"]) == ("decode", K)
    assert_matches(out, case, dtype)
    assert torch.equal(out, sorted_out.detach())


def test_programs_loop_where_most_slots_stay_empty():
    """A section launches a program per slot's items, or as many as its S rows make in full
    tiles where that is fewer, but never fewer than the device holds at once."""
    # scale-out at E=8192 (S=32768, 16-row tiles, 8 column blocks) on a 132-SM GPU
    section = launch.Section(0, 10240, 16, None, 1, packed=2048, floor=132 * 32, sms=132)
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
        schedule.tile_schedule(ids_TK, 2, 16, 16)
