"""The FLOP and byte model and the device's measured ceilings: how close a layer comes to
the least time its work can take here.

T tokens, D model width, F expert hidden width, Fs shared hidden width, E experts,
K experts per token, S = T*K token-expert pairs.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import MoEConfig
from .timing import measure


def useful_flops(cfg: MoEConfig, num_tokens: int) -> int:
    """6*S*D*F routed + 6*T*D*Fs shared: padding does not count, and the sweep takes the
    padded layer's dropped pairs out (6*D*F each)."""
    return cfg.flops(num_tokens)


def min_bytes(cfg: MoEConfig, num_tokens: int, touched_experts: int, itemsize: int) -> int:
    """What the layer must move at least: each expert that received a token read once, the
    shared expert read once, x read and y written once."""
    D, F, Fs = cfg.d_model, cfg.d_ff, cfg.d_ff_shared
    weights = (touched_experts * 3 * D * F + 3 * D * Fs) * itemsize
    return weights + 2 * num_tokens * D * itemsize


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The device's measured limits in the profile's dtype."""

    matmul_flops: float  # FLOP/s of a large square matmul
    copy_bytes: float  # bytes/s read plus written by a large device-to-device copy
    label: str

    def roofline_ms(self, flops: int, nbytes: int) -> float:
        """The least time the layer can take here: compute bound or memory bound."""
        return max(flops / self.matmul_flops, nbytes / self.copy_bytes) * 1e3


def roofline_fraction(flops: int, nbytes: int, time_ms: float, ceilings: Ceilings) -> float:
    return ceilings.roofline_ms(flops, nbytes) / time_ms


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
    return Ceilings(
        matmul_flops=2 * matmul_n**3 / (mm.median_ms * 1e-3),
        copy_bytes=2 * nbytes / (copy.median_ms * 1e-3),
        label=(
            f"{str(dtype).removeprefix('torch.')} matmul {matmul_n}^3, "
            f"copy {nbytes / 2**20:.0f} MiB, {timer.label}"
        ),
    )
