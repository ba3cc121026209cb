"""A point's inputs: weights and x made on the device, when the memory allows.

T tokens, D model width, F expert hidden width, Fs shared hidden width, E experts,
K experts per token, S = T*K token-expert pairs, B the quantization block size.
"""

from __future__ import annotations

import gc
import os

import torch

from ..weights import ExpertWeights
from . import grid
from .records import failure
from .roofline import quant_expert_bytes

SEED = 0


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def point_inputs(point: grid.Point, device: torch.device, dtype: torch.dtype, block: int):
    """(weights, x, floats) for a point, or the reason they cannot be made here. A quant
    point's weights are the same random layer as its models or sonicmoe point's (`floats`,
    for quant_err) quantized in blocks of `block`; floats is None elsewhere."""
    cfg = point.cfg
    experts = cfg.num_experts * cfg.d_ff + cfg.d_ff_shared
    weights_bytes = 3 * cfg.d_model * experts * dtype.itemsize
    if point.quant:
        # The float weights and the quantized ones (quantize works a few experts at a
        # time). The float weights are kept: quant_err needs the unquantized oracle's
        # experts, which each routing picks (on an 80 GB H100, deepseek-v3 is 22 GB in
        # bf16 and 11 GB in fp8-block).
        weights_bytes += cfg.num_experts * quant_expert_bytes(cfg, point.quant, block, dtype)
    # Leave a tenth of the free memory for the layer's own buffers.
    free = free_memory(device)
    if weights_bytes > 0.9 * free:
        return None, (
            f"out of memory: weights need {weights_bytes / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB free on {device}"
        )
    try:
        weights = floats = ExpertWeights.random(cfg, dtype=dtype, device=device, seed=SEED)
        if point.quant:
            weights = floats.quantize(point.quant, block)
        else:
            floats = None
        gen = torch.Generator(device=device).manual_seed(SEED + 1)
        x_TD = torch.randn(point.T, cfg.d_model, generator=gen, device=device, dtype=dtype)
    except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's failure
        release(device)
        return None, failure(e)
    return (weights, x_TD, floats), None
