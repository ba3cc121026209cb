"""Running the grid: points x skews x implementations -> one record each, and run files.

The loop is point -> skew -> impl, so each point's weights (22 GB for deepseek-v3 in
bf16) are generated once and shared by every routing and implementation. A point that
cannot run is recorded as skipped with its reason (out of memory, a capacity buffer that
does not fit, an unsupported dtype, Triton without CUDA, or any other error) and the
sweep goes on. A run file is `{"env": ..., "profile": ..., "records": [...]}`, written to a
temporary file beside its destination and renamed over it, so a reader never sees half a
run.

`python -m moebench.sweep` runs a whole profile and writes its run file (what
`nox -s bench` does before asv records the same numbers).

T tokens, D model width, F expert hidden width, Fs shared hidden width, E experts,
K experts per token, S = T*K token-expert pairs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from . import grid, harness
from .config import torch_dtype
from .layer import moe_forward, reference
from .routing import Routing, load_stats, make_routing
from .weights import ExpertWeights

# Every record has these keys; metrics are None where a point was skipped or a metric
# does not apply.
RECORD_FIELDS = (
    "family", "label", "impl", "skew", "T", "D", "F", "E", "K", "Fs", "dtype",
    "status", "reason",
    "time_ms", "p20_ms", "p80_ms", "cv", "repeats", "host_ms", "graph_ms", "graph_reason",
    "peak_bytes", "peak_label",
    "flops", "min_bytes", "tokens_per_s", "tflops", "roofline_fraction",
    "max_over_mean", "touched_experts", "imbalance_overhead", "dropped_fraction", "rel_err",
    "layer_stats",
)  # fmt: skip
SEED = 0
_CEILINGS: dict[tuple, harness.Ceilings] = {}  # measured once per process and profile


def ceilings_for(profile: grid.Profile, timer) -> harness.Ceilings:
    key = (profile.device, profile.dtype, profile.matmul_n, profile.copy_bytes, timer.label)
    if key not in _CEILINGS:
        _CEILINGS[key] = harness.measure_ceilings(
            profile.device,
            torch_dtype(profile.dtype),
            timer,
            matmul_n=profile.matmul_n,
            copy_bytes=profile.copy_bytes,
        )
    return _CEILINGS[key]


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _inputs(point: grid.Point, device: torch.device, dtype: torch.dtype):
    """Weights and x for a point, or the reason they cannot be made here."""
    cfg = point.cfg
    experts = cfg.num_experts * cfg.d_ff + cfg.d_ff_shared
    weights_bytes = 3 * cfg.d_model * experts * dtype.itemsize
    # Leave a tenth of the free memory for the layer's own buffers.
    free = _free_memory(device)
    if weights_bytes > 0.9 * free:
        return None, (
            f"out of memory: weights need {weights_bytes / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB free on {device}"
        )
    try:
        weights = ExpertWeights.random(cfg, dtype=dtype, device=device, seed=SEED)
        gen = torch.Generator(device=device).manual_seed(SEED + 1)
        x_TD = torch.randn(point.T, cfg.d_model, generator=gen, device=device, dtype=dtype)
    except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's failure
        _release(device)
        return None, _failure(e)
    return (weights, x_TD), None


class WrongOutput(RuntimeError):
    """The layer returned what no correct layer returns: the point failed."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _check_tokens(routing, weights, budget_bytes):
    """(n, experts): the first n <= 256 tokens whose experts' float64 weights fit in
    `budget_bytes`, and those experts' ids (sorted); None if not even one token's do."""
    D, F, Fs = weights.d_model, weights.d_ff, weights.d_ff_shared
    n = min(routing.num_tokens, 256)
    while True:
        experts = routing.ids[:n].unique()
        if (experts.numel() * 3 * D * F + 3 * D * Fs) * 8 <= budget_bytes:
            return n, experts
        if n == 1:
            return None
        n //= 2


