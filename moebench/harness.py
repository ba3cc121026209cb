"""The measuring harness: timers, peak memory, the FLOP and byte model, the device's
ceilings and the environment record that goes with every result.

Timers are objects with `prepare(fn) -> fn`, `samples(fn, n) -> [ms]` and a `label` (and,
where the device runs apart from the host, `host_ms` after `samples`), so that `measure` is
the same loop on every device and tests can drive it with a fake clock.
Medians, not means: a stray slow repeat (a context switch, a clock ramp) must not move the
number; the spread is kept as p20/p80 and the coefficient of variation.

T tokens, D model width, F expert hidden width, Fs shared hidden width, E experts,
K experts per token, S = T*K token-expert pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .config import MoEConfig

# Bump when a change to this file changes what the numbers mean (the gate refuses to
# compare runs of different harness versions).
HARNESS_VERSION = "1"


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


# --- peak memory ---------------------------------------------------------------------

CUDA_PEAK_LABEL = "cuda max_memory_allocated"
CPU_PEAK_LABEL = "cpu tracked tensor storages (allocator workspaces not seen)"


class StorageTracker(TorchDispatchMode):
    """Bytes of the tensor storages created under this mode that are still referenced.

    Every aten op's outputs are inspected: a storage that no input shares is a new
    allocation; views and in-place results of it keep it alive until the last tensor on
    it is garbage. This is the CPU's stand-in for max_memory_allocated: it sees every
    tensor the layer creates but not scratch memory inside a single op.
    """

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages = {}  # data_ptr -> [nbytes, live tensors on it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._storages:
                if ptr == 0 or ptr in inputs:
                    continue  # empty, or a view of memory that existed before
                self._storages[ptr] = [storage.nbytes(), 0]
                self.live_bytes += storage.nbytes()
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self._storages[ptr][1] += 1
            weakref.finalize(t, self._release, ptr)
        return out

    def _release(self, ptr):
        entry = self._storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._storages[ptr]


def peak_memory(fn, device) -> tuple[int, str]:
    """Bytes allocated during one call of `fn` above what was allocated before it (the
    inputs and weights), with the label of how it was measured."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, CUDA_PEAK_LABEL
    tracker = StorageTracker()
    with tracker:
        fn()
    return tracker.peak_bytes, CPU_PEAK_LABEL


# --- FLOP and byte model ---------------------------------------------------------------


def useful_flops(cfg: MoEConfig, num_tokens: int) -> int:
    """6*S*D*F routed + 6*T*D*Fs shared: padding does not count, and the sweep takes the
    padded layer's dropped pairs out (6*D*F each)."""
    return cfg.flops(num_tokens)


def min_bytes(cfg: MoEConfig, num_tokens: int, touched_experts: int, itemsize: int) -> int:
    """What the layer must move at least: each expert that received a token read once, the
    shared expert read once, x read and y written once."""
    D, F, Fs = cfg.d_model, cfg.d_ff, cfg.d_ff_shared
    weights = (touched_experts * 3 * D * F + 3 * D * Fs) * itemsize
    return weights + 2 * num_tokens * D * itemsize


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The device's measured limits in the profile's dtype."""

    matmul_flops: float  # FLOP/s of a large square matmul
    copy_bytes: float  # bytes/s read plus written by a large device-to-device copy
    label: str

    def roofline_ms(self, flops: int, nbytes: int) -> float:
        """The least time the layer can take here: compute bound or memory bound."""
        return max(flops / self.matmul_flops, nbytes / self.copy_bytes) * 1e3


def roofline_fraction(flops: int, nbytes: int, time_ms: float, ceilings: Ceilings) -> float:
    return ceilings.roofline_ms(flops, nbytes) / time_ms


def measure_ceilings(
    device,
    dtype: torch.dtype,
    timer,
    *,
    matmul_n: int,
    copy_bytes: int,
    warmup: int = 2,
    repeats: int = 10,
) -> Ceilings:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    a, b = randn(matmul_n, matmul_n), randn(matmul_n, matmul_n)
    mm = measure(lambda: torch.mm(a, b), timer, warmup=warmup, repeats=repeats)
    src = randn(copy_bytes // dtype.itemsize)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), timer, warmup=warmup, repeats=repeats)
    nbytes = src.numel() * dtype.itemsize
    return Ceilings(
        matmul_flops=2 * matmul_n**3 / (mm.median_ms * 1e-3),
        copy_bytes=2 * nbytes / (copy.median_ms * 1e-3),
        label=(
            f"{str(dtype).removeprefix('torch.')} matmul {matmul_n}^3, "
            f"copy {nbytes / 2**20:.0f} MiB, {timer.label}"
        ),
    )


# --- environment record ------------------------------------------------------------------


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _version(package: str) -> str | None:
    # Read from the installed metadata: importing triton just to ask costs seconds.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu(device) -> dict:
    """Name, driver and clocks of the GPU; nvidia-smi is asked because torch does not
    report the driver or clocks."""
    if not torch.cuda.is_available():
        return {"gpu": None, "driver": None, "clocks": None}
    index = torch.device(device).index or 0
    fields = "driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit"
    smi = _run(["nvidia-smi", f"--id={index}", f"--query-gpu={fields}", "--format=csv,noheader"])
    driver, clocks = None, None
    if smi:
        values = [v.strip() for v in smi.splitlines()[0].split(",")]
        driver = values[0]
        clocks = dict(zip(fields.split(",")[1:], values[1:], strict=False))
    return {"gpu": torch.cuda.get_device_name(index), "driver": driver, "clocks": clocks}


def git_commit(cwd=None) -> tuple[str | None, bool | None]:
    """HEAD's hash and whether tracked files have uncommitted changes, for the checkout
    that holds this package (asv runs suites from a temporary directory)."""
    where = str(cwd or Path(__file__).resolve().parent)
    commit = _run(["git", "-C", where, "rev-parse", "HEAD"])
    status = _run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"])
    return commit, (None if commit is None else bool(status))


def machine_name() -> str:
    """MOEBENCH_MACHINE, else the host name: names the results directory."""
    return os.environ.get("MOEBENCH_MACHINE") or platform.node() or "unknown"


def asv_machine() -> dict:
    """This machine in asv's terms (`asv machine --yes` alone records only the name)."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "os": platform.platform(),
        "arch": platform.machine(),
        "cpu": f"{_cpu_model()}{gpu}",
        "num_cpu": str(os.cpu_count()),
        "ram": f"{ram / 2**30:.0f}GB",
    }


def environment(
    profile: str | None = None,
    *,
    device=None,
    timer=None,
    ceilings: Ceilings | None = None,
) -> dict:
    """Everything a result depends on besides the code: machine, versions, clocks, the
    timer and L2 mode, the commit and the harness version."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    commit, dirty = git_commit()
    return {
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_name(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **_gpu(device),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "moebench": _version("moebench"),
        "harness_version": HARNESS_VERSION,
        "device": str(device),
        "timer": timer.label if timer is not None else None,
        "l2": timer.l2 if timer is not None else None,
        "profile": profile,
        "ceilings": dataclasses.asdict(ceilings) if ceilings is not None else None,
    }
