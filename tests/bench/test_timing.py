"""Timers and the measuring loop with fake clocks: statistics, repeats, time budgets."""

import math
import statistics
import time

import numpy as np
import pytest
import torch

from moebench.bench import timing


class FakeClock:
    """A clock that moves only when told: a call 'takes' exactly what it advances."""

    def __init__(self):
        self.now = 100.0
        self.reads = 0

    def __call__(self):
        self.reads += 1
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_summarize_known_samples():
    t = timing.summarize([4.0, 1.0, 100.0, 3.0, 2.0], label="fake")
    assert t.median_ms == 3.0
    # Order statistics 1, 2, 3, 4, 100: p20 sits at position 0.8, p80 at 3.2.
    assert t.p20_ms == pytest.approx(1.8)
    assert t.p80_ms == pytest.approx(4.0 + 0.2 * 96.0)
    assert t.cv == pytest.approx(statistics.stdev([1, 2, 3, 4, 100]) / 22.0)
    assert (t.repeats, t.label) == (5, "fake")


def test_summarize_one_sample_has_no_spread():
    t = timing.summarize([7.5])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.cv) == (7.5, 7.5, 7.5, 0.0)
    with pytest.raises(ValueError, match="no timing samples"):
        timing.summarize([])


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_percentile_matches_numpy_linear(q):
    values = list(np.random.default_rng(1).exponential(size=17))
    assert timing.percentile(values, q) == pytest.approx(np.percentile(values, 100 * q))


def test_cpu_timer_reads_the_clock_around_each_call():
    clock = FakeClock()
    durations = iter([0.001, 0.004, 0.002])
    timer = timing.CpuTimer(clock)
    samples = timer.samples(lambda: clock.advance(next(durations)), 3)
    assert samples == pytest.approx([1.0, 4.0, 2.0])
    assert clock.reads == 6


def test_measure_warms_up_untimed_then_takes_the_median():
    clock = FakeClock()
    calls = []
    # The first two calls are slow (compilation, allocation): they must not count.
    costs = iter([5.0, 5.0, 0.003, 0.001, 0.002, 0.009, 0.002])

    def fn():
        calls.append(1)
        clock.advance(next(costs))

    t = timing.measure(fn, timing.CpuTimer(clock), warmup=2, repeats=5)
    assert len(calls) == 7
    assert t.repeats == 5
    assert t.median_ms == pytest.approx(2.0)
    assert t.p80_ms == pytest.approx(3.0 + 0.2 * 6.0)


@pytest.mark.parametrize(
    ("call_s", "expected_repeats"),
    [(0.010, 10), (0.001, 50), (1.0, 3)],
    ids=["budget-cuts", "fast-full-count", "slow-floor"],
)
def test_measure_fits_repeats_to_the_time_budget(call_s, expected_repeats):
    clock = FakeClock()
    calls = []

    def fn():
        calls.append(1)
        clock.advance(call_s)

    t = timing.measure(fn, timing.CpuTimer(clock), warmup=1, repeats=50, max_time_s=0.1)
    assert t.repeats == expected_repeats
    assert len(calls) == 1 + 1 + expected_repeats  # warm-up, the estimate, the repeats
    assert t.median_ms == pytest.approx(call_s * 1e3)


@pytest.mark.parametrize(
    ("call_s", "floors", "expected_warmup", "expected_repeats"),
    [
        (0.001, dict(warmup_s=0.01), 10, 5),  # 2 counted + 8 more: 10 ms of warm-up
        (0.001, dict(min_time_s=0.05), 2, 50),  # 50 ms of timed calls, not 5
        (0.010, dict(min_time_s=1.0), 2, 20),  # the budget (0.2 s) still bounds them
        (1e-6, dict(min_time_s=1.0), 2, timing.MAX_REPEATS),
        (0.050, dict(warmup_s=0.01, min_time_s=0.05), 2, 4),  # slow: as without floors
    ],
    ids=["warmup-floor", "time-floor", "budget-over-floor", "repeat-cap", "slow-calls"],
)
def test_measure_time_floors(call_s, floors, expected_warmup, expected_repeats):
    clock = FakeClock()
    calls = []

    def fn():
        calls.append(1)
        clock.advance(call_s)

    timer = timing.CpuTimer(clock)
    t = timing.measure(fn, timer, warmup=2, repeats=5, max_time_s=0.2, **floors)
    assert t.repeats == expected_repeats
    assert len(calls) == expected_warmup + 1 + expected_repeats  # with the estimate


def test_cuda_only_timer_options_are_refused_on_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        timing.make_timer("cpu", flush_l2=True)
    assert isinstance(timing.make_timer("cpu"), timing.CpuTimer)


def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    with timing.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize(
    ("flush_l2", "cuda_graph", "label"),
    [
        (False, False, "cuda events, warm-l2"),
        (True, False, "cuda events, cold-l2"),
        (False, True, "cuda events, warm-l2, cuda graph"),
    ],
)
def test_cuda_timer_modes_are_labelled_and_time_real_work(flush_l2, cuda_graph, label):
    a = torch.randn(1024, 1024, device="cuda")
    timer = timing.make_timer("cuda", flush_l2=flush_l2, cuda_graph=cuda_graph)
    t = timing.measure(lambda: a @ a, timer, warmup=2, repeats=5)
    assert t.label == label
    assert 0 < t.median_ms < 1e3 and not math.isnan(t.cv)
    assert 0 < t.host_ms < 1e3


@cuda
def test_cuda_host_time_sees_a_host_bound_call():
    """A call that sleeps on the host between two tiny kernels: its device time is the host's."""
    a = torch.ones(16, device="cuda")

    def host_bound():
        a.add_(1)
        time.sleep(0.005)
        a.add_(1)

    t = timing.measure(host_bound, timing.make_timer("cuda"), warmup=1, repeats=5)
    assert t.host_ms >= 5.0 and t.median_ms >= 0.8 * t.host_ms


@cuda
def test_cuda_host_time_is_not_the_wait_for_a_full_launch_queue():
    """Back to back, a device-bound call fills the launch queue and the host waits for
    room; host_ms is what issuing one call costs with nothing queued."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)

    def device_bound():  # 10 launches of 0.14 TFLOP: about 2 ms of device time a call
        for _ in range(10):
            torch.mm(a, a, out=b)

    # 500 calls queue 5000 launches, far more than CUDA's launch queue holds: issue time
    # summed over the timed calls (host_ms before 2026-11-26) approaches the device time.
    t = timing.measure(device_bound, timing.make_timer("cuda"), warmup=2, repeats=500)
    assert t.host_ms < 0.5 * t.median_ms, (t.host_ms, t.median_ms)
