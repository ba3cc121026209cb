"""The `triton` MoE layer: Triton kernels over a tile schedule of expert-sorted rows.

The S token-expert pairs are stable-sorted by expert on the device and cut into tiles of
BLOCK_M sorted rows, each tile belonging to one expert; only experts that received tokens
get tiles, so a layer with 8192 experts and a handful of tokens each launches no program for
an empty expert and pads no expert to a fixed capacity (ideas from vLLM's
moe_align_block_size and ScatterMoE's scatter2scatter). The schedule is one sort and two
small kernels (one counting kernel for the few pairs of decode, none for a single token),
with shapes known from the input shapes alone: no host synchronisation, so the layer can be
captured in a CUDA graph.
The schedule has room for the most tiles any routing can produce, cdiv(S, BLOCK_M) +
min(E, S) slots, and counts its real tiles on the device; a program takes one (tile, column
block) item of the real tiles. Where the tiles are short (up to 32 rows) and the slots more
than twice cdiv(S, BLOCK_M), most may stay empty (`collapse` over 8192 experts): there the
programs are no more than cdiv(S, BLOCK_M) tiles' worth (unless the GPU holds more at once)
and loop over the items.
BLOCK_M follows the average expert load, which is the wrong height for the few experts that
hold most rows under skewed routing (`collapse`, `hot`): prefill schedules with BLOCK_M < 128
therefore cut each expert's full 128-row blocks into tall tiles, launched apart (S // 128
more slots, a fixed 128 x 128 config), and only the remainder into BLOCK_M-row tiles.
Decode (16-row tiles) gives an expert with more than 16 rows one 64-row tile instead, so
that each touched expert's weights are still read once.

Forward. Kernel 1 gathers each tile's rows of x straight from the unsorted input
(token = pair // K, no permuted copy of x), computes the gate and up projections in one pass
over D and stores h = silu(gate) * up in sorted row order. Kernel 2 multiplies h by the
expert's down projection, scales each row by its routing weight and combines. By default
(`combine="pairs"`) each pair's row is stored in pair order in x's dtype and a small kernel
sums the K rows of a token in a fixed order: bitwise reproducible, and half the bytes of an
fp32 buffer (on an H100 at T=32768, D=4096, E=64, K=4 the fp32 atomic combine made the
down kernel take 3.6 ms, next to 4.0 ms for the gate/up kernel with twice its FLOPs).
`combine="atomic"` adds fp32 rows into an fp32 buffer instead: one rounding per token
rather than per pair, in a run-dependent order. With K == 1 a token has a single row,
stored straight into the output.

Backward, over the forward's schedule, from the saved h (gate and up are recomputed rather
than stored: they would cost [S, 2F] of activation memory for one extra pass over D).
Kernel 3 recomputes gate and up, computes g = dy[t] @ down[e] on the same tile, and writes
dgate, dup = SwiGLU'(w * g) in sorted row order, plus dw[t, j] = <dy[t], down[e] @ h> =
<g, h>, one partial sum per F block (reduced by torch, so always deterministic). dx is
kernel 2 run on [dgate, dup] through the transposed gate_up, with the same combine.
Kernel 4 computes the weight gradients: a program owns an output tile of one expert and
reduces over that expert's sorted rows, so every expert, idle ones included, gets every
element written (zeros where it received no token) and no atomics are needed.
The kernels are wrapped in two `torch.library.custom_op`s with `register_autograd`, so that
`torch.compile` traces the layer with the ops as single graph nodes.

Two paths share the kernels. `decode` (T <= DECODE_MAX_TOKENS) uses tiles of 16 rows and
narrow, deep blocks so that many programs stream the touched experts' weights once; it is
bound by reading those weights. `prefill` sizes BLOCK_M to the expected rows per expert and
uses wide blocks with a grouped tile order for L2 reuse; where the tensors allow TMA (16-bit,
unit last stride, 16-byte aligned rows), its forward tuners also time configs that read the
weights, and down's rows of h, through TMA descriptors (Hopper's bulk copies; x's rows are
gathered, so they stay pointer loads), among them persistent ones: a program an SM, whose
loop over items and loop over the reduction are flattened into one pipelined loop, so that
the next tile's loads overlap this tile's epilogue. All kernels autotune on the problem
sizes and a power-of-two token (or pair) bucket; under TRITON_INTERPRET=1 one small fixed
config is used.
Once a kernel is tuned and compiled for a problem, its launches skip triton's per-call
argument binding (`_run`): decode and small prefill layers are bound by host time.

T tokens, D model width, F expert hidden width, E experts, K experts per token,
S = T*K token-expert pairs, N tile slots in the schedule.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

# tl.dot has no float64; fp32 runs exact (no TF32), fp16/bf16 accumulate in fp32.
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_MAX_TOKENS = 64
PATHS = ("decode", "prefill")
# Read once: it decides at import whether @triton.jit builds interpreted kernels.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _expert_rows_kernel(
    sorted_ids_ptr, offsets_ptr, tiles_ptr, S, E, SEARCH_STEPS, big_m, rest_max,
    BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    # offsets[e] = the first sorted row whose expert is >= e (a vectorised binary search),
    # for e in [0, E]; for e < E, tiles[0, e] = rows of e // big_m (full big tiles) and
    # tiles[1, e] = cdiv(the rest, BLOCK_M), except that a rest of more than rest_max rows
    # takes one more big tile instead (rest_max >= big_m: never).
    o_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    lo_first = tl.zeros((BLOCK_E,), dtype=tl.int64)
    hi_first = tl.zeros((BLOCK_E,), dtype=tl.int64) + S
    lo_next = lo_first
    hi_next = hi_first
    for _ in range(SEARCH_STEPS):
        mid = (lo_first + hi_first) // 2
        below = tl.load(sorted_ids_ptr + mid, mask=mid < S, other=E) < o_e
        lo_first = tl.where(below, mid + 1, lo_first)
        hi_first = tl.where(below, hi_first, mid)
        mid = (lo_next + hi_next) // 2
        below = tl.load(sorted_ids_ptr + mid, mask=mid < S, other=E) < o_e + 1
        lo_next = tl.where(below, mid + 1, lo_next)
        hi_next = tl.where(below, hi_next, mid)
    tl.store(offsets_ptr + o_e, lo_first, mask=o_e <= E)
    rows = lo_next - lo_first
    full = rows // big_m
    rest = rows - full * big_m
    tall = rest > rest_max
    tl.store(tiles_ptr + o_e, full + tall.to(tl.int64), mask=o_e < E)
    rest_tiles = tl.where(tall, 0, (rest + BLOCK_M - 1) // BLOCK_M)
    tl.store(tiles_ptr + E + o_e, rest_tiles, mask=o_e < E)


@triton.jit
def _tile_slots_kernel(
    offsets_ptr, tiles_ptr, tile_end_ptr, expert_ptr, start_ptr, end_ptr, count_ptr, N, E,
    big_slots, big_m, SEARCH_STEPS, BLOCK_M: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
):  # fmt: skip
    # Slots [0, big_slots) hold big_m-row tiles, the others BLOCK_M-row tiles; within its
    # section, slot n belongs to the first expert whose running tile count passes n. Slots
    # past a section's real tiles get start == end == 0 (and the last expert, so that loads
    # stay in range). A big tile ends at its expert's last row: it may hold fewer than big_m.
    # count gets each height's tile count: the last of its running counts.
    if tl.program_id(0) == 0:
        o_2 = tl.arange(0, 2)
        tl.store(count_ptr + o_2, tl.load(tile_end_ptr + o_2 * E + E - 1))
    o_n = tl.program_id(0) * BLOCK_SLOTS + tl.arange(0, BLOCK_SLOTS)
    small = o_n >= big_slots
    o_local = tl.where(small, o_n - big_slots, o_n)
    row = tl.where(small, E, 0)  # row of tiles / tile_end: 0 big, 1 small
    lo = tl.zeros((BLOCK_SLOTS,), dtype=tl.int64)
    hi = tl.zeros((BLOCK_SLOTS,), dtype=tl.int64) + E
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        passed = tl.load(tile_end_ptr + row + mid, mask=mid < E, other=N) > o_local
        lo = tl.where(passed, lo, mid + 1)
        hi = tl.where(passed, mid, hi)
    real = lo < E
    expert = tl.minimum(lo, E - 1)
    first_tile = tl.load(tile_end_ptr + row + expert) - tl.load(tiles_ptr + row + expert)
    # An expert's small tiles start after its big ones.
    first_row = tl.load(offsets_ptr + expert) + tl.where(
        small, tl.load(tiles_ptr + expert) * big_m, 0
    )
    height = tl.where(small, BLOCK_M, big_m)
    start = first_row + (o_local - first_tile) * height
    end = tl.minimum(tl.load(offsets_ptr + expert + 1), start + height)
    m_n = o_n < N
    tl.store(expert_ptr + o_n, expert, mask=m_n)
    tl.store(start_ptr + o_n, tl.where(real, start, 0), mask=m_n)
    tl.store(end_ptr + o_n, tl.where(real, end, 0), mask=m_n)


@triton.jit
def _counted_schedule_kernel(
    ids_ptr, order_ptr, offsets_ptr, expert_ptr, start_ptr, end_ptr, count_ptr, S, E, N,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    # The whole one-height schedule of a few pairs by counting, with no sort: program i
    # writes entries [i * BLOCK, (i + 1) * BLOCK) of offsets (by expert), order (by pair) and
    # the slots. Pair p's sorted row is its rank in the stable sort,
    # rank = #{q : id_q < id_p} + local, local = #{q < p : id_q == id_p}. An expert's tiles
    # start at its local rows 0, BLOCK_M, 2 * BLOCK_M, ..., so the pair at such a row heads
    # a tile, in slot (heads of smaller experts) + local // BLOCK_M. Every program scans all
    # S ids, a few times: S * S / 2 comparisons to find the heads, about 5 * BLOCK * S more.
    o_i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_p = o_i < S
    id_p = tl.load(ids_ptr + o_i, mask=m_p, other=E)
    zero = tl.zeros((BLOCK,), dtype=tl.int32)
    less, local, count, heads_less, below, heads = zero, zero, zero, zero, zero, zero
    for q0 in range(0, S, CHUNK):
        o_q = q0 + tl.arange(0, CHUNK)
        id_q = tl.load(ids_ptr + o_q, mask=o_q < S, other=E)  # E: past every real expert
        local_q = tl.zeros((CHUNK,), dtype=tl.int32)
        for r0 in range(0, q0 + CHUNK, CHUNK):
            o_r = r0 + tl.arange(0, CHUNK)
            id_r = tl.load(ids_ptr + o_r, mask=o_r < S, other=E)
            before = (id_r[None, :] == id_q[:, None]) & (o_r[None, :] < o_q[:, None])
            local_q += tl.sum(before.to(tl.int32), axis=1)
        head_q = (local_q % BLOCK_M == 0) & (o_q < S)
        smaller = id_q[None, :] < id_p[:, None]
        same = id_q[None, :] == id_p[:, None]
        heads += tl.sum(head_q.to(tl.int32), axis=0)
        less += tl.sum(smaller.to(tl.int32), axis=1)
        heads_less += tl.sum((smaller & head_q[None, :]).to(tl.int32), axis=1)
        count += tl.sum(same.to(tl.int32), axis=1)
        local += tl.sum((same & (o_q[None, :] < o_i[:, None])).to(tl.int32), axis=1)
        below += tl.sum((id_q[None, :] < o_i[:, None]).to(tl.int32), axis=1)
    tl.store(offsets_ptr + o_i, below.to(tl.int64), mask=o_i <= E)
    rank = less + local
    tl.store(order_ptr + rank, o_i.to(tl.int64), mask=m_p)
    head = m_p & (local % BLOCK_M == 0)
    slot = heads_less + local // BLOCK_M
    tl.store(expert_ptr + slot, id_p.to(tl.int64), mask=head)
    tl.store(start_ptr + slot, rank.to(tl.int64), mask=head)
    tl.store(end_ptr + slot, tl.minimum(rank + BLOCK_M, less + count).to(tl.int64), mask=head)
    # The tile counts of the (empty) big section and of this one, as the sorted schedule has.
    first = o_i == 0
    tl.store(count_ptr + o_i, zero.to(tl.int64), mask=first)
    tl.store(count_ptr + 1 + o_i, heads.to(tl.int64), mask=first)
    # Slots past the real tiles: empty, on the last expert, as _tile_slots_kernel leaves them.
    idle = (o_i >= heads) & (o_i < N)
    tl.store(expert_ptr + o_i, (zero + E - 1).to(tl.int64), mask=idle)
    tl.store(start_ptr + o_i, zero.to(tl.int64), mask=idle)
    tl.store(end_ptr + o_i, zero.to(tl.int64), mask=idle)


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
    tile_count_ptr, w_desc, D, F, K, E, T_BUCKET, slot0, section,
    stride_xt, stride_xd, stride_we, stride_wf, stride_wd, stride_hs, stride_hf,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, TMA: tl.constexpr = False, LOOP: tl.constexpr = False,
    PERSISTENT: tl.constexpr = False,
):  # fmt: skip
    # An item per program, or with LOOP or PERSISTENT every num_programs-th item: (tile,
    # column block) pairs of the section's real tiles, count_2[section] of them. Two call
    # sites, because one loop of at most one trip still costs registers (56 -> 72 for
    # decode's 32 x 128). PERSISTENT (a program an SM) flattens the item loop and the loop
    # over D into one software-pipelined loop: the next item's first blocks load during
    # this item's epilogue.
    num_tiles = tl.load(tile_count_ptr + section).to(tl.int32)
    num_blocks_n = (F + BLOCK_N - 1) // BLOCK_N
    items = num_tiles * num_blocks_n
    if LOOP or PERSISTENT:
        for item in tl.range(tl.program_id(0), items, tl.num_programs(0), flatten=PERSISTENT):
            _gate_up_tile(
                item, num_tiles, num_blocks_n, x_ptr, w_ptr, h_ptr, order_ptr, tile_expert_ptr,
                tile_start_ptr, tile_end_ptr, w_desc, D, F, K, slot0, stride_xt, stride_xd,
                stride_we, stride_wf, stride_wd, stride_hs, stride_hf, BLOCK_M, BLOCK_N,
                BLOCK_K, GROUP_SIZE_M, TMA,
            )  # fmt: skip
    else:
        if tl.program_id(0) < items:
            _gate_up_tile(
                tl.program_id(0), num_tiles, num_blocks_n, x_ptr, w_ptr, h_ptr, order_ptr,
                tile_expert_ptr, tile_start_ptr, tile_end_ptr, w_desc, D, F, K, slot0,
                stride_xt, stride_xd, stride_we, stride_wf, stride_wd, stride_hs, stride_hf,
                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE_M, TMA,
            )  # fmt: skip


@triton.jit
def _gate_up_tile(
    item, num_tiles, num_blocks_n, x_ptr, w_ptr, h_ptr, order_ptr, tile_expert_ptr,
    tile_start_ptr, tile_end_ptr, w_desc, D, F, K, slot0,
    stride_xt, stride_xd, stride_we, stride_wf, stride_wd, stride_hs, stride_hf,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr, TMA: tl.constexpr,
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
    for k in range(0, D, BLOCK_K):
        m_k = o_k < D - k
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)
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

    b_h = b_gate / (1.0 + tl.exp(-b_gate)) * b_up
    p_h = h_ptr + o_m[:, None] * stride_hs + o_n[None, :] * stride_hf
    tl.store(p_h, b_h.to(h_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, y_ptr, order_ptr, routing_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    tile_count_ptr, h_desc, w_desc, D, F, K, E, T_BUCKET, slot0, section,
    stride_hs, stride_hf, stride_we, stride_wd, stride_wf, stride_yr, stride_yd,
    WEIGHTED: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    TMA: tl.constexpr = False, N_BLOCKS: tl.constexpr = 1, LOOP: tl.constexpr = False,
    PERSISTENT: tl.constexpr = False,
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
                WEIGHTED, ATOMIC, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE_M, TMA, N_BLOCKS,
            )  # fmt: skip
    else:
        if tl.program_id(0) < items:
            _down_tile(
                tl.program_id(0), num_tiles, num_groups_n, h_ptr, w_ptr, y_ptr, order_ptr,
                routing_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, h_desc, w_desc, D,
                F, K, slot0, stride_hs, stride_hf, stride_we, stride_wd, stride_wf, stride_yr,
                stride_yd, WEIGHTED, ATOMIC, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE_M, TMA,
                N_BLOCKS,
            )  # fmt: skip


@triton.jit
def _down_tile(
    item, num_tiles, num_groups_n, h_ptr, w_ptr, y_ptr, order_ptr, routing_ptr,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr, h_desc, w_desc, D, F, K, slot0,
    stride_hs, stride_hf, stride_we, stride_wd, stride_wf, stride_yr, stride_yd,
    WEIGHTED: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
    TMA: tl.constexpr, N_BLOCKS: tl.constexpr,
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
        for k in range(0, F, BLOCK_K):
            if TMA:
                b_h = h_desc.load([row_start.to(tl.int32), k])
                b_w = w_desc.load([w_row, k]).T
            else:
                m_k = o_k < F - k
                b_h = tl.load(p_h, mask=m_m[:, None] & m_k[None, :], other=0.0)
                b_w = tl.load(p_w, mask=m_k[:, None] & m_n[None, :], other=0.0)
            b_y += tl.dot(b_h, b_w, input_precision="ieee")
            p_h += BLOCK_K * stride_hf
            p_w += BLOCK_K * stride_wf

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
    # rounded once to out's dtype. Offsets in int64: y may hold 2^31 elements (T = 32768,
    # K = 16, D = 4096).
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
    # compiled, while the interpreter spends about a quarter of this kernel's time checking
    # int32 products for overflow.
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


def _configs(path, kernel, tma=False):
    """Autotune search space of one path for one forward kernel ("gate_up" or "down");
    tma adds the configs that read through TMA descriptors (prefill)."""
    if _INTERPRET:
        # Small blocks so that test shapes cross block edges; no tuning under the interpreter.
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_SIZE_M": 4})]
    if path == "decode":
        # Few rows: many programs with narrow N blocks and deep K blocks stream the weights.
        return [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_SIZE_M": 1}, num_stages=s)
            for n in (32, 64)
            for k in (128, 256)
            for s in (3, 4)
        ]
    # Wide blocks for large tiles; the deep-K ones suit many experts with BLOCK_M = 16.
    # gate_up holds two accumulators, so its 128-wide blocks take 8 warps (with 4 they
    # spill at BLOCK_M = 128: ptxas for sm_90, triton 3.6). The narrow ones are for experts
    # 8 to 16 wide (iso-params at E >= 4096); _prune keeps them for those only.
    shapes = [(64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4),
              (32, 128, 4, 3), (64, 128, 4, 3)]  # fmt: skip
    if kernel == "gate_up":
        shapes += [(16, 128, 4, 3), (16, 256, 4, 3)]
        # Decode's deeper shapes, for tiles of up to 32 rows (_prune), which stream the
        # weights as decode's 16-row tiles do. On those, decode's tuners picked 256-deep
        # blocks for gate_up at 4 of the H200 run's 8 points (3 of the 4 at T = 64), and
        # its balanced points ran at 0.98-1.06 of the copy bandwidth, where prefill's 16-row
        # sections, which could not pick them, ran at 0.44-0.49 of the roofline (iso-params
        # E = 512 to 2048, balanced and random routing).
        # Not decode's 64 x 128 and 64 x 256 with 4 stages: at 32 rows the first spills 4 B
        # looping (triton 3.9) and the second takes 240 KiB of shared memory.
        shapes += [(32, 128, 4, 4), (32, 256, 4, 3), (32, 256, 4, 4), (64, 256, 4, 3)]
        # TMA boxes for the weights (x's rows are gathered, so they stay pointer loads).
        tma_shapes = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)]
        # Persistent (PERSISTENT: one program an SM, looping over the items). A program that
        # ends with its tile leaves the SM to its epilogue and the next program's first
        # loads, unless another program shares the SM (the 128-wide TMA shape takes 144 KiB
        # of shared memory at 128 rows: one an SM); a persistent one loads its next tile
        # during its epilogue. Its flattened loop holds the two accumulators in 255
        # registers without spilling at 128 rows (ptxas, sm_90, triton 3.6 and 3.9). Both
        # stage counts: at 128 rows the H200 run's tuners picked 4 in 16 of 19 sections
        # (persistent: 224 KiB of shared memory, under 227).
        persistent = [(128, 64, 8, 3), (128, 64, 8, 4)]
    else:
        # Narrow experts give down a short reduction (F) over a wide output (D): wide, shallow
        # blocks make fewer, longer programs (_prune drops those that would spill at tall
        # tiles). 128 x 256 with 8 warps is the Hopper shape for large experts.
        shapes += [(128, 32, 4, 4), (128, 64, 4, 3), (128, 16, 4, 4), (256, 16, 4, 3),
                   (256, 32, 4, 3), (256, 64, 8, 3), (256, 32, 8, 4)]  # fmt: skip
        # With F <= BLOCK_K a program's reduction is one step, cheaper than launching it:
        # these cover 4 or 8 column blocks each (_prune offers them there, for tiles of up to
        # 32 rows: at 64 the 32-deep one spills, sm_90).
        looped = [(256, 16, 4, 3, 4), (256, 16, 4, 3, 8), (256, 32, 4, 3, 8)]
        # TMA boxes for both operands (a tile's rows of h are contiguous).
        tma_shapes = [(128, 64, 8, 3), (256, 64, 8, 3), (128, 64, 4, 4)]
        # Persistent as gate_up's: 180-204 registers at 128 rows; 256-wide blocks spill
        # there when persistent (44-112 B).
        persistent = [(128, 64, 8, 3)]
    groups = [({}, shapes)]
    if kernel == "down":
        groups += [({"N_BLOCKS": nb}, [(n, k, w, s)]) for n, k, w, s, nb in looped]
    if not tma:
        return [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_SIZE_M": 8, **flag}, num_warps=w,
                          num_stages=s)
            for flag, group in groups
            for n, k, w, s in group
        ]  # fmt: skip
    # Launches of these get descriptors, which the pointer configs fit too, unused: one
    # specialization per config.
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_SIZE_M": 8, **flag}, num_warps=w,
                      num_stages=s, pre_hook=_fit_descriptors)
        for flag, group in [
            *groups, ({"TMA": True}, tma_shapes), ({"TMA": True, "PERSISTENT": True}, persistent)
        ]
        for n, k, w, s in group
    ]  # fmt: skip


def _fit_descriptors(nargs):
    """Set a launch's TMA boxes to its blocks: h [BLOCK_M, BLOCK_K], weights [BLOCK_N, BLOCK_K]."""
    if nargs.get("h_desc") is not None:
        nargs["h_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    if nargs["w_desc"] is not None:
        nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _descriptor(t):
    """A TMA descriptor over the 2-D t (its box set per launch), or None where TMA cannot
    read t (the last dimension strided, an address or row pitch not 16-byte aligned) or
    where it is not worth tuning: fp32, whose exact dots run on FMA units, not wgmma."""
    size = t.element_size()
    aligned = t.stride(0) * size % 16 == 0 and t.data_ptr() % 16 == 0
    if size != 2 or t.stride(1) != 1 or not aligned or t.numel() == 0:
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [16, 16])


