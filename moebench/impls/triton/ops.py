"""Launchers of the `triton` layer's kernels, the two custom ops and their autograd.

Each kernel's positional arguments come from one builder (`gate_up_args`, `down_args`,
`pair_sum_args`, `swiglu_backward_args`, `expert_grad_args`; the schedule's are in
schedule.py). A builder reads only .shape and .stride() of its tensor arguments, so that
tools/compile_check.py builds the same argument lists from stand-ins.

T tokens, D model width, F expert hidden width, E experts, K experts per token,
S = T*K token-expert pairs, N tile slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...quant import QuantizedTensor, quantize_activations
from . import configs, launch
from .kernels import _down_kernel, _gate_up_kernel, _pair_sum_kernel, _quantize_rows_kernel
from .schedule import TileSchedule, big_slots

# -- Quantized weights --------------------------------------------------------------------

# The kernels' QUANT by format (kernels.py).
QUANT_CODES = {"int8": 1, "int4": 2, "fp8-block": 3}


class Quant(NamedTuple):
    """What a launch over quantized weights adds: the weights' scales [E, N / SCALE_N,
    K / columns], the activations' [rows, K / GROUP_K] (fp8) or None, the kernels'
    constexprs, and the values a stored weight element packs (8 for int4)."""

    w_scale: object
    a_scale: object
    meta: dict
    per_element: int

    def args(self) -> tuple:
        a_strides = (0, 0) if self.a_scale is None else self.a_scale.stride()
        return (self.w_scale, self.a_scale, *self.w_scale.stride(), *a_strides)


_NO_QUANT = (None, None, 0, 0, 0, 0, 0)  # Quant.args() of float weights


def quant_for(w: QuantizedTensor, a_scale=None) -> Quant:
    """The Quant of projection `w`, with the activations' scales where its format has them."""
    rows, cols = w.format.scale_block(w.block, w.shape[2])
    code = QUANT_CODES[w.fmt]
    meta = {"QUANT": code, "SCALE_N": rows, "GROUP_K": 0 if code == 1 else cols}
    return Quant(w.scale, a_scale, meta, w.format.per_element)


# -- Argument builders --------------------------------------------------------------------


def gate_up_args(x_TD, gate_up_E2FD, h_SF, schedule, w_desc, *, top_k, t_bucket, slot0, count,
                 quant=None):  # fmt: skip
    """_gate_up_kernel's positional arguments: x [T, D], gate_up [E, 2F, D] (or its stored
    values, with `quant`), h [S, F], the schedule's tensors, the weights' TMA descriptor (or
    None), sizes, the section, the Quant's arguments."""
    E, F2, D = gate_up_E2FD.shape
    D *= quant.per_element if quant else 1
    return (
        x_TD, gate_up_E2FD, h_SF, schedule.order_S, schedule.expert_N, schedule.start_N,
        schedule.end_N, schedule.count_2, w_desc, D, F2 // 2, top_k, E, t_bucket, slot0, count,
        *x_TD.stride(), *gate_up_E2FD.stride(), *h_SF.stride(),
        *(quant.args() if quant else _NO_QUANT),
    )  # fmt: skip


def down_args(h_SF, down_EDF, y, weights_S, schedule, h_desc, w_desc, *, top_k, t_bucket,
              slot0, count, quant=None):  # fmt: skip
    """_down_kernel's positional arguments: h [S, F], down [E, D, F] (or its stored values,
    with `quant`), y ([S, D] pairs or [T, D]), the routing weights [S] (or None), the
    schedule's tensors, the TMA descriptors of h and the weights (or None), sizes, the
    section, the Quant's arguments."""
    E, D, F = down_EDF.shape
    F *= quant.per_element if quant else 1
    return (
        h_SF, down_EDF, y, schedule.order_S, weights_S, schedule.expert_N, schedule.start_N,
        schedule.end_N, schedule.count_2, h_desc, w_desc, D, F, top_k, E, t_bucket, slot0,
        count, *h_SF.stride(), *down_EDF.stride(), *y.stride(),
        *(quant.args() if quant else _NO_QUANT),
    )  # fmt: skip


def quantize_rows_args(a_MK, q_MK, scale_MG):
    """_quantize_rows_kernel's positional arguments: a [M, K] -> fp8 q [M, K] and scales
    [M, K / group]."""
    return (a_MK, q_MK, scale_MG, a_MK.shape[0], *a_MK.stride(), *q_MK.stride(),
            *scale_MG.stride())  # fmt: skip


