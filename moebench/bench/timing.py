"""Timers and the measuring loop.

Timers are objects with `prepare(fn) -> fn`, `samples(fn, n) -> [ms]` and a `label` (and,
where the device runs apart from the host, `host_ms` after `samples`), so that `measure` is
the same loop on every device and tests can drive it with a fake clock.
Medians, not means: a stray slow repeat (a context switch, a clock ramp) must not move the
number; the spread is kept as p20/p80 and the coefficient of variation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    cv: float  # sample standard deviation / mean
    repeats: int
    label: str  # which timer, e.g. "cuda events, warm-l2"
    # Host time to issue one call, where the timer can tell (CUDA: the calls are queued
    # without waiting for the device). Close to median_ms: the layer is bound by its
    # launches, not its kernels.
    host_ms: float | None = None
    # Every repeat's time in ms, in the order taken: the gate's tests work on them.
    samples_ms: tuple[float, ...] = ()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between order statistics."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples_ms: list[float], label: str = "", host_ms: float | None = None) -> Timing:
    if not samples_ms:
        raise ValueError("no timing samples")
    mean = statistics.fmean(samples_ms)
    spread = statistics.stdev(samples_ms) if len(samples_ms) > 1 else 0.0
    return Timing(
        median_ms=statistics.median(samples_ms),
        p20_ms=percentile(samples_ms, 0.2),
        p80_ms=percentile(samples_ms, 0.8),
        cv=spread / mean if mean > 0 else 0.0,
        repeats=len(samples_ms),
        label=label,
        host_ms=host_ms,
        samples_ms=tuple(samples_ms),
    )


class CpuTimer:
    """Wall time of each call from `clock` (seconds; time.perf_counter by default)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.label = "cpu perf_counter"
        self.l2 = "n/a"

    def prepare(self, fn):
        return fn

    def samples(self, fn, repeats: int) -> list[float]:
        out = []
        for _ in range(repeats):
            start = self.clock()
            fn()
            out.append((self.clock() - start) * 1e3)
        return out


class CudaTimer:
    """CUDA events around each call, synchronized once at the end.

    flush_l2: overwrite a buffer larger than L2 before each call (outside the events), so
    every call starts with a cold cache; otherwise weights stay warm in L2 between calls.
    cuda_graph: capture the call once and time graph replays (no launch overhead); layers
    that synchronize with the host cannot be captured and raise.
    After `samples`, host_ms is the host time that issuing one call takes with nothing
    queued on the device (the median of HOST_CALLS calls after the timed ones, each after a
    synchronize). Timed back to back, a call whose device time exceeds its host time fills
    CUDA's launch queue, and the host then waits for room: the H200 run of e104318 read
    host times of 0.33 ms at scale-out E=8 (a replay of 0.32 ms) and 1.0 ms at E=4096 (3.2)
    that were that wait, not launch cost.
    """

    HOST_CALLS = 5

    def __init__(self, device=None, *, flush_l2: bool = False, cuda_graph: bool = False):
        self.device = torch.device(device or "cuda")
        self.flush_l2 = flush_l2
        self.cuda_graph = cuda_graph
        self.l2 = "cold-l2" if flush_l2 else "warm-l2"
        self.label = f"cuda events, {self.l2}" + (", cuda graph" if cuda_graph else "")
        self._flush_buffer = None
        self.host_ms = None
        if flush_l2:
            l2_bytes = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0)
            self._flush_buffer = torch.empty(
                max(2 * l2_bytes, 256 * 2**20), dtype=torch.int8, device=self.device
            )

    def prepare(self, fn):
        if not self.cuda_graph:
            return fn
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()  # allocations made before capture, on a side stream as capture requires
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    def samples(self, fn, repeats: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends, strict=True):
            if self._flush_buffer is not None:
                self._flush_buffer.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        samples = [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]
        issued = []
        for _ in range(self.HOST_CALLS):
            began = time.perf_counter()
            fn()
            issued.append(time.perf_counter() - began)
            torch.cuda.synchronize(self.device)
        self.host_ms = statistics.median(issued) * 1e3
        return samples


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Run the block with `threads` torch CPU threads (None: leave them as they are)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_timer(device, *, flush_l2: bool = False, cuda_graph: bool = False):
    if torch.device(device).type == "cuda":
        return CudaTimer(device, flush_l2=flush_l2, cuda_graph=cuda_graph)
    if flush_l2 or cuda_graph:
        raise ValueError("flush_l2 and cuda_graph need a CUDA device")
    return CpuTimer()


# The most timed calls one measurement takes (min_time_s of a call of a few microseconds).
MAX_REPEATS = 1000


def measure(
    fn,
    timer,
    *,
    warmup: int,
    repeats: int,
    max_time_s: float | None = None,
    min_repeats: int = 3,
    warmup_s: float = 0.0,
    min_time_s: float = 0.0,
) -> Timing:
    """Median time of `fn` after `warmup` untimed calls.

    With `max_time_s`, one more call is timed first; from its time, untimed calls go on
    until the warm-up has taken warmup_s, and the repeats are `repeats` or enough to take
    min_time_s, whichever is more, cut to take about max_time_s at most, but never below
    min(repeats, min_repeats) nor above MAX_REPEATS: a slow point (the naive loop over 8192
    experts) gets a few repeats, a sub-millisecond one hundreds.
    """
    fn = timer.prepare(fn)
    for _ in range(warmup):
        fn()
    if max_time_s is not None:
        (estimate_ms,) = timer.samples(fn, 1)
        call_s = max(estimate_ms, 1e-6) * 1e-3
        for _ in range(min(MAX_REPEATS, math.ceil(warmup_s / call_s) - warmup)):
            fn()
        wanted = max(repeats, math.ceil(min_time_s / call_s))
        affordable = round(max_time_s / call_s)
        repeats = min(wanted, max(min(repeats, min_repeats), affordable), MAX_REPEATS)
    samples = timer.samples(fn, repeats)
    return summarize(samples, timer.label, getattr(timer, "host_ms", None))
