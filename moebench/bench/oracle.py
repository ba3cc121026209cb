"""The float64 oracle's verdict: how far a layer's output may lie from float64.

Largest accepted rel_err = ||y - ref|| / ||ref|| against the float64 reference. The
reference is fed the same rounded inputs, so only the layer's own rounding counts: dot
products of length D and F accumulated in fp32 (~u32 * sqrt(D) ~ 1e-6 for D <= 7168), plus
the hidden activation and output rounded to the storage dtype (a few units of its
roundoff u). float32 1e-4 is 100x that and still catches TF32 sneaking into a matmul
(u = 5e-4); float16 (u = 4.9e-4) and bfloat16 (u = 3.9e-3) allow about 10 u and 5 u.
One table for the gate, the sweep's checks and the tests; and the float64 checks themselves.

Quantized weights are checked against the oracle of their own semantics (moebench/quant.py)
at the dtype's tolerance, but fp8-block's: its activations are quantized to fp8 (a step of
1/16 of a value), and where h lies near a rounding boundary, h's last-bit difference from
the float64 h moves its fp8 value a whole step. Seen on the CPU: up to 6e-4 in fp32 (T=100,
D=256, F=128, one or two such steps), 5.5e-3 in fp16 and 1.1e-2 in bf16 (T=37, D=64, F=32);
quantizing the activations at all moves the layer ~3e-2, so fp32 and fp16 would still see
them left out.
"""

from __future__ import annotations

import torch

from ..layer import moe_forward, reference
from ..quant import QuantizedWeights
from ..routing import Routing
from ..weights import ExpertWeights
from .inputs import SEED

TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
QUANT_TOLERANCE = {"fp8-block": {"float32": 2e-3, "float16": 2e-2, "bfloat16": 4e-2}}
_DTYPE_NAMES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def tolerance(dtype: str | torch.dtype, quant: str | None = None) -> float:
    """The dtype's tolerance, by torch dtype or name ("bf16", "torch.bfloat16", ...), with
    weights in the quantized format `quant` where given."""
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_NAMES.get(name, name)
    if name not in TOLERANCE:
        raise ValueError(f"no correctness tolerance for dtype {dtype!r}; known: {list(TOLERANCE)}")
    return QUANT_TOLERANCE.get(quant, {}).get(name, TOLERANCE[name])


class WrongOutput(RuntimeError):
    """The layer returned what no correct layer returns: the point failed."""


def check_tokens(routing, weights, budget_bytes):
    """(n, experts): the first n <= 256 tokens whose experts' float64 weights fit in
    `budget_bytes`, and those experts' ids (sorted); None if not even one token's do."""
    D, F, Fs = weights.d_model, weights.d_ff, weights.d_ff_shared
    n = min(routing.num_tokens, 256)
    while True:
        experts = routing.ids[:n].unique()
        if (experts.numel() * 3 * D * F + 3 * D * Fs) * 8 <= budget_bytes:
            return n, experts
        if n == 1:
            return None
        n //= 2


def oracle_inputs(x_nD, routing, weights, experts, stats):
    """The float64 oracle's leaves for the first n tokens: x, their routing over the
    experts they use (renumbered in `experts` order, pairs the padded layer dropped
    weighted by zero) and those experts' weights (and the shared expert's)."""
    n = x_nD.shape[0]
    leaf = lambda t: None if t is None else t.detach().double().requires_grad_()
    weights_nK = routing.weights[:n]
    if "dropped_mask" in stats:
        weights_nK = weights_nK.masked_fill(stats["dropped_mask"][:n], 0)
    local = Routing(torch.searchsorted(experts, routing.ids[:n]), leaf(weights_nK))
    if isinstance(weights, QuantizedWeights):  # inference only: no leaves to differentiate
        return x_nD, local, weights.select(experts)
    subset = ExpertWeights(
        gate_up=leaf(weights.gate_up[experts]),
        down=leaf(weights.down[experts]),
        shared_gate_up=leaf(weights.shared_gate_up),
        shared_down=leaf(weights.shared_down),
    )
    return leaf(x_nD), local, subset


def rel(got, want) -> float:
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def rel_err(y_TD, x_TD, routing, weights, stats, budget_bytes) -> float | None:
    """||y - ref|| / ||ref|| against the float64 oracle on the first tokens whose experts'
    float64 weights fit in `budget_bytes` (None if not even one token's do). Pairs the
    padded layer dropped are dropped from the reference too: its drops are reported as
    dropped_fraction, this is its arithmetic."""
    if (chosen := check_tokens(routing, weights, budget_bytes)) is None:
        return None
    n, experts = chosen
    with torch.no_grad():
        ref_nD = reference(*oracle_inputs(x_TD[:n], routing, weights, experts, stats))
    return rel(y_TD[:n], ref_nD)


def quant_err(x_TD, routing, weights, floats, stats, budget_bytes) -> float | None:
    """The quantization error itself: ||quantized oracle - unquantized oracle|| / ||the
    unquantized oracle||, on the tokens rel_err checks (None where it checks none), for
    QuantizedWeights `weights` made from the ExpertWeights `floats`."""
    if (chosen := check_tokens(routing, weights, budget_bytes)) is None:
        return None
    n, experts = chosen
    with torch.no_grad():
        x_nD, local, quantized = oracle_inputs(x_TD[:n], routing, weights, experts, stats)
        unquantized = oracle_inputs(x_TD[:n], routing, floats, experts, stats)[2]
        return rel(reference(x_nD, local, quantized), reference(x_nD, local, unquantized))


def train_rel_err(forward, impl, x_TD, routing, weights, budget_bytes) -> float | None:
    """The training step's error: the layer's forward and backward on the first tokens that
    check_tokens picks (the layer sees those tokens alone) against float64 autograd through
    the oracle; the worst ||got - want|| / ||want|| over the output and the gradients of x,
    the routing weights (pairs the padded layer kept), the experts used and the shared
    expert. Raises WrongOutput where any of them holds NaN or inf."""
    if (chosen := check_tokens(routing, weights, budget_bytes)) is None:
        return None
    n, experts = chosen
    leaf = lambda t: t.detach().requires_grad_()
    x_nD = leaf(x_TD[:n])
    test = Routing(routing.ids[:n], leaf(routing.weights[:n]))
    tensors = {name: leaf(t) for name, t in weights.tensors().items()}
    gen = torch.Generator(device=x_TD.device).manual_seed(SEED + 2)
    dy_nD = torch.randn(x_nD.shape, generator=gen, device=x_TD.device, dtype=x_TD.dtype)
    stats = {}
    y_nD = forward(x_nD, test, ExpertWeights(**tensors), impl=impl, stats=stats)
    y_nD.backward(dy_nD)
    x64, local, subset = oracle_inputs(x_nD, test, weights, experts, stats)
    y64 = moe_forward(x64, local, subset, impl="naive")
    y64.backward(dy_nD.double())
    kept = ~stats["dropped_mask"] if "dropped_mask" in stats else slice(None)
    pairs = {
        "output": (y_nD.detach(), y64.detach()),
        "dx": (x_nD.grad, x64.grad),
        "routing weights' gradient": (test.weights.grad[kept], local.weights.grad[kept]),
    }
    for name, t in subset.tensors().items():
        got = tensors[name].grad
        pairs[f"{name}'s gradient"] = (got[experts] if name in ("gate_up", "down") else got, t.grad)
    for name, (got, _) in pairs.items():
        if not torch.isfinite(got).all():
            raise WrongOutput(f"the {name} holds NaN or inf")
    return max(rel(got, want) for got, want in pairs.values())
