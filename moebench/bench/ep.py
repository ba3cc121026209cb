"""The ep family: the expert-parallel layer (moebench.parallel) measured over W ranks.

Each world size is one launch of W processes (gloo on the CPU, NCCL with one GPU per rank;
or the ranks torchrun started). Every rank builds the point's whole layer from the seed,
keeps its block of experts and its block of the T tokens, and times each call phase by
phase: dispatch, local experts, combine, after a barrier so that the ranks start
together. The parent turns the ranks' samples into one record per point x skew x impl:

- time_ms: per call the slowest rank's total (the step), its median over the calls;
- dispatch_ms, local_ms, combine_ms: the medians of the straggler, the rank whose local
  experts take longest: it waits least for the others, so its dispatch and combine are
  the transfers on the step's critical path, and comm_share = (dispatch + combine) / the
  sum of its three medians;
- straggler: the straggler's local_ms / the mean over the ranks;
- sent_bytes, recv_bytes: over all ranks, both all-to-alls (parallel.traffic);
  a2a_GBps: the mean rank's bytes sent / the straggler's dispatch + combine time;
- ranks: per rank its tokens, phase medians, rows sent and received, pairs computed and
  bytes.

The run's env gets `ep_calibration`: per world size, one all_to_all_single's median time
at a few sizes, for fitting the link's alpha and beta (bench/projection.py).

W ranks, E experts, K experts per token, T tokens of all ranks, D model width.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .. import parallel
from ..config import torch_dtype
from ..routing import Routing, load_stats, make_routing
from . import grid
from .inputs import SEED, point_inputs, release
from .oracle import WrongOutput, rel_err
from .records import add_imbalance, base_record, failure, samples, skip, unsupported
from .timing import summarize, torch_threads

PHASES = ("dispatch_ms", "local_ms", "combine_ms")
TRAFFIC = ("dispatch_sent", "dispatch_recv", "combine_sent", "combine_recv")
CALIBRATION_BYTES = (256, 4096, 65536, 1 << 20)  # per peer


def launch_reason(profile: grid.Profile, world: int) -> str | None:
    """Why `world` ranks cannot be launched here, else None."""
    if profile.device == "cuda" and torch.cuda.device_count() < world:
        return (
            f"unsupported: {world} ranks need {world} GPUs (NCCL, one per rank), this "
            f"machine has {torch.cuda.device_count()}"
        )
    return None


def run_ep(points, impls, skews, *, profile, check=True, progress=None):
    """(records, calibration) of the ep points: one launch of W ranks per world size. Under
    torchrun (or any launcher that initialized torch.distributed) the ranks are this
    process and its peers: only the points of their world size are measured, and every rank
    returns the same records."""
    p = grid.get_profile(profile)
    records, calibration = [], {}
    total = len(points) * len(skews) * len(impls)

    def done(record):
        records.append(record)
        if progress is not None:
            progress(len(records), total, record)

    for world in sorted({pt.world for pt in points}):
        mine = [pt for pt in points if pt.world == world]
        ranks, reason = None, launch_reason(p, world)
        if dist.is_initialized():
            if world != dist.get_world_size():
                reason = f"unsupported: launched with {dist.get_world_size()} ranks"
            else:
                ranks = [None] * world
                dist.all_gather_object(ranks, _rank_sweep(mine, impls, skews, p, check))
        elif reason is None:
            backend = "nccl" if p.device == "cuda" else "gloo"
            try:
                ranks = parallel.launch(
                    _rank_sweep, world, mine, impls, skews, p, check, backend=backend
                )
            except Exception as e:  # a rank died: this world's points say why
                reason = failure(e)
        if ranks is not None:
            calibration[str(world)] = ranks[0]["calibration"]
        cases = [(pt, skew, impl) for pt in mine for skew in skews for impl in impls]
        for i, (pt, skew, impl) in enumerate(cases):
            record = base_record(pt, impl, skew, torch_dtype(p.dtype))
            record.update(world=world, group_limit=pt.group_limit)
            if ranks is None:
                done(skip(record, reason))
            else:
                _fill(record, [r["results"][i] for r in ranks])
                done(record)
    add_imbalance(records)
    return records, calibration


def _fill(record: dict, per_rank: list[dict]) -> None:
    """The record of one point x skew x impl from each rank's result."""
    skipped = [r["skip"] for r in per_rank if "skip" in r]
    if skipped:
        skip(record, skipped[0])
        return
    record["max_over_mean"] = per_rank[0]["max_over_mean"]
    record["touched_experts"] = per_rank[0]["touched_experts"]
    per_call = zip(*(r["samples"] for r in per_rank), strict=True)
    steps = [max(sum(s) for s in call) for call in per_call]
    ranks = []
    for r in per_rank:
        medians = {
            phase: statistics.median(s[i] for s in r["samples"]) for i, phase in enumerate(PHASES)
        }
        total = statistics.median(sum(s) for s in r["samples"])
        ranks.append({"T": r["T"], **medians, "total_ms": total, **r["traffic"]})
    slow = max(range(len(ranks)), key=lambda i: ranks[i]["local_ms"])
    straggler = ranks[slow]
    comm_ms = straggler["dispatch_ms"] + straggler["combine_ms"]
    sent = [r["dispatch_sent"] + r["combine_sent"] for r in ranks]
    step = summarize(steps)
    time_ms = step.median_ms
    errors = [r["rel_err"] for r in per_rank if r["rel_err"] is not None]
    mean_local = statistics.mean(r["local_ms"] for r in ranks)
    record.update(
        status="ok",
        time_ms=time_ms,
        p20_ms=step.p20_ms,
        p80_ms=step.p80_ms,
        cv=step.cv,
        repeats=step.repeats,
        samples_ms=samples(step),
        tokens_per_s=record["T"] / (time_ms * 1e-3),
        tflops=record["flops"] / (time_ms * 1e-3) / 1e12,
        rel_err=max(errors) if errors else None,
        **{phase: straggler[phase] for phase in PHASES},
        comm_share=comm_ms / (comm_ms + straggler["local_ms"]),
        straggler=straggler["local_ms"] / mean_local if mean_local > 0 else None,
        sent_bytes=sum(sent),
        recv_bytes=sum(r["dispatch_recv"] + r["combine_recv"] for r in ranks),
        a2a_GBps=statistics.mean(sent) / (comm_ms * 1e-3) / 1e9 if sum(sent) else None,
        ranks=ranks,
    )