def _oracle_inputs(x_nD, routing, weights, experts, stats):
    """The float64 oracle's leaves for the first n tokens: x, their routing over the
    experts they use (renumbered in `experts` order, pairs the padded layer dropped
    weighted by zero) and those experts' weights (and the shared expert's)."""
    n = x_nD.shape[0]
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_()
    weights_nK = routing.weights[:n]
    if "dropped_mask" in stats:
        weights_nK = weights_nK.masked_fill(stats["dropped_mask"][:n], 0)
    local = Routing(torch.searchsorted(experts, routing.ids[:n]), leaf(weights_nK))
    subset = ExpertWeights(
        gate_up=leaf(weights.gate_up[experts]),
        down=leaf(weights.down[experts]),
        shared_gate_up=leaf(weights.shared_gate_up),
        shared_down=leaf(weights.shared_down),
    )
    return leaf(x_nD), local, subset


def _rel(got, want) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _rel_err(y_TD, x_TD, routing, weights, stats, budget_bytes) -> float | None:
    """||y - ref|| / ||ref|| against the float64 oracle on the first tokens whose experts'
    float64 weights fit in `budget_bytes` (None if not even one token's do). Pairs the
    padded layer dropped are dropped from the reference too: its drops are reported as
    dropped_fraction, this is its arithmetic."""
    if (chosen := _check_tokens(routing, weights, budget_bytes)) is None:
        return None
    n, experts = chosen
    with torch.no_grad():
        ref_nD = reference(*_oracle_inputs(x_TD[:n], routing, weights, experts, stats))
    return _rel(y_TD[:n], ref_nD)


def _train_rel_err(forward, impl, x_TD, routing, weights, budget_bytes) -> float | None:
    """The training step's error: the layer's forward and backward on the first tokens that
    _check_tokens picks (the layer sees those tokens alone) against float64 autograd through
    the oracle; the worst ||got - want|| / ||want|| over the output and the gradients of x,
    the routing weights (pairs the padded layer kept), the experts used and the shared
    expert. Raises WrongOutput where any of them holds NaN or inf."""
    if (chosen := _check_tokens(routing, weights, budget_bytes)) is None:
        return None
    n, experts = chosen
    leaf = lambda t: t.detach().requires_grad_()
    x_nD = leaf(x_TD[:n])
    test = Routing(routing.ids[:n], leaf(routing.weights[:n]))
    tensors = {name: leaf(t) for name, t in weights.tensors().items()}
    gen = torch.Generator(device=x_TD.device).manual_seed(SEED + 2)
    dy_nD = torch.randn(x_nD.shape, generator=gen, device=x_TD.device, dtype=x_TD.dtype)
    stats = {}
    y_nD = forward(x_nD, test, ExpertWeights(**tensors), impl=impl, stats=stats)
    y_nD.backward(dy_nD)
    x64, local, subset = _oracle_inputs(x_nD, test, weights, experts, stats)
    y64 = moe_forward(x64, local, subset, impl="naive")
    y64.backward(dy_nD.double())
    kept = ~stats["dropped_mask"] if "dropped_mask" in stats else slice(None)
    pairs = {
        "output": (y_nD.detach(), y64.detach()),
        "dx": (x_nD.grad, x64.grad),
        "routing weights' gradient": (test.weights.grad[kept], local.weights.grad[kept]),
    }
    for name, t in subset.tensors().items():
        got = tensors[name].grad
        pairs[f"{name}'s gradient"] = (got[experts] if name in ("gate_up", "down") else got, t.grad)
    for name, (got, _) in pairs.items():
        if not torch.isfinite(got).all():
            raise WrongOutput(f"the {name} holds NaN or inf")
    return max(_rel(got, want) for got, want in pairs.values())


def _failure(e: Exception) -> str:
    """A skipped point's reason: out of memory (the GPU's, or a CPU allocation that failed),
    unsupported (the layer refused the point), or failed (anything else)."""
    if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
        return f"out of memory: {_first_line(e)}"
    if isinstance(e, (ValueError, NotImplementedError)):
        return f"unsupported: {_first_line(e)}"
    return f"failed: {type(e).__name__}: {_first_line(e)}"


def _base_record(point: grid.Point, impl: str, skew: str, dtype: torch.dtype) -> dict:
    cfg = point.cfg
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(
        family=point.family,
        label=point.label,
        impl=impl,
        skew=skew,
        T=point.T,
        D=cfg.d_model,
        F=cfg.d_ff,
        E=cfg.num_experts,
        K=cfg.top_k,
        Fs=cfg.d_ff_shared,
        dtype=str(dtype).removeprefix("torch."),
        flops=harness.useful_flops(cfg, point.T) * (3 if _training(point.family) else 1),
        status="skipped",
    )
    return record


