"""Expert parallelism on torch.distributed: the MoE layer with its experts spread over ranks.

Each rank holds its own tokens (x and a routing with global expert ids) and a contiguous
block of experts. `ep_forward` sends each token's row to every rank that holds one of its
experts, once per rank as DeepEP's dispatch does (or, with dedup=False, once per
token-expert pair), with the row's K slots: the local expert ids there (-1 for the other
ranks' experts) and the routing weights. That is one all-to-all of counts, then one each of
slots, weights and rows. The rank runs its experts through any registered single-device
implementation and sums each row's weighted outputs; the combine (one all-to-all) brings
each row back to its token's rank, where the rows from the ranks are summed. Shared experts
run locally. NCCL on GPUs, gloo on the CPU; launch with torchrun or `moebench ep`.

W ranks, E experts in all, T tokens on this rank, K experts per token, U rows sent (one
per token and rank it reaches; with dedup=False one per pair, S = T*K), R rows received,
P the received rows' pairs on this rank, D model width, F expert hidden width.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import multiprocessing
import os
import queue
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

from . import registry
from .layer import moe_forward
from .routing import Routing
from .weights import ExpertWeights

ID_BYTES = 4  # each slot's local expert id travels as int32
COUNT_BYTES = 8  # the row counts travel as int64


def expert_blocks(num_experts: int, world: int) -> list[tuple[int, int]]:
    """Each rank's experts [start, stop): contiguous, the first E mod W ranks one more."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive int, got {world!r}")
    if not isinstance(num_experts, int) or num_experts < world:
        raise ValueError(
            f"E={num_experts} experts over {world} ranks: every rank needs at least one expert"
        )
    return token_blocks(num_experts, world)


@dataclasses.dataclass(frozen=True)
class LocalExperts:
    """One rank's share of a layer: its block of routed experts and the shared experts."""

    weights: ExpertWeights  # gate_up [E_r, 2F, D], down [E_r, D, F], shared whole
    num_experts: int  # E over all ranks
    rank: int
    world: int

    @property
    def block(self) -> tuple[int, int]:
        return expert_blocks(self.num_experts, self.world)[self.rank]

    @property
    def routed(self) -> ExpertWeights:
        return ExpertWeights(self.weights.gate_up, self.weights.down)


def shard_weights(weights: ExpertWeights, rank: int, world: int) -> LocalExperts:
    """Rank `rank`'s experts of `weights` (a view, no copy), for `ep_forward`."""
    if not isinstance(weights, ExpertWeights):
        raise TypeError(f"weights must be moebench.ExpertWeights, got {type(weights).__name__}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, world={world}), got {rank!r}")
    start, stop = expert_blocks(weights.num_experts, world)[rank]
    block = dataclasses.replace(
        weights, gate_up=weights.gate_up[start:stop], down=weights.down[start:stop]
    )
    return LocalExperts(block, weights.num_experts, rank, world)


def row_counts(
    ids_TK: torch.Tensor, num_experts: int, world: int, tokens_W=None, dedup: bool = True
) -> torch.Tensor:
    """counts_WW[src, dst]: the rows rank src sends rank dst in `ep_forward` (one per token
    and rank; one per pair with dedup=False) when the tokens of `ids_TK` (all ranks' tokens,
    rank by rank) are split over the ranks, tokens_W[r] to rank r (default: as
    `token_blocks` splits them)."""
    ends = torch.tensor([b[1] for b in expert_blocks(num_experts, world)])
    dest_TK = torch.bucketize(ids_TK.long().cpu(), ends, right=True)
    if tokens_W is None:
        tokens_W = [stop - start for start, stop in token_blocks(ids_TK.shape[0], world)]
    if len(tokens_W) != world or sum(tokens_W) != ids_TK.shape[0]:
        raise ValueError(f"tokens_W={tokens_W} must give {world} ranks {ids_TK.shape[0]} tokens")
    if dedup:
        hit_TW = torch.zeros(ids_TK.shape[0], world, dtype=torch.long)
        per_token = hit_TW.scatter_(1, dest_TK, 1)
    else:
        per_token = torch.zeros(ids_TK.shape[0], world, dtype=torch.long)
        per_token.scatter_add_(1, dest_TK, torch.ones_like(dest_TK))
    return torch.stack([part.sum(0) for part in per_token.split(list(tokens_W))])


