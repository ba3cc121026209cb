"""Tests specific to the `triton` layer: its tile schedule, both paths, the deterministic combine.

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
            torch.tensor([e for e in row.tolist() if e != hot_expert][: K - 1]) for row in ids_TK
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


def run(case, deterministic=False):
    """Call forward on a NaN-poisoned output; return it and the stats."""
    x_TD = case[0]
    out_TD = torch.full_like(x_TD, float("nan"))
    stats = {}
    assert fused.forward(*case, out_TD, stats, deterministic=deterministic) is out_TD
    assert not out_TD.isnan().any(), "some output elements were not written"
    return out_TD, stats


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("block_m", [4, 16])
@pytest.mark.parametrize(
    "T, E, K, hot",
    [
        (1, 8, 1, False),
        (1, 8, 8, False),
        (37, 12, 3, False),
        (50, 12, 2, True),
        (5, 8192, 2, False),
    ],
    ids=["T1-K1", "T1-K=E", "T37-E12-K3", "hot-expert", "E8192"],
)
def test_tile_schedule_covers_every_pair_once(T, E, K, hot, block_m):
    g = torch.Generator().manual_seed(1)
    # Only some experts receive pairs, with uneven counts; the rest are empty.
    used = torch.randperm(E, generator=g)[: max(K, E // 3)]
    ids_TK = torch.stack([used[torch.randperm(used.numel(), generator=g)[:K]] for _ in range(T)])
    if hot:
        ids_TK[:, 0] = used[0]
        ids_TK[:, 1] = used[1 + torch.arange(T) % (used.numel() - 1)]
    S = T * K
    sched = fused.tile_schedule(ids_TK, E, block_m)
    ids_S = ids_TK.reshape(-1)
    sorted_ids = ids_S[sched.order_S]

    assert sorted(sched.order_S.tolist()) == list(range(S))
    assert (sorted_ids.diff() >= 0).all()
    same_expert = sorted_ids[1:] == sorted_ids[:-1]
    assert (sched.order_S.diff()[same_expert] > 0).all(), "sort is not stable"

    assert sched.expert_N.numel() == -(-S // block_m) + min(E, S)
    covered = torch.zeros(S, dtype=torch.long)
    tiles = 0
    for e, start, end in zip(*(t.tolist() for t in sched[1:]), strict=True):
        if start == end:
            continue
        tiles += 1
        assert 0 < end - start <= block_m
        assert (sorted_ids[start:end] == e).all(), "a tile mixes experts"
        covered[start:end] += 1
    assert (covered == 1).all(), "a sorted row is not covered exactly once"
    counts_E = torch.bincount(ids_S, minlength=E)
    assert tiles == int((-(-counts_E // block_m)).sum()), "empty experts got tiles"


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


def test_routing_weights_in_x_dtype(path):
    case = make_case(T=9, D=16, F=16, E=4, K=2, dtype=torch.float16)
    case = (*case[:2], case[2].half(), *case[3:])
    out, _ = run(case)
    assert rel_err(out, reference(*case)) < TOLERANCE[torch.float16]


def test_many_experts_few_tokens(path):
    case = make_case(T=64, D=16, F=16, E=1024, K=2, dtype=torch.float32)
    out, stats = run(case)
    assert stats["tile_slots"] == -(-128 // stats["block_m"]) + 128
    assert rel_err(out, reference(*case)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("T", [20, 100], ids=["decode", "prefill"])
def test_deterministic_is_bitwise_reproducible(T):
    case = make_case(T=T, D=40, F=24, E=6, K=3, dtype=torch.float32)
    first, stats = run(case, deterministic=True)
    second, _ = run(case, deterministic=True)
    assert stats["combine"] == "store-pairs"
    assert torch.equal(first, second)
    atomic, stats = run(case)
    assert stats["combine"] == "atomic"
    assert rel_err(first, atomic.double().cpu()) < 1e-6


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
