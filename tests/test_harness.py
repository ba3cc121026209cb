"""The measuring harness with fake clocks and known inputs: statistics, timers, the FLOP
and byte model, the roofline, peak memory and the environment record."""

import math
import re
import statistics
import time

import numpy as np
import pytest
import torch

import moebench as mb
from moebench import harness


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
    t = harness.summarize([4.0, 1.0, 100.0, 3.0, 2.0], label="fake")
    assert t.median_ms == 3.0
    # Order statistics 1, 2, 3, 4, 100: p20 sits at position 0.8, p80 at 3.2.
    assert t.p20_ms == pytest.approx(1.8)
    assert t.p80_ms == pytest.approx(4.0 + 0.2 * 96.0)
    assert t.cv == pytest.approx(statistics.stdev([1, 2, 3, 4, 100]) / 22.0)
    assert (t.repeats, t.label) == (5, "fake")


def test_summarize_one_sample_has_no_spread():
    t = harness.summarize([7.5])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.cv) == (7.5, 7.5, 7.5, 0.0)
    with pytest.raises(ValueError, match="no timing samples"):
        harness.summarize([])


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_percentile_matches_numpy_linear(q):
    values = list(np.random.default_rng(1).exponential(size=17))
    assert harness.percentile(values, q) == pytest.approx(np.percentile(values, 100 * q))


def test_cpu_timer_reads_the_clock_around_each_call():
    clock = FakeClock()
    durations = iter([0.001, 0.004, 0.002])
    timer = harness.CpuTimer(clock)
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

    t = harness.measure(fn, harness.CpuTimer(clock), warmup=2, repeats=5)
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

    t = harness.measure(fn, harness.CpuTimer(clock), warmup=1, repeats=50, max_time_s=0.1)
    assert t.repeats == expected_repeats
    assert len(calls) == 1 + 1 + expected_repeats  # warm-up, the estimate, the repeats
    assert t.median_ms == pytest.approx(call_s * 1e3)