def pair_sum_args(y_SD, out_TD):
    """_pair_sum_kernel's positional arguments: y [S, D] -> out [T, D]."""
    T, D = out_TD.shape
    return (y_SD, out_TD, T, D, *y_SD.stride(), *out_TD.stride())


def swiglu_backward_args(x_TD, dy_TD, gate_up_E2FD, down_EDF, weights_S, dgu_S2F, dw_RS,
                         schedule, *, top_k, t_bucket, slot0, count):  # fmt: skip
    """_swiglu_backward_kernel's positional arguments: x, dy [T, D], gate_up, down, the
    routing weights [S], [dgate, dup] [S, 2F], dw's partial sums [F blocks, S] (fp32), the
    schedule's tensors, sizes, the section."""
    E, D, F = down_EDF.shape
    return (
        x_TD, dy_TD, gate_up_E2FD, down_EDF, weights_S, dgu_S2F, dw_RS, schedule.order_S,
        schedule.expert_N, schedule.start_N, schedule.end_N, schedule.count_2, D, F, top_k, E,
        t_bucket, slot0, count, *x_TD.stride(), *dy_TD.stride(), *gate_up_E2FD.stride(),
        *down_EDF.stride(), *dgu_S2F.stride(), dw_RS.stride(0),
    )  # fmt: skip


def expert_grad_args(a_SN, b_SC, out_ENC, schedule, weights_S, *, top_k, s_bucket):
    """_expert_grad_kernel's positional arguments: a [S or T, N], b [S or T, C], out
    [E, N, C], the schedule's order and offsets, the routing weights [S] (or None), sizes."""
    E, N, C = out_ENC.shape
    return (
        a_SN, b_SC, out_ENC, schedule.order_S, weights_S, schedule.offsets_E1, N, C, top_k, E,
        s_bucket, *a_SN.stride(), *b_SC.stride(), *out_ENC.stride(),
    )  # fmt: skip


# -- Launchers ----------------------------------------------------------------------------


def plan(schedule, block_m, big_m, path, F, fp8=False):
    """The sections (launches) over a schedule of experts F wide (fp8-block weights: fp8):
    its big-tile slots with their fixed configs, if any, then the others."""
    S = schedule.order_S.numel()
    big = big_slots(S, big_m, configs.tall_over(path, block_m))
    fixed = configs.big_config(path, F, fp8) if big else None
    return launch._sections(schedule, block_m, big_m, big, fixed)


def _descriptors(**tensors):
    """TMA descriptors of 2-D tensors by argument name; {} where one of them cannot have
    one (then the launch reads through pointers)."""
    descs = {name: launch.descriptor(t) for name, t in tensors.items()}
    return {} if None in descs.values() else descs


def gate_up_swiglu(x_TD, gate_up_E2FD, schedule, sections, top_k, path, t_bucket,
                   quant=None, h_dtype=None):  # fmt: skip
    """h_SF = silu(gate[e] @ x[t]) * (up[e] @ x[t]) for every sorted row; [S, F], in x's
    dtype or h_dtype. With `quant` (a Quant), gate_up_E2FD holds the stored values and
    x_TD, for fp8-block, x's fp8 values.

    Returns h_SF and the config of the last section's launch.
    """
    E, F2, _ = gate_up_E2FD.shape
    D = x_TD.shape[1]
    F = F2 // 2
    h_SF = x_TD.new_empty(schedule.order_S.numel(), F, dtype=h_dtype or x_TD.dtype)
    descs = {}
    if path == "prefill" and gate_up_E2FD.is_contiguous() and not quant:
        descs = _descriptors(w_desc=gate_up_E2FD.view(E * F2, D))
    tuner = configs.TUNERS["gate_up"][path, bool(descs)]
    config = None
    for section in sections:
        # tuned tiles, and big ones whose fixed config reads through TMA
        d = descs if section.fixed is None or section.fixed[_gate_up_kernel].get("TMA") else {}
        args = gate_up_args(
            x_TD, gate_up_E2FD, h_SF, schedule, d.get("w_desc"), top_k=top_k, t_bucket=t_bucket,
            slot0=section.slot0, count=section.count, quant=quant,
        )  # fmt: skip
        key = (E, D, F, top_k, t_bucket, x_TD.dtype, gate_up_E2FD.dtype)
        meta = quant.meta if quant else {}
        config = launch._tile_launch(tuner, section, F, args, key, d, **meta)
    return h_SF, config


# The `combine` option -> what the down kernel does with each pair's row (K > 1).
_COMBINE_MODES = {"pairs": "store-pairs", "atomic": "atomic"}
COMBINES = tuple(_COMBINE_MODES)


def combine_mode(top_k, combine):
    return "store-direct" if top_k == 1 else _COMBINE_MODES[combine]


