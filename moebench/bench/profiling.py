"""Where a call's time goes: torch.profiler's kernels (or CPU ops), cProfile's host
functions, and one point's breakdown as the sweep makes its inputs."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from ..config import torch_dtype
from ..layer import moe_forward
from ..routing import make_routing
from . import grid
from .inputs import SEED, point_inputs
from .timing import torch_threads


def op_times(fn, device, *, calls: int = 10) -> list[dict]:
    """Where the time of one call of `fn` goes, from torch.profiler over `calls` calls.

    On CUDA, one row per kernel: its device time and launches per call. On the CPU, one row
    per op: its self time (its children's excluded) and calls per call. Rows are sorted by
    time_us, the largest first; `fn` should be warm (compiled, tuned).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for event in prof.key_averages():
        if cuda and event.device_type != DeviceType.CUDA:
            continue  # a CPU op: its kernels are rows of their own
        total = event.self_device_time_total if cuda else event.self_cpu_time_total
        if total > 0:
            rows.append({"name": event.key, "time_us": total / calls, "calls": event.count / calls})
    return sorted(rows, key=lambda r: -r["time_us"])


def host_times(fn, device, *, calls: int = 10) -> list[dict]:
    """Where the host time of one call of `fn` goes: cProfile's self time of each Python
    function and builtin (a torch op, a kernel launcher's C entry, a driver call), per call,
    over `calls` calls. Each call is issued with the device idle (synchronized outside the
    profile), so that no launch waits for room in a full queue (see CudaTimer). Rows as
    op_times's, the largest first; `fn` should be warm.
    """
    import cProfile
    import pstats

    cuda = torch.device(device).type == "cuda"
    profiler = cProfile.Profile()
    for _ in range(calls):
        if cuda:
            torch.cuda.synchronize(device)
        profiler.enable()
        fn()
        profiler.disable()
    if cuda:
        torch.cuda.synchronize(device)
    rows = []
    for (path, line, name), (_, count, self_s, _, _) in pstats.Stats(profiler).stats.items():
        if name == "<method 'disable' of '_lsprof.Profiler' objects>" or self_s <= 0:
            continue
        where = "/".join(Path(path).parts[-2:]) + f":{line} " if line else ""
        rows.append({"name": where + name, "time_us": self_s / calls * 1e6, "calls": count / calls})
    return sorted(rows, key=lambda r: -r["time_us"])


def format_op_times(rows: list[dict], top: int, what: str = "kernels or ops") -> str:
    """op_times (or host_times) rows: the total, then the `top` largest, one per line."""
    total = sum(r["time_us"] for r in rows)
    lines = [f"  {total:.4g} us per call in {len(rows)} {what}; the largest:"]
    lines.append(f"  {'time us':>10}  {'share':>6}  {'per call':>8}  name")
    for r in rows[:top]:
        share = r["time_us"] / total
        lines.append(f"  {r['time_us']:>10.4g}  {share:>6.1%}  {r['calls']:>8.3g}  {r['name']}")
    return "\n".join(lines)


class Breakdown(NamedTuple):
    kernels: list[dict]  # op_times: kernels' device time (CUDA) or ops' CPU time
    # host_times on a GPU: the host's time issuing a call, by function (on the CPU
    # the ops are the host's time already: empty)
    host: list[dict]


def op_breakdown(point: grid.Point, impl: str, skew: str, *, profile, calls: int = 10):
    """Where one forward call of `impl` spends its time on the point's inputs and routing as
    the sweep makes them, after two untimed calls (compile, tune): a Breakdown. Raises
    RuntimeError when the inputs cannot be made here."""
    p = grid.get_profile(profile)
    device = torch.device(p.device)
    with torch_threads(p.threads):
        inputs, reason = point_inputs(point, device, torch_dtype(p.dtype), p.quant_block)
        if inputs is None:
            raise RuntimeError(reason)
        weights, x_TD, _ = inputs
        routing = make_routing(point.T, point.cfg, skew=skew, seed=SEED, device=device)
        call = lambda: moe_forward(x_TD, routing, weights, impl=impl, check=False)
        for _ in range(2):
            call()
        kernels = op_times(call, device, calls=calls)
        cuda = device.type == "cuda"
        return Breakdown(kernels, host_times(call, device, calls=calls) if cuda else [])


def format_breakdown(breakdown: Breakdown, top: int) -> str:
    """A Breakdown's `top` kernels (or CPU ops), then its `top` host functions if any."""
    text = format_op_times(breakdown.kernels, top)
    if breakdown.host:
        text += "\n  host time issuing one call onto an idle device (cProfile, self time):\n"
        text += format_op_times(breakdown.host, top, "functions")
    return text
