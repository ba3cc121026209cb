"""Expert parallelism on gloo: ranks are processes of this machine (moebench.parallel.launch).

Each launch runs many cases in its ranks, since starting processes is the slow part; a
case's inputs are seeded, so every rank builds the whole layer and checks its share.
"""

import math

import pytest
import torch
import torch.distributed as dist

import moebench as mb
import moebench.parallel as mp
from moebench.bench.oracle import tolerance

SKEWS = ("balanced", "random", "zipf:1.2", "hot:0.5", "collapse")


def _device():
    return f"cuda:{dist.get_rank()}" if dist.get_backend() == "nccl" else "cpu"


def _case(E, K, tokens_W, dtype=torch.float32, shared=0, skew="random", seed=0):
    """The whole layer (every rank builds the same, on its device) and this rank's token
    slice."""
    cfg = mb.MoEConfig(
        d_model=24, d_ff=16, num_experts=E, top_k=K, num_shared_experts=shared, dtype="float32"
    )
    device = _device()
    weights = mb.ExpertWeights.random(cfg, seed=seed).to(device, dtype)
    T = sum(tokens_W)
    routing = mb.make_routing(T, cfg, skew=skew, seed=seed, device=device)
    x = torch.randn(T, cfg.d_model, generator=torch.Generator().manual_seed(seed + 1))
    x = x.to(device, dtype)
    rank = dist.get_rank()
    start = sum(tokens_W[:rank])
    mine = slice(start, start + tokens_W[rank])
    return weights, routing, x, mine


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _forward_cases(world, impl, skews, dtype, dedup=True):
    """Per case: the worst relative error of this rank's output against the float64
    oracle on all tokens, and the traffic ep_forward reported against mp.traffic's."""
    out = []
    rank = dist.get_rank()
    # Uneven expert blocks (E mod W != 0), a rank with no tokens, shared experts.
    layouts = [
        (10, 3, [5 + 3 * r for r in range(world)], 0),
        (8, 2, [0 if r == world - 1 else 7 for r in range(world)], 1),
    ]
    for skew in skews:
        for E, K, tokens_W, shared in layouts:
            weights, routing, x, mine = _case(E, K, tokens_W, dtype, shared, skew)
            local = mp.shard_weights(weights, rank, world)
            mine_routing = mb.Routing(routing.ids[mine], routing.weights[mine])
            options = {"capacity_factor": None} if impl == "padded" else {}
            stats = {}
            y = mp.ep_forward(
                x[mine], mine_routing, local, impl=impl, stats=stats, dedup=dedup, **options
            )
            ref = mb.reference(x, routing, weights)[mine]
            counts = mp.row_counts(routing.ids, E, world, tokens_W, dedup=dedup)
            slots = K if dedup else 1
            traffic = mp.traffic(counts, 24, x.element_size(), slots)
            expect = {k: v[rank] for k, v in traffic.items()}
            got = {k: stats[k] for k in expect}
            err = _rel(y, ref) if y.numel() else 0.0
            ok = y.dtype == dtype and y.shape == x[mine].shape
            out.append((skew, E, ok, err, got, expect, stats["rows_recv"]))
            out.append(("rows", stats["rows_recv"], int(counts[:, rank].sum())))
            pairs = mp.row_counts(routing.ids, E, world, tokens_W, dedup=False)
            out.append(("rows", stats["pairs_recv"], int(pairs[:, rank].sum())))
    return out


@pytest.mark.parametrize(("world", "dedup"), [(2, True), (3, True), (4, True), (3, False)])
def test_ep_forward_equals_the_single_process_layer(world, dedup):
    results = mp.launch(_forward_cases, world, world, "sorted", SKEWS, torch.float32, dedup)
    idle = 0  # ranks whose experts receive nothing: every token on the same 2 of E=8
    for rank_results in results:
        for case in rank_results:
            if case[0] == "rows":
                assert case[1] == case[2]
                continue
            skew, E, shape_ok, err, got, expect, received = case
            assert shape_ok
            assert err < tolerance(torch.float32), (skew, E, err)
            assert got == expect, (skew, E)
            idle += (skew, E, received) == ("collapse", 8, 0)
    assert idle >= world - 2


@pytest.mark.parametrize(
    ("impl", "dtype"),
    [("naive", torch.float32), ("padded", torch.float32), ("triton", torch.float16)],
)
def test_ep_forward_runs_every_local_impl(impl, dtype):
    results = mp.launch(_forward_cases, 2, 2, impl, ("zipf:1.2",), dtype)
    errors = [c[3] for r in results for c in r if c[0] != "rows"]
    assert errors and max(errors) < tolerance(dtype)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between ranks needs 2 GPUs")