def token_blocks(num_tokens: int, world: int) -> list[tuple[int, int]]:
    """Each rank's tokens [start, stop) of a batch of `num_tokens`: contiguous, the first
    T mod W ranks one more (a rank may have none)."""
    base, extra = divmod(num_tokens, world)
    starts = [r * base + min(r, extra) for r in range(world + 1)]
    return list(itertools.pairwise(starts))


def row_bytes(d_model: int, itemsize: int, slots: int, weight_itemsize: int = 4) -> tuple:
    """(out, back): the bytes of one dispatched row (its D values, and `slots` slots of a
    local expert id and a routing weight each: K, or 1 with dedup=False) and of one row
    combined back (its D values)."""
    row = d_model * itemsize
    return row + slots * (ID_BYTES + weight_itemsize), row


def traffic(
    counts_WW: torch.Tensor, d_model: int, itemsize: int, slots: int, weight_itemsize: int = 4
) -> dict[str, list[int]]:
    """Bytes each rank sends to and receives from the other ranks in one `ep_forward`, from
    counts_WW[src, dst], the rows rank src sends rank dst (`row_counts`): the counts (8
    bytes a peer) and `row_bytes` per row. Sends to itself are copies, not traffic. What
    ep_forward's stats report, exactly."""
    counts = counts_WW.long().clone()
    counts.fill_diagonal_(0)
    W = counts.shape[0]
    out, back = row_bytes(d_model, itemsize, slots, weight_itemsize)
    return {
        "dispatch_sent": (counts.sum(1) * out + (W - 1) * COUNT_BYTES).tolist(),
        "dispatch_recv": (counts.sum(0) * out + (W - 1) * COUNT_BYTES).tolist(),
        "combine_sent": (counts.sum(0) * back).tolist(),
        "combine_recv": (counts.sum(1) * back).tolist(),
    }


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows; its gradient goes back the same way, splits swapped."""

    @staticmethod
    def forward(ctx, rows, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = rows.new_empty((sum(out_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def ep_forward(
    x_TD: torch.Tensor,
    routing: Routing,
    local: LocalExperts,
    group=None,
    impl: str = "sorted",
    *,
    check: bool = True,
    stats: dict | None = None,
    dedup: bool = True,
    **options,
) -> torch.Tensor:
    """The MoE layer over the ranks of `group` (default: the world): this rank's tokens
    x_TD [T, D] with routing ids in [0, E) over all ranks' experts, and `local`, this rank's
    block from `shard_weights`. Returns this rank's y_TD [T, D], equal to the
    single-process layer on all ranks' tokens. Every rank of the group must call it.

    `impl` (with its `options`) runs the local experts. `check` first agrees on the inputs
    with one collective, so that bad input on any rank raises the same ValueError on every
    rank instead of leaving the others waiting; and agrees again after the buffers are
    allocated and after the local experts ran, so that one rank's failure there (out of
    memory on the rank that hot experts flood) raises on every rank too. `stats`, a dict,
    receives the time of each phase (synchronized; ms), the rows sent and received, the
    pairs computed here and the bytes of `traffic`. `dedup=False` sends one row per
    token-expert pair instead of one per token and rank. Differentiable where `impl` is.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ep_forward needs torch.distributed initialized: launch with torchrun (or "
            "`moebench ep`) and call dist.init_process_group first"
        )
    if check:
        _agree(x_TD, routing, local, group, impl, options)
    W = dist.get_world_size(group)
    clock = _Clock(x_TD.device, stats is not None)
    T, K = routing.ids.shape
    D = x_TD.shape[1]

    # Dispatch: rows grouped by destination rank, counts first so each side can size its
    # buffers, then each row's slots (local expert ids), their weights and the row.
    ends = torch.tensor([b[1] for b in expert_blocks(local.num_experts, W)], device=x_TD.device)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    ids_TK = routing.ids.long()
    dest_TK = torch.bucketize(ids_TK, ends, right=True)
    if dedup:
        hit_WT = torch.zeros(W, T, dtype=torch.bool, device=x_TD.device)
        hit_WT[dest_TK.T, torch.arange(T, device=x_TD.device)] = True
        dest_U, token_U = hit_WT.nonzero(as_tuple=True)  # by rank, then token
        mine_UK = dest_TK[token_U] == dest_U[:, None]
        slots_UK = torch.where(mine_UK, ids_TK[token_U] - starts[dest_U, None], -1)
        w_UK = routing.weights[token_U] * mine_UK
    else:
        order_U = dest_TK.flatten().argsort(stable=True)
        token_U, dest_U = order_U // K, dest_TK.flatten()[order_U]
        slots_UK = (ids_TK.flatten()[order_U] - starts[dest_U])[:, None]
        w_UK = routing.weights.flatten()[order_U][:, None]
    send_W = torch.bincount(dest_U, minlength=W)
    recv_W = torch.empty_like(send_W)
    dist.all_to_all_single(recv_W, send_W, group=group)
    send, recv = send_W.tolist(), recv_W.tolist()
    if check:  # the buffers of both all-to-alls, where one rank may lack the memory
        rows = (sum(recv), sum(recv), len(token_U))
        _together(group, "allocating its buffers", lambda: _probe(x_TD, rows))
    slots_UK = slots_UK.int()
    slots_RK = slots_UK.new_empty((sum(recv), slots_UK.shape[1]))
    dist.all_to_all_single(slots_RK, slots_UK, recv, send, group=group)
    w_RK = _AllToAll.apply(w_UK, recv, send, group)
    rows_RD = _AllToAll.apply(x_TD[token_U], recv, send, group)
    clock("dispatch_ms")

    # Local experts: each received row's pairs with this rank's experts, K = 1 each, then
    # the row's weighted sum.
    row_P, slot_P = (slots_RK >= 0).nonzero(as_tuple=True)
    acc = torch.promote_types(x_TD.dtype, torch.float32)

    def experts():
        ones = torch.ones(row_P.shape[0], 1, dtype=torch.float32, device=x_TD.device)
        pairs = Routing(slots_RK[row_P, slot_P, None], ones)
        y_PD = moe_forward(rows_RD[row_P], pairs, local.routed, impl, check=False, **options)
        weighted_PD = y_PD.to(acc) * w_RK[row_P, slot_P, None].to(acc)
        summed = torch.zeros(rows_RD.shape, dtype=acc, device=x_TD.device)
        return summed.index_add(0, row_P, weighted_PD).to(x_TD.dtype)

    out_RD = _together(group, "in its local experts", experts) if check else experts()
    clock("local_ms")

    # Combine: each row back to its token's rank, summed there over the ranks.
    back_UD = _AllToAll.apply(out_RD, send, recv, group)
    y_TD = torch.zeros(T, D, dtype=acc, device=x_TD.device)
    y_TD = y_TD.index_add(0, token_U, back_UD.to(acc)).to(x_TD.dtype)
    if local.weights.shared_gate_up is not None:
        gate, up = (x_TD @ local.weights.shared_gate_up.T).chunk(2, dim=-1)
        y_TD = y_TD + (torch.nn.functional.silu(gate) * up) @ local.weights.shared_down.T
    clock("combine_ms")
    if stats is not None:
        me = dist.get_rank(group)
        counts = torch.zeros(W, W, dtype=torch.long)
        counts[me] = torch.tensor(send)
        counts[:, me] = torch.tensor(recv)
        w_size = routing.weights.element_size()
        bytes_ = traffic(counts, D, x_TD.element_size(), slots_UK.shape[1], w_size)
        stats.update(clock.times, rows_sent=len(token_U), rows_recv=sum(recv))
        stats.update({k: v[me] for k, v in bytes_.items()}, pairs_recv=row_P.shape[0])
    return y_TD