@pytest.mark.parametrize(
    ("call_s", "floors", "expected_warmup", "expected_repeats"),
    [
        (0.001, dict(warmup_s=0.01), 10, 5),  # 2 counted + 8 more: 10 ms of warm-up
        (0.001, dict(min_time_s=0.05), 2, 50),  # 50 ms of timed calls, not 5
        (0.010, dict(min_time_s=1.0), 2, 20),  # the budget (0.2 s) still bounds them
        (1e-6, dict(min_time_s=1.0), 2, harness.MAX_REPEATS),
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

    timer = harness.CpuTimer(clock)
    t = harness.measure(fn, timer, warmup=2, repeats=5, max_time_s=0.2, **floors)
    assert t.repeats == expected_repeats
    assert len(calls) == expected_warmup + 1 + expected_repeats  # with the estimate


def test_cuda_only_timer_options_are_refused_on_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        harness.make_timer("cpu", flush_l2=True)
    assert isinstance(harness.make_timer("cpu"), harness.CpuTimer)


CFG = mb.MoEConfig(d_model=4, d_ff=2, num_experts=8, top_k=2, num_shared_experts=1)


def test_useful_flops_count_routed_and_shared_matmuls():
    # 3 tokens x 2 experts: 6 pairs; each pair 3 matmuls of D x F, 2 FLOPs per multiply-add.
    assert harness.useful_flops(CFG, 3) == 6 * 6 * 4 * 2 + 6 * 3 * 4 * 2
    assert harness.useful_flops(CFG.replace(num_shared_experts=0), 3) == 6 * 6 * 4 * 2


def test_min_bytes_counts_touched_experts_once_plus_x_and_y():
    # 5 touched experts of 3*D*F elements, the shared expert, x read and y written; bf16.
    expected = (5 * 3 * 4 * 2 + 3 * 4 * 2 + 2 * 3 * 4) * 2
    assert harness.min_bytes(CFG, num_tokens=3, touched_experts=5, itemsize=2) == expected
    w = mb.ExpertWeights.random(CFG, dtype=torch.bfloat16)
    assert harness.min_bytes(CFG.replace(num_shared_experts=0), 1, 1, 2) == (
        w.expert_nbytes + 2 * 4 * 2
    )


@pytest.mark.parametrize(
    ("flops", "nbytes", "time_ms", "fraction"),
    [
        (2e9, 1e6, 4.0, 0.5),  # compute bound: 2 ms of matmul at 1 TFLOP/s
        (1e6, 3e6, 6.0, 0.5),  # memory bound: 3 ms of copy at 1 GB/s
        (1e9, 1e6, 1.0, 1.0),  # exactly at the roofline
    ],
    ids=["compute-bound", "memory-bound", "at-roofline"],
)
def test_roofline_fraction(flops, nbytes, time_ms, fraction):
    ceilings = harness.Ceilings(matmul_flops=1e12, copy_bytes=1e9, label="fake")
    assert harness.roofline_fraction(flops, nbytes, time_ms, ceilings) == pytest.approx(fraction)


def test_measured_ceilings_are_plausible_on_this_cpu():
    c = harness.measure_ceilings(
        "cpu", torch.float32, harness.CpuTimer(), matmul_n=128, copy_bytes=2**20, repeats=3
    )
    assert 1e6 < c.matmul_flops < 1e15
    assert 1e6 < c.copy_bytes < 1e13
    assert "float32 matmul 128^3" in c.label


MIB = 2**20


def test_cpu_peak_counts_live_tensors_created_inside():
    def fn():
        a = torch.ones(MIB // 4)  # 1 MiB
        b = torch.ones(MIB // 2)  # 2 MiB: 3 MiB live
        del a
        c = b * 2  # 2 MiB, a freed: 4 MiB live
        return c.sum()

    peak, label = harness.peak_memory(fn, "cpu")
    assert peak == pytest.approx(4 * MIB, abs=64)
    assert label == harness.CPU_PEAK_LABEL


def test_cpu_peak_keeps_a_storage_alive_through_its_views():
    def fn():
        h = torch.ones(2, MIB // 4)  # 2 MiB
        first, second = h.chunk(2)
        del h  # the views keep all 2 MiB alive
        return (torch.ones(MIB // 4) + first + second).sum()  # 2 more MiB at the peak

    peak, _ = harness.peak_memory(fn, "cpu")
    assert peak == pytest.approx(4 * MIB, abs=64)


def test_cpu_peak_ignores_inputs_and_in_place_work():
    x = torch.ones(MIB // 4)

    def fn():
        x.mul_(2)
        x[:10].add_(1)

    peak, _ = harness.peak_memory(fn, "cpu")
    assert peak == 0


def test_environment_record():
    timer = harness.CpuTimer()
    ceilings = harness.Ceilings(1e12, 1e9, "fake")
    env = harness.environment("tiny", device="cpu", timer=timer, ceilings=ceilings)
    for key in (
        *("commit", "date", "machine", "hostname", "cpu", "gpu", "driver", "cuda"),
        *("torch", "triton", "python", "clocks", "harness_version", "timer", "l2", "profile"),
    ):
        assert key in env
    assert env["harness_version"] == harness.HARNESS_VERSION
    assert (env["profile"], env["timer"], env["l2"]) == ("tiny", "cpu perf_counter", "n/a")
    assert env["torch"] == torch.__version__
    assert env["ceilings"]["matmul_flops"] == 1e12
    assert env["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["commit"])


def test_machine_name_follows_the_environment_variable(monkeypatch):
    monkeypatch.setenv("MOEBENCH_MACHINE", "bench-box")
    assert harness.machine_name() == "bench-box"


def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    with harness.torch_threads(1):
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
    timer = harness.make_timer("cuda", flush_l2=flush_l2, cuda_graph=cuda_graph)
    t = harness.measure(lambda: a @ a, timer, warmup=2, repeats=5)
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

    t = harness.measure(host_bound, harness.make_timer("cuda"), warmup=1, repeats=5)
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
    t = harness.measure(device_bound, harness.make_timer("cuda"), warmup=2, repeats=500)
    assert t.host_ms < 0.5 * t.median_ms, (t.host_ms, t.median_ms)


def _twice_asleep():
    for _ in range(2):
        _asleep()


def _asleep():
    time.sleep(0.002)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_host_times_name_the_functions_a_call_spends_its_host_time_in(device):
    """Self time per call, by function: the sleep takes the time, its callers almost none;
    calls are per call (two sleeps a call); the profiler's own switch is not a row."""
    rows = harness.host_times(_twice_asleep, device, calls=3)
    sleep = next(r for r in rows if r["name"] == "<built-in method time.sleep>")
    assert sleep["calls"] == 2 and 4e3 <= sleep["time_us"] < 4e4
    asleep = next(r for r in rows if r["name"].endswith(" _asleep"))
    assert asleep["name"].startswith("tests/test_harness.py:") and asleep["calls"] == 2
    assert asleep["time_us"] < 0.1 * sleep["time_us"]
    assert rows[0] is sleep and not any("disable" in r["name"] for r in rows)
    text = harness.format_op_times(rows, 1, "functions")
    assert f"in {len(rows)} functions; the largest:" in text and "time.sleep" in text


@cuda
def test_cuda_peak_is_above_what_was_allocated_before():
    x = torch.ones(MIB, device="cuda")  # 4 MiB already allocated: not counted
    peak, label = harness.peak_memory(lambda: (x * 2).sum(), "cuda")
    assert label == harness.CUDA_PEAK_LABEL
    assert 4 * MIB <= peak < 5 * MIB
