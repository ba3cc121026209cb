"""GShard/Switch capacity padding: a dense [E, C, D] buffer and two batched matmuls.

T tokens, D model width, F expert hidden width, E experts, K experts per token,
S = T*K token-expert pairs, C capacity (rows per expert in the buffer).

Drop policy: each expert keeps its first C pairs in token order (first come, first served);
the rest are dropped and contribute nothing. C = ceil(capacity_factor * S / E), or the
largest expert load when capacity_factor is None (nothing dropped). The buffer's padding
rows are computed like real rows: that waste is what this layer measures.
"""

import math
import os

import torch
import torch.nn.functional as F

from .. import quant


def slots(ids_TK: torch.Tensor, num_experts: int):
    """Each pair's row within its expert, in token order, and the per-expert loads."""
    ids_S = ids_TK.flatten()
    order_S = torch.argsort(ids_S, stable=True)
    counts_E = torch.bincount(ids_S, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    slot_S = torch.empty_like(ids_S)
    slot_S[order_S] = torch.arange(ids_S.numel(), device=ids_S.device) - starts_E[ids_S[order_S]]
    return slot_S, counts_E


def _check_fits(nbytes: int, device: torch.device):
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > free:
        raise torch.OutOfMemoryError(
            f"padded layer: capacity buffers need {nbytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free on {device}"
        )


def forward(
    x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF, out_TD, stats, *, capacity_factor=1.25
):
    number = isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
    if capacity_factor is not None and not (number and 0 < capacity_factor < math.inf):
        raise ValueError(f"capacity_factor must be a number > 0 or None, got {capacity_factor!r}")
    T, K = ids_TK.shape
    E, F2, D = gate_up_E2FD.shape
    S = T * K
    slot_S, counts_E = slots(ids_TK, E)
    if capacity_factor is None:
        C = int(counts_E.max())
    else:
        C = max(1, math.ceil(capacity_factor * S / E))
    _check_fits(E * C * (2 * D + 3 * F2 // 2) * x_TD.element_size(), x_TD.device)

    ids_S = ids_TK.flatten()
    keep_S = slot_S < C
    # Dropped pairs go to a spare row E*C that no expert reads, so no host sync is needed.
    row_S = torch.where(keep_S, ids_S * C + slot_S, E * C)
    x_ND = x_TD.new_zeros(E * C + 1, D)
    x_ND[row_S] = quant.activations(x_TD, gate_up_E2FD).repeat_interleave(K, dim=0)
    x_ECD = x_ND[: E * C].view(E, C, D)
    gate_up, down = (quant.dense(w, x_TD.dtype) for w in (gate_up_E2FD, down_EDF))
    gate, up = torch.bmm(x_ECD, gate_up.transpose(1, 2)).chunk(2, dim=-1)
    h_NF = quant.activations((F.silu(gate) * up).view(E * C, -1), down_EDF)
    y_ECD = torch.bmm(h_NF.view(E, C, -1), down.transpose(1, 2))

    acc_dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    # A dropped pair reads any finite row and weighs it by zero.
    y_SD = y_ECD.reshape(E * C, D)[row_S.clamp_max(E * C - 1)].to(acc_dtype)
    w_S = torch.where(keep_S, weights_TK.flatten().to(acc_dtype), 0)
    y_TKD = (y_SD * w_S[:, None]).view(T, K, D)
    out_TD.copy_(y_TKD.sum(1))
    if stats is not None:
        stats["capacity"] = C
        stats["dropped_mask"] = (~keep_S).view(T, K)
        stats["dropped"] = int(S - keep_S.sum())
    return out_TD