def test_ep_forward_over_nccl():
    results = mp.launch(_forward_cases, 2, 2, "sorted", SKEWS, torch.bfloat16, backend="nccl")
    errors = [c[3] for r in results for c in r if c[0] != "rows"]
    assert errors and max(errors) < tolerance(torch.bfloat16)


def _fail_on_rank_1(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF, error=RuntimeError):
    if dist.get_rank() == 1:
        raise error("planted")
    return torch.zeros_like(x_TD)


def _nan_on_rank_1(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    return torch.full_like(x_TD, math.nan if dist.get_rank() == 1 else 0.0)


def _oom_on_rank_1(*args):
    return _fail_on_rank_1(*args, error=torch.OutOfMemoryError)


def _failures_in_the_local_experts(world):
    """One rank's local experts raise: every rank raises, and the group stays usable."""
    weights, routing, x, mine = _case(8, 2, [5] * world)
    r = mb.Routing(routing.ids[mine], routing.weights[mine])
    local = mp.shard_weights(weights, dist.get_rank(), world)
    raised = []
    for impl in ("test_parallel:_fail_on_rank_1", "test_parallel:_oom_on_rank_1"):
        try:
            mp.ep_forward(x[mine], r, local, impl=impl)
            raised.append(None)
        except Exception as e:
            raised.append((type(e).__name__, str(e)))
    y = mp.ep_forward(x[mine], r, local)
    return raised, _rel(y, mb.reference(x, routing, weights)[mine])


def test_a_failure_in_one_ranks_experts_raises_on_every_rank():
    for raised, err in mp.launch(_failures_in_the_local_experts, 3, 3):
        assert raised == [
            (
                "RuntimeError",
                "ep_forward failed in its local experts: rank 1: RuntimeError: planted",
            ),
            (
                "OutOfMemoryError",
                "ep_forward failed in its local experts: rank 1: OutOfMemoryError: planted",
            ),
        ]
        assert err < 1e-5


def _backward_case(world):
    """Gradients of x, the routing weights, this rank's experts and the shared experts
    (summed over ranks) against the single-process layer's."""
    rank = dist.get_rank()
    weights, routing, x, mine = _case(10, 3, [6, 0, 9, 4][:world], torch.float64, 1, "zipf:1.2")
    dy = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7))

    def leaves(w, rw, xx):
        return [xx, rw, *w.tensors().values()]

    full_w = mb.ExpertWeights(**{k: t.clone() for k, t in weights.tensors().items()})
    full_rw, full_x = routing.weights.clone(), x.clone()
    for t in leaves(full_w, full_rw, full_x):
        t.requires_grad_(True)
    mb.moe_forward(full_x, mb.Routing(routing.ids, full_rw), full_w, impl="naive").backward(dy)

    local = mp.shard_weights(weights, rank, world)
    local_w = mb.ExpertWeights(
        **{k: t.detach().clone().requires_grad_(True) for k, t in local.weights.tensors().items()}
    )
    local = mp.LocalExperts(local_w, 10, rank, world)
    rw = routing.weights[mine].clone().requires_grad_(True)
    xx = x[mine].clone().requires_grad_(True)
    mp.ep_forward(xx, mb.Routing(routing.ids[mine], rw), local).backward(dy[mine])
    start, stop = local.block
    shared = [local_w.shared_gate_up.grad, local_w.shared_down.grad]
    for g in shared:
        dist.all_reduce(g)
    pairs = [
        (xx.grad, full_x.grad[mine]),
        (rw.grad, full_rw.grad[mine]),
        (local_w.gate_up.grad, full_w.gate_up.grad[start:stop]),
        (local_w.down.grad, full_w.down.grad[start:stop]),
        (shared[0], full_w.shared_gate_up.grad),
        (shared[1], full_w.shared_down.grad),
    ]
    return [(_rel(a, b) if b.numel() else 0.0) for a, b in pairs]


@pytest.mark.parametrize("world", [2, 4])
def test_ep_backward_equals_the_single_process_gradients(world):
    for errors in mp.launch(_backward_case, world, world):
        assert max(errors) < 1e-10


def _refusals(world):
    """Bad input on one rank: every rank gets the same ValueError, and the group stays
    usable after it (the check is itself a collective every rank took part in)."""
    rank = dist.get_rank()
    weights, routing, x, mine = _case(8, 2, [5] * world)
    r = mb.Routing(routing.ids[mine], routing.weights[mine])
    local = mp.shard_weights(weights, rank, world)
    other = mb.ExpertWeights.random(
        mb.MoEConfig(d_model=24, d_ff=8, num_experts=8, top_k=2, dtype="float32")
    )
    other_shared = mb.ExpertWeights.random(
        mb.MoEConfig(24, 16, 8, 2, num_shared_experts=1, dtype="float32"), seed=rank
    )
    bad = {
        "ids": (x[mine], mb.Routing(r.ids + 8 * (rank == 1), r.weights), local),
        "shape": (x[mine][:, :20] if rank == 1 else x[mine], r, local),
        "weights": (x[mine], r, mp.shard_weights(other, rank, world) if rank == 1 else local),
        "shard": (x[mine], r, mp.shard_weights(weights, 0, world)),
        "shared": (x[mine], r, mp.shard_weights(other_shared, rank, world)),
    }
    messages = {}
    for name, args in bad.items():
        try:
            mp.ep_forward(*args)
            messages[name] = None
        except ValueError as e:
            messages[name] = str(e)
    y = mp.ep_forward(x[mine], r, local)
    return messages, _rel(y, mb.reference(x, routing, weights)[mine])