# The [BLOCK_M, BLOCK_N] fp32 accumulators each tile kernel holds.
_ACCUMULATORS = {"gate_up": 2, "down": 1, "swiglu_backward": 3}


def _prune(kernel):
    """The configs worth timing for one problem: blocks near the expert's width, and
    accumulators that fit in registers.

    gate_up's and the SwiGLU backward's N dimension is F, down's reduction is F; blocks are
    at least 16 (tl.dot's minimum). Accumulators of more than 128 fp32 registers a thread
    spill (ptxas for sm_90, triton 3.6 and 3.9: `python -m moebench.compile_check`), and the
    tile height is only known per problem. Fewer candidates also shorten the first call's
    tuning. TMA configs are for tiles of 64 rows or more: shorter ones compile to mma.sync
    rather than wgmma for sm_90 and are bound by the weight bytes, where the bulk copies are
    not worth their compile and tuning time; 256-deep blocks, which stream those weights,
    for tiles of up to 32 rows.
    """
    dim = "BLOCK_K" if kernel == "down" else "BLOCK_N"

    def prune(configs, nargs, **kwargs):
        if kwargs["BLOCK_M"] < 64:
            configs = [c for c in configs if not c.kwargs.get("TMA")]
        else:  # 256-deep blocks are for short tiles (16 x 256 at 128 rows: 240 KiB of smem)
            configs = [c for c in configs if c.kwargs["BLOCK_K"] < 256]
        if kernel == "swiglu_backward" and kwargs.get("LOOP") and kwargs["BLOCK_M"] >= 32:
            # Looping, 32 x 32 x 128 (4 warps, 2 stages) takes 255 registers and spills 40 B,
            # where one item a program takes 202 (ptxas, sm_90, triton 3.6).
            configs = [c for c in configs if c.kwargs["BLOCK_K"] < 128]
        if kernel == "down":  # column blocks in a loop: one-step reductions, short tiles
            configs = [
                c for c in configs
                if c.kwargs.get("N_BLOCKS", 1) == 1
                or (nargs["F"] <= c.kwargs["BLOCK_K"] and kwargs["BLOCK_M"] <= 32)
            ]  # fmt: skip
        accumulators = _ACCUMULATORS[kernel] * kwargs["BLOCK_M"]
        fits = [c for c in configs if accumulators * c.kwargs["BLOCK_N"] <= 128 * 32 * c.num_warps]
        cap = max(16, _pow2(nargs["F"]))
        near = [c for c in fits if c.kwargs[dim] <= cap and (c.kwargs[dim] > 16 or cap == 16)]
        return near or fits or configs

    return prune


