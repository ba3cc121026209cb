"""Every tuning choice of the `triton` layer, and the seam to change them.

The knobs (path threshold, tile heights, when programs loop, the schedule's and the pair
sum's blocks), the tuners' search spaces and their pruning, the big tiles' fixed configs
and the tuners themselves live here. The rest of the layer reads the knobs as
`configs.NAME` at call time, so that the public seam below changes what the next call does:

- `set_knobs(**values)`: change knobs (DECODE_MAX_TOKENS, BIG_M, COUNTED_MAX_PAIRS,
  SCHEDULE_BLOCKS, ...) for a `with` block;
- `force_configs(kernel, configs, path=None, tma=None)`: have a kernel's tuners offer only
  the given configs (tuned configs forgotten on entry and exit);
- `tuning_bench(bench)`: replace the benchmark with which the tuners time their candidates;
- `clear_tuning()`: forget every tuned config, so that the next call tunes again.

T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import contextlib
import functools
import os

import triton

from .kernels import _down_kernel, _gate_up_kernel
from .kernels_bwd import _expert_grad_kernel, _swiglu_backward_kernel

# Read once: it decides at import whether @triton.jit builds interpreted kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PATHS = ("decode", "prefill")
KERNELS = ("gate_up", "down", "swiglu_backward", "expert_grad")

# -- Knobs (change them with set_knobs) ---------------------------------------------------

# Up to this many tokens the layer takes the decode path (16-row tiles, narrow deep blocks).
DECODE_MAX_TOKENS = 64
# Tall tiles for the experts that hold many rows when the average expert holds few (skewed
# routing), launched apart from the BLOCK_M-row tiles:
# - prefill: BIG_M-row tiles over each expert's full BIG_M blocks, BLOCK_M-row tiles over
#   the rest;
# - decode (T > 16): an expert with more than BLOCK_M rows gets one DECODE_BIG_M-row tile
#   for all of them (an expert holds at most T <= DECODE_MAX_TOKENS rows), so that its
#   weights are read once rather than once per 16-row tile.
BIG_M = 128
DECODE_BIG_M = 64
# The tallest tiles whose programs may loop over their items (Section.loop).
LOOP_MAX_M = 32
# Up to this many pairs (64 decode tokens at K = 8), a one-height schedule is counted in one
# launch instead of sorted in four.
COUNTED_MAX_PAIRS = 512
# The counting schedule kernel's blocks on a GPU (wider comparison blocks spill).
COUNTED_BLOCKS = {"BLOCK": 128, "CHUNK": 32}
# The schedule kernels' block sizes, by kernel: "expert_rows", "tile_slots", "counted".
SCHEDULE_BLOCKS = {
    "expert_rows": {"BLOCK_E": 256},
    "tile_slots": {"BLOCK_SLOTS": 256},
    "counted": COUNTED_BLOCKS,
}
if INTERPRET:  # its cost is per op, not per element: one wide step, not (S / 32)^2 / 2
    SCHEDULE_BLOCKS["counted"] = {"BLOCK": COUNTED_MAX_PAIRS, "CHUNK": COUNTED_MAX_PAIRS}
# Elements a program of the pair sum adds up (4 warps).
PAIR_SUM_ELEMENTS = 2048
# Rows of 128 columns a program of the fp8 activations' quantization takes (4 warps).
QUANTIZE_ROWS = 32

KNOBS = (
    "DECODE_MAX_TOKENS", "BIG_M", "DECODE_BIG_M", "LOOP_MAX_M", "COUNTED_MAX_PAIRS",
    "SCHEDULE_BLOCKS", "PAIR_SUM_ELEMENTS", "QUANTIZE_ROWS",
)  # fmt: skip


@contextlib.contextmanager
def set_knobs(**values):
    """Set knobs (module constants named in KNOBS) for a `with` block, then restore them."""
    unknown = sorted(set(values) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown knobs {unknown}; known: {', '.join(KNOBS)}")
    old = {name: globals()[name] for name in values}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(old)


# -- Problem sizes ------------------------------------------------------------------------


def cdiv(a, b):
    return -(-a // b)


def pow2(n):
    """The smallest power of two >= n (triton.next_power_of_2 without its host overhead)."""
    return 1 << (n - 1).bit_length()


def path_for(num_tokens):
    return "decode" if num_tokens <= DECODE_MAX_TOKENS else "prefill"


def block_m_for(path, t_bucket, top_k, num_experts):
    """Tile height: 16 for decode, else the expected rows per expert as a power of two."""
    if path == "decode":
        return 16
    return min(BIG_M, max(16, pow2(cdiv(t_bucket * top_k, num_experts))))


def big_m_for(path, block_m, t_bucket):
    """The second tile height, 0 for one: BIG_M when prefill tiles are shorter; in decode,
    DECODE_BIG_M when an expert can hold more than one tile's rows (T > block_m)."""
    if path == "decode":
        return DECODE_BIG_M if t_bucket > block_m else 0
    return BIG_M if block_m < BIG_M else 0


