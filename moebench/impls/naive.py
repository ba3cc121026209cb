"""The readable oracle: one pass per expert that received tokens.

T tokens, D model width, F expert hidden width, E experts, K experts per token,
S = T*K token-expert pairs. Each expert gathers its tokens, runs its SwiGLU MLP with two
matmuls and adds the weighted result back with `index_add_`: one launch per expert, which
is what the other implementations exist to avoid. Quantized projections are dequantized
an expert at a time, and their activations quantized as their format does
(moebench/quant.py).
"""

import torch
import torch.nn.functional as F

from .. import quant


def forward(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF, out_TD, stats):
    T, K = ids_TK.shape
    acc_dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    acc_TD = torch.zeros(T, x_TD.shape[1], dtype=acc_dtype, device=x_TD.device)
    ids_S = ids_TK.flatten()
    weights_S = weights_TK.flatten().to(acc_dtype)
    experts = ids_S.unique().tolist()
    gate_up_E = quant.experts(gate_up_E2FD, x_TD.dtype)
    down_E = quant.experts(down_EDF, x_TD.dtype)
    xq_TD = quant.activations(x_TD, gate_up_E2FD)
    for e in experts:
        pairs = (ids_S == e).nonzero().squeeze(1)
        tokens = pairs // K
        gate, up = (xq_TD[tokens] @ gate_up_E[e].T).chunk(2, dim=-1)
        y = quant.activations(F.silu(gate) * up, down_EDF) @ down_E[e].T
        acc_TD.index_add_(0, tokens, y.to(acc_dtype) * weights_S[pairs, None])
    if stats is not None:
        stats["launches"] = len(experts)
    return out_TD.copy_(acc_TD)
