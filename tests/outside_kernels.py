"""Outside implementations for the registry and conformance-kit tests: one correct, three
with the bugs the kit exists to catch. Plain torch, written as a kernel author outside
moebench would write them, against the registry's signature only.

T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

import torch
import torch.nn.functional as F

import moebench as mb


def _expert_rows(x_TD, ids_TK, gate_up_E2FD, down_EDF):
    """Each pair's expert output [T, K, D], one pair at a time through gathered weights."""
    gate_up = gate_up_E2FD[ids_TK.long()]  # [T, K, 2F, D]
    gate, up = torch.einsum("tkfd,td->tkf", gate_up, x_TD).chunk(2, dim=-1)
    return torch.einsum("tkdf,tkf->tkd", down_EDF[ids_TK.long()], F.silu(gate) * up)


@mb.declare(dtypes=(torch.float32, torch.float64), differentiable=True)
def correct(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF, *, scale=1.0):
    y_TKD = _expert_rows(x_TD, ids_TK, gate_up_E2FD, down_EDF)
    return (y_TKD * weights_TK[..., None].to(y_TKD.dtype)).sum(1) * scale


def ignores_weights(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    return _expert_rows(x_TD, ids_TK, gate_up_E2FD, down_EDF).sum(1)


def drops_tail(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """Runs whole blocks of 16 tokens only: the rows past the last full block stay zero."""
    y_TD = torch.zeros_like(x_TD)
    T = x_TD.shape[0] // 16 * 16
    y_TD[:T] = correct(x_TD[:T], ids_TK[:T], weights_TK[:T], gate_up_E2FD, down_EDF)
    return y_TD


def drops_past_capacity(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """Keeps each expert's first 1.25 x T*K/E pairs in token order, as a padded layer does
    without saying so: right under balanced routing, wrong under skew."""
    T, K = ids_TK.shape
    E = gate_up_E2FD.shape[0]
    capacity = int(1.25 * T * K / E) + 1
    flat = ids_TK.flatten().long()
    order = torch.argsort(flat, stable=True)
    rank = torch.empty_like(order)
    starts = torch.bincount(flat, minlength=E).cumsum(0) - torch.bincount(flat, minlength=E)
    rank[order] = torch.arange(flat.numel()) - starts[flat[order]]
    kept = (rank < capacity).view(T, K)
    return correct(x_TD, ids_TK, weights_TK * kept, gate_up_E2FD, down_EDF)


@mb.declare(dtypes=(torch.float32,), quant=("int8", "int4"))
def forgets_scales(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF):
    """Takes int8 and int4 weights and multiplies by their stored values, not value * scale."""
    gate_up, down = (
        w.values().to(x_TD.dtype) if isinstance(w, mb.quant.QuantizedTensor) else w
        for w in (gate_up_E2FD, down_EDF)
    )
    return correct(x_TD, ids_TK, weights_TK, gate_up, down)