def _training(family: str) -> bool:
    return family.endswith(grid.TRAIN)


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


def _measure(record, forward, impl, x_TD, routing, weights, ctx) -> None:
    """Fill in one record; raises what the layer raises."""
    if _training(record["family"]):
        if impl == "padded":
            stats = {}
            with torch.no_grad():
                forward(x_TD, routing, weights, impl=impl, stats=stats)
            _count_drops(record, stats["dropped"])
        if ctx["check"]:
            record["rel_err"] = _train_rel_err(
                forward, impl, x_TD, routing, weights, ctx["profile"].check_bytes
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
        _count_drops(record, stats["dropped"])
    record["layer_stats"] = _layer_stats(stats)
    if ctx["check"]:
        if not torch.isfinite(y_TD).all():
            raise WrongOutput("the output holds NaN or inf")
        record["rel_err"] = _rel_err(
            y_TD, x_TD, routing, weights, stats, ctx["profile"].check_bytes
        )
    del y_TD, stats
    call = lambda: forward(x_TD, routing, weights, impl=impl, check=False)
    _time(record, call, ctx)
    p = ctx["profile"]
    replay = ctx["graph_timer"] is not None and impl in p.graph_impls
    if not replay or record["time_ms"] >= p.graph_below_ms:
        return
    try:
        graphed = harness.measure(call, ctx["graph_timer"], **ctx["timing"])
        record["graph_ms"] = graphed.median_ms
    except Exception as e:  # the eager numbers above stand; say why there is no replay
        record["graph_reason"] = f"{type(e).__name__}: {_first_line(e)}"


def _count_drops(record: dict, dropped: int) -> None:
    """The padded layer's dropped pairs: their fraction of S, and their FLOPs (6*D*F each,
    three times that with the backward) taken out of the useful ones."""
    record["dropped_fraction"] = dropped / (record["T"] * record["K"])
    passes = 3 if _training(record["family"]) else 1
    record["flops"] -= 6 * dropped * record["D"] * record["F"] * passes


def _layer_stats(stats: dict) -> dict | None:
    """What the layer reported of its call, without tensors (the padded layer's drop
    mask): the triton layer's path, tile heights, tile slots, combine and tuned configs,
    the sorted layer's grouped_mm, the padded layer's capacity and drops."""

    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items() if not torch.is_tensor(v)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)

    return plain(stats) or None


def _config_label(config: dict) -> str:
    """'128x64 w8 s3 TMA persistent': BLOCK_N x BLOCK_K, warps, stages, the options set."""
    label = (
        f"{config['BLOCK_N']}x{config['BLOCK_K']} w{config['num_warps']} s{config['num_stages']}"
    )
    if config.get("TMA"):
        label += " TMA"
    if config.get("PERSISTENT"):
        label += " persistent"
    if config.get("N_BLOCKS", 1) > 1:
        label += f" {config['N_BLOCKS']} col blocks"
    return label


def tuned_kernels(layer_stats) -> dict | None:
    """From a triton record's layer_stats: its path, tile heights (rows; 'big + small' with
    two) and the gate_up and down configs, as labels; None for other records."""
    config = layer_stats.get("config") if isinstance(layer_stats, dict) else None
    if not config:
        return None
    heights = layer_stats["block_m"]
    if layer_stats["big_m"]:
        heights = f"{layer_stats['big_m']} + {heights}"
    return {"path": layer_stats["path"], "tiles": heights,
            "gate_up": _config_label(config["gate_up"]),
            "down": _config_label(config["down"])}  # fmt: skip


def _time(record, call, ctx) -> None:
    """Time `call` and fill in the record's timing, memory and throughput fields."""
    timing = harness.measure(call, ctx["timer"], **ctx["timing"])
    peak, peak_label = harness.peak_memory(call, ctx["device"])
    seconds = timing.median_ms * 1e-3
    record.update(
        status="ok",
        time_ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        cv=timing.cv,
        repeats=timing.repeats,
        host_ms=timing.host_ms,
        peak_bytes=peak,
        peak_label=peak_label,
        tokens_per_s=record["T"] / seconds,
        tflops=record["flops"] / seconds / 1e12,
        roofline_fraction=harness.roofline_fraction(
            record["flops"], record["min_bytes"], timing.median_ms, ctx["ceilings"]
        ),
    )