class _Clock:
    """Phase times in ms, the device synchronized at each mark; a no-op when off."""

    def __init__(self, device: torch.device, on: bool):
        self.device, self.on, self.times = device, on, {}
        if on:
            self._sync()
            self.last = time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, phase: str) -> None:
        if self.on:
            self._sync()
            now = time.perf_counter()
            self.times[phase] = (now - self.last) * 1e3
            self.last = now


def _probe(x_TD, rows) -> None:
    """Allocate what the dispatch and combine will: rows received, computed, sent back."""
    held = [torch.empty(n, x_TD.shape[1], dtype=x_TD.dtype, device=x_TD.device) for n in rows]
    del held


def _together(group, what: str, fn):
    """fn() on every rank, then one collective: where it raised on any rank, every rank
    raises (out of memory as torch.OutOfMemoryError), naming the ranks."""
    try:
        result, error = fn(), None
    except Exception as e:  # reported to every rank below, then raised everywhere
        result, error = None, e
    mine = None if error is None else (type(error).__name__, str(error).strip().split("\n")[0])
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
    if failed:
        message = (
            "ep_forward failed "
            + what
            + ": "
            + "; ".join(f"rank {r}: {name}: {text}" for r, (name, text) in failed)
        )
        oom = any(name == "OutOfMemoryError" for _, (name, _) in failed)
        raise (torch.OutOfMemoryError if oom else RuntimeError)(message) from error
    return result


