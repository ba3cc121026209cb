"""Peak memory of one call: CUDA's allocator statistics, or on the CPU the tensor storages
a call creates (StorageTracker)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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