def _skip(record: dict, reason: str) -> dict:
    record.update(status="skipped", reason=reason)
    for key in ("time_ms", "p20_ms", "p80_ms", "cv", "repeats", "host_ms", "graph_ms",
                "peak_bytes", "tokens_per_s"):  # fmt: skip
        record[key] = None
    record.update(tflops=None, roofline_fraction=None, dropped_fraction=None, rel_err=None)
    return record


def _add_imbalance(records: list[dict]) -> None:
    balanced = {
        (r["family"], r["label"], r["impl"]): r["time_ms"]
        for r in records
        if r["skew"] == "balanced" and r["status"] == "ok"
    }
    for r in records:
        base = balanced.get((r["family"], r["label"], r["impl"]))
        if r["status"] == "ok" and base:
            r["imbalance_overhead"] = r["time_ms"] / base


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
    ceilings: harness.Ceilings | None = None,
    checkpoint=None,
) -> list[dict]:
    """Measure every point x skew x impl; one record each (see RECORD_FIELDS).

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
    with harness.torch_threads(p.threads):
        timer = timer or harness.make_timer(p.device)
        ctx = {
            "profile": p,
            "device": torch.device(p.device),
            "timer": timer,
            "graph_timer": graph_timer,
            "ceilings": ceilings or ceilings_for(p, timer),
            "timing": timing_options(p, repeats=repeats, warmup=warmup),
            "check": check,
        }
        records = _sweep(points, impls, skews, forward or moe_forward, progress, checkpoint, ctx)
    _add_imbalance(records)
    return records


def timing_options(p: grid.Profile, *, repeats=None, warmup=None) -> dict:
    """harness.measure's options for the profile; a given repeats or warmup count replaces
    the profile's count and its time floor."""
    return {
        "warmup": p.warmup if warmup is None else warmup,
        "warmup_s": p.warmup_s if warmup is None else 0.0,
        "repeats": p.repeats if repeats is None else repeats,
        "min_time_s": p.min_time_s if repeats is None else 0.0,
        "max_time_s": p.max_time_s,
    }


class Breakdown(NamedTuple):
    kernels: list[dict]  # harness.op_times: kernels' device time (CUDA) or ops' CPU time
    # harness.host_times on a GPU: the host's time issuing a call, by function (on the CPU
    # the ops are the host's time already: empty)
    host: list[dict]


def op_breakdown(point: grid.Point, impl: str, skew: str, *, profile, calls: int = 10):
    """Where one forward call of `impl` spends its time on the point's inputs and routing as
    the sweep makes them, after two untimed calls (compile, tune): a Breakdown. Raises
    RuntimeError when the inputs cannot be made here."""
    p = grid.get_profile(profile)
    device = torch.device(p.device)
    with harness.torch_threads(p.threads):
        inputs, reason = _inputs(point, device, torch_dtype(p.dtype))
        if inputs is None:
            raise RuntimeError(reason)
        weights, x_TD = inputs
        routing = make_routing(point.T, point.cfg, skew=skew, seed=SEED, device=device)
        call = lambda: moe_forward(x_TD, routing, weights, impl=impl, check=False)
        for _ in range(2):
            call()
        kernels = harness.op_times(call, device, calls=calls)
        cuda = device.type == "cuda"
        return Breakdown(kernels, harness.host_times(call, device, calls=calls) if cuda else [])


def format_breakdown(breakdown: Breakdown, top: int) -> str:
    """A Breakdown's `top` kernels (or CPU ops), then its `top` host functions if any."""
    text = harness.format_op_times(breakdown.kernels, top)
    if breakdown.host:
        text += "\n  host time issuing one call onto an idle device (cProfile, self time):\n"
        text += harness.format_op_times(breakdown.host, top, "functions")
    return text


