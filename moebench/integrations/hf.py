"""moebench's own layers as experts implementations of transformers' MoE models.

    from moebench.integrations import hf
    hf.register()                                         # moebench_naive ... moebench_triton
    model.set_experts_implementation("moebench_triton")
    # or from_pretrained(..., experts_implementation="moebench_triton")

An experts module of transformers (a class decorated with @use_experts_implementation, in
transformers.integrations.moe) calls ExpertsInterface's entry named by its config as
fn(module, hidden_states [T, D], top_k_index [T, K], top_k_weights [T, K]) -> [T, D].
register() adds one such function per layer; it reads the module's weights as views in
moebench's layout and runs moe_forward.

T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import torch
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface, _default_apply_gate

from .. import registry
from ..layer import moe_forward
from ..routing import Routing
from ..weights import ExpertWeights


def register() -> tuple[str, ...]:
    """Register each of moebench's own layers as the experts implementation
    `moebench_<impl>`, for every model. Calling it again changes nothing. Returns the names."""
    for name, forward in _FORWARDS.items():
        ExpertsInterface.register(name, forward)
    return tuple(_FORWARDS)


def _unsupported(module) -> str | None:
    """What of this experts module moebench does not compute (it computes bias-free SwiGLU
    experts holding gate rows then up rows), else None."""
    silu = isinstance(module.act_fn, (SiLUActivation, torch.nn.SiLU))
    if not module.has_gate or not silu:
        return "experts that are not SwiGLU"
    clipped = getattr(module, "limit", None) is not None
    if type(module)._apply_gate is not _default_apply_gate or clipped:
        return "a gate of its own (clipped or otherwise changed)"
    if module.has_bias:
        return "expert biases"
    if module.has_post_expert_norm:
        return "a norm after each expert"
    if not module.is_concatenated:
        return "gate and up rows interleaved"
    return None


def _routing(ids_TK, weights_TK, num_experts: int, expert_parallel: bool) -> Routing:
    """The module's routing as moe_forward takes it, ids in [0, E).

    Under transformers' expert parallelism a pair whose expert lives on another rank comes
    as id E (the module's local num_experts) with weight 0 (transformers.distributed.
    expert_parallel). Such a pair becomes a zero-weight pair on an expert its token does not
    pick: each token's K experts stay distinct, as a router's are, so no expert receives
    more than T pairs. Without expert parallelism an id E is refused by moe_forward's checks,
    as transformers' own grouped_mm and batched_mm do not expect one either.
    """
    if not expert_parallel:
        return Routing(ids_TK, weights_TK)
    E = num_experts
    masked_TK = ids_TK >= E
    picked_TE = ids_TK.new_zeros(ids_TK.shape[0], E + 1, dtype=torch.uint8)
    picked_TE = picked_TE.scatter_(1, ids_TK.long().clamp(0, E), 1)[:, :E]
    spare_TE = picked_TE.argsort(dim=1, stable=True)  # each token's unpicked experts first
    # A masked pair takes the n-th spare expert, n its rank among its token's masked pairs
    # (clamped only where K > E, which moe_forward refuses anyway).
    nth_TK = (masked_TK.cumsum(1) - 1).clamp(0, E - 1)
    ids_TK = torch.where(masked_TK, spare_TE.gather(1, nth_TK), ids_TK)
    return Routing(ids_TK, weights_TK.masked_fill(masked_TK, 0))


def _experts_forward(impl: str):
    """The experts function of transformers' interface that runs moebench's layer `impl`."""

    def forward(module, hidden_states, top_k_index, top_k_weights):
        why = _unsupported(module)
        if why:
            raise NotImplementedError(
                f"moebench_{impl}: {type(module).__name__} has {why}; moebench computes "
                "bias-free SwiGLU experts (use another experts implementation)"
            )
        gate_up, down = module.gate_up_proj, module.down_proj
        if module.is_transposed:  # [E, D, 2F] and [E, F, D]: our layout as views
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        weights = ExpertWeights(gate_up, down)
        routing = _routing(top_k_index, top_k_weights, module.num_experts,
                           module._is_expert_parallel)  # fmt: skip
        # The padded layer drops the pairs past an expert's capacity, by design; a model's
        # layer must drop none. Without a factor its capacity is T, and no expert gets more
        # than T pairs (see _routing).
        options = {"capacity_factor": None} if impl == "padded" else {}
        # Under autocast the hidden states may be wider than the weights.
        x_TD = hidden_states.to(weights.dtype)
        return moe_forward(x_TD, routing, weights, impl=impl, **options).to(hidden_states.dtype)

    forward.__name__ = forward.__qualname__ = f"moebench_{impl}_experts_forward"
    return forward


_FORWARDS = {f"moebench_{impl}": _experts_forward(impl) for impl in registry.OWN}