def tall_over(path, block_m):
    """Decode's rule for its big tiles (see DECODE_BIG_M); prefill has none (0)."""
    return block_m if path == "decode" else 0


# -- Search spaces ------------------------------------------------------------------------

# Under the interpreter: small blocks, so that test shapes cross block edges; no tuning.
_INTERPRETED = {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_SIZE_M": 4}


def forward_configs(path, kernel, tma=False, *, interpreted=INTERPRET):
    """Autotune search space of one path for one forward kernel ("gate_up" or "down");
    tma adds the configs that read through TMA descriptors (prefill). interpreted=False
    gives the compiled search space under the interpreter too."""
    if interpreted:
        return [triton.Config(dict(_INTERPRETED))]
    if path == "decode":
        # Few rows: many programs with narrow N blocks and deep K blocks stream the weights.
        return [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_SIZE_M": 1}, num_stages=s)
            for n in (32, 64)
            for k in (128, 256)
            for s in (3, 4)
        ]
    # (BLOCK_N, BLOCK_K, num_warps, num_stages). Wide blocks for large tiles; the deep-K
    # ones suit many experts with BLOCK_M = 16. gate_up holds two accumulators, so its
    # 128-wide blocks take 8 warps (with 4 they spill at BLOCK_M = 128). The narrow ones are
    # for experts 8 to 16 wide; prune keeps them for those only.
    shapes = [(64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 8, 4), (128, 64, 8, 3), (128, 64, 8, 4),
              (32, 128, 4, 3), (64, 128, 4, 3)]  # fmt: skip
    if kernel == "gate_up":
        shapes += [(16, 128, 4, 3), (16, 256, 4, 3)]
        # Decode's deeper shapes, for tiles of up to 32 rows (prune), which stream the
        # weights as decode's 16-row tiles do. Not decode's 64 x 128 and 64 x 256 with 4
        # stages: at 32 rows the first spills when looping and the second takes too much
        # shared memory.
        shapes += [(32, 128, 4, 4), (32, 256, 4, 3), (32, 256, 4, 4), (64, 256, 4, 3)]
        # TMA boxes for the weights (x's rows are gathered, so they stay pointer loads).
        tma_shapes = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)]
        # Persistent (PERSISTENT: one program an SM, looping over the items). A program that
        # ends with its tile leaves the SM to its epilogue and the next program's first
        # loads, unless another program shares the SM (the 128-wide TMA shape fills an SM's
        # shared memory at 128 rows); a persistent one loads its next tile during its
        # epilogue. Both stage counts: which wins depends on the problem.
        persistent = [(128, 64, 8, 3), (128, 64, 8, 4)]
    else:
        # Narrow experts give down a short reduction (F) over a wide output (D): wide, shallow
        # blocks make fewer, longer programs (prune drops those that would spill at tall
        # tiles). 128 x 256 with 8 warps is the Hopper shape for large experts.
        shapes += [(128, 32, 4, 4), (128, 64, 4, 3), (128, 16, 4, 4), (256, 16, 4, 3),
                   (256, 32, 4, 3), (256, 64, 8, 3), (256, 32, 8, 4)]  # fmt: skip
        # With F <= BLOCK_K a program's reduction is one step, cheaper than launching it:
        # these cover 4 or 8 column blocks each (prune offers them there, for tiles of up to
        # 32 rows: taller ones spill).
        looped = [(256, 16, 4, 3, 4), (256, 16, 4, 3, 8), (256, 32, 4, 3, 8)]
        # TMA boxes for both operands (a tile's rows of h are contiguous).
        tma_shapes = [(128, 64, 8, 3), (256, 64, 8, 3), (128, 64, 4, 4)]
        # Persistent as gate_up's; 256-wide blocks spill at 128 rows when persistent.
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
                      num_stages=s, pre_hook=fit_descriptors)
        for flag, group in [
            *groups, ({"TMA": True}, tma_shapes), ({"TMA": True, "PERSISTENT": True}, persistent)
        ]
        for n, k, w, s in group
    ]  # fmt: skip


