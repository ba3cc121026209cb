"""The dropless standard: sort pairs by expert, one grouped GEMM per projection.

T tokens, D model width, F expert hidden width, E experts, K experts per token,
S = T*K token-expert pairs. This is the `sorted` implementation, as in torchtitan's
GroupedExperts and transformers' grouped_mm path: permute a copy of x into expert order,
run `grouped_mm` over the per-expert row segments (a per-segment loop where the torch build
has no grouped GEMM for these operands), unpermute and combine. Quantized projections: the
experts that received tokens are dequantized first (the reference semantics of
moebench/quant.py; torch has no block-scaled grouped GEMM on every build), after one host
sync that finds them.
"""

import torch
import torch.nn.functional as F

from .. import quant

_GROUPED_MM = getattr(F, "grouped_mm", None)
# CUDA's grouped GEMM refused E=1024 groups ("Can't process more than 1024 groups", torch
# 2.11 on an H100); larger E runs in slices of this many experts.
_MAX_GROUPS = 512


def _has_grouped_mm(x_TD: torch.Tensor, d_ff: int, *weights: torch.Tensor) -> bool:
    """Whether this build has a grouped GEMM for these operands: rows must be 16-byte
    aligned and each weight row- or column-major in its last two dims (a strided view, as
    a checkpoint's weights may be, is neither); on CUDA only bf16 is supported everywhere
    (sm80+ for F.grouped_mm, sm90 for the older torch._grouped_mm); the CPU kernels of
    F.grouped_mm also take fp16 and fp32."""
    elt = x_TD.element_size()
    if (x_TD.shape[1] * elt) % 16 or (d_ff * elt) % 16:
        return False
    for w in weights:
        inner = sorted(w.stride()[-2:])
        if inner[0] != 1 or (inner[1] * elt) % 16:
            return False
    if not x_TD.is_cuda:
        return _GROUPED_MM is not None and x_TD.dtype in (
            torch.float16,
            torch.bfloat16,
            torch.float32,
        )
    if x_TD.dtype != torch.bfloat16:
        return False
    capability = torch.cuda.get_device_capability(x_TD.device)
    if _GROUPED_MM is not None:
        return capability >= (8, 0)
    return hasattr(torch, "_grouped_mm") and capability >= (9, 0)


def _segment_mm(a_SN, w_EMN, ends_E, use_grouped):
    """Rows of segment e of a_SN (ending at ends_E[e]) times w_EMN[e].T."""
    if use_grouped:
        grouped_mm = _GROUPED_MM or torch._grouped_mm
        E = w_EMN.shape[0]
        if E <= _MAX_GROUPS:
            return grouped_mm(a_SN, w_EMN.transpose(1, 2), offs=ends_E.to(torch.int32))
        # The last row of each slice of experts, on the host: one sync, for E > 512 only.
        firsts = range(0, E, _MAX_GROUPS)
        row_ends = ends_E[[min(e + _MAX_GROUPS, E) - 1 for e in firsts]].tolist()
        out = a_SN.new_empty(a_SN.shape[0], w_EMN.shape[1])
        lo = 0
        for e, hi in zip(firsts, row_ends, strict=True):
            if hi > lo:
                experts = slice(e, e + _MAX_GROUPS)
                offs = (ends_E[experts] - lo).to(torch.int32)
                out[lo:hi] = grouped_mm(a_SN[lo:hi], w_EMN[experts].transpose(1, 2), offs=offs)
            lo = hi
        return out
    out = a_SN.new_empty(a_SN.shape[0], w_EMN.shape[1])
    start = 0
    for e, end in enumerate(ends_E.tolist()):
        if end > start:
            out[start:end] = a_SN[start:end] @ w_EMN[e].T
        start = end
    return out


def forward(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF, out_TD, stats):
    T, K = ids_TK.shape
    if isinstance(gate_up_E2FD, quant.QuantizedTensor):  # the touched experts, renumbered
        used_E = torch.bincount(ids_TK.flatten(), minlength=gate_up_E2FD.shape[0]) > 0
        ids_TK = (used_E.cumsum(0) - 1)[ids_TK]
        touched = used_E.nonzero().squeeze(1)
        gate_up_E2FD, down_EDF = gate_up_E2FD.select(touched), down_EDF.select(touched)
    E, D, F_ = down_EDF.shape
    ids_S = ids_TK.flatten()
    order_S = torch.argsort(ids_S, stable=True)
    ends_E = torch.bincount(ids_S, minlength=E).cumsum(0)
    gate_up, down = (quant.dense(w, x_TD.dtype) for w in (gate_up_E2FD, down_EDF))
    use_grouped = _has_grouped_mm(x_TD, F_, gate_up, down)

    xs_SD = quant.activations(x_TD, gate_up_E2FD)[order_S // K]
    gate, up = _segment_mm(xs_SD, gate_up, ends_E, use_grouped).chunk(2, dim=-1)
    h_SF = quant.activations(F.silu(gate) * up, down_EDF)
    ys_SD = _segment_mm(h_SF, down, ends_E, use_grouped)

    acc_dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    y_SD = torch.empty_like(ys_SD, dtype=acc_dtype)
    y_SD[order_S] = ys_SD.to(acc_dtype)  # unpermute back to pair order t*K + j
    y_TKD = y_SD.view(T, K, D) * weights_TK.to(acc_dtype)[..., None]
    out_TD.copy_(y_TKD.sum(1))
    if stats is not None:
        stats["grouped_mm"] = use_grouped
    return out_TD
