"""The tile schedule of the `triton` layer: pairs sorted by expert and cut into tiles of
rows of one expert, built on the device with no host sync (see README.md in this folder).

T tokens, E experts, K experts per token, S = T*K token-expert pairs, N tile slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import configs, launch


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
    return big_slots(S, big_m, tall_over) + configs.cdiv(S, block_m) + min(E, S)


def expert_rows_args(sorted_ids_S, offsets_E1, tiles_2E, num_experts, height, rest_max):
    """_expert_rows_kernel's positional arguments (tensors, or stand-ins with .shape)."""
    S = sorted_ids_S.shape[0]
    return (sorted_ids_S, offsets_E1, tiles_2E, S, num_experts, S.bit_length(), height,
            rest_max)  # fmt: skip


def tile_slots_args(offsets_E1, tiles_2E, tile_end_2E, schedule, num_experts, big, height):
    """_tile_slots_kernel's positional arguments; schedule: its outputs (expert_N, start_N,
    end_N, count_2), big: the big-tile slots."""
    N = schedule.expert_N.shape[0]
    return (
        offsets_E1, tiles_2E, tile_end_2E, schedule.expert_N, schedule.start_N, schedule.end_N,
        schedule.count_2, N, num_experts, big, height, num_experts.bit_length(),
    )  # fmt: skip


def counted_schedule_args(ids_S, schedule, num_experts):
    """_counted_schedule_kernel's positional arguments; schedule: its outputs."""
    S, N = ids_S.shape[0], schedule.expert_N.shape[0]
    return (ids_S, schedule.order_S, schedule.offsets_E1, schedule.expert_N, schedule.start_N,
            schedule.end_N, schedule.count_2, S, num_experts, N)  # fmt: skip


def tile_schedule(ids_TK, num_experts, block_m, big_m=0, tall_over=0):
    """Build the tile schedule on the device: N = tile_slots(S, E, block_m, big_m, tall_over)
    slots.

    big_m > block_m gives two tile heights, 0 one. tall_over (two heights only): an expert's
    rest of more than tall_over rows takes one big tile rather than several small ones
    (decode passes block_m). One sort, then two small kernels around a cumsum: four
    launches, few because the schedule is on the critical path of every call. A one-height
    schedule of at most configs.COUNTED_MAX_PAIRS pairs (decode) is one launch that counts
    instead of sorting, and comes out the same.
    """
    ids_S = ids_TK.reshape(-1).contiguous()  # the counting kernel reads it by pair
    S, E = ids_S.numel(), num_experts
    if big_m and big_m <= block_m:
        raise ValueError(f"big_m={big_m} must exceed block_m={block_m}, or be 0 (one height)")
    if tall_over and not big_m:
        raise ValueError(f"tall_over={tall_over} needs a second tile height (big_m)")
    N = tile_slots(S, E, block_m, big_m, tall_over)
    cdiv = configs.cdiv
    if not big_m and S <= configs.COUNTED_MAX_PAIRS:
        new = lambda n: ids_S.new_empty(n, dtype=torch.int64)
        schedule = TileSchedule(new(S), new(E + 1), new(N), new(N), new(N), new(2))
        blocks = configs.SCHEDULE_BLOCKS["counted"]
        launch._run(
            _counted_schedule_kernel, (cdiv(max(E + 1, S, N), blocks["BLOCK"]),),
            counted_schedule_args(ids_S, schedule, E), {"BLOCK_M": block_m, **blocks},
        )  # fmt: skip
        return schedule
    # Narrow keys: torch's CUDA sort of one row is a cub radix sort over every bit of its key
    # type, so int16 ids take 2 passes where int64 ids take 8 (ids < E fit, and E itself,
    # the search kernel's fill value).
    keys_S = ids_S.to(torch.int16 if E < 2**15 else torch.int32)
    sorted_ids_S, order_S = torch.sort(keys_S, stable=True)
    offsets_E1 = torch.empty(E + 1, device=ids_S.device, dtype=torch.int64)
    tiles_2E = torch.empty(2, E, device=ids_S.device, dtype=torch.int64)
    # With one height no expert fills a block of S + 1 rows; no rest exceeds a height.
    height = big_m or S + 1
    blocks = configs.SCHEDULE_BLOCKS["expert_rows"]
    launch._run(
        _expert_rows_kernel, (cdiv(E + 1, blocks["BLOCK_E"]),),
        expert_rows_args(sorted_ids_S, offsets_E1, tiles_2E, E, height, tall_over or height),
        {"BLOCK_M": block_m, **blocks},
    )  # fmt: skip
    tile_end_2E = torch.cumsum(tiles_2E, 1)
    expert_N, start_N, end_N = (order_S.new_empty(N) for _ in range(3))
    schedule = TileSchedule(order_S, offsets_E1, expert_N, start_N, end_N, order_S.new_empty(2))
    blocks = configs.SCHEDULE_BLOCKS["tile_slots"]
    big = big_slots(S, big_m, tall_over)
    launch._run(
        _tile_slots_kernel, (cdiv(N, blocks["BLOCK_SLOTS"]),),
        tile_slots_args(offsets_E1, tiles_2E, tile_end_2E, schedule, E, big, height),
        {"BLOCK_M": block_m, **blocks},
    )  # fmt: skip
    return schedule


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
