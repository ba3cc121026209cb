"""Forward kernels of the `triton` layer: gate/up with SwiGLU, down with the routing weight
and the combine, and the pair sum. See README.md in this folder for the design.

Inside the kernels: i_ program ids, o_ offsets, m_ masks, p_ pointers, b_ blocks.

Quantized weights (moebench/quant.py) by QUANT, read through pointers (no TMA):
1 int8: the values converted to the activations' dtype (exact), a scale per output row
  applied once after the reduction;
2 int4: 8 values a 32-bit word along the reduction, unpacked, times the scale of their row
  and group (GROUP_K along the reduction) and rounded once to the activations' dtype;
3 fp8-block: fp8 x fp8 dots (fp8 activations too), each group's fp32 result times the
  activations' scale (a row per GROUP_K) and the weights' (SCALE_N rows per GROUP_K).
A reduction block lies within one group (BLOCK_K divides GROUP_K).

T tokens, D model width, F expert hidden width, E experts, K experts per token,
S = T*K token-expert pairs.
"""

import triton
import triton.language as tl


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
def _weights_block(
    p_w, p_s, k, o_k, stride_k, stride_sk, m_k, m_n, QUANT: tl.constexpr, GROUP_K: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Quantized weights at reduction rows k + o_k of the columns of p_w [1, BLOCK_N] (scales
    # at p_s [BLOCK_N]), [BLOCK_K, BLOCK_N] for the dot: int4 (QUANT 2) dequantized in fp32,
    # the rest as stored. int4 loads each word once and shifts its 8 values (v + 8 at bits
    # 4j) out; BLOCK_K divides the group, so its rows are all there (no mask along k).
    if QUANT == 2:
        o_w = k // 8 + tl.arange(0, BLOCK_K // 8)
        words = tl.load(p_w + o_w[:, None] * stride_k, mask=m_n[None, :], other=0)
        nibbles = (words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF
        values = tl.reshape(nibbles, (BLOCK_K, BLOCK_N)) - 8
        scale = tl.load(p_s + (k // GROUP_K) * stride_sk, mask=m_n, other=0.0)
        b_w = values.to(tl.float32) * scale.to(tl.float32)[None, :]
    else:  # one return: the compiler types every return of a function alike
        b_w = tl.load(p_w + (k + o_k[:, None]) * stride_k, mask=m_k[:, None] & m_n[None, :],
                      other=0.0)  # fmt: skip
    return b_w


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    tile_count_ptr, w_desc, D, F, K, E, T_BUCKET, slot0, section,
    stride_xt, stride_xd, stride_we, stride_wf, stride_wd, stride_hs, stride_hf,
    ws_ptr, as_ptr, stride_wse, stride_wsn, stride_wsk, stride_ast, stride_ask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, TMA: tl.constexpr = False, LOOP: tl.constexpr = False,
    PERSISTENT: tl.constexpr = False, QUANT: tl.constexpr = 0, SCALE_N: tl.constexpr = 1,
    GROUP_K: tl.constexpr = 0,
):  # fmt: skip
    # An item per program, or with LOOP or PERSISTENT every num_programs-th item: (tile,
    # column block) pairs of the section's real tiles, count_2[section] of them. Two call
    # sites, because a loop of at most one trip still costs registers. PERSISTENT (a program
    # an SM) flattens the item loop and the loop over D into one software-pipelined loop:
    # the next item's first blocks load during this item's epilogue.
    num_tiles = tl.load(tile_count_ptr + section).to(tl.int32)
    num_blocks_n = (F + BLOCK_N - 1) // BLOCK_N
    items = num_tiles * num_blocks_n
    if LOOP or PERSISTENT:
        for item in tl.range(tl.program_id(0), items, tl.num_programs(0), flatten=PERSISTENT):
            _gate_up_tile(
                item, num_tiles, num_blocks_n, x_ptr, w_ptr, h_ptr, order_ptr, tile_expert_ptr,
                tile_start_ptr, tile_end_ptr, w_desc, D, F, K, slot0, stride_xt, stride_xd,
                stride_we, stride_wf, stride_wd, stride_hs, stride_hf, ws_ptr, as_ptr,
                stride_wse, stride_wsn, stride_wsk, stride_ast, stride_ask, BLOCK_M, BLOCK_N,
                BLOCK_K, GROUP_SIZE_M, TMA, QUANT, SCALE_N, GROUP_K,
            )  # fmt: skip
    else:
        if tl.program_id(0) < items:
            _gate_up_tile(
                tl.program_id(0), num_tiles, num_blocks_n, x_ptr, w_ptr, h_ptr, order_ptr,
                tile_expert_ptr, tile_start_ptr, tile_end_ptr, w_desc, D, F, K, slot0,
                stride_xt, stride_xd, stride_we, stride_wf, stride_wd, stride_hs, stride_hf,
                ws_ptr, as_ptr, stride_wse, stride_wsn, stride_wsk, stride_ast, stride_ask,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE_M, TMA, QUANT, SCALE_N, GROUP_K,
            )  # fmt: skip


@triton.jit
def _gate_up_tile(
    item, num_tiles, num_blocks_n, x_ptr, w_ptr, h_ptr, order_ptr, tile_expert_ptr,
    tile_start_ptr, tile_end_ptr, w_desc, D, F, K, slot0,
    stride_xt, stride_xd, stride_we, stride_wf, stride_wd, stride_hs, stride_hf,
    ws_ptr, as_ptr, stride_wse, stride_wsn, stride_wsk, stride_ast, stride_ask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, TMA: tl.constexpr, QUANT: tl.constexpr, SCALE_N: tl.constexpr,
    GROUP_K: tl.constexpr,
):  # fmt: skip
    # TMA: the weights come through w_desc, gate_up as [E * 2F, D] in [BLOCK_N, BLOCK_K]
    # boxes (rows past an expert's gate or up half belong to the next half or expert: their
    # columns are not stored; past E * 2F, and past D, the box reads zeros).
    i_m, i_n = _tile_coords(item, num_tiles, num_blocks_n, GROUP_SIZE_M)
    row_start = tl.load(tile_start_ptr + slot0 + i_m)
    row_end = tl.load(tile_end_ptr + slot0 + i_m)
    i_e = tl.load(tile_expert_ptr + slot0 + i_m)

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
    w_row = (i_e * 2 * F + i_n * BLOCK_N).to(tl.int32)  # TMA coordinates are 32-bit
    # Quantized: the weights' base pointers [1, BLOCK_N] (the reduction offset is k's), the
    # gate's and up's scales of these columns, and x's scales of these rows (fp8).
    if QUANT:
        p_wq = w_ptr + i_e * stride_we + o_n[None, :] * stride_wf
        p_sg = ws_ptr + i_e * stride_wse + (o_n // SCALE_N) * stride_wsn
        p_su = ws_ptr + i_e * stride_wse + ((o_n + F) // SCALE_N) * stride_wsn
        if QUANT == 3:
            p_sx = as_ptr + o_t * stride_ast
    for k in range(0, D, BLOCK_K):
        m_k = o_k < D - k
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)
        if QUANT:
            b_wg = _weights_block(
                p_wq, p_sg, k, o_k, stride_wd, stride_wsk, m_k, m_n, QUANT, GROUP_K, BLOCK_K,
                BLOCK_N,
            ).to(b_x.dtype)  # fmt: skip
            b_wu = _weights_block(
                p_wq + F * stride_wf, p_su, k, o_k, stride_wd, stride_wsk, m_k, m_n, QUANT,
                GROUP_K, BLOCK_K, BLOCK_N,
            ).to(b_x.dtype)  # fmt: skip
            if QUANT == 3:  # this group's dots times x's and the weights' scales
                i_s = k // GROUP_K
                b_sx = tl.load(p_sx + i_s * stride_ask, mask=m_m, other=0.0)[:, None]
                b_sg = tl.load(p_sg + i_s * stride_wsk, mask=m_n, other=0.0)[None, :]
                b_su = tl.load(p_su + i_s * stride_wsk, mask=m_n, other=0.0)[None, :]
                b_gate += tl.dot(b_x, b_wg) * (b_sx * b_sg)
                b_up += tl.dot(b_x, b_wu) * (b_sx * b_su)
            else:
                b_gate += tl.dot(b_x, b_wg, input_precision="ieee")
                b_up += tl.dot(b_x, b_wu, input_precision="ieee")
        else:
            if TMA:
                b_wg = w_desc.load([w_row, k]).T
                b_wu = w_desc.load([w_row + F, k]).T
            else:
                b_wg = tl.load(p_gate, mask=m_k[:, None] & m_n[None, :], other=0.0)
                b_wu = tl.load(p_up, mask=m_k[:, None] & m_n[None, :], other=0.0)
            # "ieee" keeps fp32 inputs exact (no TF32); it does not affect fp16/bf16 inputs.
            b_gate += tl.dot(b_x, b_wg, input_precision="ieee")
            b_up += tl.dot(b_x, b_wu, input_precision="ieee")
        p_x += BLOCK_K * stride_xd
        p_gate += BLOCK_K * stride_wd
        p_up += BLOCK_K * stride_wd

    if QUANT == 1:
        b_gate *= tl.load(p_sg, mask=m_n, other=0.0)[None, :]
        b_up *= tl.load(p_su, mask=m_n, other=0.0)[None, :]
    b_h = b_gate / (1.0 + tl.exp(-b_gate)) * b_up
    p_h = h_ptr + o_m[:, None] * stride_hs + o_n[None, :] * stride_hf
    tl.store(p_h, b_h.to(h_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, y_ptr, order_ptr, routing_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    tile_count_ptr, h_desc, w_desc, D, F, K, E, T_BUCKET, slot0, section,
    stride_hs, stride_hf, stride_we, stride_wd, stride_wf, stride_yr, stride_yd,
    ws_ptr, as_ptr, stride_wse, stride_wsn, stride_wsk, stride_ast, stride_ask,
    WEIGHTED: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    TMA: tl.constexpr = False, N_BLOCKS: tl.constexpr = 1, LOOP: tl.constexpr = False,
    PERSISTENT: tl.constexpr = False, QUANT: tl.constexpr = 0, SCALE_N: tl.constexpr = 1,
    GROUP_K: tl.constexpr = 0,
):  # fmt: skip
    # Items as in _gate_up_kernel: (tile, group of N_BLOCKS column blocks) pairs.
    num_tiles = tl.load(tile_count_ptr + section).to(tl.int32)
    num_groups_n = ((D + BLOCK_N - 1) // BLOCK_N + N_BLOCKS - 1) // N_BLOCKS
    items = num_tiles * num_groups_n
    if LOOP or PERSISTENT:
        for item in tl.range(tl.program_id(0), items, tl.num_programs(0), flatten=PERSISTENT):
            _down_tile(
                item, num_tiles, num_groups_n, h_ptr, w_ptr, y_ptr, order_ptr, routing_ptr,
                tile_expert_ptr, tile_start_ptr, tile_end_ptr, h_desc, w_desc, D, F, K, slot0,
                stride_hs, stride_hf, stride_we, stride_wd, stride_wf, stride_yr, stride_yd,
                ws_ptr, as_ptr, stride_wse, stride_wsn, stride_wsk, stride_ast, stride_ask,
                WEIGHTED, ATOMIC, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE_M, TMA, N_BLOCKS, QUANT,
                SCALE_N, GROUP_K,
            )  # fmt: skip
    else:
        if tl.program_id(0) < items:
            _down_tile(
                tl.program_id(0), num_tiles, num_groups_n, h_ptr, w_ptr, y_ptr, order_ptr,
                routing_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, h_desc, w_desc, D,
                F, K, slot0, stride_hs, stride_hf, stride_we, stride_wd, stride_wf, stride_yr,
                stride_yd, ws_ptr, as_ptr, stride_wse, stride_wsn, stride_wsk, stride_ast,
                stride_ask, WEIGHTED, ATOMIC, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE_M, TMA,
                N_BLOCKS, QUANT, SCALE_N, GROUP_K,
            )  # fmt: skip


@triton.jit
def _down_tile(
    item, num_tiles, num_groups_n, h_ptr, w_ptr, y_ptr, order_ptr, routing_ptr,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr, h_desc, w_desc, D, F, K, slot0,
    stride_hs, stride_hf, stride_we, stride_wd, stride_wf, stride_yr, stride_yd,
    ws_ptr, as_ptr, stride_wse, stride_wsn, stride_wsk, stride_ast, stride_ask,
    WEIGHTED: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    TMA: tl.constexpr, N_BLOCKS: tl.constexpr, QUANT: tl.constexpr, SCALE_N: tl.constexpr,
    GROUP_K: tl.constexpr,
):  # fmt: skip
    # TMA: h through h_desc ([S, F], [BLOCK_M, BLOCK_K] boxes at the tile's first row: rows
    # past the tile are other experts' rows, computed and not stored) and the weights
    # through w_desc (down as [E * D, F], [BLOCK_N, BLOCK_K] boxes); past F the boxes read
    # zeros. An item covers N_BLOCKS consecutive BLOCK_N column blocks, one after another.
    i_m, i_g = _tile_coords(item, num_tiles, num_groups_n, GROUP_SIZE_M)
    row_start = tl.load(tile_start_ptr + slot0 + i_m)
    row_end = tl.load(tile_end_ptr + slot0 + i_m)
    i_e = tl.load(tile_expert_ptr + slot0 + i_m)

    o_m = row_start + tl.arange(0, BLOCK_M)
    m_m = o_m < row_end
    o_p = tl.load(order_ptr + o_m, mask=m_m, other=0)
    o_k = tl.arange(0, BLOCK_K)
    for j in range(N_BLOCKS):
        i_n = i_g * N_BLOCKS + j
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < D
        p_h = h_ptr + o_m[:, None] * stride_hs + o_k[None, :] * stride_hf
        p_w = w_ptr + i_e * stride_we + o_n[None, :] * stride_wd + o_k[:, None] * stride_wf
        b_y = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        w_row = (i_e * D + i_n * BLOCK_N).to(tl.int32)  # TMA coordinates are 32-bit
        # Quantized: as in _gate_up_tile, h's scales by sorted row.
        if QUANT:
            p_wq = w_ptr + i_e * stride_we + o_n[None, :] * stride_wd
            p_sw = ws_ptr + i_e * stride_wse + (o_n // SCALE_N) * stride_wsn
        for k in range(0, F, BLOCK_K):
            if QUANT:
                m_k = o_k < F - k
                b_h = tl.load(p_h, mask=m_m[:, None] & m_k[None, :], other=0.0)
                b_w = _weights_block(p_wq, p_sw, k, o_k, stride_wf, stride_wsk, m_k, m_n, QUANT,
                                     GROUP_K, BLOCK_K, BLOCK_N).to(b_h.dtype)  # fmt: skip
                if QUANT == 3:  # this group's dot times h's and the weights' scales
                    i_s = k // GROUP_K
                    b_sh = tl.load(as_ptr + o_m * stride_ast + i_s * stride_ask, mask=m_m,
                                   other=0.0)  # fmt: skip
                    b_sw = tl.load(p_sw + i_s * stride_wsk, mask=m_n, other=0.0)
                    b_y += tl.dot(b_h, b_w) * (b_sh[:, None] * b_sw[None, :])
                else:
                    b_y += tl.dot(b_h, b_w, input_precision="ieee")
            elif TMA:
                b_h = h_desc.load([row_start.to(tl.int32), k])
                b_w = w_desc.load([w_row, k]).T
            else:
                m_k = o_k < F - k
                b_h = tl.load(p_h, mask=m_m[:, None] & m_k[None, :], other=0.0)
                b_w = tl.load(p_w, mask=m_k[:, None] & m_n[None, :], other=0.0)
            if not QUANT:
                b_y += tl.dot(b_h, b_w, input_precision="ieee")
            p_h += BLOCK_K * stride_hf
            p_w += BLOCK_K * stride_wf

        if QUANT == 1:
            b_y *= tl.load(p_sw, mask=m_n, other=0.0)[None, :]
        if WEIGHTED:
            b_y *= tl.load(routing_ptr + o_p, mask=m_m, other=0.0).to(tl.float32)[:, None]
        m_y = m_m[:, None] & m_n[None, :]
        if ATOMIC:
            p_y = y_ptr + (o_p // K)[:, None] * stride_yr + o_n[None, :] * stride_yd
            tl.atomic_add(p_y, b_y, mask=m_y, sem="relaxed")
        else:
            p_y = y_ptr + o_p[:, None] * stride_yr + o_n[None, :] * stride_yd
            tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def _pair_sum_kernel(
    y_ptr, out_ptr, T, D, stride_yp, stride_yd, stride_ot, stride_od, K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # The "pairs" combine: out[t] = y[t*K] + ... + y[t*K + K-1], in fp32 in that order,
    # rounded once to out's dtype. Offsets in int64: y may hold 2^31 elements or more.
    o_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (o_t < T)[:, None] & (o_d < D)[None, :]
    b_out = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        p_y = y_ptr + (o_t * K + j)[:, None] * stride_yp + o_d[None, :] * stride_yd
        b_out += tl.load(p_y, mask=m, other=0.0).to(tl.float32)
    p_out = out_ptr + o_t[:, None] * stride_ot + o_d[None, :] * stride_od
    tl.store(p_out, b_out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _quantize_rows_kernel(
    a_ptr, q_ptr, s_ptr, M, stride_am, stride_ak, stride_qm, stride_qk, stride_sm, stride_sk,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # fp8-block's activations in one pass: a row's GROUP columns -> fp8 values and a scale,
    # amax / 448 (amax at least 1e-10), as moebench.quant.quantize_activations computes them.
    # Offsets in int64: h may hold 2^31 elements or more.
    o_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    i_g = tl.program_id(1)
    o_k = i_g * GROUP + tl.arange(0, GROUP)
    m_m = o_m < M
    p_a = a_ptr + o_m[:, None] * stride_am + o_k[None, :] * stride_ak
    b_a = tl.load(p_a, mask=m_m[:, None], other=0.0).to(tl.float32)
    b_s = tl.maximum(tl.max(tl.abs(b_a), axis=1), 1e-10) / 448.0
    b_q = tl.clamp(b_a / b_s[:, None], -448.0, 448.0).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + o_m[:, None] * stride_qm + o_k[None, :] * stride_qk, b_q, mask=m_m[:, None])
    tl.store(s_ptr + o_m * stride_sm + i_g * stride_sk, b_s, mask=m_m)
