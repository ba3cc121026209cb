"""Backward kernels of the `triton` layer: the SwiGLU backward (dgate, dup and the routing
weights' gradient) and the experts' weight gradients. dx reuses the forward's down kernel.
See README.md in this folder for the design.

Inside the kernels: i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ blocks.
T tokens, D model width, F expert hidden width, E experts, K experts per token,
S = T*K token-expert pairs.
"""

import triton
import triton.language as tl

from .kernels import _tile_coords


@triton.jit
def _swiglu_backward_kernel(
    x_ptr, dy_ptr, w1_ptr, w2_ptr, routing_ptr, dgu_ptr, dw_ptr, order_ptr, tile_expert_ptr,
    tile_start_ptr, tile_end_ptr, tile_count_ptr,
    D, F, K, E, T_BUCKET, slot0, section,
    stride_xt, stride_xd, stride_dyt, stride_dyd, stride_w1e, stride_w1f, stride_w1d,
    stride_w2e, stride_w2d, stride_w2f, stride_gs, stride_gf, stride_dwn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, LOOP: tl.constexpr = False,
):  # fmt: skip
    # Items as in _gate_up_kernel. int64 index math: done once per item, so free when
    # compiled, and it spares the interpreter its overflow checks of int32 products.
    num_tiles = tl.load(tile_count_ptr + section)
    num_blocks_n = (F + BLOCK_N - 1) // BLOCK_N
    items = num_tiles * num_blocks_n
    pid = tl.program_id(0).to(tl.int64)
    if LOOP:
        for item in range(pid, items, tl.num_programs(0)):
            _swiglu_backward_tile(
                item, num_tiles, num_blocks_n, x_ptr, dy_ptr, w1_ptr, w2_ptr, routing_ptr,
                dgu_ptr, dw_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, F,
                K, slot0, D, stride_xt, stride_xd, stride_dyt, stride_dyd, stride_w1e,
                stride_w1f, stride_w1d, stride_w2e, stride_w2d, stride_w2f, stride_gs,
                stride_gf, stride_dwn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE_M,
            )  # fmt: skip
    else:
        if pid < items:
            _swiglu_backward_tile(
                pid, num_tiles, num_blocks_n, x_ptr, dy_ptr, w1_ptr, w2_ptr, routing_ptr,
                dgu_ptr, dw_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, F,
                K, slot0, D, stride_xt, stride_xd, stride_dyt, stride_dyd, stride_w1e,
                stride_w1f, stride_w1d, stride_w2e, stride_w2d, stride_w2f, stride_gs,
                stride_gf, stride_dwn, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE_M,
            )  # fmt: skip


@triton.jit
def _swiglu_backward_tile(
    item, num_tiles, num_blocks_n, x_ptr, dy_ptr, w1_ptr, w2_ptr, routing_ptr, dgu_ptr,
    dw_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, F, K, slot0, D,
    stride_xt, stride_xd, stride_dyt, stride_dyd, stride_w1e, stride_w1f, stride_w1d,
    stride_w2e, stride_w2d, stride_w2f, stride_gs, stride_gf, stride_dwn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):  # fmt: skip
    i_m, i_n = _tile_coords(item, num_tiles, num_blocks_n, GROUP_SIZE_M)
    row_start = tl.load(tile_start_ptr + slot0 + i_m)
    row_end = tl.load(tile_end_ptr + slot0 + i_m)
    i_e = tl.load(tile_expert_ptr + slot0 + i_m)

    o_m = row_start + tl.arange(0, BLOCK_M)
    m_m = o_m < row_end
    o_p = tl.load(order_ptr + o_m, mask=m_m, other=0)
    o_t = o_p // K
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < F
    o_k = tl.arange(0, BLOCK_K).to(tl.int64)

    # One pass over D feeds three products that share the rows of x and dy: gate and up
    # (recomputed) and g = dy @ down[e], the gradient of h before the routing weight.
    p_x = x_ptr + o_t[:, None] * stride_xt + o_k[None, :] * stride_xd
    p_dy = dy_ptr + o_t[:, None] * stride_dyt + o_k[None, :] * stride_dyd
    p_gate = w1_ptr + i_e * stride_w1e + o_n[None, :] * stride_w1f + o_k[:, None] * stride_w1d
    p_up = p_gate + F * stride_w1f
    p_down = w2_ptr + i_e * stride_w2e + o_k[:, None] * stride_w2d + o_n[None, :] * stride_w2f
    b_gate = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    b_up = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    b_g = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        m_k = o_k < D - k
        m_rows = m_m[:, None] & m_k[None, :]
        m_cols = m_k[:, None] & m_n[None, :]
        b_x = tl.load(p_x, mask=m_rows, other=0.0)
        b_dy = tl.load(p_dy, mask=m_rows, other=0.0)
        b_gate += tl.dot(b_x, tl.load(p_gate, mask=m_cols, other=0.0), input_precision="ieee")
        b_up += tl.dot(b_x, tl.load(p_up, mask=m_cols, other=0.0), input_precision="ieee")
        b_g += tl.dot(b_dy, tl.load(p_down, mask=m_cols, other=0.0), input_precision="ieee")
        p_x += BLOCK_K * stride_xd
        p_dy += BLOCK_K * stride_dyd
        p_gate += BLOCK_K * stride_w1d
        p_up += BLOCK_K * stride_w1d
        p_down += BLOCK_K * stride_w2d

    b_sig = 1.0 / (1.0 + tl.exp(-b_gate))
    b_silu = b_gate * b_sig
    # <dy[t], down[e] @ h> = <g, h>: this F block's share of the routing weight's gradient;
    # padding rows and columns hold zeros and add nothing.
    tl.store(dw_ptr + i_n * stride_dwn + o_p, tl.sum(b_g * b_silu * b_up, axis=1), mask=m_m)
    b_dh = b_g * tl.load(routing_ptr + o_p, mask=m_m, other=0.0).to(tl.float32)[:, None]
    b_dgate = b_dh * b_up * b_sig * (1.0 + b_gate * (1.0 - b_sig))
    b_dup = b_dh * b_silu
    p_dgu = dgu_ptr + o_m[:, None] * stride_gs + o_n[None, :] * stride_gf
    m_dgu = m_m[:, None] & m_n[None, :]
    tl.store(p_dgu, b_dgate.to(dgu_ptr.dtype.element_ty), mask=m_dgu)
    tl.store(p_dgu + F * stride_gf, b_dup.to(dgu_ptr.dtype.element_ty), mask=m_dgu)


