"""The environment record that goes with every result."""

import re

import torch

from moebench.bench import environment, roofline, timing


def test_environment_record():
    timer = timing.CpuTimer()
    ceilings = roofline.Ceilings(1e12, 1e9, "fake")
    env = environment.environment("tiny", device="cpu", timer=timer, ceilings=ceilings)
    for key in (
        *("commit", "date", "machine", "hostname", "cpu", "gpu", "driver", "cuda"),
        *("torch", "triton", "python", "clocks", "harness_version", "timer", "l2", "profile"),
    ):
        assert key in env
    assert env["harness_version"] == environment.HARNESS_VERSION
    assert (env["profile"], env["timer"], env["l2"]) == ("tiny", "cpu perf_counter", "n/a")
    assert env["torch"] == torch.__version__
    assert env["ceilings"]["matmul_flops"] == 1e12
    assert env["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["commit"])


def test_machine_name_follows_the_environment_variable(monkeypatch):
    monkeypatch.setenv("MOEBENCH_MACHINE", "bench-box")
    assert environment.machine_name() == "bench-box"
