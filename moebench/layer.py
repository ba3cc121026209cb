"""`moe_forward`: input checks, dispatch to one implementation, shared experts.

T tokens, D model width, F expert hidden width, Fs shared hidden width, E experts,
K experts per token.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from . import registry
from .quant import QuantizedWeights
from .routing import Routing
from .weights import ExpertWeights


def impl_options(impl: str) -> dict:
    """The keyword options an implementation takes, with their defaults."""
    return dict(registry.get(impl).keywords)


def check_inputs(x_TD, routing, weights, out_TD=None) -> None:
    """Raise a ValueError naming the problem before any kernel runs."""
    if not isinstance(x_TD, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x_TD).__name__}")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moebench.Routing, got {type(routing).__name__}")
    if not isinstance(weights, (ExpertWeights, QuantizedWeights)):
        raise TypeError(
            f"weights must be moebench.ExpertWeights or QuantizedWeights, got "
            f"{type(weights).__name__}"
        )
    E, D = weights.num_experts, weights.d_model
    if x_TD.dim() != 2 or x_TD.shape[1] != D:
        raise ValueError(f"x must be [T, D={D}], got shape {tuple(x_TD.shape)}")
    if routing.ids.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"routing has {routing.ids.shape[0]} tokens, x has {x_TD.shape[0]}: "
            f"ids must be [T={x_TD.shape[0]}, K], got {tuple(routing.ids.shape)}"
        )
    if routing.top_k > E:
        raise ValueError(f"routing picks K={routing.top_k} experts per token, there are E={E}")
    if x_TD.dtype != weights.dtype:
        raise ValueError(f"x is {x_TD.dtype}, weights are {weights.dtype}: they must match")
    for name, t in (("routing", routing.ids), ("weights", weights)):
        if t.device != x_TD.device:
            raise ValueError(f"x is on {x_TD.device}, {name} on {t.device}: move them together")
    if out_TD is not None:
        _check_out(out_TD, x_TD)
    if routing.ids.numel():
        # One host sync for the value checks.
        w = routing.weights
        lo, hi, nan, inf = torch.stack(
            [routing.ids.min(), routing.ids.max(), w.isnan().sum(), w.isinf().sum()]
        ).tolist()
        if lo < 0 or hi >= E:
            raise ValueError(f"expert ids must be in [0, {E}), got ids in [{lo}, {hi}]")
        if nan or inf:
            raise ValueError(
                f"routing weights must be finite: {nan} NaN and {inf} inf of {w.numel()}"
            )


def _check_out(out_TD, x_TD) -> None:
    if not isinstance(out_TD, torch.Tensor):
        raise TypeError(f"out must be a tensor, got {type(out_TD).__name__}")
    if out_TD.shape != x_TD.shape or out_TD.dtype != x_TD.dtype or out_TD.device != x_TD.device:
        raise ValueError(
            f"out must be {x_TD.dtype} {tuple(x_TD.shape)} on {x_TD.device}, got "
            f"{out_TD.dtype} {tuple(out_TD.shape)} on {out_TD.device}"
        )
    storage = out_TD.untyped_storage().data_ptr()
    if x_TD.numel() and storage == x_TD.untyped_storage().data_ptr():
        # The implementations and the shared expert read x after writing into out.
        raise ValueError("out shares memory with x: give the output its own tensor")


def moe_forward(
    x_TD: torch.Tensor,
    routing: Routing,
    weights: ExpertWeights,
    impl: str = "sorted",
    *,
    out: torch.Tensor | None = None,
    stats: dict | None = None,
    check: bool = True,
    **options,
) -> torch.Tensor:
    """The MoE layer: y[t] = sum_j w[t,j] * expert_{ids[t,j]}(x[t]) + shared(x[t]).

    x_TD [T, D] and the weights share dtype and device; returns [T, D] in x's dtype, written
    into `out` when given. `weights` may be QuantizedWeights (`ExpertWeights.quantize`):
    the implementation then gets each projection as a moebench.quant.QuantizedTensor.
    `stats`, a dict, receives what the implementation reports (the
    padded layer's capacity, dropped count and dropped_mask [T, K]). `check=False` skips the
    input checks (and their host sync) for callers that already ran `check_inputs`.
    `options` are the implementation's own (see `impl_options`), e.g. capacity_factor.
    """
    spec = registry.get(impl)
    if spec.requires and spec.missing():
        raise registry.Unavailable(spec.missing())
    impl, allowed = spec.name, spec.keywords
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict to fill in, got {type(stats).__name__}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"impl {impl!r} has no option {unknown}; its options: {allowed}")
    if check:
        check_inputs(x_TD, routing, weights, out)
    refusal = spec.refusal(x_TD.device, x_TD.dtype, getattr(weights, "fmt", None))
    if refusal:
        raise ValueError(refusal)
    if out is None:
        out = torch.empty_like(x_TD)
    if x_TD.shape[0] == 0:
        return out
    spec(
        x_TD,
        routing.ids,
        routing.weights,
        weights.gate_up,
        weights.down,
        out,
        stats,
        **options,
    )
    if weights.shared_gate_up is not None:
        gate, up = (x_TD @ weights.shared_gate_up.T).chunk(2, dim=-1)
        out += (F.silu(gate) * up) @ weights.shared_down.T
    return out


def reference(
    x_TD: torch.Tensor, routing: Routing, weights: ExpertWeights | QuantizedWeights
) -> torch.Tensor:
    """The float64 oracle: the naive loop on upcast inputs, returned in float64. For
    QuantizedWeights, the quantized layer's own semantics: value * scale exactly, and for
    fp8-block the activations quantized as the layer quantizes them (moebench/quant.py)."""
    return moe_forward(x_TD.double(), routing, weights.to(dtype=torch.float64), impl="naive")


class _Impls(Mapping):
    """Every registered implementation's name -> moe_forward bound to it; a live view of
    moebench.registry, so names registered later (and entry points) join it."""

    def __getitem__(self, name):
        if name not in registry.names():
            raise KeyError(name)
        return functools.partial(moe_forward, impl=name)

    def __iter__(self):
        return iter(registry.names())

    def __len__(self):
        return len(registry.names())

    def __repr__(self):
        return f"IMPLS({', '.join(self)})"


IMPLS = _Impls()
