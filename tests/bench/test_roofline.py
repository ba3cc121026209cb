"""The FLOP and byte model, the roofline fraction and the measured ceilings."""

import pytest
import torch

import moebench as mb
from moebench.bench import roofline, timing

CFG = mb.MoEConfig(d_model=4, d_ff=2, num_experts=8, top_k=2, num_shared_experts=1)


def test_useful_flops_count_routed_and_shared_matmuls():
    # 3 tokens x 2 experts: 6 pairs; each pair 3 matmuls of D x F, 2 FLOPs per multiply-add.
    assert roofline.useful_flops(CFG, 3) == 6 * 6 * 4 * 2 + 6 * 3 * 4 * 2
    assert roofline.useful_flops(CFG.replace(num_shared_experts=0), 3) == 6 * 6 * 4 * 2


def test_min_bytes_counts_touched_experts_once_plus_x_and_y():
    # 5 touched experts of 3*D*F elements, the shared expert, x read and y written; bf16.
    expected = (5 * 3 * 4 * 2 + 3 * 4 * 2 + 2 * 3 * 4) * 2
    assert roofline.min_bytes(CFG, num_tokens=3, touched_experts=5, itemsize=2) == expected
    w = mb.ExpertWeights.random(CFG, dtype=torch.bfloat16)
    assert roofline.min_bytes(CFG.replace(num_shared_experts=0), 1, 1, 2) == (
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
    ceilings = roofline.Ceilings(matmul_flops=1e12, copy_bytes=1e9, label="fake")
    assert roofline.roofline_fraction(flops, nbytes, time_ms, ceilings) == pytest.approx(fraction)


def test_measured_ceilings_are_plausible_on_this_cpu():
    c = roofline.measure_ceilings(
        "cpu", torch.float32, timing.CpuTimer(), matmul_n=128, copy_bytes=2**20, repeats=3
    )
    assert 1e6 < c.matmul_flops < 1e15
    assert 1e6 < c.copy_bytes < 1e13
    assert "float32 matmul 128^3" in c.label