def fit_descriptors(nargs):
    """Set a launch's TMA boxes to its blocks: h [BLOCK_M, BLOCK_K], weights [BLOCK_N, BLOCK_K].
    The pre_hook of the TMA tuners' configs; give it to a forced TMA config too."""
    if nargs.get("h_desc") is not None:
        nargs["h_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    if nargs["w_desc"] is not None:
        nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


# The [BLOCK_M, BLOCK_N] fp32 accumulators each tile kernel holds.
_ACCUMULATORS = {"gate_up": 2, "down": 1, "swiglu_backward": 3}


def prune(kernel):
    """The configs worth timing for one problem: blocks near the expert's width, and
    accumulators that fit in registers.

    gate_up's and the SwiGLU backward's N dimension is F, down's reduction is F; blocks are
    at least 16 (tl.dot's minimum). Accumulators of more than 128 fp32 registers a thread
    spill (tools/compile_check.py shows it), and the tile height is only known per problem.
    Fewer candidates also shorten the first call's tuning. TMA configs are for tiles of 64
    rows or more: shorter ones compile to mma.sync rather than wgmma for sm_90 and are bound
    by the weight bytes, where the bulk copies are not worth their compile and tuning time;
    256-deep blocks, which stream those weights, for tiles of up to 32 rows.
    """
    dim = "BLOCK_K" if kernel == "down" else "BLOCK_N"

    def prune(configs, nargs, **kwargs):
        if kwargs["BLOCK_M"] < 64:
            configs = [c for c in configs if not c.kwargs.get("TMA")]
        else:  # 256-deep blocks are for short tiles (at 128 rows they overflow shared memory)
            configs = [c for c in configs if c.kwargs["BLOCK_K"] < 256]
        if kernel == "swiglu_backward" and kwargs.get("LOOP") and kwargs["BLOCK_M"] >= 32:
            # Looping, 128-deep blocks spill where one item a program does not.
            configs = [c for c in configs if c.kwargs["BLOCK_K"] < 128]
        if kernel == "down":  # column blocks in a loop: one-step reductions, short tiles
            configs = [
                c for c in configs
                if c.kwargs.get("N_BLOCKS", 1) == 1
                or (nargs["F"] <= c.kwargs["BLOCK_K"] and kwargs["BLOCK_M"] <= 32)
            ]  # fmt: skip
        quant = kwargs.get("QUANT", 0)
        if quant:  # a reduction block within one scale's group; converted 256-deep ones spill
            group = kwargs["GROUP_K"] or 128
            configs = [c for c in configs if min(group, 128) % c.kwargs["BLOCK_K"] == 0]
        # Quantized: fp8's dots are scaled before they add up, a second block of registers
        # each; integer weights are converted (int4 in fp32) in registers, a block each.
        projections = _ACCUMULATORS[kernel]
        accumulators = projections * kwargs["BLOCK_M"] * (2 if quant == 3 else 1)
        converted = projections if quant in (1, 2) else 0

        def registers(c):
            return (accumulators + converted * c.kwargs["BLOCK_K"]) * c.kwargs["BLOCK_N"]

        fits = [c for c in configs if registers(c) <= 128 * 32 * c.num_warps]
        cap = max(16, pow2(nargs["F"]))
        near = [c for c in fits if c.kwargs[dim] <= cap and (c.kwargs[dim] > 16 or cap == 16)]
        return near or fits or configs

    return prune


def swiglu_backward_configs(path, *, interpreted=INTERPRET):
    """Kernel 3 streams five operands and holds three accumulators: narrower, shallower blocks."""
    if interpreted:
        return [triton.Config(dict(_INTERPRETED))]
    g = 1 if path == "decode" else 8
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_SIZE_M": g}, num_warps=w, num_stages=s)
        for n, k, w, s in (
            (32, 64, 4, 3), (32, 128, 4, 2), (64, 32, 4, 3), (64, 64, 4, 3),
            (64, 64, 8, 3), (64, 32, 8, 4), (128, 32, 8, 3),
        )
    ]  # fmt: skip


