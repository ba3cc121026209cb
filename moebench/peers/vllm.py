"""vLLM's fused_experts (vllm.model_executor.layers.fused_moe): its unquantized Triton MoE.

    fused_experts(hidden_states, w1, w2, topk_weights, topk_ids) -> [T, D]

The five positional arguments are the same from vLLM 0.10 to 0.34; the keywords after them
changed (the quantization flags moved into `quant_config` in 0.11, `activation` turned from
"silu" into MoEActivation.SILU by 0.20, `inplace` was gone by 0.25), so this peer passes
none and gets their defaults in every version: SiLU, unquantized, out of place. w1 is
[E, 2N, D] with gate rows then up rows (silu_and_mul computes silu(h[:N]) * h[N:]) and w2
[E, D, N]: moebench's gate_up [E, 2F, D] and down [E, D, F] as they are, nothing copied.
vLLM serves inference: no autograd, CUDA builds only (its silu_and_mul, moe_align_block_size
and moe_sum are CUDA ops around the Triton GEMMs, so the Triton interpreter cannot run it).

T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import functools

import torch

from ..registry import Unavailable


@functools.cache
def _fused_experts():
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except ImportError as e:  # installed, but a build for another torch or platform
        raise Unavailable(f"vllm: its fused_moe does not import: {e}") from None
    try:
        torch.ops._C.silu_and_mul  # noqa: B018 (the lookup raises where vllm._C did not load)
    except (AttributeError, RuntimeError):
        raise Unavailable("vllm: its CUDA kernels (vllm._C) did not load") from None
    return fused_experts


def _last_dim_dense(w: torch.Tensor) -> torch.Tensor:
    # vLLM asserts w.stride(-1) == 1 and handles the other strides itself; only weights
    # strided along their rows are copied, and moebench's own never are.
    return w if w.stride(-1) == 1 else w.contiguous()


def arguments(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF) -> tuple:
    """fused_experts' positional arguments for our tensors: hidden_states contiguous (vLLM
    asserts it), w1 = gate_up, w2 = down, then topk_weights as fp32 and topk_ids as int32,
    both contiguous (the dtypes vLLM's router hands it; its kernels index them flat)."""
    return (
        x_TD.contiguous(),
        _last_dim_dense(gate_up_E2FD),
        _last_dim_dense(down_EDF),
        weights_TK.to(torch.float32).contiguous(),
        ids_TK.to(torch.int32).contiguous(),
    )


def call(fused_experts, x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """`fused_experts` (vLLM's, or a stand-in with its signature) on our tensors."""
    return fused_experts(*arguments(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF))


def forward(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """vLLM's fused_experts on our tensors."""
    return call(_fused_experts(), x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF)