@triton.jit
def _expert_grad_kernel(
    a_ptr, b_ptr, out_ptr, order_ptr, routing_ptr, offsets_ptr,
    N, C, K, E, S_BUCKET,
    stride_as, stride_an, stride_bs, stride_bc, stride_oe, stride_on, stride_oc,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # out[e] [N, C] = a_rows^T @ b_rows over expert e's sorted rows. The reduction runs over
    # rows, so each program owns one output tile and loops; an idle expert's loop is empty
    # and its program stores zeros, which is what makes its gradient exactly zero.
    num_blocks_n = (N + BLOCK_N - 1) // BLOCK_N
    num_blocks_c = (C + BLOCK_C - 1) // BLOCK_C
    # int64 from the program id on: E * N * C, the size of the output, can pass 2^31.
    pid = tl.program_id(0).to(tl.int64)
    i_e = pid // (num_blocks_n * num_blocks_c)
    i_n = pid % (num_blocks_n * num_blocks_c) // num_blocks_c
    i_c = pid % num_blocks_c
    row_start = tl.load(offsets_ptr + i_e)
    row_end = tl.load(offsets_ptr + i_e + 1)

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    p_a_cols = a_ptr + o_n[:, None] * stride_an
    p_b_cols = b_ptr + o_c[None, :] * stride_bc
    b_out = tl.full((BLOCK_N, BLOCK_C), 0.0, dtype=tl.float32)
    for m in range(row_start, row_end, BLOCK_M):
        o_m = m + tl.arange(0, BLOCK_M)
        m_m = o_m < row_end
        # Sorted rows index h and [dgate, dup]; x and dy are gathered by token.
        o_p = tl.load(order_ptr + o_m, mask=m_m, other=0)
        o_a = o_m
        if GATHER_A:
            o_a = o_p // K
        o_b = o_m
        if GATHER_B:
            o_b = o_p // K
        p_a = p_a_cols + o_a[None, :] * stride_as
        b_a = tl.load(p_a, mask=m_n[:, None] & m_m[None, :], other=0.0)
        if WEIGHTED:
            b_w = tl.load(routing_ptr + o_p, mask=m_m, other=0.0).to(tl.float32)
            b_a = (b_a.to(tl.float32) * b_w[None, :]).to(a_ptr.dtype.element_ty)
        p_b = p_b_cols + o_b[:, None] * stride_bs
        b_b = tl.load(p_b, mask=m_m[:, None] & m_c[None, :], other=0.0)
        b_out += tl.dot(b_a, b_b, input_precision="ieee")

    p_out = out_ptr + i_e * stride_oe + o_n[:, None] * stride_on + o_c[None, :] * stride_oc
    tl.store(p_out, b_out.to(out_ptr.dtype.element_ty), mask=m_n[:, None] & m_c[None, :])
