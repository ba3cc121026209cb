"""Peak memory: the CPU's tracked tensor storages and CUDA's allocator statistics."""

import pytest
import torch

from moebench.bench import memory

MIB = 2**20
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_peak_counts_live_tensors_created_inside():
    def fn():
        a = torch.ones(MIB // 4)  # 1 MiB
        b = torch.ones(MIB // 2)  # 2 MiB: 3 MiB live
        del a
        c = b * 2  # 2 MiB, a freed: 4 MiB live
        return c.sum()

    peak, label = memory.peak_memory(fn, "cpu")
    assert peak == pytest.approx(4 * MIB, abs=64)
    assert label == memory.CPU_PEAK_LABEL


def test_cpu_peak_keeps_a_storage_alive_through_its_views():
    def fn():
        h = torch.ones(2, MIB // 4)  # 2 MiB
        first, second = h.chunk(2)
        del h  # the views keep all 2 MiB alive
        return (torch.ones(MIB // 4) + first + second).sum()  # 2 more MiB at the peak

    peak, _ = memory.peak_memory(fn, "cpu")
    assert peak == pytest.approx(4 * MIB, abs=64)


def test_cpu_peak_ignores_inputs_and_in_place_work():
    x = torch.ones(MIB // 4)

    def fn():
        x.mul_(2)
        x[:10].add_(1)

    peak, _ = memory.peak_memory(fn, "cpu")
    assert peak == 0


@cuda
def test_cuda_peak_is_above_what_was_allocated_before():
    x = torch.ones(MIB, device="cuda")  # 4 MiB already allocated: not counted
    peak, label = memory.peak_memory(lambda: (x * 2).sum(), "cuda")
    assert label == memory.CUDA_PEAK_LABEL
    assert 4 * MIB <= peak < 5 * MIB