def _sweep(points, impls, skews, forward, progress, checkpoint, ctx) -> list[dict]:
    device, dtype = ctx["device"], torch_dtype(ctx["profile"].dtype)
    total = len(points) * len(skews) * len(impls)
    records: list[dict] = []

    def done(record):
        records.append(record)
        if progress is not None:
            progress(len(records), total, record)

    for point in points:
        inputs, reason = _inputs(point, device, dtype)
        for skew in skews:
            try:
                routing = make_routing(point.T, point.cfg, skew=skew, seed=SEED, device=device)
                load = load_stats(routing, point.cfg.num_experts)
            except Exception as e:  # the routing does not fit: its points are skipped
                routing, routing_reason = None, _failure(e)
            for impl in impls:
                record = _base_record(point, impl, skew, dtype)
                if routing is None:
                    done(_skip(record, routing_reason))
                    continue
                touched = point.cfg.num_experts - load.empty_experts
                record.update(
                    max_over_mean=load.max_over_mean,
                    touched_experts=touched,
                    # fwd + bwd reads the weights and writes their gradients; x, y, dy, dx
                    min_bytes=harness.min_bytes(point.cfg, point.T, touched, dtype.itemsize)
                    * (2 if _training(point.family) else 1),
                )
                if inputs is None:
                    done(_skip(record, reason))
                    continue
                if impl == "triton" and device.type != "cuda":
                    done(_skip(record, "unsupported: triton needs a CUDA device"))
                    continue
                weights, x_TD = inputs
                try:
                    _measure(record, forward, impl, x_TD, routing, weights, ctx)
                except Exception as e:  # one broken point must not end a sweep of hours
                    _skip(record, _failure(e))
                if record["status"] != "ok":
                    _release(device)
                done(record)
            del routing
        del inputs
        _release(device)
        if checkpoint is not None:
            checkpoint(records)
    return records


# --- run files --------------------------------------------------------------------------


def _jsonable(value):
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_atomic(path, write) -> Path:
    """write(f), f a binary file, into a temporary file beside `path`, then rename it over
    `path`: a reader never sees half a file, and a failure leaves the previous one whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_run(path, env: dict, records: list[dict]) -> Path:
    """Write a run file atomically (write_atomic), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dump = lambda value: json.dumps(_jsonable(value), allow_nan=False)
    # One record per line: compact, and a diff of two runs reads point by point.
    text = (
        f'{{"env": {dump(env)},\n"profile": {dump(env.get("profile"))},\n"records": [\n'
        + ",\n".join(dump(r) for r in records)
        + "\n]}\n"
    )
    return write_atomic(path, lambda f: f.write(text.encode()))


class BadRun(ValueError):
    """A file that is not a readable moebench run; the message names it and says why."""


