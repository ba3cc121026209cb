"""The `triton` MoE layer: two Triton kernels over a tile schedule of expert-sorted rows.

The S token-expert pairs are stable-sorted by expert on the device and cut into tiles of
BLOCK_M sorted rows, each tile belonging to one expert; only experts that received tokens
get tiles, so a layer with 8192 experts and a handful of tokens each launches no program for
an empty expert and pads no expert to a fixed capacity (ideas from vLLM's
moe_align_block_size and ScatterMoE's scatter2scatter). Everything on the host is torch ops
with shapes known from the input shapes alone: no host synchronisation, so the layer can be
captured in a CUDA graph. The grid has room for the most tiles any routing can produce,
cdiv(S, BLOCK_M) + min(E, S); programs past the real tile count exit at once.

Kernel 1 gathers each tile's rows of x straight from the unsorted input (token = pair // K,
no permuted copy of x), computes the gate and up projections in one pass over D and stores
h = silu(gate) * up in sorted row order. Kernel 2 multiplies h by the expert's down
projection, scales each row by its routing weight and combines: fp32 atomic adds into the
output by default; with `deterministic=True` each pair's row is stored in pair order and the
K rows of a token are summed by torch in a fixed order, so the result is bitwise
reproducible. With K == 1 a token has a single row, which is stored straight into the output.

Two paths share the kernels. `decode` (T <= DECODE_MAX_TOKENS) uses tiles of 16 rows and
narrow, deep blocks so that many programs stream the touched experts' weights once; it is
bound by reading those weights. `prefill` sizes BLOCK_M to the expected rows per expert and
uses wide blocks with a grouped tile order for L2 reuse. Both autotune on (E, D, F, K, a
power-of-two token bucket); under TRITON_INTERPRET=1 one small fixed config is used.

T tokens, D model width, F expert hidden width, E experts, K experts per token,
S = T*K token-expert pairs, N tile slots in the schedule.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# tl.dot has no float64; fp32 runs exact (no TF32), fp16/bf16 accumulate in fp32.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_MAX_TOKENS = 64
PATHS = ("decode", "prefill")
# Read once: it decides at import whether @triton.jit builds interpreted kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tile_coords(pid, num_tiles, num_blocks_n, GROUP_SIZE_M: tl.constexpr):
    # Consecutive programs walk GROUP_SIZE_M tiles before moving to the next column block,
    # so a group of tiles of one expert shares its weight blocks in L2.
    group_width = GROUP_SIZE_M * num_blocks_n
    first_tile = (pid // group_width) * GROUP_SIZE_M
    group_size = tl.minimum(num_tiles - first_tile, GROUP_SIZE_M)
    i_m = first_tile + (pid % group_width) % group_size
    i_n = (pid % group_width) // group_size
    return i_m, i_n


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    D, F, K, E, T_BUCKET, num_tiles,
    stride_xt, stride_xd, stride_we, stride_wf, stride_wd, stride_hs, stride_hf,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):  # fmt: skip
    i_m, i_n = _tile_coords(tl.program_id(0), num_tiles, (F + BLOCK_N - 1) // BLOCK_N, GROUP_SIZE_M)
    row_start = tl.load(tile_start_ptr + i_m)
    row_end = tl.load(tile_end_ptr + i_m)
    if row_start >= row_end:
        return
    i_e = tl.load(tile_expert_ptr + i_m)

    o_m = row_start + tl.arange(0, BLOCK_M)
    m_m = o_m < row_end
    o_t = tl.load(order_ptr + o_m, mask=m_m, other=0) // K
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < F
    o_k = tl.arange(0, BLOCK_K)

    p_x = x_ptr + o_t[:, None] * stride_xt + o_k[None, :] * stride_xd
    p_gate = w_ptr + i_e * stride_we + o_n[None, :] * stride_wf + o_k[:, None] * stride_wd
    p_up = p_gate + F * stride_wf
    b_gate = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    b_up = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        m_k = o_k < D - k
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_wg = tl.load(p_gate, mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_wu = tl.load(p_up, mask=m_k[:, None] & m_n[None, :], other=0.0)
        # "ieee" keeps fp32 inputs exact (no TF32); it does not affect fp16/bf16 inputs.
        b_gate += tl.dot(b_x, b_wg, input_precision="ieee")
        b_up += tl.dot(b_x, b_wu, input_precision="ieee")
        p_x += BLOCK_K * stride_xd
        p_gate += BLOCK_K * stride_wd
        p_up += BLOCK_K * stride_wd

    b_h = b_gate / (1.0 + tl.exp(-b_gate)) * b_up
    p_h = h_ptr + o_m[:, None] * stride_hs + o_n[None, :] * stride_hf
    tl.store(p_h, b_h.to(h_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, y_ptr, order_ptr, routing_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    D, F, K, E, T_BUCKET, num_tiles,
    stride_hs, stride_hf, stride_we, stride_wd, stride_wf, stride_yr, stride_yd,
    ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):  # fmt: skip
    i_m, i_n = _tile_coords(tl.program_id(0), num_tiles, (D + BLOCK_N - 1) // BLOCK_N, GROUP_SIZE_M)
    row_start = tl.load(tile_start_ptr + i_m)
    row_end = tl.load(tile_end_ptr + i_m)
    if row_start >= row_end:
        return
    i_e = tl.load(tile_expert_ptr + i_m)

    o_m = row_start + tl.arange(0, BLOCK_M)
    m_m = o_m < row_end
    o_p = tl.load(order_ptr + o_m, mask=m_m, other=0)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < D
    o_k = tl.arange(0, BLOCK_K)

    p_h = h_ptr + o_m[:, None] * stride_hs + o_k[None, :] * stride_hf
    p_w = w_ptr + i_e * stride_we + o_n[None, :] * stride_wd + o_k[:, None] * stride_wf
    b_y = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, F, BLOCK_K):
        m_k = o_k < F - k
        b_h = tl.load(p_h, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(p_w, mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_y += tl.dot(b_h, b_w, input_precision="ieee")
        p_h += BLOCK_K * stride_hf
        p_w += BLOCK_K * stride_wf

    b_y *= tl.load(routing_ptr + o_p, mask=m_m, other=0.0).to(tl.float32)[:, None]
    m_y = m_m[:, None] & m_n[None, :]
    if ATOMIC:
        p_y = y_ptr + (o_p // K)[:, None] * stride_yr + o_n[None, :] * stride_yd
        tl.atomic_add(p_y, b_y, mask=m_y, sem="relaxed")
    else:
        p_y = y_ptr + o_p[:, None] * stride_yr + o_n[None, :] * stride_yd
        tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)


def _configs(path):
    """Autotune search space of one path (the same for both kernels)."""
    if _INTERPRET:
        # Small blocks so that test shapes cross block edges; no tuning under the interpreter.
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_SIZE_M": 4})]
    if path == "decode":
        # Few rows: many programs with narrow N blocks and deep K blocks stream the weights.
        return [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_SIZE_M": 1}, num_stages=s)
            for n in (32, 64)
            for k in (128, 256)
            for s in (3, 4)
        ]
    # Wide blocks for large tiles; the deep-K ones suit many experts with BLOCK_M = 16.
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_SIZE_M": 8}, num_warps=w, num_stages=s)
        for n, k, w, s in (
            (64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 4, 3),
            (128, 32, 8, 4), (128, 64, 8, 3), (32, 128, 4, 3), (64, 128, 4, 3),
        )
    ]  # fmt: skip


_KEY = ["E", "D", "F", "K", "T_BUCKET"]
_GATE_UP = {p: triton.autotune(_configs(p), key=_KEY)(_gate_up_kernel) for p in PATHS}
# Benchmarking a config adds into y; restoring it keeps the tuned call's result exact.
_DOWN = {
    p: triton.autotune(_configs(p), key=_KEY, restore_value=["y_ptr"])(_down_kernel) for p in PATHS
}


class TileSchedule(NamedTuple):
    """Pairs sorted by expert, cut into tiles of at most BLOCK_M rows of one expert.

    Tile n covers sorted rows [start_N[n], end_N[n]) of expert expert_N[n]; slots past the
    real tile count have start == end == 0.
    """

    order_S: torch.Tensor  # [S] pair index t*K + j of each sorted row, stable within an expert
    expert_N: torch.Tensor  # [N] expert of each tile slot
    start_N: torch.Tensor  # [N] first sorted row of each tile slot
    end_N: torch.Tensor  # [N] one past its last sorted row


def tile_schedule(ids_TK, num_experts, block_m):
    """Build the tile schedule with device ops only; N = cdiv(S, block_m) + min(E, S)."""
    ids_S = ids_TK.reshape(-1)
    S = ids_S.numel()
    sorted_ids_S, order_S = torch.sort(ids_S, stable=True)
    experts = torch.arange(num_experts + 1, device=ids_S.device, dtype=ids_S.dtype)
    offsets_E1 = torch.searchsorted(sorted_ids_S, experts)  # first sorted row of each expert
    tiles_E = (offsets_E1.diff() + block_m - 1) // block_m
    tile_end_E = torch.cumsum(tiles_E, 0)

    # A nonempty expert with c rows has cdiv(c, block_m) <= c // block_m + 1 tiles.
    slot_N = torch.arange(triton.cdiv(S, block_m) + min(num_experts, S), device=ids_S.device)
    expert_N = torch.searchsorted(tile_end_E, slot_N, right=True)
    real_N = expert_N < num_experts
    expert_N = expert_N.clamp_(max=num_experts - 1)
    first_tile_N = tile_end_E[expert_N] - tiles_E[expert_N]
    start_N = offsets_E1[expert_N] + (slot_N - first_tile_N) * block_m
    end_N = torch.minimum(offsets_E1[expert_N + 1], start_N + block_m)
    start_N = torch.where(real_N, start_N, 0)
    end_N = torch.where(real_N, end_N, 0)
    return TileSchedule(order_S, expert_N, start_N, end_N)


def _grid(num_tiles, width):
    return lambda META: (num_tiles * triton.cdiv(width, META["BLOCK_N"]),)


def gate_up_swiglu(x_TD, gate_up_E2FD, schedule, top_k, path, t_bucket, block_m):
    """h_SF = silu(gate[e] @ x[t]) * (up[e] @ x[t]) for every sorted row; [S, F], x's dtype."""
    E, F2, D = gate_up_E2FD.shape
    assert F2 % 2 == 0 and x_TD.shape[1] == D, "gate_up must be [E, 2F, D] with x [T, D]"
    F = F2 // 2
    h_SF = x_TD.new_empty(schedule.order_S.numel(), F)
    num_tiles = schedule.expert_N.numel()
    _GATE_UP[path][_grid(num_tiles, F)](
        x_TD, gate_up_E2FD, h_SF, schedule.order_S, schedule.expert_N, schedule.start_N,
        schedule.end_N, D, F, top_k, E, t_bucket, num_tiles, *x_TD.stride(),
        *gate_up_E2FD.stride(), *h_SF.stride(), BLOCK_M=block_m,
    )  # fmt: skip
    return h_SF


