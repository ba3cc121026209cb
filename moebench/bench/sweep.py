"""Running the grid: points x skews x implementations -> one record each, and run files.

The loop is point -> skew -> impl, so each point's weights (22 GB for deepseek-v3 in
bf16) are generated once and shared by every routing and implementation. A point that
cannot run is recorded as skipped with its reason (out of memory, a capacity buffer that
does not fit, an unsupported dtype, Triton without CUDA, or any other error) and the
sweep goes on. `moebench sweep` runs a whole profile and writes its run file (what
`nox -s bench` does before asv records the same numbers). A quant point's weights are
quantized once per point (inputs.point_inputs); its records also carry quant_err.

T tokens, D model width, F expert hidden width, Fs shared hidden width, E experts,
K experts per token, S = T*K token-expert pairs.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import torch_dtype
from ..layer import moe_forward
from ..routing import load_stats, make_routing
from . import ep, grid
from .environment import environment
from .inputs import SEED, point_inputs, release
from .memory import peak_memory
from .oracle import WrongOutput, quant_err, rel_err, train_rel_err
from .records import (
    add_imbalance,
    base_record,
    count_drops,
    failure,
    first_line,
    layer_stats,
    samples,
    skip,
    training,
    unsupported,
)
from .roofline import Ceilings, measure_ceilings, min_bytes, quant_expert_bytes, roofline_fraction
from .runs import run_path, write_run
from .timing import make_timer, measure, torch_threads

_CEILINGS: dict[tuple, Ceilings] = {}  # measured once per process and profile


@dataclasses.dataclass(frozen=True)
class Context:
    """What every point of one run_points call is measured with."""

    profile: grid.Profile
    device: torch.device
    timer: object  # a timing timer (CpuTimer, CudaTimer or a test's)
    graph_timer: object | None  # times the profile's graph_impls again as graph replays
    ceilings: Ceilings
    timing: dict  # measure's options (timing_options)
    check: bool  # compare with the float64 oracle


def ceilings_for(profile: grid.Profile, timer) -> Ceilings:
    key = (profile.device, profile.dtype, profile.matmul_n, profile.copy_bytes, timer.label)
    if key not in _CEILINGS:
        _CEILINGS[key] = measure_ceilings(
            profile.device,
            torch_dtype(profile.dtype),
            timer,
            matmul_n=profile.matmul_n,
            copy_bytes=profile.copy_bytes,
        )
    return _CEILINGS[key]


def _train_step(forward, impl, x_TD, routing, weights):
    """The layer's forward + backward against a fixed random output gradient, with x, every
    weight and the routing weights as leaves; gradients are dropped before each step, as
    `zero_grad(set_to_none=True)` does."""
    leaves = [x_TD, routing.weights, *weights.tensors().values()]
    for t in leaves:
        t.requires_grad_(True)
    dy_TD = torch.randn_like(x_TD)

    def step():
        for t in leaves:
            t.grad = None
        forward(x_TD, routing, weights, impl=impl, check=False).backward(dy_TD)

    def release():
        for t in leaves:
            t.grad = None
            t.requires_grad_(False)

    return step, release


def _measure(record, forward, impl, x_TD, routing, weights, ctx: Context, floats=None) -> None:
    """Fill in one record; raises what the layer raises. floats: the unquantized weights
    of a quant point's QuantizedWeights."""
    if training(record["family"]):
        if impl == "padded":
            stats = {}
            with torch.no_grad():
                forward(x_TD, routing, weights, impl=impl, stats=stats)
            count_drops(record, stats["dropped"])
        if ctx.check:
            record["rel_err"] = train_rel_err(
                forward, impl, x_TD, routing, weights, ctx.profile.check_bytes
            )
        call, release = _train_step(forward, impl, x_TD, routing, weights)
        try:
            _time(record, call, ctx)
        finally:
            release()
        return
    stats = {}
    y_TD = forward(x_TD, routing, weights, impl=impl, stats=stats)  # checked; compiles
    if impl == "padded":
        count_drops(record, stats["dropped"])
    record["layer_stats"] = layer_stats(stats)
    if ctx.check:
        if not torch.isfinite(y_TD).all():
            raise WrongOutput("the output holds NaN or inf")
        budget = ctx.profile.check_bytes
        record["rel_err"] = rel_err(y_TD, x_TD, routing, weights, stats, budget)
        if floats is not None:
            record["quant_err"] = quant_err(x_TD, routing, weights, floats, stats, budget)
    del y_TD, stats
    call = lambda: forward(x_TD, routing, weights, impl=impl, check=False)
    _time(record, call, ctx)
    p = ctx.profile
    replay = ctx.graph_timer is not None and impl in p.graph_impls
    if not replay or record["time_ms"] >= p.graph_below_ms:
        return
    try:
        graphed = measure(call, ctx.graph_timer, **ctx.timing)
        record["graph_ms"] = graphed.median_ms
    except Exception as e:  # the eager numbers above stand; say why there is no replay
        record["graph_reason"] = f"{type(e).__name__}: {first_line(e)}"