def down_combine(h_SF, down_EDF, weights_S, schedule, sections, out_TD, top_k, path, t_bucket,
                 combine, quant=None):  # fmt: skip
    """out[t] = sum_j weights[t*K + j] * down[e] @ h[row of (t, j)]; writes every element of out.

    weights_S None means unweighted (the input gradient through the transposed gate_up).
    With `quant` (a Quant), down_EDF holds the stored values and h_SF, for fp8-block, h's
    fp8 values. Returns the combine mode and the config of the last section's launch.
    """
    E, D, F = down_EDF.shape
    F *= quant.per_element if quant else 1
    T, S = out_TD.shape[0], h_SF.shape[0]
    assert T * top_k == S and h_SF.shape[1] == F and out_TD.shape[1] == D, "shapes disagree"
    combine = combine_mode(top_k, combine)
    if combine == "store-direct":
        y = out_TD
    elif combine == "store-pairs":
        y = out_TD.new_empty(S, D)
    elif out_TD.dtype == torch.float32:
        y = out_TD.zero_()
    else:
        y = out_TD.new_zeros(T, D, dtype=torch.float32)
    descs = {}
    if path == "prefill" and down_EDF.is_contiguous() and not quant:  # dx's gate_up.T is not
        descs = _descriptors(h_desc=h_SF, w_desc=down_EDF.view(E * D, F))
    tuner = configs.TUNERS["down"][path, bool(descs)]
    config = None
    weighted = weights_S is not None
    for section in sections:
        # tuned tiles, and big ones whose fixed config reads through TMA
        d = descs if section.fixed is None or section.fixed[_down_kernel].get("TMA") else {}
        args = down_args(
            h_SF, down_EDF, y, weights_S, schedule, d.get("h_desc"), d.get("w_desc"),
            top_k=top_k, t_bucket=t_bucket, slot0=section.slot0, count=section.count,
            quant=quant,
        )  # fmt: skip
        key = (E, D, F, top_k, t_bucket, h_SF.dtype, y.dtype, weighted and weights_S.dtype,
               down_EDF.dtype)  # fmt: skip
        meta = quant.meta if quant else {}
        config = launch._tile_launch(
            tuner, section, D, args, key, d, WEIGHTED=weighted, ATOMIC=combine == "atomic", **meta
        )
    if combine == "store-pairs":
        pair_sum(y, out_TD, top_k)
    elif y is not out_TD:
        out_TD.copy_(y)
    return combine, config


def quantized_forward(x_TD, gate_up, down, weights_S, schedule, sections, out_TD, top_k,
                      path, t_bucket, combine):  # fmt: skip
    """The forward over QuantizedTensor projections: the kernels read the stored values and
    their scales; fp8-block's activations (x, then h) are quantized first, a scale per row
    per block. Returns the configs of the last launches by kernel."""
    fp8 = gate_up.format.activations
    x_in, x_scale = quantize_rows(x_TD, gate_up.block) if fp8 else (x_TD, None)
    h_SF, gate_up_config = gate_up_swiglu(
        x_in, gate_up.data, schedule, sections, top_k, path, t_bucket,
        quant_for(gate_up, x_scale), h_dtype=x_TD.dtype,
    )  # fmt: skip
    h_in, h_scale = quantize_rows(h_SF, down.block) if fp8 else (h_SF, None)
    _, down_config = down_combine(
        h_in, down.data, weights_S, schedule, sections, out_TD, top_k, path, t_bucket, combine,
        quant_for(down, h_scale),
    )  # fmt: skip
    return {"gate_up": gate_up_config, "down": down_config}


