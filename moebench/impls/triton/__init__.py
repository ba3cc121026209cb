"""The `triton` MoE layer: Triton kernels over a tile schedule of expert-sorted rows.

README.md in this folder describes the design. The files, each one concern: schedule.py
(the tile schedule and its kernels), kernels.py (forward kernels), kernels_bwd.py
(backward kernels), configs.py (every tuning knob, the search spaces, the tuners and the
public seam that changes them), launch.py (tuned and direct launches), ops.py (launchers,
custom ops, autograd).

T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from ...quant import QuantizedTensor
from . import configs, ops, schedule
from .ops import COMBINES

__all__ = ["COMBINES", "check_runnable", "forward"]


def check_runnable(x_TD, *, interpreted=configs.INTERPRET):
    """Refuse what the kernels cannot run: CPU tensors without the interpreter, bf16 under
    it. interpreted: whether the kernels run under TRITON_INTERPRET=1 (read at import)."""
    if x_TD.device.type != "cuda" and not interpreted:
        raise RuntimeError(
            "the triton implementation needs a CUDA device, or TRITON_INTERPRET=1 to run on the CPU"
        )
    if interpreted and x_TD.dtype == torch.bfloat16:
        # Its outputs are far off (results/gpu-h200/NOTES.md), not merely imprecise.
        raise ValueError(
            "the triton implementation gives wrong bfloat16 results under TRITON_INTERPRET=1 "
            "(the interpreter misreads bf16 loads): use float32 or float16 there, bf16 on a GPU"
        )


def check_quantized(x_TD, gate_up, needs_grad, compiling):
    """Refuse what the kernels cannot run over quantized weights: autograd, torch.compile,
    blocks that the reduction blocks do not divide, fp8 before Ada/Hopper."""
    if needs_grad or compiling:
        raise ValueError(
            "the triton layer runs quantized weights forward only: no autograd or torch.compile"
        )
    if gate_up.fmt != "int8" and gate_up.block % QUANT_BLOCK:
        raise ValueError(
            f"the triton layer takes {gate_up.fmt} blocks that are multiples of {QUANT_BLOCK} "
            f"(its deepest reduction block), got {gate_up.block}"
        )
    fp8 = gate_up.format.activations
    if fp8 and x_TD.is_cuda and torch.cuda.get_device_capability(x_TD.device) < (8, 9):
        raise ValueError("fp8-block needs fp8 tensor cores (sm_89 or later) for the triton layer")


# The scales' groups along the reduction must hold whole BLOCK_K blocks (configs.prune).
QUANT_BLOCK = 128


def forward(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF, out_TD, stats, *,
            combine="pairs"):  # fmt: skip
    """y[t] = sum_j weights[t,j] * expert_{ids[t,j]}(x[t]), written into out_TD and returned.

    x_TD [T, D]; ids_TK [T, K] int64 in [0, E); weights_TK [T, K] float; gate_up_E2FD
    [E, 2F, D] (gate rows, then up rows); down_EDF [E, D, F]; out_TD [T, D] in x's dtype,
    every element overwritten. Accumulates in fp32; `combine` (forward and dx): "pairs"
    rounds each pair's row to x's dtype and sums a token's K rows in a fixed order (bitwise
    reproducible), "atomic" adds them into fp32 in a run-dependent order. When autograd
    needs gradients of x, weights_TK, gate_up or down, the layer runs through the
    `moebench::fused_moe` op and out_TD carries the graph; otherwise the kernels run
    straight into out_TD. stats, when a dict, receives the path, the tile heights (block_m,
    and big_m, 0 for one height), the tile slots, the combine mode and, without autograd,
    the configs of the last launch of each kernel. gate_up_E2FD and down_EDF may be
    moebench.quant.QuantizedTensor (forward only; see kernels.py).
    """
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; known: {', '.join(COMBINES)}")
    check_runnable(x_TD)
    T, K = ids_TK.shape
    E, F2, _ = gate_up_E2FD.shape
    weights_TK = weights_TK.contiguous()  # the kernels read it by pair index
    path = configs.path_for(T)
    if stats is not None:
        stats["path"] = path
    if T * K == 0 or F2 == 0:
        return out_TD.zero_()

    t_bucket = configs.pow2(T)
    block_m = configs.block_m_for(path, t_bucket, K, E)
    big_m = configs.big_m_for(path, block_m, t_bucket)
    tall_over = configs.tall_over(path, block_m) if big_m else 0
    differentiable = (x_TD, weights_TK, gate_up_E2FD, down_EDF)
    quantized = isinstance(gate_up_E2FD, QuantizedTensor)
    grads = differentiable[:2] if quantized else differentiable
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in grads)
    compiling = torch.compiler.is_compiling()
    if quantized:
        check_quantized(x_TD, gate_up_E2FD, needs_grad, compiling)
    if compiling:
        tiles = schedule.TileSchedule(
            *schedule._tile_schedule_op(ids_TK, E, block_m, big_m, tall_over)
        )
    elif T == 1 and not needs_grad:
        tiles, big_m = schedule.pair_tiles(ids_TK), 0  # one height: a row per tile
    else:
        tiles = schedule.tile_schedule(ids_TK, E, block_m, big_m, tall_over)
    if stats is not None:
        stats.update(block_m=block_m, big_m=big_m, tile_slots=tiles.expert_N.numel(),
                     combine=ops.combine_mode(K, combine))  # fmt: skip
    if needs_grad or compiling:
        # The op is what autograd differentiates and what torch.compile keeps as one node
        # (tracing into the kernel launches fails under the interpreter).
        y_TD, _ = ops.fused_moe(*differentiable, *tiles, path, block_m, big_m, combine)
        return out_TD.copy_(y_TD)
    fp8 = quantized and gate_up_E2FD.format.activations
    sections = ops.plan(tiles, block_m, big_m, path, F2 // 2, fp8)
    if quantized:
        config = ops.quantized_forward(
            x_TD, gate_up_E2FD, down_EDF, weights_TK.reshape(-1), tiles, sections, out_TD, K,
            path, t_bucket, combine,
        )  # fmt: skip
        if stats is not None:
            stats["config"] = config
        return out_TD
    h_SF, gate_up_config = ops.gate_up_swiglu(
        x_TD, gate_up_E2FD, tiles, sections, K, path, t_bucket
    )
    _, down_config = ops.down_combine(
        h_SF, down_EDF, weights_TK.reshape(-1), tiles, sections, out_TD, K, path, t_bucket,
        combine,
    )  # fmt: skip
    if stats is not None:
        stats["config"] = {"gate_up": gate_up_config, "down": down_config}
    return out_TD
