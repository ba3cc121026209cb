"""Liger-Kernel's fused MoE (liger_kernel.ops.LigerFusedMoEFunction, since liger 0.8.0).

What `apply_liger_kernel_to_<model>(swiglu=True)` puts in a transformers v5 MoE model: its
LigerExperts module calls `LigerFusedMoEFunction.apply(x, gate_up_proj, down_proj,
top_k_index, top_k_weights)`, Triton kernels after SonicMoE's design (routing metadata in
three kernels, gather + grouped GEMM + SwiGLU, grouped down GEMM, a weighted gather-sum per
token) with its own backward for x, both projections and the routing weights. Liger holds
the weights as moebench does (gate_up [E, 2F, D], gate rows then up rows; down [E, D, F]),
so they go in as they are: no weight is copied per call (its ensure_contiguous copies only
a non-contiguous input). It accumulates in fp32 and rounds the hidden activation and each
pair's output row to x's dtype.

T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os

import torch

from ..registry import Unavailable


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _function():
    if _interpreted():
        # Liger autotunes each GEMM over 32 configs by timing them on a GPU; the interpreter
        # has none to time on (triton: "0 active drivers"). This pins one config, and liger
        # reads it once, when its kernels module is first imported.
        os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
    try:
        from liger_kernel.ops import LigerFusedMoEFunction, fused_moe_kernels
    except ImportError:
        version = importlib.metadata.version("liger-kernel")
        raise Unavailable(
            f"liger: liger-kernel {version} has no fused MoE (LigerFusedMoEFunction, 0.8.0 on)"
        ) from None
    if _interpreted() and not getattr(fused_moe_kernels, "_AUTOTUNE_DISABLED", False):
        raise Unavailable(
            "liger: its autotuner needs a GPU; under TRITON_INTERPRET=1 set "
            "LIGER_FUSED_MOE_AUTOTUNE=0 before liger_kernel is imported (0.8.5 reads it)"
        )
    return LigerFusedMoEFunction


def forward(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """Liger's fused MoE on our tensors; autograd reaches x, the routing weights and both
    projections."""
    if _interpreted() and x_TD.dtype == torch.bfloat16:
        raise Unavailable("liger: bfloat16 is wrong under TRITON_INTERPRET=1; run it on a GPU")
    fused_moe = _function()
    # Its routing kernels read int32 ids, as LigerExperts casts the router's int64 ones.
    return fused_moe.apply(x_TD, gate_up_E2FD, down_EDF, ids_TK.to(torch.int32), weights_TK)