def expert_grad_configs(*, interpreted=INTERPRET):
    """Kernel 4: output tiles of one expert's weight gradient, BLOCK_M rows per step."""
    if interpreted:
        # One output tile per expert at the training test's sizes (its slowest part); the
        # row loop still crosses BLOCK_M, and the backward tests have weights wider than 64.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_C": 64})]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_C": c}, num_warps=w, num_stages=s)
        for m, n, c, w, s in (
            (32, 64, 64, 4, 3), (32, 128, 64, 4, 3), (32, 64, 128, 4, 3), (64, 128, 128, 8, 3),
            (32, 128, 128, 8, 4), (64, 64, 64, 4, 4), (16, 64, 64, 4, 4),
        )
    ]  # fmt: skip


# -- The big tiles' fixed configs ---------------------------------------------------------

# Fixed, not tuned: a tuner keyed on the shapes would time them on whatever routing came
# first, often one with no tall tile at all. Prefill's 128 x 128 blocks with 8 warps are the
# Hopper matmul shape; decode's narrow, deep blocks are the shapes its tuners pick for
# 16-row tiles (many programs streaming the weights). Blocks over F shrink for narrow
# experts, and prefill's read through TMA where F leaves them whole (big_config).
# tools/compile_check.py builds these too. (BLOCK_N, BLOCK_K, warps, stages, GROUP_SIZE_M)
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
# The big tiles' configs by path and kernel, as triton.Config.all_kwargs().
BIG_CONFIGS = {
    path: {
        kernel: triton.Config({"BLOCK_N": n, "BLOCK_K": k, "GROUP_SIZE_M": g}, num_warps=w,
                              num_stages=st).all_kwargs()
        for kernel, (n, k, w, st, g) in shapes.items()
    }
    for path, shapes in _BIG_SHAPES.items()
}  # fmt: skip
if INTERPRET:
    BIG_CONFIGS = {
        path: {kernel: forward_configs(path, "gate_up")[0].all_kwargs() for kernel in configs}
        for path, configs in BIG_CONFIGS.items()
    }


@functools.cache
def big_config(path, F, fp8=False):
    """The big tiles' fixed configs by kernel for experts F wide: BIG_CONFIGS', with
    gate_up's column block (over F) and down's reduction block (over F) cut to F as a
    power of two, at least 16 (tl.dot's least): a 128-wide block over an 8-wide expert
    would multiply 16 times the columns there are.

    Prefill's gate_up and down configs whose blocks F leaves whole read through TMA (TMA,
    where the launch has descriptors). fp8: prefill's gate_up blocks are 64 wide (its
    scaled dots hold a second pair of accumulators, which spill at 128 x 128)."""
    fit = max(16, pow2(F))
    configs = dict(BIG_CONFIGS[path])
    for kernel, dim in ((_gate_up_kernel, "BLOCK_N"), (_down_kernel, "BLOCK_K")):
        config = configs[kernel]
        tma = {"TMA": True} if path == "prefill" and config[dim] <= fit else {}
        configs[kernel] = {**config, dim: min(config[dim], fit), **tma}
    if fp8 and path == "prefill":
        configs[_gate_up_kernel] = {**configs[_gate_up_kernel], "BLOCK_N": 64}
    return configs


# -- The tuners ---------------------------------------------------------------------------


def timed_bench(kernel_call, quantiles):
    """Time one candidate config: a short run (10 ms of warm-up, 25 of repeats, where
    triton's default is 25 and 100): a GPU sweep tunes each kernel once per point, ten to
    twenty candidates at tens of points."""
    return triton.testing.do_bench(kernel_call, warmup=10, rep=25, quantiles=quantiles)