def _rank_sweep(points, impls, skews, p: grid.Profile, check: bool) -> dict:
    """In each rank: every point x skew x impl of its world, in the parent's order."""
    # The GPU the launcher gave this rank (torchrun's LOCAL_RANK, not the global rank).
    cuda = p.device == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch_dtype(p.dtype)
    results = []
    with torch_threads(p.threads):
        calibration = _calibrate(device)
        for pt in points:
            inputs, reason = point_inputs(pt, device, dtype, p.quant_block)
            # Memory differs between ranks: all of them skip where any one cannot.
            reason = _first(reason)
            for skew in skews:
                routing = ep_routing(pt, skew, device)
                for impl in impls:
                    why = reason or unsupported(impl, pt.family, device, dtype)
                    result = {"skip": why} if why else _measure(pt, impl, inputs, routing, p)
                    results.append(result)
                    if "skip" in result:
                        release(device)
            del inputs
            release(device)
    return {"results": results, "calibration": calibration}


def ep_routing(pt: grid.Point, skew: str, device="cpu") -> Routing:
    """The routing of all ranks' tokens at an ep point: group-limited to pt.group_limit
    ranks (the contiguous expert blocks) where the point has a limit."""
    limit = {"n_group": pt.world, "topk_group": pt.group_limit} if pt.group_limit else {}
    return make_routing(pt.T, pt.cfg, skew=skew, seed=SEED, device=device, **limit)


