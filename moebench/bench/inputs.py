"""A point's inputs: weights and x made on the device, when the memory allows.

T tokens, D model width, F expert hidden width, Fs shared hidden width, E experts,
K experts per token, S = T*K token-expert pairs.
"""

from __future__ import annotations

import gc
import os

import torch

from ..weights import ExpertWeights
from . import grid
from .records import failure

SEED = 0


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def point_inputs(point: grid.Point, device: torch.device, dtype: torch.dtype):
    """Weights and x for a point, or the reason they cannot be made here."""
    cfg = point.cfg
    experts = cfg.num_experts * cfg.d_ff + cfg.d_ff_shared
    weights_bytes = 3 * cfg.d_model * experts * dtype.itemsize
    # Leave a tenth of the free memory for the layer's own buffers.
    free = free_memory(device)
    if weights_bytes > 0.9 * free:
        return None, (
            f"out of memory: weights need {weights_bytes / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB free on {device}"
        )
    try:
        weights = ExpertWeights.random(cfg, dtype=dtype, device=device, seed=SEED)
        gen = torch.Generator(device=device).manual_seed(SEED + 1)
        x_TD = torch.randn(point.T, cfg.d_model, generator=gen, device=device, dtype=dtype)
    except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's failure
        release(device)
        return None, failure(e)
    return (weights, x_TD), None