def quantize_rows(a_MK, block):
    """fp8 activations: (values [M, K], scales [M, K / block]) as
    moebench.quant.quantize_activations gives them, in one kernel: torch's six passes over
    h took as long as a third of the layer at prefill (a prediction). Under the interpreter
    torch's, whose fp32 -> fp8 conversion the interpreter gets wrong (-31.2 became -16)."""
    if configs.INTERPRET:
        return quantize_activations(a_MK, block)
    M, K = a_MK.shape
    q_MK = a_MK.new_empty(M, K, dtype=torch.float8_e4m3fn)
    scale_MG = a_MK.new_empty(M, K // block, dtype=torch.float32)
    rows = configs.QUANTIZE_ROWS
    grid = (configs.cdiv(M, rows), K // block)
    meta = {"GROUP": block, "BLOCK_M": rows}
    launch._run(_quantize_rows_kernel, grid, quantize_rows_args(a_MK, q_MK, scale_MG), meta)
    return q_MK, scale_MG


def pair_sum(y_SD, out_TD, top_k):
    """out[t] = the sum of y's rows t*K .. t*K + K-1, accumulated in fp32 in that order.

    A Triton kernel rather than torch.sum over [T, K, D]: the same streaming on the device,
    launched straight once compiled (launch._run) where torch sets up a generic reduction
    on each call.
    """
    T, D = out_TD.shape
    elements = configs.PAIR_SUM_ELEMENTS
    block_d = min(configs.pow2(D), elements)
    block_t = elements // block_d
    grid = (configs.cdiv(T, block_t), configs.cdiv(D, block_d))
    meta = {"K": top_k, "BLOCK_T": block_t, "BLOCK_D": block_d}
    launch._run(_pair_sum_kernel, grid, pair_sum_args(y_SD, out_TD), meta)


def swiglu_backward(dy_TD, x_TD, weights_TK, gate_up_E2FD, down_EDF, schedule, sections, path,
                    t_bucket):  # fmt: skip
    """([dgate, dup] [S, 2F] in sorted rows, x's dtype; dweights [T, K] in the weights' dtype)."""
    E, D, F = down_EDF.shape
    T, K = weights_TK.shape
    S = T * K
    dgu_S2F = x_TD.new_empty(S, 2 * F)
    # One partial row per F block. The tuned BLOCK_N is known only after the launch, so
    # allocate for the narrowest config; with two sections, zeros where the other writes.
    tuner = configs.TUNERS["swiglu_backward"][path]
    widths = [c.kwargs["BLOCK_N"] for c in tuner.configs]
    widths += [big[tuner.fn]["BLOCK_N"] for big in configs.BIG_CONFIGS.values()]
    rows = configs.cdiv(F, min(widths))
    alloc = x_TD.new_zeros if len(sections) > 1 else x_TD.new_empty
    dw_RS = alloc(rows, S, dtype=torch.float32)
    used = 0
    for section in sections:
        args = swiglu_backward_args(
            x_TD, dy_TD, gate_up_E2FD, down_EDF, weights_TK.reshape(-1), dgu_S2F, dw_RS,
            schedule, top_k=K, t_bucket=t_bucket, slot0=section.slot0, count=section.count,
        )  # fmt: skip
        key = (E, D, F, K, t_bucket, x_TD.dtype, weights_TK.dtype)
        config = launch._tile_launch(tuner, section, F, args, key)
        used = max(used, configs.cdiv(F, config["BLOCK_N"]))
    dw_TK = dw_RS[:used].sum(0).view(T, K).to(weights_TK.dtype)
    return dgu_S2F, dw_TK


def expert_grad(a_SN, b_SC, schedule, top_k, num_experts, *, tuner, weights_S=None,
                gather_a=False, gather_b=False):  # fmt: skip
    """out[e] = sum over expert e's rows of (w *) a[row]^T b[row]: [E, N, C], a's dtype.

    A row of a (of b) is a sorted row, or with gather_a (gather_b) the token of that row;
    weights_S, when given, scales a's rows by the pair's routing weight. Every element is
    written, zeros for experts without rows. tuner names the weight ("gate_up", "down").
    """
    N, C, S = a_SN.shape[1], b_SC.shape[1], schedule.order_S.numel()
    out_ENC = a_SN.new_empty(num_experts, N, C)
    cdiv = configs.cdiv
    grid = lambda meta: (num_experts * cdiv(N, meta["BLOCK_N"]) * cdiv(C, meta["BLOCK_C"]),)
    weighted = weights_S is not None
    s_bucket = configs.pow2(S)
    args = expert_grad_args(a_SN, b_SC, out_ENC, schedule, weights_S, top_k=top_k,
                            s_bucket=s_bucket)  # fmt: skip
    key = (num_experts, N, C, s_bucket, a_SN.dtype, b_SC.dtype, weighted and weights_S.dtype)
    launch._launch(
        configs.TUNERS["expert_grad"][tuner], grid, args, key, GATHER_A=gather_a,
        GATHER_B=gather_b, WEIGHTED=weighted,
    )  # fmt: skip
    return out_ENC


# -- Custom ops and autograd --------------------------------------------------------------


# The schedule is built outside the ops (plain torch ops that torch.compile traces) and passed
# in as tensors, so that the backward reuses the forward's.
@torch.library.custom_op("moebench::fused_moe", mutates_args=())
def fused_moe(
    x_TD: torch.Tensor, weights_TK: torch.Tensor, gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor, order_S: torch.Tensor, offsets_E1: torch.Tensor,
    expert_N: torch.Tensor, start_N: torch.Tensor, end_N: torch.Tensor, count_2: torch.Tensor,
    path: str, block_m: int, big_m: int, combine: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y_TD, h_SF): the forward kernels, keeping h for the backward."""
    schedule = TileSchedule(order_S, offsets_E1, expert_N, start_N, end_N, count_2)
    sections = plan(schedule, block_m, big_m, path, down_EDF.shape[2])
    T, K = weights_TK.shape
    t_bucket = configs.pow2(T)
    h_SF, _ = gate_up_swiglu(x_TD, gate_up_E2FD, schedule, sections, K, path, t_bucket)
    y_TD = torch.empty_like(x_TD)
    down_combine(
        h_SF, down_EDF, weights_TK.reshape(-1), schedule, sections, y_TD, K, path, t_bucket,
        combine,
    )  # fmt: skip
    return y_TD, h_SF


@fused_moe.register_fake
def _(x_TD, weights_TK, gate_up_E2FD, down_EDF, *schedule_and_options):
    return torch.empty_like(x_TD), x_TD.new_empty(weights_TK.numel(), down_EDF.shape[2])


@torch.library.custom_op("moebench::fused_moe_backward", mutates_args=())
def fused_moe_backward(
    dy_TD: torch.Tensor, x_TD: torch.Tensor, weights_TK: torch.Tensor,
    gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor, h_SF: torch.Tensor,
    order_S: torch.Tensor, offsets_E1: torch.Tensor, expert_N: torch.Tensor,
    start_N: torch.Tensor, end_N: torch.Tensor, count_2: torch.Tensor, path: str, block_m: int,
    big_m: int, combine: str, need_x: bool, need_weights: bool, need_gate_up: bool,
    need_down: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dx_TD, dweights_TK, dgate_up_E2FD, ddown_EDF); an unneeded one is an empty tensor."""
    schedule = TileSchedule(order_S, offsets_E1, expert_N, start_N, end_N, count_2)
    sections = plan(schedule, block_m, big_m, path, down_EDF.shape[2])
    T, K = weights_TK.shape
    E = gate_up_E2FD.shape[0]
    t_bucket = configs.pow2(T)
    dx_TD, dw_TK, dgate_up, ddown = (t.new_empty(0) for t in (x_TD, weights_TK, x_TD, x_TD))
    if need_x or need_weights or need_gate_up:
        dgu_S2F, dw_TK = swiglu_backward(
            dy_TD, x_TD, weights_TK, gate_up_E2FD, down_EDF, schedule, sections, path, t_bucket
        )
    if need_x:
        # [dgate, dup] @ gate_up[e] is the forward's down kernel with gate_up read as [E, D, 2F].
        dx_TD = torch.empty_like(x_TD)
        down_combine(
            dgu_S2F, gate_up_E2FD.transpose(1, 2), None, schedule, sections, dx_TD, K, path,
            t_bucket, combine,
        )  # fmt: skip
    if need_gate_up:  # [dgate; dup]^T @ x rows
        dgate_up = expert_grad(dgu_S2F, x_TD, schedule, K, E, tuner="gate_up", gather_b=True)
    if need_down:  # (w * dy rows)^T @ h
        ddown = expert_grad(
            dy_TD, h_SF, schedule, K, E, tuner="down", weights_S=weights_TK.reshape(-1),
            gather_a=True,
        )  # fmt: skip
    return dx_TD, dw_TK, dgate_up, ddown


@fused_moe_backward.register_fake
def _(dy_TD, x_TD, weights_TK, gate_up_E2FD, down_EDF, h_SF, *schedule_and_options):
    like = (x_TD, weights_TK, gate_up_E2FD, down_EDF)
    need = schedule_and_options[-4:]
    return tuple(
        torch.empty_like(t) if n else t.new_empty(0) for t, n in zip(like, need, strict=True)
    )


def _setup_context(ctx, inputs, output):
    x_TD, weights_TK, gate_up_E2FD, down_EDF, *schedule, path, block_m, big_m, combine = inputs
    h_SF = output[1]
    ctx.save_for_backward(x_TD, weights_TK, gate_up_E2FD, down_EDF, h_SF, *schedule)
    ctx.options = (path, block_m, big_m, combine)
    ctx.mark_non_differentiable(h_SF)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy_TD, _dh_SF):
    need = ctx.needs_input_grad[:4]
    grads = fused_moe_backward(dy_TD, *ctx.saved_tensors, *ctx.options, *need)
    return *(g if n else None for g, n in zip(grads, need, strict=True)), *([None] * 10)


fused_moe.register_autograd(_backward, setup_context=_setup_context)