def _first(reason: str | None) -> str | None:
    """The first rank's reason to skip, on every rank (None where no rank has one)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, reason)
    return next((r for r in everyone if r), None)


def _measure(pt, impl, inputs, routing, p: grid.Profile) -> dict:
    """One rank's samples of one point x skew x impl; {"skip": reason} where it failed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    weights, x_all, _ = inputs
    start, stop = parallel.token_blocks(pt.T, world)[rank]
    x_TD = x_all[start:stop]
    mine = Routing(routing.ids[start:stop], routing.weights[start:stop])
    local = parallel.shard_weights(weights, rank, world)
    # padded with its capacity would drop pairs: a different layer from the one compared.
    options = {"capacity_factor": None} if impl == "padded" else {}

    def call(check_inputs=False):
        stats = {}
        y = parallel.ep_forward(
            x_TD, mine, local, impl=impl, check=check_inputs, stats=stats, **options
        )
        return y, stats

    try:  # checked: raises on every rank alike
        y_TD, stats = call(check_inputs=True)
    except Exception as e:
        return {"skip": failure(e)}
    error, problem = None, None
    try:
        if y_TD.numel():
            if not torch.isfinite(y_TD).all():
                raise WrongOutput("the output holds NaN or inf")
            error = rel_err(y_TD, x_TD, mine, weights, {}, p.check_bytes)
    except Exception as e:  # one rank's wrong output or failed check: all ranks skip
        problem = failure(e)
    problem = _first(problem)
    if problem:
        return {"skip": problem}
    try:
        for _ in range(p.warmup):
            call()
        samples = []
        for _ in range(p.repeats):
            dist.barrier()
            _, s = call()
            samples.append([s[phase] for phase in PHASES])
    except Exception as e:  # the same calls as the checked one: the peers wait, then time out
        return {"skip": failure(e)}
    load = load_stats(routing, pt.cfg.num_experts)
    return {
        "T": stop - start,
        "samples": samples,
        "rel_err": error,
        "traffic": {k: stats[k] for k in (*TRAFFIC, "rows_sent", "rows_recv", "pairs_recv")},
        "max_over_mean": load.max_over_mean,
        "touched_experts": pt.cfg.num_experts - load.empty_experts,
    }


def _calibrate(device: torch.device, repeats: int = 20) -> dict:
    """The median time of one all_to_all_single with every rank sending each size to every
    other rank: the link's own alpha and beta, without the layer."""
    world = dist.get_world_size()
    seconds = []
    for size in CALIBRATION_BYTES:
        send = torch.zeros(world * size, dtype=torch.uint8, device=device)
        recv = torch.empty_like(send)
        samples = []
        for _ in range(repeats):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            began = time.perf_counter()
            dist.all_to_all_single(recv, send)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - began)
        seconds.append(statistics.median(samples))
    return {"bytes_per_peer": list(CALIBRATION_BYTES), "seconds": seconds}


def markdown(records: list[dict]) -> str:
    """The ep records as a markdown table: per point x skew x impl the step and its phases
    on the straggler, the communication share, the straggler ratio and the traffic; M the
    group limit (ranks per token), where there is one."""
    lines = [
        "| W | E | M | skew | impl | step ms | dispatch | local | combine | comm share "
        "| straggler | MB sent | GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r["family"] != grid.EP:
            continue
        limit = "-" if _missing(r.get("group_limit")) else int(r["group_limit"])
        # int(): a frame of several families holds world as a float column
        head = f"| {int(r['world'])} | {r['E']} | {limit} | {r['skew']} | {r['impl']} "
        if r["status"] != "ok":
            lines.append(head + f"| {r['reason']} |" + " |" * 7)
            continue
        bandwidth = "-" if _missing(r["a2a_GBps"]) else f"{r['a2a_GBps']:.3g}"
        lines.append(
            head + f"| {r['time_ms']:.3g} | {r['dispatch_ms']:.3g} | {r['local_ms']:.3g} "
            f"| {r['combine_ms']:.3g} | {r['comm_share']:.0%} | {r['straggler']:.2f} "
            f"| {r['sent_bytes'] / 1e6:.3g} | {bandwidth} |"
        )
    return "\n".join(lines)


def _missing(value) -> bool:
    """None, or the NaN a data frame holds for it."""
    return value is None or value != value