def _local_problem(x_TD, routing, local, impl, options) -> str | None:
    """What is wrong with this rank's inputs, or None; raises nothing."""
    if not isinstance(local, LocalExperts):
        return f"local must be moebench.parallel.LocalExperts, got {type(local).__name__}"
    if not isinstance(x_TD, torch.Tensor):
        return f"x must be a tensor, got {type(x_TD).__name__}"
    if not isinstance(routing, Routing):
        return f"routing must be a moebench.Routing, got {type(routing).__name__}"
    w, E = local.weights, local.num_experts
    if x_TD.dim() != 2 or x_TD.shape[1] != w.d_model:
        return f"x must be [T, D={w.d_model}], got shape {tuple(x_TD.shape)}"
    if routing.num_tokens != x_TD.shape[0]:
        return f"routing has {routing.num_tokens} tokens, x has {x_TD.shape[0]}"
    if routing.top_k > E:
        return f"routing picks K={routing.top_k} experts per token, there are E={E}"
    if x_TD.dtype != w.dtype:
        return f"x is {x_TD.dtype}, weights are {w.dtype}: they must match"
    if routing.ids.device != x_TD.device or w.device != x_TD.device:
        return (
            f"x, routing and weights must share a device: x on {x_TD.device}, routing on "
            f"{routing.ids.device}, weights on {w.device}"
        )
    if routing.ids.numel():
        lo, hi = int(routing.ids.min()), int(routing.ids.max())
        if lo < 0 or hi >= E:
            return f"expert ids must be in [0, {E}), got ids in [{lo}, {hi}]"
        if not bool(routing.weights.isfinite().all()):
            return "routing weights must be finite"
    try:
        spec = registry.get(impl)
        unknown = sorted(set(options) - set(spec.keywords))
        if unknown:
            return f"impl {spec.name!r} has no option {unknown}; its options: {spec.keywords}"
        return spec.missing() or spec.refusal(x_TD.device, x_TD.dtype)
    except (ValueError, TypeError) as e:
        return str(e)


def _signature(local: LocalExperts, impl) -> tuple:
    """What every rank must agree on: the layer's shape, dtype, device type, the shared
    experts' values (a checksum), the impl; and where this rank's block sits."""
    if not isinstance(local, LocalExperts):
        return ()
    w = local.weights
    shared = w.shared_gate_up
    checksum = (
        None
        if shared is None
        else [float(t.double().sum()) for t in (w.shared_gate_up, w.shared_down)]
    )
    layer = (local.num_experts, w.d_model, w.d_ff, w.d_ff_shared, str(w.dtype), w.device.type)
    return layer, checksum, str(impl), (local.rank, local.world, w.num_experts)