def _swiglu_backward_configs(path):
    """Kernel 3 streams five operands and holds three accumulators: narrower, shallower blocks."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_SIZE_M": 4})]
    g = 1 if path == "decode" else 8
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_SIZE_M": g}, num_warps=w, num_stages=s)
        for n, k, w, s in (
            (32, 64, 4, 3), (32, 128, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3),
            (64, 64, 8, 3), (64, 32, 8, 4), (128, 32, 8, 3),
        )
    ]  # fmt: skip


def _expert_grad_configs():
    """Kernel 4: output tiles of one expert's weight gradient, BLOCK_M rows per step."""
    if _INTERPRET:
        # One output tile per expert at the training test's sizes (its slowest part); the
        # row loop still crosses BLOCK_M, and test_fused has weights wider than 64.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_C": 64})]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_C": c}, num_warps=w, num_stages=s)
        for m, n, c, w, s in (
            (32, 64, 64, 4, 3), (32, 128, 64, 4, 3), (32, 64, 128, 4, 3), (64, 128, 128, 8, 3),
            (32, 128, 128, 8, 4), (64, 64, 64, 4, 4), (16, 64, 64, 4, 4),
        )
    ]  # fmt: skip


def _tuning_bench(kernel_call, quantiles):
    """Time one candidate config: 25 ms of repeats after 10 of warm-up (triton's default is
    100 after 25). A GPU sweep tunes each kernel once per point, ten to twenty candidates at
    40 points; the median of even the slowest kernels (a few ms) still takes five runs."""
    return triton.testing.do_bench(kernel_call, warmup=10, rep=25, quantiles=quantiles)


