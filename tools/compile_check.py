"""Compile every Triton config the `triton` layer can launch for Hopper (sm_90), with no GPU.

A config that spills registers or does not compile shows only on a GPU, at tuning time, as
a slow or failed candidate; GPU time is scarce and CI has none. This check builds each
(kernel, BLOCK_M, config) that the layer's autotuners can pick with the installed triton
for sm_90, runs the ptxas that triton itself uses with -v, and prints registers, spill
bytes, shared memory (flagged past an H100's 227 KiB) and whether the dots became wgmma.
It exits 1 when a config fails to compile or spills. A stand-in driver names the target;
`JITFunction.warmup` specializes the arguments as a launch does (aligned pointers, unit
strides, sizes divisible by 16).

Covered: the forward kernels and the backward's SwiGLU kernel on both paths at every
prefill tile height, each with the configs its pruning keeps for narrow, middle and wide
experts (the persistent ones included: their item and reduction loops flattened into
one), and again with LOOP (the programs loop over their items) at the heights where
the layer may loop (up to configs.LOOP_MAX_M rows); the fixed big-tile configs; the
weight-gradient kernel (dx reuses the down kernel); the schedule's kernels (sorted and
counted), at their fixed block sizes. Each kernel's arguments come from the layer's own
argument builders (moebench.impls.triton.ops and .schedule), given stand-ins for tensors.
Quantized weights (int8, int4, fp8-block with 128 blocks): the forward kernels with the
pointer configs that their pruning keeps for wide experts at the tile heights of QUANT_M,
the fixed big-tile configs, and the fp8 activations' quantization.

    python tools/compile_check.py [--only KERNEL] [--jobs N]   # TRITON_INTERPRET unset
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

SM = 90
# Shared memory a block may use on an H100: a bigger config compiles, and the autotuner
# skips it at launch (OutOfResources).
SMEM_LIMIT = 227 * 1024
TILE_HEIGHTS = (16, 32, 64, 128)  # what configs.block_m_for can choose for prefill
QUANT_M = {"decode": (16,), "prefill": (16, 128)}  # the quantized cases' tile heights
QUANTS = ("int8", "int4", "fp8-block")
EXPERT_WIDTHS = (8, 32, 64, 1024)  # F for the pruning: narrow, middle, wide experts
# Argument sizes: multiples of 16 like the real shapes, so they specialize the same way.
D, F, K, E, T_BUCKET = 4096, 1024, 8, 64, 4096
S = T_BUCKET * K
KERNELS = ("gate_up", "down", "swiglu_backward", "expert_grad", "schedule", "combine")


class Case(NamedTuple):
    kernel: str  # one of KERNELS
    # decode, prefill, big-prefill, big-decode; gate_up or down for expert_grad; rows, slots,
    # counted (schedule); pairs (combine)
    variant: str
    block_m: int  # 0 for expert_grad and schedule, whose BLOCK_M is part of their config
    config: dict  # triton.Config.all_kwargs()
    quant: str = ""  # the weights' format (moebench.quant), "" for float weights


class Result(NamedTuple):
    case: Case
    regs: int | None
    spill_bytes: int | None
    smem_bytes: int | None
    wgmma: bool
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_bytes == 0


def _install_driver():
    """Make triton compile for sm_90 on a machine without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver

    class Hopper(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", SM, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("compile_check compiles only; nothing is launched")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def set_current_device(self, device):
            pass

    driver.set_active(Hopper())


def _layer():
    """The triton layer's modules (configs, ops, schedule), compiled, not interpreted."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check builds compiled kernels: unset TRITON_INTERPRET")
    from moebench.impls.triton import configs, kernels, kernels_bwd, ops, schedule

    return configs, kernels, kernels_bwd, ops, schedule


def cases(only: str | None = None) -> list[Case]:
    """Every (kernel, BLOCK_M, config) the layer can launch on a GPU."""
    configs, kernels, kernels_bwd, _, _ = _layer()
    compiled = {"interpreted": False}
    search = {  # prefill: the TMA tuner's configs, a superset of the other's
        "gate_up": lambda path: configs.forward_configs(
            path, "gate_up", tma=path == "prefill", **compiled
        ),
        "down": lambda path: configs.forward_configs(
            path, "down", tma=path == "prefill", **compiled
        ),
        "swiglu_backward": lambda path: configs.swiglu_backward_configs(path, **compiled),
    }
    out = []
    for kernel, configs_of in search.items():
        prune = configs.prune(kernel)
        for path, heights in (("decode", (16,)), ("prefill", TILE_HEIGHTS)):
            space = configs_of(path)
            for bm, loop in [(bm, False) for bm in heights] + [
                (bm, True) for bm in heights if bm <= configs.LOOP_MAX_M
            ]:
                flags = {"BLOCK_M": bm, "LOOP": loop}
                kept = {id(c) for f in EXPERT_WIDTHS for c in prune(space, {"F": f}, **flags)}
                out += [
                    Case(kernel, path, bm, {**c.all_kwargs(), **({"LOOP": True} if loop else {})})
                    for c in space
                    if id(c) in kept
                ]
    names = {
        kernels._gate_up_kernel: "gate_up",
        kernels._down_kernel: "down",
        kernels_bwd._swiglu_backward_kernel: "swiglu_backward",
    }
    heights = {"prefill": configs.BIG_M, "decode": configs.DECODE_BIG_M}
    big = {  # the fixed configs, cut for narrow experts
        (path, names[k], tuple(sorted(c.items()))): c
        for path in configs.BIG_CONFIGS
        for f in EXPERT_WIDTHS
        for k, c in configs.big_config(path, f).items()
    }
    out += [Case(k, f"big-{path}", heights[path], dict(c)) for (path, k, _), c in big.items()]
    out += _quant_cases(configs, search, heights)
    grad_configs = [c.all_kwargs() for c in configs.expert_grad_configs(**compiled)]
    out += [Case("expert_grad", w, 0, c) for w in ("gate_up", "down") for c in grad_configs]
    variants = {"expert_rows": "rows", "tile_slots": "slots", "counted": "counted"}
    launch = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 3}  # triton's default launch
    blocks = {**configs.SCHEDULE_BLOCKS, "counted": configs.COUNTED_BLOCKS}  # the GPU's
    out += [Case("schedule", variants[k], 0, {**b, **launch}) for k, b in blocks.items()]
    # The pair sum's blocks for D >= 2048 and for D = 128, K = 8.
    elements = configs.PAIR_SUM_ELEMENTS
    out += [
        Case("combine", "pairs", 0, {"K": 8, "BLOCK_T": elements // d, "BLOCK_D": d,
                                     "num_warps": 4, "num_stages": 3})
        for d in (elements, 128)
    ]  # fmt: skip
    return [c for c in out if only in (None, c.kernel) or (only == "quant" and c.quant)]


def _quant_cases(configs, search, heights) -> list[Case]:
    """The forward kernels over quantized weights: pointer configs only (no TMA)."""
    from moebench.impls.triton.ops import QUANT_CODES

    out = []
    for fmt in QUANTS:
        group = {"GROUP_K": 0 if fmt == "int8" else 128, "QUANT": QUANT_CODES[fmt]}
        for kernel in ("gate_up", "down"):
            prune = configs.prune(kernel)
            for path, tile_heights in QUANT_M.items():
                space = [c for c in search[kernel](path) if not c.kwargs.get("TMA")]
                for bm in tile_heights:
                    kept = prune(space, {"F": F}, BLOCK_M=bm, LOOP=False, **group)
                    out += [Case(kernel, path, bm, c.all_kwargs(), fmt) for c in kept]
            for path in configs.BIG_CONFIGS:
                fixed = configs.big_config(path, F, fmt == "fp8-block")
                config = {**next(c for k, c in fixed.items() if k.__name__ == f"_{kernel}_kernel"),
                          "TMA": False}  # fmt: skip
                out.append(Case(kernel, f"big-{path}", heights[path], config, fmt))
    rows = {"GROUP": 128, "BLOCK_M": configs.QUANTIZE_ROWS, "num_warps": 4, "num_stages": 3}
    out.append(Case("quantize_rows", "fp8", 0, rows, "fp8-block"))
    return out


class Like:
    """A tensor's dtype, shape and (contiguous) strides, standing for it in an argument
    builder; _launch_args passes its dtype to JITFunction.warmup in the tensor's place."""

    def __init__(self, dtype, *shape):
        self.dtype, self.shape = dtype, shape

    def stride(self, dim=None):
        strides, step = [], 1
        for size in reversed(self.shape):
            strides.insert(0, step)
            step *= size
        return tuple(strides) if dim is None else strides[dim]


def _launch_args(case: Case):
    """The kernel and its arguments (dtypes stand for tensors), as the layer passes them."""
    _, kernels, kernels_bwd, ops, schedule = _layer()
    bf16, i64, f32 = torch.bfloat16, torch.int64, torch.float32
    n = S + E  # tile slots
    tiles = schedule.TileSchedule(
        Like(i64, S), Like(i64, E + 1), Like(i64, n), Like(i64, n), Like(i64, n), Like(i64, 2)
    )
    section = {"t_bucket": T_BUCKET, "slot0": 0, "count": 1}
    c, base = case.config, torch.empty(8, dtype=bf16)  # a descriptor's base: only its dtype

    def desc(rows, cols, box):  # a TMA config's descriptor over a [rows, cols] bf16 matrix
        return TensorDescriptor(base, [rows, cols], [cols, 1], box) if c.get("TMA") else None

    x, h = Like(bf16, T_BUCKET, D), Like(bf16, S, F)
    if case.quant:
        return _quant_launch_args(case, tiles, section)
    if case.kernel == "gate_up":  # x [T, D], gate_up [E, 2F, D] (or [E * 2F, D]), h [S, F]
        w = desc(E * 2 * F, D, [c["BLOCK_N"], c["BLOCK_K"]])
        args = ops.gate_up_args(x, Like(bf16, E, 2 * F, D), h, tiles, w, top_k=K, **section)
        kernel, flags = kernels._gate_up_kernel, {"BLOCK_M": case.block_m}
    elif case.kernel == "down":  # h [S, F], down [E, D, F] (or [E * D, F]), y [S, D] (pairs)
        h_desc = desc(S, F, [case.block_m, c["BLOCK_K"]])
        w_desc = desc(E * D, F, [c["BLOCK_N"], c["BLOCK_K"]])
        args = ops.down_args(h, Like(bf16, E, D, F), Like(bf16, S, D), Like(bf16, S), tiles,
                             h_desc, w_desc, top_k=K, **section)  # fmt: skip
        flags = {"WEIGHTED": True, "ATOMIC": False, "BLOCK_M": case.block_m}
        kernel = kernels._down_kernel
    elif case.kernel == "swiglu_backward":  # dgu [S, 2F]; dw's partial sums [F blocks, S]
        args = ops.swiglu_backward_args(
            x, x, Like(bf16, E, 2 * F, D), Like(bf16, E, D, F), Like(bf16, S),
            Like(bf16, S, 2 * F), Like(f32, F // 16, S), tiles, top_k=K, **section,
        )  # fmt: skip
        kernel, flags = kernels_bwd._swiglu_backward_kernel, {"BLOCK_M": case.block_m}
    elif case.kernel == "schedule":  # ids [S] (sorted: int16); int64 outputs; sizes
        flags = {}
        if case.variant == "rows":
            kernel = schedule._expert_rows_kernel
            args = schedule.expert_rows_args(
                Like(torch.int16, S), Like(i64, E + 1), Like(i64, 2, E), E, 128, 16
            )
        elif case.variant == "slots":
            kernel = schedule._tile_slots_kernel
            args = schedule.tile_slots_args(Like(i64, E + 1), Like(i64, 2, E), Like(i64, 2, E),
                                            tiles, E, S // 128, 128)  # fmt: skip
        else:  # counting: at most configs.COUNTED_MAX_PAIRS pairs
            kernel = schedule._counted_schedule_kernel
            args = schedule.counted_schedule_args(Like(i64, 512), tiles, E)
    elif case.kernel == "combine":  # y [S, D] -> out [T, D]
        kernel, flags = kernels._pair_sum_kernel, {}
        args = ops.pair_sum_args(Like(bf16, S, D), Like(bf16, T_BUCKET, D))
    elif case.variant == "gate_up":  # [dgate, dup] [S, 2F]^T @ x rows [T, D] -> [E, 2F, D]
        args = ops.expert_grad_args(Like(bf16, S, 2 * F), x, Like(bf16, E, 2 * F, D), tiles,
                                    None, top_k=K, s_bucket=S)  # fmt: skip
        flags = {"GATHER_A": False, "GATHER_B": True, "WEIGHTED": False}
        kernel = kernels_bwd._expert_grad_kernel
    else:  # (w * dy rows) [T, D]^T @ h [S, F] -> [E, D, F]
        args = ops.expert_grad_args(x, h, Like(bf16, E, D, F), tiles, Like(bf16, S), top_k=K,
                                    s_bucket=S)  # fmt: skip
        flags = {"GATHER_A": True, "GATHER_B": False, "WEIGHTED": True}
        kernel = kernels_bwd._expert_grad_kernel
    return kernel, tuple(a.dtype if isinstance(a, Like) else a for a in args), flags


def _quant_launch_args(case: Case, tiles, section):
    """_launch_args of a forward kernel over quantized weights, in blocks of 128: values
    [E, N, K / per element], scales as moebench.quant lays them out, fp8 activations and
    their scales [rows, K / 128]."""
    from moebench.quant import FORMATS

    _, kernels, _, ops, _ = _layer()
    bf16, f32 = torch.bfloat16, torch.float32
    if case.kernel == "quantize_rows":  # h [S, F] -> fp8 [S, F], scales [S, F / 128]
        fp8 = Like(torch.float8_e4m3fn, S, F)
        args = ops.quantize_rows_args(Like(bf16, S, F), fp8, Like(f32, S, F // 128))
        return kernels._quantize_rows_kernel, tuple(a.dtype for a in args[:3]) + args[3:], {}
    f = FORMATS[case.quant]
    fp8 = f.activations
    act = torch.float8_e4m3fn if fp8 else bf16
    n, k = (2 * F, D) if case.kernel == "gate_up" else (D, F)
    rows, cols = f.scale_block(128, k)
    w_scale = Like(f32 if fp8 else bf16, E, n // rows, k // cols)
    values = Like(f.storage, E, n, k // f.per_element)
    meta = {"QUANT": ops.QUANT_CODES[case.quant], "SCALE_N": rows,
            "GROUP_K": 0 if case.quant == "int8" else cols}  # fmt: skip
    if case.kernel == "gate_up":
        quant = ops.Quant(w_scale, Like(f32, T_BUCKET, D // 128) if fp8 else None, meta,
                          f.per_element)  # fmt: skip
        args = ops.gate_up_args(Like(act, T_BUCKET, D), values, Like(bf16, S, F), tiles, None,
                                top_k=K, quant=quant, **section)  # fmt: skip
        kernel, flags = kernels._gate_up_kernel, {"BLOCK_M": case.block_m, **meta}
    else:
        quant = ops.Quant(w_scale, Like(f32, S, F // 128) if fp8 else None, meta, f.per_element)
        args = ops.down_args(Like(act, S, F), values, Like(bf16, S, D), Like(bf16, S), tiles,
                             None, None, top_k=K, quant=quant, **section)  # fmt: skip
        flags = {"WEIGHTED": True, "ATOMIC": False, "BLOCK_M": case.block_m, **meta}
        kernel = kernels._down_kernel
    return kernel, tuple(a.dtype if isinstance(a, Like) else a for a in args), flags


def _ptxas_report(ptx: str) -> tuple[int | None, int | None]:
    """(registers, spill store bytes) from `ptxas -v` on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(SM).path, "-v", f"--gpu-name={arch}", src, "-o", src + ".cubin"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None)


def compile_case(case: Case) -> Result:
    """Compile one case for sm_90 and read its resources."""
    kernel, args, flags = _launch_args(case)
    try:
        compiled = kernel.warmup(*args, grid=(1,), **flags, **case.config)
        ptx = compiled.asm["ptx"]
        regs, spill = _ptxas_report(ptx)
    except Exception as e:  # a config that does not build is the finding, not a crash
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return Result(case, None, None, None, False, f"{type(e).__name__}: {first}")
    return Result(case, regs, spill, compiled.metadata.shared, "wgmma" in ptx, None)


def run(selected: list[Case], jobs: int) -> list[Result]:
    _install_driver()
    if jobs <= 1:
        return [compile_case(c) for c in selected]
    with ProcessPoolExecutor(jobs, initializer=_install_driver) as pool:
        return list(pool.map(compile_case, selected))


def format_table(results: list[Result]) -> str:
    head = (
        "kernel           variant          M    N    K/C  warps stages regs spill smem_KiB wgmma "
        "verdict"
    )
    lines = [head]
    for r in results:
        c = r.case.config
        block_m = r.case.block_m or c.get("BLOCK_M", c.get("BLOCK_T"))
        variant = r.case.variant + ("/tma" if c.get("TMA") else "")
        variant += f"/{r.case.quant}" if r.case.quant else ""
        variant += f"/x{c['N_BLOCKS']}" if c.get("N_BLOCKS", 1) > 1 else ""
        variant += "/loop" if c.get("LOOP") else ""
        variant += "/pers" if c.get("PERSISTENT") else ""
        width = c.get(
            "BLOCK_N",
            c.get(
                "BLOCK_E", c.get("BLOCK_SLOTS", c.get("BLOCK_D", c.get("BLOCK", c.get("GROUP"))))
            ),
        )
        inner = c.get("BLOCK_K", c.get("BLOCK_C", c.get("CHUNK", 0)))
        verdict = "ok" if r.ok else (r.error or f"SPILLS {r.spill_bytes} B")
        if r.ok and r.smem_bytes > SMEM_LIMIT:
            verdict = "ok, but over 227 KiB of shared memory: skipped at launch on an H100"
        smem = f"{r.smem_bytes / 1024:.0f}" if r.smem_bytes is not None else "-"
        lines.append(
            f"{r.case.kernel:16s} {variant:16s} {block_m:<4d} {width:<4d} "
            f"{inner:<4d} {c['num_warps']:<5d} {c['num_stages']:<6d} {r.regs or '-'!s:4s} "
            f"{r.spill_bytes if r.spill_bytes is not None else '-'!s:5s} {smem:8s} "
            f"{'yes' if r.wgmma else 'no':5s} {verdict}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python tools/compile_check.py", description=__doc__)
    p.add_argument("--only", choices=(*KERNELS, "quant"), help="one kernel, or the quantized")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = p.parse_args(argv)
    try:
        selected = cases(args.only)
    except RuntimeError as e:
        print(f"compile_check: {e}", file=sys.stderr)
        return 2
    import triton

    print(f"triton {triton.__version__}, sm_{SM}, {len(selected)} configs", flush=True)
    results = run(selected, args.jobs)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"{len(results) - len(bad)} ok, {len(bad)} failed or spilled")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