def _time(record, call, ctx: Context) -> None:
    """Time `call` and fill in the record's timing, memory and throughput fields."""
    timing = measure(call, ctx.timer, **ctx.timing)
    peak, peak_label = peak_memory(call, ctx.device)
    seconds = timing.median_ms * 1e-3
    record.update(
        status="ok",
        time_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        cv=timing.cv,
        repeats=timing.repeats,
        samples_ms=samples(timing),
        host_ms=timing.host_ms,
        peak_bytes=peak,
        peak_label=peak_label,
        tokens_per_s=record["T"] / seconds,
        tflops=record["flops"] / seconds / 1e12,
        roofline_fraction=roofline_fraction(
            record["flops"], record["min_bytes"], timing.median_ms, ctx.ceilings, record["quant"]
        ),
    )


def run_points(
    points: list[grid.Point],
    impls,
    skews,
    *,
    profile,
    repeats: int | None = None,
    warmup: int | None = None,
    check: bool = False,
    progress=None,
    forward=None,
    timer=None,
    graph_timer=None,
    ceilings: Ceilings | None = None,
    checkpoint=None,
) -> list[dict]:
    """Measure every point x skew x impl; one record each (see RECORD_FIELDS). impls: names
    or module:function (default: every registered impl).

    profile: a grid.Profile or its name; it gives the device, dtype and timing budget.
    repeats, warmup: override the profile's (and its time floors, min_time_s and
    warmup_s: an explicit count is taken as given). check: compare each output with the float64
    oracle (rel_err). progress(done, total, record) is called after each record.
    forward: the layer (default moebench.moe_forward), replaceable to plant a slowdown.
    timer, ceilings: default to the profile device's timer and ceilings measured now.
    graph_timer: times the profile's graph_impls again as graph replays (see grid.Profile).
    checkpoint(records), when given, is called with the records so far after each point.
    """
    p = grid.get_profile(profile)
    impls = impls or grid.default_impls(p)
    if any(pt.family == grid.EP for pt in points):
        raise ValueError("ep points run in several processes: measure them with bench.ep.run_ep")
    with torch_threads(p.threads):
        timer = timer or make_timer(p.device)
        ctx = Context(
            profile=p,
            device=torch.device(p.device),
            timer=timer,
            graph_timer=graph_timer,
            ceilings=ceilings or ceilings_for(p, timer),
            timing=timing_options(p, repeats=repeats, warmup=warmup),
            check=check,
        )
        records = _sweep(points, impls, skews, forward or moe_forward, progress, checkpoint, ctx)
    add_imbalance(records)
    return records


def timing_options(p: grid.Profile, *, repeats=None, warmup=None) -> dict:
    """measure's options for the profile; a given repeats or warmup count replaces
    the profile's count and its time floor."""
    return {
        "warmup": p.warmup if warmup is None else warmup,
        "warmup_s": p.warmup_s if warmup is None else 0.0,
        "repeats": p.repeats if repeats is None else repeats,
        "min_time_s": p.min_time_s if repeats is None else 0.0,
        "max_time_s": p.max_time_s,
    }


def _sweep(points, impls, skews, forward, progress, checkpoint, ctx: Context) -> list[dict]:
    device, dtype = ctx.device, torch_dtype(ctx.profile.dtype)
    total = len(points) * len(skews) * len(impls)
    records: list[dict] = []

    def done(record):
        records.append(record)
        if progress is not None:
            progress(len(records), total, record)

    block = ctx.profile.quant_block
    for point in points:
        inputs, reason = point_inputs(point, device, dtype, block)
        expert_bytes = point.quant and quant_expert_bytes(point.cfg, point.quant, block, dtype)
        for skew in skews:
            try:
                routing = make_routing(point.T, point.cfg, skew=skew, seed=SEED, device=device)
                load = load_stats(routing, point.cfg.num_experts)
            except Exception as e:  # the routing does not fit: its points are skipped
                routing, routing_reason = None, failure(e)
            for impl in impls:
                record = base_record(point, impl, skew, dtype)
                if routing is None:
                    done(skip(record, routing_reason))
                    continue
                touched = point.cfg.num_experts - load.empty_experts
                record.update(
                    max_over_mean=load.max_over_mean,
                    touched_experts=touched,
                    # fwd + bwd reads the weights and writes their gradients; x, y, dy, dx
                    min_bytes=min_bytes(point.cfg, point.T, touched, dtype.itemsize, expert_bytes)
                    * (2 if training(point.family) else 1),
                )
                if inputs is None:
                    done(skip(record, reason))
                    continue
                why = unsupported(impl, point.family, device, dtype, point.quant)
                if why:
                    done(skip(record, why))
                    continue
                weights, x_TD, floats = inputs
                try:
                    _measure(record, forward, impl, x_TD, routing, weights, ctx, floats)
                except Exception as e:  # one broken point must not end a sweep of hours
                    skip(record, failure(e))
                if record["status"] != "ok":
                    release(device)
                done(record)
            del routing
        del inputs
        release(device)
        if checkpoint is not None:
            checkpoint(records)
    return records