def _agree(x_TD, routing, local, group, impl, options) -> None:
    """One all_gather of each rank's problem and signature, then the same verdict on every
    rank: a ValueError naming the ranks at fault, or nothing."""
    me, W = dist.get_rank(group), dist.get_world_size(group)
    mine = (_local_problem(x_TD, routing, local, impl, options), _signature(local, impl))
    everyone = [None] * W
    dist.all_gather_object(everyone, mine, group=group)
    problems = [f"rank {r}: {p}" for r, (p, _) in enumerate(everyone) if p]
    if not problems:
        layer0, shared0, impl0, _ = everyone[0][1]
        for r, (_, (layer, shared, impl_r, (rank, world, held))) in enumerate(everyone):
            if layer != layer0:
                problems.append(
                    f"rank {r} has a layer (E, D, F, Fs, dtype, device) = {layer}, rank 0 "
                    f"{layer0}: the ranks' weights disagree"
                )
            elif shared != shared0:
                problems.append(f"rank {r}'s shared experts differ from rank 0's")
            elif impl_r != impl0:
                problems.append(f"rank {r} runs impl {impl_r!r}, rank 0 {impl0!r}")
            elif (rank, world) != (r, W):
                problems.append(
                    f"rank {r} of {W} holds the experts of shard_weights(..., rank={rank}, "
                    f"world={world})"
                )
            else:
                start, stop = expert_blocks(layer0[0], W)[r]
                if held != stop - start:
                    problems.append(f"rank {r} holds {held} experts, its block is {stop - start}")
    if problems:
        who = "this rank" if any(p.startswith(f"rank {me}") for p in problems) else "another rank"
        raise ValueError(f"ep_forward refused ({who} at fault): " + "; ".join(problems))


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR): NCCL with GPU LOCAL_RANK for "cuda", else gloo. False where
    no launcher started this process."""
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
        return False
    backend = "gloo"
    if device_type == "cuda":
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local} has no GPU: this node has {torch.cuda.device_count()}"
            )
        torch.cuda.set_device(local)
        backend = "nccl"
    dist.init_process_group(backend)
    return True


def launch(fn, world: int, *args, backend: str | None = None, timeout_s: float = 600.0) -> list:
    """fn(*args) on `world` fresh processes, each a rank of the default process group
    (gloo on the CPU; nccl with a GPU per rank), and their results in rank order: what
    `moebench ep` and the tests use where torchrun did not start the ranks. A rank that
    raises makes this raise a RuntimeError naming the rank and its error, after every rank
    ended; a collective left waiting fails after `timeout_s` instead of hanging."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive int, got {world!r}")
    backend = backend or "gloo"
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise ValueError(
            f"nccl with {world} ranks needs {world} GPUs, this machine has "
            f"{torch.cuda.device_count()}"
        )
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="moebench-ep-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, args, rank, world, store, backend, timeout_s, results),
                daemon=True,
            )
            for rank in range(world)
        ]
        for p in procs:
            p.start()
        outcomes = {}
        deadline = time.monotonic() + timeout_s + 60
        while len(outcomes) < world:
            try:
                rank, outcome = results.get(timeout=1.0)
                outcomes[rank] = outcome
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs) if r not in outcomes and p.exitcode is not None
                ]
                if dead or time.monotonic() > deadline:
                    for p in procs:
                        p.kill()
                    why = f"exited with {procs[dead[0]].exitcode}" if dead else "timed out"
                    raise RuntimeError(
                        f"rank {dead[0] if dead else '?'} {why} without a result"
                    ) from None
        for p in procs:
            p.join()
    errors = [f"rank {r}: {o[1]}" for r, o in sorted(outcomes.items()) if o[0] == "error"]
    if errors:
        raise RuntimeError("; ".join(errors))
    return [outcomes[r][1] for r in range(world)]


def _rank_main(fn, args, rank, world, store, backend, timeout_s, results) -> None:
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            outcome = ("ok", fn(*args))
        finally:
            dist.destroy_process_group()
    except BaseException as e:  # reported to the launcher, which raises it there
        outcome = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
    results.put((rank, outcome))