_KEY = ["E", "D", "F", "K", "T_BUCKET"]
# Forward tuners by (path, TMA): prefill launches whose tensors TMA can read (see
# _descriptor) also time the TMA configs.
_FORWARD_TUNERS = (("decode", False), ("prefill", False), ("prefill", True))
_GATE_UP = {
    (p, tma): triton.autotune(
        _configs(p, "gate_up", tma), key=_KEY, do_bench=_tuning_bench,
        prune_configs_by={"early_config_prune": _prune("gate_up")},
    )(_gate_up_kernel)
    for p, tma in _FORWARD_TUNERS
}  # fmt: skip
# Benchmarking a config adds into y; restoring it keeps the tuned call's result exact.
_DOWN = {
    (p, tma): triton.autotune(
        _configs(p, "down", tma), key=_KEY, restore_value=["y_ptr"], do_bench=_tuning_bench,
        prune_configs_by={"early_config_prune": _prune("down")},
    )(_down_kernel)
    for p, tma in _FORWARD_TUNERS
}  # fmt: skip
_SWIGLU_BACKWARD = {
    p: triton.autotune(
        _swiglu_backward_configs(p), key=_KEY, do_bench=_tuning_bench,
        prune_configs_by={"early_config_prune": _prune("swiglu_backward")},
    )(_swiglu_backward_kernel)
    for p in PATHS
}  # fmt: skip
# One tuner per weight: the two gradients have different operand layouts.
_EXPERT_GRAD = {
    w: triton.autotune(
        _expert_grad_configs(), key=["E", "N", "C", "S_BUCKET"], do_bench=_tuning_bench
    )(_expert_grad_kernel)
    for w in ("gate_up", "down")
}

# Tall tiles for the experts that hold many rows when the average expert holds few (skewed
# routing), launched apart from the BLOCK_M-row tiles:
# - prefill: BIG_M-row tiles over each expert's full BIG_M blocks, BLOCK_M-row tiles over
#   the rest;
# - decode (T > 16): an expert with more than BLOCK_M rows gets one DECODE_BIG_M-row tile
#   for all of them (an expert holds at most T <= DECODE_MAX_TOKENS rows), so that its
#   weights are read once: with 16-row tiles, `collapse` at T = 64 read every touched
#   expert's weights four times (0.25 to 0.33 of the copy bandwidth, H200).
# Their config is fixed, not tuned: a tuner keyed on the shapes would time them on whatever
# routing came first, often one with no tall tile at all. Prefill's 128 x 128 blocks with 8
# warps are the Hopper matmul shape; decode's narrow, deep blocks are the shapes its tuners
# pick for 16-row tiles (many programs streaming the weights). Blocks over F shrink for
# narrow experts, and prefill's read through TMA where F leaves them whole (_big_config).
# No spills for sm_90 with triton 3.6 or 3.9:
# `python -m moebench.compile_check` builds these too.
BIG_M = 128
DECODE_BIG_M = 64
_BIG_SHAPES = {
    "prefill": {
        _gate_up_kernel: (128, 64, 8, 3, 8),
        _down_kernel: (128, 64, 8, 3, 8),
        _swiglu_backward_kernel: (64, 32, 8, 3, 8),
    },
    "decode": {
        _gate_up_kernel: (32, 128, 4, 3, 1),
        _down_kernel: (64, 128, 4, 3, 1),
        _swiglu_backward_kernel: (32, 64, 4, 3, 1),
    },
}
_BIG_CONFIG = {
    path: {
        kernel: triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_SIZE_M": g}, num_warps=w,
                              num_stages=st).all_kwargs()
        for kernel, (n, k, w, st, g) in shapes.items()
    }
    for path, shapes in _BIG_SHAPES.items()
}  # fmt: skip
if _INTERPRET:
    _BIG_CONFIG = {
        path: {kernel: _configs(path, "gate_up")[0].all_kwargs() for kernel in configs}
        for path, configs in _BIG_CONFIG.items()
    }