_BENCH = [timed_bench]  # the tuners' benchmark now (tuning_bench replaces it)


def _bench(kernel_call, quantiles):
    return _BENCH[0](kernel_call, quantiles)


@contextlib.contextmanager
def tuning_bench(bench):
    """Have the tuners time their candidates with bench(kernel_call, quantiles) for a `with`
    block: e.g. one that returns equal times without timing, so that each tuner keeps the
    first config its pruning leaves (what the GPU tests do), or one that launches each
    candidate once untimed (tools/stub_cuda/warm_cache.py)."""
    old, _BENCH[0] = _BENCH[0], bench
    try:
        yield
    finally:
        _BENCH[0] = old


_KEY = ["E", "D", "F", "K", "T_BUCKET"]
# Quantized launches also key on the scales' group, which bounds BLOCK_K (prune).
_FORWARD_KEY = [*_KEY, "QUANT", "GROUP_K"]
# Forward tuners by (path, TMA): prefill launches whose tensors TMA can read also time the
# TMA configs.
_FORWARD_TUNERS = (("decode", False), ("prefill", False), ("prefill", True))
# The tuners by kernel, then by (path, tma) (forward), path (swiglu_backward) or weight
# (expert_grad: the two gradients have different operand layouts).
TUNERS = {
    "gate_up": {
        (p, tma): triton.autotune(
            forward_configs(p, "gate_up", tma), key=_FORWARD_KEY, do_bench=_bench,
            prune_configs_by={"early_config_prune": prune("gate_up")},
        )(_gate_up_kernel)
        for p, tma in _FORWARD_TUNERS
    },
    # Benchmarking a config adds into y; restoring it keeps the tuned call's result exact.
    "down": {
        (p, tma): triton.autotune(
            forward_configs(p, "down", tma), key=_FORWARD_KEY, restore_value=["y_ptr"],
            do_bench=_bench,
            prune_configs_by={"early_config_prune": prune("down")},
        )(_down_kernel)
        for p, tma in _FORWARD_TUNERS
    },
    "swiglu_backward": {
        p: triton.autotune(
            swiglu_backward_configs(p), key=_KEY, do_bench=_bench,
            prune_configs_by={"early_config_prune": prune("swiglu_backward")},
        )(_swiglu_backward_kernel)
        for p in PATHS
    },
    "expert_grad": {
        w: triton.autotune(
            expert_grad_configs(), key=["E", "N", "C", "S_BUCKET"], do_bench=_bench
        )(_expert_grad_kernel)
        for w in ("gate_up", "down")
    },
}  # fmt: skip


def clear_tuning():
    """Forget every tuned config (the layer's and the tuners' own): the next call tunes."""
    from . import launch  # launch imports this module

    launch._TUNED.clear()
    for tuners in TUNERS.values():
        for tuner in tuners.values():
            tuner.cache.clear()


def tuners(kernel, path=None, tma=None):
    """The tuners of `kernel` (one of KERNELS): those of `path` (forward and SwiGLU
    backward) and of that TMA flag (forward) where given."""
    if kernel not in TUNERS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    selected = []
    for key, tuner in TUNERS[kernel].items():
        if kernel in ("gate_up", "down"):
            p, t = key
        else:
            p, t = (key if kernel == "swiglu_backward" else None), None
        if (path is None or p in (None, path)) and (tma is None or t in (None, tma)):
            selected.append(tuner)
    return selected


@contextlib.contextmanager
def force_configs(kernel, configs, *, path=None, tma=None):
    """Have `kernel`'s tuners (see `tuners`) offer only `configs` (triton.Config; one is
    launched untimed and unpruned) for a `with` block; the tuned configs are forgotten on
    entry and on exit, so that calls inside and after tune again."""
    if isinstance(configs, triton.Config):
        configs = [configs]
    selected = tuners(kernel, path, tma)
    old = [tuner.configs for tuner in selected]
    for tuner in selected:
        tuner.configs = list(configs)
    clear_tuning()
    try:
        yield
    finally:
        for tuner, kept in zip(selected, old, strict=True):
            tuner.configs = kept
        clear_tuning()