def run_profile(
    profile=None,
    *,
    output=None,
    results_dir="results",
    families=None,
    impls=None,
    skews=grid.SKEWS,
    check: bool = True,
    flush_l2: bool = False,
    cuda_graph: bool = False,
    progress=None,
) -> Path:
    """Measure the profile's families (ceilings first), write the run file, return its path
    (`output`, else run_path(results_dir, env)). impls: default every registered impl
    (moebench's own, the peers, plug-ins), each skipped with its reason where it cannot run.
    The file is rewritten after every point,
    marked `"partial": true` in its env until the sweep ends, so a sweep that is stopped
    keeps what it measured. The ep family runs last, in ranks of its own (bench/ep.py).
    Under torchrun (torch.distributed initialized), each rank measures a share of the
    single-device points on its GPU, the ep family runs over those ranks, and rank 0 writes
    the run file."""
    p = grid.get_profile(profile)
    timer = make_timer(p.device, flush_l2=flush_l2, cuda_graph=cuda_graph)
    graph_timer = None
    if p.graph_impls and not cuda_graph:
        graph_timer = make_timer(p.device, flush_l2=flush_l2, cuda_graph=True)
    started = time.perf_counter()
    points = [pt for family in families or grid.families(p) for pt in grid.points(family, p)]
    ep_points = [pt for pt in points if pt.family == grid.EP]
    # Under torchrun each rank (a GPU) measures every world-th point; rank 0 writes.
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    points = [pt for pt in points if pt.family != grid.EP]
    mine = points[rank::world]
    ep_impls = impls or p.ep_impls
    impls = impls or grid.default_impls(p)
    total = len(skews) * (len(mine) * len(impls) + len(ep_points) * len(ep_impls))
    counted = _Counter(progress if rank == 0 else None, total)
    with torch_threads(p.threads):
        ceilings = ceilings_for(p, timer)
        env = environment(p.name, device=p.device, timer=timer, ceilings=ceilings)
        env["timing"] = timing_options(p)
        path = output or run_path(results_dir, env)

        def checkpoint(records):
            duration = round(time.perf_counter() - started, 1)
            write_run(path, {**env, "partial": True, "duration_s": duration}, records)

        records = run_points(
            mine,
            impls,
            skews,
            profile=p,
            check=check,
            progress=counted,
            timer=timer,
            graph_timer=graph_timer,
            ceilings=ceilings,
            checkpoint=checkpoint if rank == 0 else None,
        )
    if world > 1:
        records = _gather(records, points)
    if ep_points:
        counted.offset = len(mine) * len(impls) * len(skews)
        ep_records, env["ep_calibration"] = ep.run_ep(
            ep_points, ep_impls, skews, profile=p, check=check, progress=counted
        )
        records += ep_records
    env["duration_s"] = round(time.perf_counter() - started, 1)
    return write_run(path, env, records) if rank == 0 else Path(path)


def _gather(records: list[dict], points: list[grid.Point]) -> list[dict]:
    """Every rank's records, in the order of `points` (as one process would have them)."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    order = {(pt.family, pt.label): i for i, pt in enumerate(points)}
    merged = [r for rank_records in everyone for r in rank_records]
    return sorted(merged, key=lambda r: order[(r["family"], r["label"])])


class _Counter:
    """Progress over both parts of a run (one process's points, then the ep family's),
    passed on as done of the run's total."""

    def __init__(self, progress, total: int):
        self.progress, self.total, self.offset = progress, total, 0

    def __call__(self, done: int, _total: int, record: dict) -> None:
        if self.progress is not None:
            self.progress(self.offset + done, self.total, record)


class Progress:
    """Prints one line per record to `stream` once a run has taken more than `after_s`:
    short runs stay quiet, long ones show where they are and what is left."""

    def __init__(self, stream=None, after_s: float = 2.0, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.after_s = after_s
        self.clock = clock
        self.start = clock()

    def __call__(self, done: int, total: int, record: dict) -> None:
        elapsed = self.clock() - self.start
        if elapsed < self.after_s and done < total:
            return
        eta = elapsed / done * (total - done)
        what = f"{record['time_ms']:.3f} ms" if record["status"] == "ok" else record["reason"]
        print(
            f"[{done:>{len(str(total))}}/{total}] {elapsed:.0f}s, ~{eta:.0f}s left  "
            f"{record['family']} {record['label']} {record['impl']} {record['skew']}: {what}",
            file=self.stream,
            flush=True,
        )