def _cdiv(a, b):
    return -(-a // b)


def _pow2(n):
    """The smallest power of two >= n (triton.next_power_of_2 without its host overhead)."""
    return 1 << (n - 1).bit_length()


# Tuned configs by problem. After a kernel's first call for a problem, the launch goes to the
# kernel with its config and a tuple grid: triton's Autotuner rebuilds its key from every
# argument on each call, 10-12 us of host time per launch (triton 3.6 and 3.9, the launch
# itself stubbed out, on a 2-core EPYC), and small layers are bound by host time.
_TUNED: dict[tuple, dict] = {}


def _launch(tuner, grid, args, key, fit=None, **constexprs):
    """tuner[grid](*args, **constexprs); returns the config it ran with.

    key: the problem as the tuner keys it (sizes, dtypes). grid(config) -> grid tuple.
    fit(config), when given, does what the configs' pre_hook does for the tuner.
    """
    key = (tuner, *key, *constexprs.values())
    config = _TUNED.get(key)
    if config is None:
        tuner[grid](*args, **constexprs)
        config = _TUNED[key] = tuner.best_config.all_kwargs()
    else:
        if fit is not None:
            fit(config)
        _run(tuner.fn, grid(config), args, {**constexprs, **config})
    return config


# Compiled kernels by (kernel, device, meta, the arguments' specialization): see _run.
_COMPILED: dict[tuple, tuple] = {}


def _descriptor_specialization(arg):
    """A launch argument that is not a tensor: a descriptor's dtype and box, else itself."""
    if isinstance(arg, TensorDescriptor):
        return arg.base.dtype, tuple(arg.block_shape), arg.padding
    return arg


def _no_launch_hooks():
    """Whether no launch hook (a profiler's) is set: triton >= 3.4 keeps them in knobs as
    chains, empty by default; older ones launch differently, so never straight."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        return False
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return all(h is None or not getattr(h, "calls", True) for h in hooks)


def _run(fn, grid, args, meta):
    """fn[grid](*args, **meta) for a @triton.jit fn, args all positional and meta its
    constexprs and launch options.

    After the first launch of a specialization, the compiled kernel's launcher is called
    straight with the arguments that triton's JITFunction.run would give it: run binds and
    specializes every argument, builds a cache key and launch metadata on each call, 15 us
    of host time a launch where the launcher itself takes 2.5 (triton 3.6 and 3.9, this
    project's 2-core CPU, a stub libcuda; prefill makes six launches). Not under the
    interpreter, nor while launch hooks (a profiler's) are set. tests/test_launch.py checks
    that the launcher gets the same arguments both ways.
    """
    if _INTERPRET:  # nothing compiled; and no driver to ask for the device
        fn[grid](*args, **meta)
        return
    # What may select another compiled kernel: the device (a kernel's function handle is
    # loaded on one), the meta, a tensor argument's dtype and alignment, a descriptor's
    # dtype and box, any other argument itself (ints first: most arguments are, and the
    # test costs half of the others').
    device = driver.active.get_current_device()
    key = (id(fn), device, *meta.items(), *[
        a if type(a) is int else (a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor)
        else _descriptor_specialization(a) for a in args
    ])  # fmt: skip
    compiled = _COMPILED.get(key)
    if compiled is not None and _no_launch_hooks():
        kernel, constexprs = compiled
        stream = driver.active.get_current_stream(device)
        kernel.run(*grid, *(1,) * (3 - len(grid)), stream, kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *constexprs)  # fmt: skip
        return
    kernel = fn[grid](*args, **meta)
    if getattr(kernel, "packed_metadata", None) is not None:
        # The arguments after the positional ones, in the kernel's order, as run binds them.
        rest = fn.params[len(args) :]
        _COMPILED[key] = kernel, [meta.get(p.name, p.default) for p in rest]


class TileSchedule(NamedTuple):
    """Pairs sorted by expert, cut into tiles of rows of one expert.

    Expert e owns sorted rows [offsets_E1[e], offsets_E1[e + 1]). Tile n covers sorted rows
    [start_N[n], end_N[n]) of expert expert_N[n]; slots past the real tile count have
    start == end == 0; each height's real tiles come first in its slots, count_2 of them.
    With two heights, the first big_slots(S, big_m, tall_over) slots hold
    tiles of big_m rows over each expert's full big_m blocks (and, with tall_over, one tile
    of up to big_m rows over an expert's rest of more than tall_over rows), the others tiles
    of at most BLOCK_M rows over the rest.
    """

    order_S: torch.Tensor  # [S] pair index t*K + j of each sorted row, stable within an expert
    offsets_E1: torch.Tensor | None  # [E + 1] first sorted row of each expert, then S
    expert_N: torch.Tensor  # [N] expert of each tile slot
    start_N: torch.Tensor  # [N] first sorted row of each tile slot
    end_N: torch.Tensor  # [N] one past its last sorted row
    count_2: torch.Tensor  # [2] int64: real tiles of the big-tile slots, then of the others


def big_slots(S, big_m, tall_over=0):
    """Slots for big_m-row tiles: every full block of every expert (0 with one height), and
    with tall_over, one per expert whose rest exceeds tall_over rows."""
    if not big_m:
        return 0
    return S // big_m + (S // (tall_over + 1) if tall_over else 0)


def tile_slots(S, E, block_m, big_m=0, tall_over=0):
    """N: room for the most tiles any routing of S pairs over E experts can produce.

    A nonempty expert with c rows left after its full big_m blocks has
    cdiv(c, block_m) <= c // block_m + 1 small tiles.
    """
    return big_slots(S, big_m, tall_over) + _cdiv(S, block_m) + min(E, S)


# Up to this many pairs (64 decode tokens at K = 8), a one-height schedule is counted in one
# launch instead of sorted in four.
COUNTED_MAX_PAIRS = 512
# The schedule kernels' block sizes (`python -m moebench.compile_check` builds these: the
# counted kernel spills at 128 x 64 comparison blocks with 4 warps, sm_90).
_COUNTED_BLOCKS = {"BLOCK": 128, "CHUNK": 32}
SCHEDULE_BLOCKS = {
    _expert_rows_kernel: {"BLOCK_E": 256},
    _tile_slots_kernel: {"BLOCK_SLOTS": 256},
    _counted_schedule_kernel: _COUNTED_BLOCKS,
}
if _INTERPRET:  # its cost is per op, not per element: one wide step, not (S / 32)^2 / 2
    SCHEDULE_BLOCKS[_counted_schedule_kernel] = {
        "BLOCK": COUNTED_MAX_PAIRS,
        "CHUNK": COUNTED_MAX_PAIRS,
    }


def tile_schedule(ids_TK, num_experts, block_m, big_m=0, tall_over=0):
    """Build the tile schedule on the device: N = tile_slots(S, E, block_m, big_m, tall_over)
    slots.

    big_m > block_m gives two tile heights, 0 one. tall_over (two heights only): an expert's
    rest of more than tall_over rows takes one big tile rather than several small ones
    (decode passes block_m). One sort, then two small kernels around a
    cumsum: four launches, and the schedule is on the critical path of every call (a chain
    of twenty torch ops cost more host time than the layer's GEMMs at T=4096). A one-height
    schedule of at most COUNTED_MAX_PAIRS pairs (decode) is one launch that counts instead
    of sorting, and comes out the same.
    """
    ids_S = ids_TK.reshape(-1).contiguous()  # the counting kernel reads it by pair
    S, E = ids_S.numel(), num_experts
    if big_m and big_m <= block_m:
        raise ValueError(f"big_m={big_m} must exceed block_m={block_m}, or be 0 (one height)")
    if tall_over and not big_m:
        raise ValueError(f"tall_over={tall_over} needs a second tile height (big_m)")
    N = tile_slots(S, E, block_m, big_m, tall_over)
    if not big_m and S <= COUNTED_MAX_PAIRS:
        new = lambda n: ids_S.new_empty(n, dtype=torch.int64)
        order_S, offsets_E1, expert_N, start_N, end_N = new(S), new(E + 1), new(N), new(N), new(N)
        count_2 = new(2)
        blocks = SCHEDULE_BLOCKS[_counted_schedule_kernel]
        _run(
            _counted_schedule_kernel, (_cdiv(max(E + 1, S, N), blocks["BLOCK"]),),
            (ids_S, order_S, offsets_E1, expert_N, start_N, end_N, count_2, S, E, N),
            {"BLOCK_M": block_m, **blocks},
        )  # fmt: skip
        return TileSchedule(order_S, offsets_E1, expert_N, start_N, end_N, count_2)
    # Narrow keys: torch's CUDA sort of one row is a cub radix sort over every bit of its key
    # type, so int16 ids take 2 passes where int64 ids take 8 (ids < E fit, and E itself,
    # the search kernel's fill value).
    keys_S = ids_S.to(torch.int16 if E < 2**15 else torch.int32)
    sorted_ids_S, order_S = torch.sort(keys_S, stable=True)
    offsets_E1 = torch.empty(E + 1, device=ids_S.device, dtype=torch.int64)
    tiles_2E = torch.empty(2, E, device=ids_S.device, dtype=torch.int64)
    # With one height no expert fills a block of S + 1 rows; no rest exceeds a height.
    height = big_m or S + 1
    blocks = SCHEDULE_BLOCKS[_expert_rows_kernel]
    _run(
        _expert_rows_kernel, (_cdiv(E + 1, blocks["BLOCK_E"]),),
        (sorted_ids_S, offsets_E1, tiles_2E, S, E, S.bit_length(), height, tall_over or height),
        {"BLOCK_M": block_m, **blocks},
    )  # fmt: skip
    tile_end_2E = torch.cumsum(tiles_2E, 1)
    expert_N, start_N, end_N = (order_S.new_empty(N) for _ in range(3))
    count_2 = order_S.new_empty(2)
    blocks = SCHEDULE_BLOCKS[_tile_slots_kernel]
    _run(
        _tile_slots_kernel, (_cdiv(N, blocks["BLOCK_SLOTS"]),),
        (offsets_E1, tiles_2E, tile_end_2E, expert_N, start_N, end_N, count_2, N, E,
         big_slots(S, big_m, tall_over), height, E.bit_length()),
        {"BLOCK_M": block_m, **blocks},
    )  # fmt: skip
    return TileSchedule(order_S, offsets_E1, expert_N, start_N, end_N, count_2)


# (rows 0..S-1, rows 1..S, tile counts [0, S]) of each device's one-token schedules:
# constants, made once.
_PAIR_ROWS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def pair_tiles(ids_TK):
    """The schedule of one token (T = 1), with no launch: a one-row tile per pair, in pair
    order, to be launched at one tile height.

    With distinct experts (as routers give them), a token's pairs sort into one-row tiles
    too: only the order of the tiles differs, and no row's result depends on it. An expert
    that repeats gets one-row tiles here where the sort gives it one taller tile, with the
    same rows. offsets_E1 is None: the forward's kernels do not read it (the backward's
    weight gradients do, and take the sorted schedule).
    """
    # The kernels read expert_N by slot, and index the weights by it in 64 bits.
    ids_S = ids_TK.reshape(-1).to(torch.int64).contiguous()
    S = ids_S.numel()
    key = (ids_S.device, S)
    rows = _PAIR_ROWS.get(key)
    if rows is None:
        rows_S1 = torch.arange(S + 1, device=ids_S.device)
        # [0, S] by a kernel, not a host copy: this may run while a CUDA graph is captured.
        count_2 = torch.arange(0, 2 * S, S, device=ids_S.device)
        rows = rows_S1[:S], rows_S1[1:], count_2
        capturing = ids_S.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing:  # not in memory that a CUDA graph's pool owns
            _PAIR_ROWS[key] = rows
    first_S, end_S, count_2 = rows
    return TileSchedule(first_S, None, ids_S, first_S, end_S, count_2)


# torch.compile keeps the schedule's kernels as one graph node (it cannot trace launches of
# interpreted kernels); eager calls skip the dispatcher.
@torch.library.custom_op("moebench::tile_schedule", mutates_args=())
def _tile_schedule_op(
    ids_TK: torch.Tensor, num_experts: int, block_m: int, big_m: int, tall_over: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(tile_schedule(ids_TK, num_experts, block_m, big_m, tall_over))


@_tile_schedule_op.register_fake
def _(ids_TK, num_experts, block_m, big_m, tall_over):
    S = ids_TK.numel()
    N = tile_slots(S, num_experts, block_m, big_m, tall_over)
    new = lambda n: ids_TK.new_empty(n, dtype=torch.int64)
    return new(S), new(num_experts + 1), new(N), new(N), new(N), new(2)


class Section(NamedTuple):
    """One launch of a tile kernel: slots [slot0, slot0 + slots), tiles of block_m rows.

    Its programs loop over the (tile, column block) items of its real tiles, count_2[count]
    of them (read on the device); `programs` gives how many programs there are.
    """

    slot0: int
    slots: int
    block_m: int
    fixed: dict | None  # the big tiles' config by kernel; None: tuned
    count: int  # index in the schedule's count_2: 0 big tiles, 1 the others
    packed: int  # tiles that the S rows would fill at block_m rows each: cdiv(S, block_m)
    floor: int  # programs that the device runs at once (at most)
    sms: int  # programs of a persistent launch: one an SM

    @property
    def loop(self) -> bool:
        """Whether the programs loop (the kernels' LOOP): for short tiles, where the slots
        are more than twice the tiles that S rows make at block_m rows each, so that most
        may stay empty. Taller tiles have fewer slots per row; at most 2x their programs
        stay empty, and looping costs their configs registers (ptxas, sm_90)."""
        return self.block_m <= LOOP_MAX_M and self.slots > 2 * self.packed

    def programs(self, blocks, persistent=False):
        """A program per slot's `blocks` items; where they loop, as many as S rows make in
        full tiles, if that is fewer (many experts, each a few rows, make more tiles), but
        not fewer than the device runs at once. An empty slot's program cost about a
        nanosecond of the whole H200 (scale-out collapse at E=8192: 0.3 of 0.75 ms).
        A persistent config (PERSISTENT) takes one program an SM."""
        if persistent:
            return min(self.slots * blocks, self.sms)
        if not self.loop:
            return self.slots * blocks
        return min(self.slots * blocks, max(self.packed * blocks, self.floor))


# The tallest tiles whose programs may loop (Section.loop).
LOOP_MAX_M = 32
# Thread blocks an SM holds at most (Hopper); the interpreter uses two programs, so that
# tests run the programs' loops.
_BLOCKS_PER_SM = 32
_RESIDENT: dict[torch.device, tuple[int, int]] = {}


def _resident(device):
    """(programs that `device` runs at once at most, its SMs); (2, 2) under the interpreter."""
    resident = _RESIDENT.get(device)
    if resident is None:
        sms = 2 if _INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count
        resident = _RESIDENT[device] = (2 if _INTERPRET else sms * _BLOCKS_PER_SM, sms)
    return resident


def _tall_over(path, block_m):
    """Decode's rule for its big tiles (see DECODE_BIG_M); prefill has none (0)."""
    return block_m if path == "decode" else 0


@functools.cache
def _big_config(path, F):
    """The big tiles' fixed configs by kernel for experts F wide: _BIG_CONFIG's, with
    gate_up's column block (over F) and down's reduction block (over F) cut to F as a
    power of two, at least 16 (tl.dot's least). A 128-wide block over an 8-wide expert
    (iso-params at E = 8192) multiplies 16 times the columns there are.

    Prefill's gate_up and down configs whose blocks F leaves whole read through TMA (TMA,
    where the launch has descriptors: _tile_launch). In every 128-row section of the H200
    run, the tuners picked a TMA config over the same blocks through pointers."""
    fit = max(16, _pow2(F))
    configs = dict(_BIG_CONFIG[path])
    for kernel, dim in ((_gate_up_kernel, "BLOCK_N"), (_down_kernel, "BLOCK_K")):
        config = configs[kernel]
        tma = {"TMA": True} if path == "prefill" and config[dim] <= fit else {}
        configs[kernel] = {**config, dim: min(config[dim], fit), **tma}
    return configs


def _sections(schedule, block_m, big_m, path, F):
    """The launches over a schedule of experts F wide: the big-tile slots (if any), then the
    others.

    Compiled kernels are launched for every slot (Section.programs; no host sync). The
    interpreter runs every program in Python, empty ones too, so there each section covers
    only its real tiles (a prefix of the section); on the CPU the host sync that counts
    them is free.
    """
    S, N = schedule.order_S.numel(), schedule.expert_N.numel()
    big = big_slots(S, big_m, _tall_over(path, block_m))
    resident = _resident(schedule.order_S.device)
    sections = [Section(big, N - big, block_m, None, 1, _cdiv(S, block_m), *resident)]
    if big:
        fixed = _big_config(path, F)
        sections.insert(0, Section(0, big, big_m, fixed, 0, _cdiv(S, big_m), *resident))
    if _INTERPRET:
        sections = [
            s._replace(slots=int(schedule.end_N[s.slot0 : s.slot0 + s.slots].count_nonzero()))
            for s in sections
        ]
    return [s for s in sections if s.slots]


def _tile_launch(tuner, section, width, args, key, descriptors=None, **constexprs):
    """A tile kernel over one section's items: (tile, BLOCK_N block of width), or (tile,
    N_BLOCKS such blocks) where the config sets N_BLOCKS (down); section.programs of them.

    descriptors: the launch's TMA descriptors by argument name (for tuned sections, and for
    big tiles whose fixed config reads through TMA: without them it reads through pointers).
    """
    grid = lambda meta: (
        section.programs(
            _cdiv(_cdiv(width, meta["BLOCK_N"]), meta.get("N_BLOCKS", 1)),
            meta.get("PERSISTENT", False),
        ),
    )
    if section.fixed is None:
        fit = None
        if descriptors:
            fit = lambda c: _fit_descriptors({"BLOCK_M": section.block_m, **c, **descriptors})
        return _launch(
            tuner, grid, args, key, fit, BLOCK_M=section.block_m, LOOP=section.loop, **constexprs
        )
    config = section.fixed[tuner.fn]
    if config.get("TMA"):
        if descriptors:
            _fit_descriptors({"BLOCK_M": section.block_m, **config, **descriptors})
        else:  # fp32, unaligned rows, dx's transposed gate_up: the blocks through pointers
            config = {**config, "TMA": False}
    meta = {"BLOCK_M": section.block_m, "LOOP": section.loop, **constexprs, **config}
    _run(tuner.fn, grid(config), args, meta)
    return config


def gate_up_swiglu(x_TD, gate_up_E2FD, schedule, sections, top_k, path, t_bucket):
    """h_SF = silu(gate[e] @ x[t]) * (up[e] @ x[t]) for every sorted row; [S, F], x's dtype.

    Returns h_SF and the config of the last section's launch.
    """
    E, F2, D = gate_up_E2FD.shape
    assert F2 % 2 == 0 and x_TD.shape[1] == D, "gate_up must be [E, 2F, D] with x [T, D]"
    F = F2 // 2
    h_SF = x_TD.new_empty(schedule.order_S.numel(), F)
    descs = {}
    if path == "prefill" and gate_up_E2FD.is_contiguous():
        descs = {"w_desc": _descriptor(gate_up_E2FD.view(E * F2, D))}
        if None in descs.values():
            descs = {}
    tuner = _GATE_UP[path, bool(descs)]
    config = None
    for section in sections:
        # tuned tiles, and big ones whose fixed config reads through TMA
        d = descs if section.fixed is None or section.fixed[_gate_up_kernel].get("TMA") else {}
        args = (
            x_TD, gate_up_E2FD, h_SF, schedule.order_S, schedule.expert_N, schedule.start_N,
            schedule.end_N, schedule.count_2, d.get("w_desc"), D, F, top_k, E, t_bucket,
            section.slot0, section.count, *x_TD.stride(), *gate_up_E2FD.stride(),
            *h_SF.stride(),
        )  # fmt: skip
        key = (E, D, F, top_k, t_bucket, x_TD.dtype, gate_up_E2FD.dtype)
        config = _tile_launch(tuner, section, F, args, key, d)
    return h_SF, config


# The `combine` option -> what the down kernel does with each pair's row (K > 1).
_COMBINE_MODES = {"pairs": "store-pairs", "atomic": "atomic"}
COMBINES = tuple(_COMBINE_MODES)


def _combine_mode(top_k, combine):
    return "store-direct" if top_k == 1 else _COMBINE_MODES[combine]


def down_combine(h_SF, down_EDF, weights_S, schedule, sections, out_TD, top_k, path, t_bucket,
                 combine):  # fmt: skip
    """out[t] = sum_j weights[t*K + j] * down[e] @ h[row of (t, j)]; writes every element of out.

    weights_S None means unweighted (the input gradient through the transposed gate_up).
    Returns the combine mode and the config of the last section's launch.
    """
    E, D, F = down_EDF.shape
    T, S = out_TD.shape[0], h_SF.shape[0]
    assert T * top_k == S and h_SF.shape[1] == F and out_TD.shape[1] == D, "shapes disagree"
    combine = _combine_mode(top_k, combine)
    if combine == "store-direct":
        y = out_TD
    elif combine == "store-pairs":
        y = out_TD.new_empty(S, D)
    elif out_TD.dtype == torch.float32:
        y = out_TD.zero_()
    else:
        y = out_TD.new_zeros(T, D, dtype=torch.float32)
    descs = {}
    if path == "prefill" and down_EDF.is_contiguous():  # dx's transposed gate_up is not
        descs = {"h_desc": _descriptor(h_SF), "w_desc": _descriptor(down_EDF.view(E * D, F))}
        if None in descs.values():
            descs = {}
    tuner = _DOWN[path, bool(descs)]
    config = None
    weighted = weights_S is not None
    for section in sections:
        # tuned tiles, and big ones whose fixed config reads through TMA
        d = descs if section.fixed is None or section.fixed[_down_kernel].get("TMA") else {}
        args = (
            h_SF, down_EDF, y, schedule.order_S, weights_S, schedule.expert_N, schedule.start_N,
            schedule.end_N, schedule.count_2, d.get("h_desc"), d.get("w_desc"), D, F, top_k, E,
            t_bucket, section.slot0, section.count, *h_SF.stride(), *down_EDF.stride(),
            *y.stride(),
        )  # fmt: skip
        key = (E, D, F, top_k, t_bucket, h_SF.dtype, y.dtype, weighted and weights_S.dtype)
        config = _tile_launch(
            tuner, section, D, args, key, d, WEIGHTED=weighted, ATOMIC=combine == "atomic"
        )
    if combine == "store-pairs":
        pair_sum(y, out_TD, top_k)
    elif y is not out_TD:
        out_TD.copy_(y)
    return combine, config


# Blocks of the pair sum: 2048 elements a program, 4 warps.
PAIR_SUM_ELEMENTS = 2048


def pair_sum(y_SD, out_TD, top_k):
    """out[t] = the sum of y's rows t*K .. t*K + K-1, accumulated in fp32 in that order.

    A Triton kernel rather than torch.sum over [T, K, D]: the same streaming on the device,
    launched straight once compiled (_run) where torch sets up a generic reduction on each
    call. On this project's 2-core CPU at [1, 8, 4096] bf16: 5 us of host time through _run
    (a stub libcuda), 12 us for torch.sum on CPU tensors (its small sum included).
    """
    T, D = out_TD.shape
    block_d = min(_pow2(D), PAIR_SUM_ELEMENTS)
    block_t = PAIR_SUM_ELEMENTS // block_d
    grid = (_cdiv(T, block_t), _cdiv(D, block_d))
    args = (y_SD, out_TD, T, D, *y_SD.stride(), *out_TD.stride())
    _run(_pair_sum_kernel, grid, args, {"K": top_k, "BLOCK_T": block_t, "BLOCK_D": block_d})


def swiglu_backward(dy_TD, x_TD, weights_TK, gate_up_E2FD, down_EDF, schedule, sections, path,
                    t_bucket):  # fmt: skip
    """([dgate, dup] [S, 2F] in sorted rows, x's dtype; dweights [T, K] in the weights' dtype)."""
    E, D, F = down_EDF.shape
    T, K = weights_TK.shape
    S = T * K
    dgu_S2F = x_TD.new_empty(S, 2 * F)
    # One partial row per F block. The tuned BLOCK_N is known only after the launch, so
    # allocate for the narrowest config; with two sections, zeros where the other writes.
    tuner = _SWIGLU_BACKWARD[path]
    widths = [c.kwargs["BLOCK_N"] for c in tuner.configs]
    widths += [configs[tuner.fn]["BLOCK_N"] for configs in _BIG_CONFIG.values()]
    rows = _cdiv(F, min(widths))
    alloc = x_TD.new_zeros if len(sections) > 1 else x_TD.new_empty
    dw_partial = alloc(rows, S, dtype=torch.float32)
    used = 0
    for section in sections:
        args = (
            x_TD, dy_TD, gate_up_E2FD, down_EDF, weights_TK.reshape(-1), dgu_S2F, dw_partial,
            schedule.order_S, schedule.expert_N, schedule.start_N, schedule.end_N,
            schedule.count_2, D, F, K, E, t_bucket, section.slot0, section.count,
            *x_TD.stride(), *dy_TD.stride(),
            *gate_up_E2FD.stride(), *down_EDF.stride(), *dgu_S2F.stride(), dw_partial.stride(0),
        )  # fmt: skip
        key = (E, D, F, K, t_bucket, x_TD.dtype, weights_TK.dtype)
        config = _tile_launch(tuner, section, F, args, key)
        used = max(used, _cdiv(F, config["BLOCK_N"]))
    dw_TK = dw_partial[:used].sum(0).view(T, K).to(weights_TK.dtype)
    return dgu_S2F, dw_TK


def expert_grad(a_SN, b_SC, schedule, top_k, num_experts, *, tuner, weights_S=None,
                gather_a=False, gather_b=False):  # fmt: skip
    """out[e] = sum over expert e's rows of (w *) a[row]^T b[row]: [E, N, C], a's dtype.

    A row of a (of b) is a sorted row, or with gather_a (gather_b) the token of that row;
    weights_S, when given, scales a's rows by the pair's routing weight. Every element is
    written, zeros for experts without rows. tuner names the weight ("gate_up", "down").
    """
    N, C, S = a_SN.shape[1], b_SC.shape[1], schedule.order_S.numel()
    out_ENC = a_SN.new_empty(num_experts, N, C)
    grid = lambda meta: (num_experts * _cdiv(N, meta["BLOCK_N"]) * _cdiv(C, meta["BLOCK_C"]),)
    weighted = weights_S is not None
    args = (
        a_SN, b_SC, out_ENC, schedule.order_S, weights_S, schedule.offsets_E1, N, C, top_k,
        num_experts, _pow2(S), *a_SN.stride(), *b_SC.stride(), *out_ENC.stride(),
    )  # fmt: skip
    key = (num_experts, N, C, _pow2(S), a_SN.dtype, b_SC.dtype, weighted and weights_S.dtype)
    _launch(
        _EXPERT_GRAD[tuner], grid, args, key, GATHER_A=gather_a, GATHER_B=gather_b,
        WEIGHTED=weighted,
    )  # fmt: skip
    return out_ENC


def _block_m(path, t_bucket, top_k, num_experts):
    """Tile height: 16 for decode, else the expected rows per expert as a power of two."""
    if path == "decode":
        return 16
    return min(BIG_M, max(16, _pow2(_cdiv(t_bucket * top_k, num_experts))))


def _big_m(path, block_m, t_bucket):
    """The second tile height, 0 for one: BIG_M when prefill tiles are shorter; in decode,
    DECODE_BIG_M when an expert can hold more than one tile's rows (T > block_m)."""
    if path == "decode":
        return DECODE_BIG_M if t_bucket > block_m else 0
    return BIG_M if block_m < BIG_M else 0


# The schedule is built outside the ops (plain torch ops that torch.compile traces) and passed
# in as tensors, so that the backward reuses the forward's.
@torch.library.custom_op("moebench::fused_moe", mutates_args=())
def _fused_moe(
    x_TD: torch.Tensor, weights_TK: torch.Tensor, gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor, order_S: torch.Tensor, offsets_E1: torch.Tensor,
    expert_N: torch.Tensor, start_N: torch.Tensor, end_N: torch.Tensor, count_2: torch.Tensor,
    path: str, block_m: int, big_m: int, combine: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y_TD, h_SF): the forward kernels, keeping h for the backward."""
    schedule = TileSchedule(order_S, offsets_E1, expert_N, start_N, end_N, count_2)
    sections = _sections(schedule, block_m, big_m, path, down_EDF.shape[2])
    T, K = weights_TK.shape
    t_bucket = _pow2(T)
    h_SF, _ = gate_up_swiglu(x_TD, gate_up_E2FD, schedule, sections, K, path, t_bucket)
    y_TD = torch.empty_like(x_TD)
    down_combine(
        h_SF, down_EDF, weights_TK.reshape(-1), schedule, sections, y_TD, K, path, t_bucket,
        combine,
    )  # fmt: skip
    return y_TD, h_SF


@_fused_moe.register_fake
def _(x_TD, weights_TK, gate_up_E2FD, down_EDF, *schedule_and_options):
    return torch.empty_like(x_TD), x_TD.new_empty(weights_TK.numel(), down_EDF.shape[2])


@torch.library.custom_op("moebench::fused_moe_backward", mutates_args=())
def _fused_moe_backward(
    dy_TD: torch.Tensor, x_TD: torch.Tensor, weights_TK: torch.Tensor,
    gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor, h_SF: torch.Tensor,
    order_S: torch.Tensor, offsets_E1: torch.Tensor, expert_N: torch.Tensor,
    start_N: torch.Tensor, end_N: torch.Tensor, count_2: torch.Tensor, path: str, block_m: int,
    big_m: int, combine: str, need_x: bool, need_weights: bool, need_gate_up: bool,
    need_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx_TD, dweights_TK, dgate_up_E2FD, ddown_EDF); an unneeded one is an empty tensor."""
    schedule = TileSchedule(order_S, offsets_E1, expert_N, start_N, end_N, count_2)
    sections = _sections(schedule, block_m, big_m, path, down_EDF.shape[2])
    T, K = weights_TK.shape
    E = gate_up_E2FD.shape[0]
    t_bucket = _pow2(T)
    dx_TD, dw_TK, dgate_up, ddown = (t.new_empty(0) for t in (x_TD, weights_TK, x_TD, x_TD))
    if need_x or need_weights or need_gate_up:
        dgu_S2F, dw_TK = swiglu_backward(
            dy_TD, x_TD, weights_TK, gate_up_E2FD, down_EDF, schedule, sections, path, t_bucket
        )
    if need_x:
        # [dgate, dup] @ gate_up[e] is the forward's down kernel with gate_up read as [E, D, 2F].
        dx_TD = torch.empty_like(x_TD)
        down_combine(
            dgu_S2F, gate_up_E2FD.transpose(1, 2), None, schedule, sections, dx_TD, K, path,
            t_bucket, combine,
        )  # fmt: skip
    if need_gate_up:  # [dgate; dup]^T @ x rows
        dgate_up = expert_grad(dgu_S2F, x_TD, schedule, K, E, tuner="gate_up", gather_b=True)
    if need_down:  # (w * dy rows)^T @ h
        ddown = expert_grad(
            dy_TD, h_SF, schedule, K, E, tuner="down", weights_S=weights_TK.reshape(-1),
            gather_a=True,
        )  # fmt: skip
    return dx_TD, dw_TK, dgate_up, ddown


@_fused_moe_backward.register_fake
def _(dy_TD, x_TD, weights_TK, gate_up_E2FD, down_EDF, h_SF, *schedule_and_options):
    like = (x_TD, weights_TK, gate_up_E2FD, down_EDF)
    need = schedule_and_options[-4:]
    return tuple(
        torch.empty_like(t) if n else t.new_empty(0) for t, n in zip(like, need, strict=True)
    )


def _setup_context(ctx, inputs, output):
    x_TD, weights_TK, gate_up_E2FD, down_EDF, *schedule, path, block_m, big_m, combine = inputs
    h_SF = output[1]
    ctx.save_for_backward(x_TD, weights_TK, gate_up_E2FD, down_EDF, h_SF, *schedule)
    ctx.options = (path, block_m, big_m, combine)
    ctx.mark_non_differentiable(h_SF)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy_TD, _dh_SF):
    need = ctx.needs_input_grad[:4]
    grads = _fused_moe_backward(dy_TD, *ctx.saved_tensors, *ctx.options, *need)
    return *(g if n else None for g, n in zip(grads, need, strict=True)), *([None] * 10)


_fused_moe.register_autograd(_backward, setup_context=_setup_context)


def _check_runnable(x_TD):
    """Refuse what the kernels cannot run: CPU tensors without the interpreter, bf16 under it."""
    if x_TD.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(
            "the triton implementation needs a CUDA device, or TRITON_INTERPRET=1 to run on the CPU"
        )
    if _INTERPRET and x_TD.dtype == torch.bfloat16:
        # Seen with triton 3.6 and 3.9: outputs of about 1e10 where the other layers give 1.
        raise ValueError(
            "the triton implementation gives wrong bfloat16 results under TRITON_INTERPRET=1 "
            "(the interpreter misreads bf16 loads): use float32 or float16 there, bf16 on a GPU"
        )


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
    the configs of the last launch of each kernel.
    """
    if combine not in COMBINES:
        raise ValueError(f"unknown combine {combine!r}; known: {', '.join(COMBINES)}")
    _check_runnable(x_TD)
    T, K = ids_TK.shape
    E, F2, _ = gate_up_E2FD.shape
    weights_TK = weights_TK.contiguous()  # the kernels read it by pair index
    path = "decode" if T <= DECODE_MAX_TOKENS else "prefill"
    if stats is not None:
        stats["path"] = path
    if T * K == 0 or F2 == 0:
        return out_TD.zero_()

    t_bucket = _pow2(T)
    block_m = _block_m(path, t_bucket, K, E)
    big_m = _big_m(path, block_m, t_bucket)
    tall_over = _tall_over(path, block_m) if big_m else 0
    differentiable = (x_TD, weights_TK, gate_up_E2FD, down_EDF)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    compiling = torch.compiler.is_compiling()
    if compiling:
        schedule = TileSchedule(*_tile_schedule_op(ids_TK, E, block_m, big_m, tall_over))
    elif T == 1 and not needs_grad:
        schedule, big_m = pair_tiles(ids_TK), 0  # one height: a row per tile
    else:
        schedule = tile_schedule(ids_TK, E, block_m, big_m, tall_over)
    if stats is not None:
        stats.update(block_m=block_m, big_m=big_m, tile_slots=schedule.expert_N.numel(),
                     combine=_combine_mode(K, combine))  # fmt: skip
    if needs_grad or compiling:
        # The op is what autograd differentiates and what torch.compile keeps as one node
        # (tracing into the kernel launches fails under the interpreter).
        y_TD, _ = _fused_moe(*differentiable, *schedule, path, block_m, big_m, combine)
        return out_TD.copy_(y_TD)
    sections = _sections(schedule, block_m, big_m, path, F2 // 2)
    h_SF, gate_up_config = gate_up_swiglu(x_TD, gate_up_E2FD, schedule, sections, K, path, t_bucket)
    _, down_config = down_combine(
        h_SF, down_EDF, weights_TK.reshape(-1), schedule, sections, out_TD, K, path, t_bucket,
        combine,
    )  # fmt: skip
    if stats is not None:
        stats["config"] = {"gate_up": gate_up_config, "down": down_config}
    return out_TD
