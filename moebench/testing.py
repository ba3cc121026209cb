"""The conformance kit: the cases moebench's own tests trust, for any implementation.

    from moebench.testing import check_impl
    def test_my_kernel():
        check_impl(my_forward, dtypes=(torch.float16, torch.float32))   # AssertionError names
                                                                        # each failing case
    moebench check-impl my_pkg.moe:forward      # exit 0 conforms, 1 does not, 2 bad input

Each case runs through moe_forward (the input checks included) into an output buffer filled
with NaN, and compares the layer with the float64 oracle (`moebench.reference`) at the
dtype's tolerance (moebench.bench.oracle). The cases: awkward shapes (T, D, F multiples of
no block size), T = 1 and T = 0, K = 1 and K = E, most experts empty, every skew including
`hot` and `collapse` (where a per-expert capacity drops rows), ids as int32 and int64,
non-contiguous inputs, each declared dtype, the gradients of x, the routing weights and
both projections against float64 autograd when the impl declares itself differentiable,
and each quantized weight format it declares (moebench/quant.py, blocks of 128) against the
oracle of that format.

T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from . import registry
from .bench.grid import SKEWS
from .bench.oracle import tolerance
from .config import MoEConfig
from .layer import moe_forward, reference
from .routing import Routing, make_routing
from .weights import ExpertWeights

SHAPES = {
    # name: (T, D, F, E, K)
    "awkward": (37, 44, 20, 6, 3),
    "T1": (1, 36, 12, 8, 2),
    "T0": (0, 36, 12, 8, 2),
    "K1": (50, 36, 12, 16, 1),
    "KeqE": (19, 36, 12, 4, 4),
    "empty-experts": (13, 36, 12, 64, 2),
    # quantized weights: D and F whole blocks of 128
    "quant": (37, 256, 128, 6, 3),
}
# Each case runs one skew; each shape runs every skew (a drop under skew shows in hot and
# collapse, a tail bug in every one).
SEED = 20260101


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    skew: str
    dtype: torch.dtype
    ids: torch.dtype = torch.int64
    contiguous: bool = True
    grad: bool = False
    quant: str | None = None  # the weights' format

    def __str__(self):
        T, D, F, E, K = SHAPES[self.shape]
        what = [f"{self.shape} (T={T} D={D} F={F} E={E} K={K})", self.skew,
                str(self.dtype).removeprefix("torch.")]  # fmt: skip
        if self.ids != torch.int64:
            what.append(f"{str(self.ids).removeprefix('torch.')} ids")
        if not self.contiguous:
            what.append("non-contiguous")
        if self.grad:
            what.append("gradients")
        if self.quant:
            what.append(f"{self.quant} weights")
        return ", ".join(what)


@dataclasses.dataclass
class Result:
    case: Case
    error: str | None  # None: passed

    def __str__(self):
        return f"{'ok  ' if self.error is None else 'FAIL'} {self.case}" + (
            f": {self.error}" if self.error else ""
        )


@dataclasses.dataclass
class Report:
    impl: str
    results: list[Result]
    skipped: list[str]  # dtypes or cases not run here, with why

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if r.error is not None]

    def __str__(self):
        lines = [str(r) for r in self.failed]
        lines += [f"skip {why}" for why in self.skipped]
        ran, bad = len(self.results), len(self.failed)
        verdict = "does not conform" if bad else "conforms"
        lines.append(f"{self.impl}: {verdict}: {ran - bad} of {ran} cases passed")
        return "\n".join(lines)


def cases(dtypes, differentiable: bool, quant=()) -> list[Case]:
    """The kit's cases for an impl taking `dtypes` (and the weight formats `quant`): every
    shape and skew in the main dtype (float32 where declared: the tightest tolerance short
    of float64), then the others."""
    main = torch.float32 if torch.float32 in dtypes else dtypes[0]
    out = [Case(shape, skew, main) for shape in SHAPES if shape != "quant" for skew in SKEWS]
    out += [Case("awkward", "zipf:1.2", d) for d in dtypes if d != main]
    out += [Case("awkward", skew, main, ids=torch.int32) for skew in ("random", "hot:0.5")]
    out += [Case("awkward", "random", main, contiguous=False)]
    if differentiable:
        out += [Case(s, skew, main, grad=True) for s in ("awkward", "empty-experts")
                for skew in ("random", "collapse")]  # fmt: skip
    out += [Case("quant", skew, main, quant=q) for q in quant for skew in ("random", "collapse")]
    return out


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view with a stride of 2 in its last dimension."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]


def _inputs(case: Case, device):
    T, D, F, E, K = SHAPES[case.shape]
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    seed = SEED + list(SHAPES).index(case.shape)
    w = ExpertWeights.random(cfg, dtype=case.dtype, device=device, seed=seed)
    if T:
        r = make_routing(T, cfg, skew=case.skew, seed=seed, device=device)
    else:  # no routing to draw: an empty one
        r = Routing(
            torch.empty(0, K, dtype=torch.long, device=device), torch.empty(0, K, device=device)
        )
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, D, generator=gen, device=device).to(case.dtype)
    r = Routing(r.ids.to(case.ids), r.weights)
    if not case.contiguous:
        x, r = _strided(x), Routing(_strided(r.ids), _strided(r.weights))
        w = ExpertWeights(_strided(w.gate_up), _strided(w.down))
    return x, r, w.quantize(case.quant) if case.quant else w


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _forward(impl, case: Case, device, options) -> str | None:
    x, r, w = _inputs(case, device)
    out = torch.full_like(x, math.nan)
    y = moe_forward(x, r, w, impl=impl, out=out, **options)
    if y is not out:
        return "moe_forward did not return the out buffer"
    if y.shape != x.shape:
        return f"returned shape {tuple(y.shape)}, expected {tuple(x.shape)}"
    if x.shape[0] == 0:
        return None
    bad = (~torch.isfinite(y)).any(dim=1).sum().item()
    if bad:
        return f"{bad} of {x.shape[0]} output rows hold NaN or inf (not written?)"
    err, tol = _rel_err(y, reference(x, r, w)), tolerance(case.dtype, case.quant)
    return None if err < tol else f"rel_err {err:.2e} against float64 > tolerance {tol:.0e}"


def _backward(impl, x, r, w, dy, dtype, options) -> dict:
    """The gradients of every differentiable input, with the layer run in `dtype`."""
    leaf = lambda t: t.detach().to(dtype).requires_grad_()
    xs, ws, rs = (
        leaf(x),
        ExpertWeights(leaf(w.gate_up), leaf(w.down)),
        Routing(r.ids, leaf(r.weights)),
    )
    moe_forward(xs, rs, ws, impl=impl, **options).backward(dy.to(dtype))
    return {"x": xs.grad, "weights": rs.weights.grad, "gate_up": ws.gate_up.grad,
            "down": ws.down.grad}  # fmt: skip


def _grads(impl, case: Case, device, options) -> str | None:
    x, r, w = _inputs(case, device)
    gen = torch.Generator(device=device).manual_seed(SEED)
    dy = torch.randn(x.shape, generator=gen, device=device)
    got = _backward(impl, x, r, w, dy, case.dtype, options)
    want = _backward("naive", x, r, w, dy, torch.float64, {})
    tol, errors = tolerance(case.dtype), []
    for name, ref in want.items():
        if got[name] is None:
            errors.append(f"no gradient for {name}")
        elif (err := _rel_err(got[name], ref)) >= tol:
            errors.append(f"{name} gradient rel_err {err:.2e} > {tol:.0e}")
    return "; ".join(errors) or None


def check_impl(impl: str | Callable, *, dtypes=None, device=None, differentiable=None,
               options=None, raise_on_failure: bool = True) -> Report:  # fmt: skip
    """Run the kit on `impl`: a registered name, "module:function", or a forward function
    (`moebench.registry` describes the signature). dtypes, differentiable: what to check
    (default: what the impl declares); device: default cuda where available, else cpu;
    options: the impl's keyword options for every call (padded: capacity_factor=None).
    Raises AssertionError naming every failing case unless raise_on_failure is False."""
    spec = _spec(impl)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = tuple(dtypes or spec.dtypes)
    if differentiable is None:
        differentiable = spec.differentiable
    why = spec.missing()
    if why:
        raise registry.Unavailable(why)
    runnable, skipped = [], []
    for d in dtypes:
        refusal = spec.refusal(device, d) or _interpreter_refusal(spec, device, d)
        (skipped.append(refusal) if refusal else runnable.append(d))
    if not runnable:
        raise ValueError(f"nothing to check on {device}: " + "; ".join(skipped))
    results = []
    for case in cases(runnable, differentiable, spec.quant):
        try:
            error = (_grads if case.grad else _forward)(spec, case, device, options or {})
        except registry.Unavailable:
            raise  # it cannot run here: no verdict
        except Exception as e:  # every case runs; the report names what each raised
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
        results.append(Result(case, error))
    report = Report(spec.name, results, skipped)
    if raise_on_failure and report.failed:
        raise AssertionError(str(report))
    return report


def _spec(impl) -> registry.Impl:
    if isinstance(impl, registry.Impl):
        return impl
    if isinstance(impl, str):
        return registry.get(impl)
    if callable(impl):
        name = getattr(impl, "__qualname__", type(impl).__name__)
        return registry.describe(f"{getattr(impl, '__module__', '?')}:{name}", impl)
    raise TypeError(f"check_impl takes an impl name, module:function or a function, got {impl!r}")


def _interpreter_refusal(spec, device, dtype) -> str | None:
    # The Triton interpreter misreads bf16 loads (results/gpu-h200/NOTES.md): no verdict.
    if spec.triton and torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        return f"{spec.name}: bfloat16 under TRITON_INTERPRET=1 (wrong loads): check on a GPU"
    return None
