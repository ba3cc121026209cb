"""Where a call's time goes: cProfile's host functions."""

import time

import pytest
import torch

from moebench.bench import profiling

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _twice_asleep():
    for _ in range(2):
        _asleep()


def _asleep():
    time.sleep(0.002)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_host_times_name_the_functions_a_call_spends_its_host_time_in(device):
    """Self time per call, by function: the sleep takes the time, its callers almost none;
    calls are per call (two sleeps a call); the profiler's own switch is not a row."""
    rows = profiling.host_times(_twice_asleep, device, calls=3)
    sleep = next(r for r in rows if r["name"] == "<built-in method time.sleep>")
    assert sleep["calls"] == 2 and 4e3 <= sleep["time_us"] < 4e4
    asleep = next(r for r in rows if r["name"].endswith(" _asleep"))
    assert asleep["name"].startswith("bench/test_profiling.py:") and asleep["calls"] == 2
    assert asleep["time_us"] < 0.1 * sleep["time_us"]
    assert rows[0] is sleep and not any("disable" in r["name"] for r in rows)
    text = profiling.format_op_times(rows, 1, "functions")
    assert f"in {len(rows)} functions; the largest:" in text and "time.sleep" in text