def read_run(path) -> dict:
    """A run file's content ({"env", "profile", "records"}); BadRun where it is missing,
    truncated or not a run."""
    try:
        with open(path) as f:
            run = json.load(f)
    except OSError as e:
        raise BadRun(f"{path}: cannot read the run: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRun(f"{path}: not JSON, a truncated or foreign file ({e})") from e
    if not (
        isinstance(run, dict)
        and isinstance(run.get("env"), dict)
        and isinstance(run.get("records"), list)
    ):
        raise BadRun(f"{path}: not a moebench run (no env and records)")
    return run


def load_run(path):
    """(env, pandas.DataFrame with one row per record and at least RECORD_FIELDS)."""
    import pandas as pd  # only the report and the gate need pandas

    run = read_run(path)
    frame = pd.DataFrame(run["records"])
    for column in RECORD_FIELDS:
        if column not in frame:
            frame[column] = None
    return run["env"], frame


def run_path(results_dir, env: dict) -> Path:
    """results/<profile>-<machine>/run-<UTC time>.json"""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(results_dir) / f"{env['profile']}-{env['machine']}" / f"run-{stamp}.json"


def run_profile(
    profile=None,
    *,
    output=None,
    results_dir="results",
    families=None,
    impls=grid.IMPLS,
    skews=grid.SKEWS,
    check: bool = True,
    flush_l2: bool = False,
    cuda_graph: bool = False,
    progress=None,
) -> Path:
    """Measure the profile's families (ceilings first), write the run file, return its path
    (`output`, else run_path(results_dir, env)). The file is rewritten after every point,
    marked `"partial": true` in its env until the sweep ends, so a sweep that is stopped
    keeps what it measured."""
    p = grid.get_profile(profile)
    timer = harness.make_timer(p.device, flush_l2=flush_l2, cuda_graph=cuda_graph)
    graph_timer = None
    if p.graph_impls and not cuda_graph:
        graph_timer = harness.make_timer(p.device, flush_l2=flush_l2, cuda_graph=True)
    started = time.perf_counter()
    points = [pt for family in families or grid.families(p) for pt in grid.points(family, p)]
    with harness.torch_threads(p.threads):
        ceilings = ceilings_for(p, timer)
        env = harness.environment(p.name, device=p.device, timer=timer, ceilings=ceilings)
        env["timing"] = timing_options(p)
        path = output or run_path(results_dir, env)

        def checkpoint(records):
            duration = round(time.perf_counter() - started, 1)
            write_run(path, {**env, "partial": True, "duration_s": duration}, records)

        records = run_points(
            points,
            impls,
            skews,
            profile=p,
            check=check,
            progress=progress,
            timer=timer,
            graph_timer=graph_timer,
            ceilings=ceilings,
            checkpoint=checkpoint,
        )
    env["duration_s"] = round(time.perf_counter() - started, 1)
    return write_run(path, env, records)


def asv_records(profile: grid.Profile, results_dir) -> dict:
    """The records asv reports, keyed by (family, label, impl, skew): the run file named by
    MOEBENCH_RUN (what `nox -s bench` measured just before), else a fresh run of the
    profile written under results_dir."""
    path = os.environ.get("MOEBENCH_RUN") or run_profile(profile, results_dir=results_dir)
    run = read_run(path)
    if run["profile"] != profile.name:
        raise ValueError(
            f"{path} is a {run['profile']!r} run; the suites were built for profile "
            f"{profile.name!r} (set MOEBENCH_PROFILE to match)"
        )
    return {(r["family"], r["label"], r["impl"], r["skew"]): r for r in run["records"]}


def asv_lookup(records: dict, family, label, impl, skew, metrics) -> dict:
    """The record of one asv parameter combination; NotImplementedError (asv: skipped)
    with the reason when the sweep skipped it or lacks one of `metrics`."""
    record = records.get((family, label, impl, skew))
    if record is None:
        raise NotImplementedError(f"{family} {label} {impl} {skew}: not in this run")
    if record["status"] != "ok":
        raise NotImplementedError(record["reason"])
    missing = [m for m in metrics if record.get(m) is None]
    if missing:
        raise NotImplementedError(f"{', '.join(missing)} not measured for this point")
    return record


# --- progress and command line ---------------------------------------------------------


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


def _csv(choices):
    def parse(text):
        values = [v for v in text.split(",") if v]
        if not values:
            raise argparse.ArgumentTypeError(f"an empty list; known: {', '.join(choices)}")
        bad = [v for v in values if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; known: {', '.join(choices)}")
        return values

    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moebench.sweep", description="Run a benchmark profile; write its run."
    )
    parser.add_argument("--profile", choices=list(grid.PROFILES), default=None)
    parser.add_argument("--output", help="run file (default results/<profile>-<machine>/...)")
    parser.add_argument("--results-dir", default="results")
    train = tuple(f + grid.TRAIN for f in grid.FAMILIES)
    parser.add_argument("--families", type=_csv(grid.FAMILIES + train), default=None)
    parser.add_argument("--impls", type=_csv(grid.IMPLS), default=list(grid.IMPLS))
    parser.add_argument("--skews", type=_csv(grid.SKEWS), default=list(grid.SKEWS))
    parser.add_argument("--no-check", action="store_true", help="skip the float64 check")
    parser.add_argument("--flush-l2", action="store_true", help="cold L2 before each call")
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA graph replays")
    args = parser.parse_args(argv)
    if args.output and Path(args.output).is_dir():
        parser.error(f"--output {args.output} is a folder; give the run file's path")
    path = run_profile(
        args.profile,
        output=args.output,
        results_dir=args.results_dir,
        families=args.families,
        impls=args.impls,
        skews=args.skews,
        check=not args.no_check,
        flush_l2=args.flush_l2,
        cuda_graph=args.cuda_graph,
        progress=Progress(),
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