def down_combine(h_SF, down_EDF, weights_TK, schedule, out_TD, path, t_bucket, block_m,
                 deterministic):  # fmt: skip
    """out[t] = sum_j weights[t, j] * down[e] @ h[row of (t, j)]; writes every element of out."""
    E, D, F = down_EDF.shape
    T, K = weights_TK.shape
    assert h_SF.shape == (T * K, F) and out_TD.shape == (T, D), "shapes of h, down, out disagree"
    if K == 1:
        y, atomic, combine = out_TD, False, "store-direct"
    elif deterministic:
        y, atomic, combine = out_TD.new_empty(T * K, D, dtype=torch.float32), False, "store-pairs"
    elif out_TD.dtype == torch.float32:
        y, atomic, combine = out_TD.zero_(), True, "atomic"
    else:
        y, atomic, combine = out_TD.new_zeros(T, D, dtype=torch.float32), True, "atomic"
    num_tiles = schedule.expert_N.numel()
    _DOWN[path][_grid(num_tiles, D)](
        h_SF, down_EDF, y, schedule.order_S, weights_TK.reshape(-1), schedule.expert_N,
        schedule.start_N, schedule.end_N, D, F, K, E, t_bucket, num_tiles, *h_SF.stride(),
        *down_EDF.stride(), *y.stride(), ATOMIC=atomic, BLOCK_M=block_m,
    )  # fmt: skip
    if combine == "store-pairs":
        out_TD.copy_(y.view(T, K, D).sum(1))
    elif y is not out_TD:
        out_TD.copy_(y)
    return combine