def test_bad_input_on_one_rank_is_refused_on_every_rank():
    results = mp.launch(_refusals, 3, 3)
    expect = {
        "ids": "rank 1: expert ids must be in [0, 8), got ids in [8, 15]",
        "shape": "rank 1: x must be [T, D=24], got shape (5, 20)",
        "weights": "rank 1 has a layer (E, D, F, Fs, dtype, device) = (8, 24, 8,",
        "shard": "rank 1 of 3 holds the experts of shard_weights(..., rank=0, world=3)",
        "shared": "rank 1's shared experts differ from rank 0's",
    }
    for rank, (messages, err) in enumerate(results):
        assert err < 1e-5
        for name, text in expect.items():
            assert messages[name] is not None, (rank, name)
            assert messages[name].startswith("ep_forward refused"), messages[name]
            assert text in messages[name], (rank, name, messages[name])
        # Every rank raised the same error, naming itself or another rank as at fault.
        assert ("this rank" in messages["ids"]) == (rank == 1)


def _fails_on(rank_to_fail):
    if dist.get_rank() == rank_to_fail:
        raise KeyError("planted")
    return dist.get_rank()


def test_launch_returns_results_in_rank_order_and_names_a_failing_rank():
    assert mp.launch(_fails_on, 2, -1) == [0, 1]
    with pytest.raises(RuntimeError, match=r"rank 1: KeyError: 'planted'"):
        mp.launch(_fails_on, 2, 1)


def test_blocks_split_contiguously_with_the_remainder_first():
    assert mp.expert_blocks(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert mp.token_blocks(2, 3) == [(0, 1), (1, 2), (2, 2)]
    with pytest.raises(ValueError, match="E=2 experts over 4 ranks"):
        mp.expert_blocks(2, 4)
    weights = mb.ExpertWeights.random(mb.MoEConfig(8, 4, 10, 2, dtype="float32"))
    local = mp.shard_weights(weights, 3, 4)
    assert local.block == (8, 10)
    assert torch.equal(local.weights.gate_up, weights.gate_up[8:10])
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world=4\), got 4"):
        mp.shard_weights(weights, 4, 4)


def test_traffic_counts_every_byte_that_leaves_a_rank():
    # Rank 0 sends 3 rows to rank 1; rank 1 sends 1 row to rank 0 and keeps 2.
    counts = torch.tensor([[5, 3], [1, 2]])
    t = mp.traffic(counts, d_model=4, itemsize=2, slots=3, weight_itemsize=4)
    row, out = 4 * 2, 4 * 2 + 3 * (4 + 4)
    assert t["dispatch_sent"] == [3 * out + 8, 1 * out + 8]
    assert t["dispatch_recv"] == [1 * out + 8, 3 * out + 8]
    assert t["combine_sent"] == [1 * row, 3 * row]
    assert t["combine_recv"] == [3 * row, 1 * row]


def test_rows_go_once_to_each_rank_a_token_reaches():
    # E=4 over 2 ranks ([0, 2) and [2, 4)); tokens 0-1 on rank 0, token 2 on rank 1.
    ids = torch.tensor([[0, 1], [1, 2], [3, 2]])
    assert mp.row_counts(ids, 4, 2, [2, 1]).tolist() == [[2, 1], [0, 1]]
    assert mp.row_counts(ids, 4, 2, [2, 1], dedup=False).tolist() == [[3, 1], [0, 2]]
    with pytest.raises(ValueError, match=r"tokens_W=\[2\] must give 2 ranks 3 tokens"):
        mp.row_counts(ids, 4, 2, [2])


def test_ep_forward_outside_a_process_group_says_how_to_start_one():
    weights = mb.ExpertWeights.random(mb.MoEConfig(8, 4, 4, 2, dtype="float32"))
    cfg = mb.MoEConfig(8, 4, 4, 2, dtype="float32")
    with pytest.raises(RuntimeError, match="torchrun"):
        mp.ep_forward(torch.randn(3, 8), mb.make_routing(3, cfg), mp.shard_weights(weights, 0, 1))
