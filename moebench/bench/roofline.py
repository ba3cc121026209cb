"""The FLOP and byte model and the device's measured ceilings: how close a layer comes to
the least time its work can take here.

T tokens, D model width, F expert hidden width, Fs shared hidden width, E experts,
K experts per token, S = T*K token-expert pairs, B the quantization block size.

Quantized experts (moebench/quant.py) move their stored bytes, values and scales; their
matmuls run in the layer's dtype (int8 and int4 are w8a16 / w4a16), but fp8-block's, whose
activations are fp8 too (w8a8): its ceiling is an FP8 matmul, measured where the device has
one (CUDA sm_89 and later). Elsewhere fp8-block runs its matmuls in the dtype, whose
ceiling then bounds it.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from ..config import MoEConfig
from ..weights import ExpertWeights
from .timing import measure

FP8 = "fp8-block"  # the format whose matmuls take FP8 operands


def useful_flops(cfg: MoEConfig, num_tokens: int) -> int:
    """6*S*D*F routed + 6*T*D*Fs shared: padding does not count, and the sweep takes the
    padded layer's dropped pairs out (6*D*F each)."""
    return cfg.flops(num_tokens)


def min_bytes(
    cfg: MoEConfig, num_tokens: int, touched_experts: int, itemsize: int, expert_bytes=None
) -> int:
    """What the layer must move at least: each expert that received a token read once
    (3*D*F values, or `expert_bytes` where given: a quantized expert's values and scales),
    the shared expert read once, x read and y written once (the shared expert, x and y in
    the dtype)."""
    D, F, Fs = cfg.d_model, cfg.d_ff, cfg.d_ff_shared
    per_expert = 3 * D * F * itemsize if expert_bytes is None else expert_bytes
    weights = touched_experts * per_expert + 3 * D * Fs * itemsize
    return weights + 2 * num_tokens * D * itemsize


def quant_expert_bytes(cfg: MoEConfig, fmt: str, block: int, dtype: torch.dtype) -> int:
    """One routed expert's stored bytes in `fmt` (values and scales), from quant.py's own
    layout: an expert quantized on the meta device, which allocates nothing."""
    D, F = cfg.d_model, cfg.d_ff
    meta = lambda *shape: torch.empty(*shape, dtype=dtype, device="meta")
    return ExpertWeights(meta(1, 2 * F, D), meta(1, D, F)).quantize(fmt, block).expert_nbytes


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The device's measured limits in the profile's dtype."""

    matmul_flops: float  # FLOP/s of a large square matmul
    copy_bytes: float  # bytes/s read plus written by a large device-to-device copy
    label: str
    # FLOP/s of the same matmul on float8_e4m3fn operands (torch._scaled_mm); None where
    # the device has no FP8 matmul. Last, with a default: run files and callers from
    # before it read and build Ceilings as they did.
    fp8_matmul_flops: float | None = None

    def roofline_ms(self, flops: int, nbytes: int, quant: str | None = None) -> float:
        """The least time the layer can take here: compute bound or memory bound; with
        fp8-block weights compute bound by the FP8 matmul where there is one."""
        matmul = self.matmul_flops
        if quant == FP8 and self.fp8_matmul_flops:
            matmul = self.fp8_matmul_flops
        return max(flops / matmul, nbytes / self.copy_bytes) * 1e3


def roofline_fraction(
    flops: int, nbytes: int, time_ms: float, ceilings: Ceilings, quant: str | None = None
) -> float:
    return ceilings.roofline_ms(flops, nbytes, quant) / time_ms


def measure_ceilings(
    device,
    dtype: torch.dtype,
    timer,
    *,
    matmul_n: int,
    copy_bytes: int,
    warmup: int = 2,
    repeats: int = 10,
) -> Ceilings:
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    a, b = randn(matmul_n, matmul_n), randn(matmul_n, matmul_n)
    mm = measure(lambda: torch.mm(a, b), timer, warmup=warmup, repeats=repeats)
    src = randn(copy_bytes // dtype.itemsize)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), timer, warmup=warmup, repeats=repeats)
    nbytes = src.numel() * dtype.itemsize
    fp8 = fp8_matmul_flops(device, timer, matmul_n, warmup=warmup, repeats=repeats)
    return Ceilings(
        matmul_flops=2 * matmul_n**3 / (mm.median_ms * 1e-3),
        copy_bytes=2 * nbytes / (copy.median_ms * 1e-3),
        label=(
            f"{str(dtype).removeprefix('torch.')} matmul {matmul_n}^3, "
            f"copy {nbytes / 2**20:.0f} MiB, {timer.label}"
            + (", fp8 matmul (torch._scaled_mm)" if fp8 else "")
        ),
        fp8_matmul_flops=fp8,
    )


def has_fp8_matmul(device) -> bool:
    """Whether torch multiplies float8_e4m3fn matrices on this device's tensor cores: CUDA
    from sm_89 (Ada, Hopper) with torch._scaled_mm."""
    device = torch.device(device)
    return (
        device.type == "cuda"
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(device) >= (8, 9)
    )


def fp8_matmul_flops(device, timer, n: int, *, warmup: int, repeats: int) -> float | None:
    """FLOP/s of an n x n x n float8_e4m3fn matmul (unit scales, bf16 out), None where the
    device has none, or where this torch's _scaled_mm refuses the call (a private op whose
    signature has changed across versions): the sweep's other ceilings stand."""
    if not has_fp8_matmul(device):
        return None
    gen = torch.Generator(device=device).manual_seed(0)
    fp8 = lambda: torch.randn(n, n, generator=gen, device=device).to(torch.float8_e4m3fn)
    a, b = fp8(), fp8().t()  # _scaled_mm takes its second operand column-major
    one = torch.ones((), device=device)
    call = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    try:
        mm = measure(call, timer, warmup=warmup, repeats=repeats)
    except (RuntimeError, TypeError) as e:
        print(f"moebench: no fp8 matmul ceiling: {str(e).splitlines()[0]}", file=sys.stderr)
        return None
    return 2 * n**3 / (mm.median_ms * 1e-3)