def _block_m(path, t_bucket, top_k, num_experts):
    """Tile height: 16 for decode, else the expected rows per expert as a power of two."""
    if path == "decode":
        return 16
    rows_per_expert = triton.cdiv(t_bucket * top_k, num_experts)
    return min(128, max(16, triton.next_power_of_2(rows_per_expert)))


def forward(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF, out_TD, stats, *,
            deterministic=False):  # fmt: skip
    """y[t] = sum_j weights[t,j] * expert_{ids[t,j]}(x[t]), written into out_TD and returned.

    x_TD [T, D]; ids_TK [T, K] int64 in [0, E); weights_TK [T, K] float; gate_up_E2FD
    [E, 2F, D] (gate rows, then up rows); down_EDF [E, D, F]; out_TD [T, D] in x's dtype,
    every element overwritten. Accumulates in fp32 and rounds once. `deterministic=True`
    replaces the atomic combine with a fixed-order sum (bitwise reproducible). stats, when a
    dict, receives the path, BLOCK_M, tile slots, combine mode and the configs used.
    """
    if x_TD.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            "the triton implementation needs a CUDA device, or TRITON_INTERPRET=1 to run on the CPU"
        )
    T, K = ids_TK.shape
    E, F2, _ = gate_up_E2FD.shape
    path = "decode" if T <= DECODE_MAX_TOKENS else "prefill"
    if stats is not None:
        stats["path"] = path
    if T * K == 0 or F2 == 0:
        return out_TD.zero_()

    t_bucket = triton.next_power_of_2(T)
    block_m = _block_m(path, t_bucket, K, E)
    schedule = tile_schedule(ids_TK, E, block_m)
    tile_slots = schedule.expert_N.numel()
    if _INTERPRET:
        # The interpreter runs every program in Python, empty slots too; on the CPU the host
        # sync that trims them is free.
        real = int(schedule.end_N.count_nonzero())
        schedule = TileSchedule(schedule.order_S, *(t[:real] for t in schedule[1:]))
    h_SF = gate_up_swiglu(x_TD, gate_up_E2FD, schedule, K, path, t_bucket, block_m)
    combine = down_combine(
        h_SF, down_EDF, weights_TK, schedule, out_TD, path, t_bucket, block_m, deterministic
    )
    if stats is not None:
        stats.update(
            block_m=block_m,
            tile_slots=tile_slots,
            combine=combine,
            config={
                "gate_up": _GATE_UP[path].best_config.all_kwargs(),
                "down": _DOWN[path].best_config.all_kwargs(),
            },
        )
    return out_TD
