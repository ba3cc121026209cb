"""transformers' experts backends (transformers.integrations.moe) as moebench peers.

`model.set_experts_implementation(name)` makes each experts module of a transformers MoE model
call `ALL_EXPERTS_FUNCTIONS[name](module, hidden_states, top_k_index, top_k_weights)`, or, for
"eager", the model's own experts forward. Each forward here calls that same function on a
stand-in for the module. transformers holds expert weights as moebench does (gate_up_proj
[E, 2F, D], gate rows then up rows; down_proj [E, D, F]; no bias, not transposed), so the
stand-in carries our tensors as they are: no weight is copied or transposed per call.

T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import types

import torch
from transformers.activations import SiLUActivation
from transformers.integrations import deepgemm as hf_deepgemm
from transformers.integrations import moe as hf_moe
from transformers.integrations import sonicmoe as hf_sonicmoe
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from ..registry import Unavailable

# "eager" is no entry of ALL_EXPERTS_FUNCTIONS but each model's own experts forward, which
# use_experts_implementation keeps (and functools.wraps exposes) as the fallback. Mixtral's
# stands for all: Qwen3-MoE's and the other SwiGLU models' are generated copies of it.
_EAGER = MixtralExperts.forward.__wrapped__


class _Experts:
    """What transformers' experts functions read off an experts module: the layout flags
    that use_experts_implementation sets (here its defaults: gated, gate and up rows
    concatenated, not transposed, no bias, no post-expert norm, no expert parallelism), the
    activation and the weights."""

    has_gate, has_bias, has_post_expert_norm = True, False, False
    is_concatenated, is_transposed, _is_expert_parallel = True, False, False
    config = types.SimpleNamespace(hidden_act="silu")  # sonicmoe picks its epilogue by name
    act_fn = SiLUActivation()
    _apply_gate = hf_moe._default_apply_gate

    def __init__(self, gate_up_E2FD, down_EDF):
        self.gate_up_proj, self.down_proj = gate_up_E2FD, down_EDF
        self.num_experts = gate_up_E2FD.shape[0]


def _run(experts_fn, x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    # transformers' routers pass topk's int64 ids; eager's one_hot takes no other.
    return experts_fn(_Experts(gate_up_E2FD, down_EDF), x_TD, ids_TK.long(), weights_TK)


def _load(loader, name: str) -> None:
    """Load a hub kernel as transformers does (cached after the first call); its ImportError
    says what is missing (the `kernels` package, CUDA, a Hopper GPU, nvcc) in one line."""
    try:
        loader()
    except ImportError as e:
        raise Unavailable(f"{name}: {e}") from None


def _check_grouped_mm(x_TD, gate_up_E2FD, down_EDF) -> None:
    """Refuse what torch's grouped_mm would refuse deep inside transformers' grouped_mm,
    which calls it on the CPU and on CUDA sm80+ (elsewhere it loops over the experts)."""
    if x_TD.is_cuda and torch.cuda.get_device_capability(x_TD.device) < (8, 0):
        return
    # On CUDA only bf16 runs (moebench's sorted layer found the same); the CPU kernels take
    # fp16 and fp32 as well, never fp64.
    dtypes = (torch.bfloat16,) if x_TD.is_cuda else (torch.float16, torch.bfloat16, torch.float32)
    if x_TD.dtype not in dtypes:
        where = x_TD.device.type
        raise Unavailable(f"hf-grouped_mm: torch's grouped_mm takes no {x_TD.dtype} on {where}")
    elt, D, F = x_TD.element_size(), x_TD.shape[1], down_EDF.shape[2]
    strides = [sorted(w.stride()[1:]) for w in (gate_up_E2FD, down_EDF)]
    if (D * elt) % 16 or (F * elt) % 16 or any(s[0] != 1 or s[1] * elt % 16 for s in strides):
        raise ValueError(
            f"hf-grouped_mm: torch's grouped_mm needs row- or column-major expert weights "
            f"with rows of a multiple of 16 bytes; D={D}, F={F} of {elt}-byte {x_TD.dtype}, "
            f"weight strides {gate_up_E2FD.stride()} and {down_EDF.stride()}"
        )


def eager(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """A loop over the experts that have tokens: gather, two linears, index_add."""
    return _run(_EAGER, x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF)


def batched_mm(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """Each pair's expert weights gathered ([S, 2F, D]: a copy per call, by design), one bmm."""
    return _run(hf_moe.batched_mm_experts_forward, x_TD, ids_TK, weights_TK, gate_up_E2FD,
                down_EDF)  # fmt: skip


def grouped_mm(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """Pairs sorted by expert, one torch grouped_mm per projection."""
    _check_grouped_mm(x_TD, gate_up_E2FD, down_EDF)
    return _run(hf_moe.grouped_mm_experts_forward, x_TD, ids_TK, weights_TK, gate_up_E2FD,
                down_EDF)  # fmt: skip


def sonicmoe(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """SonicMoE's fused CuteDSL kernels (kernels-community/sonic-moe, Hopper or newer)."""
    _load(hf_sonicmoe.load_sonicmoe_kernel, "hf-sonicmoe")
    return _run(hf_sonicmoe.sonicmoe_experts_forward, x_TD, ids_TK, weights_TK, gate_up_E2FD,
                down_EDF)  # fmt: skip


def deepgemm(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """DeepGEMM's bf16 M-grouped GEMMs (kernels-community/deep-gemm, Hopper or Blackwell)."""
    _load(hf_deepgemm.load_deepgemm_kernel, "hf-deepgemm")
    return _run(hf_deepgemm.deepgemm_bf16_experts_forward, x_TD, ids_TK, weights_TK,
                gate_up_E2FD, down_EDF)  # fmt: skip
