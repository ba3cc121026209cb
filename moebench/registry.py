"""The implementation registry: moebench's own layers, the peers it measures them against,
and outside kernels, all under one name space.

An implementation computes the routed experts of the layer:

    forward(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF, **options) -> y_TD

with y[t] = sum_j weights[t,j] * expert_{ids[t,j]}(x[t]); moe_forward checks the inputs
first and adds the shared expert after. ids_TK are int32 or int64 in [0, E); gate_up_E2FD
[E, 2F, D] holds each expert's gate rows then up rows, down_EDF [E, D, F]; expert e is
down[e] @ (silu(gate[e] @ x) * (up[e] @ x)). moebench's own layers (`naive`, `padded`,
`sorted`, `triton`) take two more arguments, out_TD and stats, and write into out_TD.

Three ways in: `register_impl` from Python; the entry-point group `moebench.impls` (name =
impl name, value = `module:function`), read on the registry's first use; and a
`module:function` given where an impl name is expected (`resolve`). Targets are imported on
first call, so naming an impl never imports triton or another package it needs.

T tokens, D model width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import types
from collections.abc import Callable, Mapping

import torch

from .quant import QUANTS

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEVICES = ("cpu", "cuda")
ENTRY_POINTS = "moebench.impls"
_ARGS = ("x_TD", "ids_TK", "weights_TK", "gate_up_E2FD", "down_EDF")
_OWN_ARGS = ("out_TD", "stats")  # what moebench's own layers take besides


class Unavailable(NotImplementedError):
    """An implementation cannot run here: a package, device or kernel it needs is missing.
    The sweep records it as a skip with this message; it is never a failure of the impl."""


@dataclasses.dataclass(frozen=True)
class Impl:
    """One registered implementation and what it declares about itself."""

    name: str
    target: str | Callable  # the forward, or "module:function" imported on first call
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    devices: tuple[str, ...] = DEVICES
    differentiable: bool = False
    options: Mapping | None = None  # keyword -> default; None: read from the signature
    origin: str = "python"  # "moebench", "peer", "entry point", "python", "module:function"
    requires: tuple[str, ...] = ()  # importable packages it needs, checked before a call
    # Runs Triton kernels: on the CPU that is the interpreter (TRITON_INTERPRET=1), right
    # but orders of magnitude slower, so its times say nothing and the sweep skips them.
    triton: bool = False
    own: bool = False  # moebench's own signature: writes into out_TD, fills stats
    # The quantized weight formats it takes (moebench.quant.QUANTS), each projection then
    # a moebench.quant.QuantizedTensor.
    quant: tuple[str, ...] = ()

    @functools.cached_property
    def forward(self) -> Callable:
        if callable(self.target):
            return self.target
        return load(self.target)

    @functools.cached_property
    def keywords(self) -> dict:
        """The keyword options it takes, with their defaults."""
        if self.options is not None:
            return dict(self.options)
        skip = {*_ARGS, *_OWN_ARGS}
        params = inspect.signature(self.forward).parameters.values()
        return {p.name: p.default for p in params if p.name not in skip and p.kind != p.VAR_KEYWORD}

    def missing(self) -> str | None:
        """Why it cannot run on this machine at all (a package missing), else None."""
        absent = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if absent:
            return f"{self.name} needs {', '.join(absent)} (not installed)"
        return None

    def refusal(self, device: torch.device | str, dtype: torch.dtype,
                quant: str | None = None) -> str | None:  # fmt: skip
        """Why it cannot run on this device and dtype (with weights in this quantized
        format), else None."""
        kind = torch.device(device).type
        if kind not in self.runs_on():
            where = " or ".join(self.runs_on()) or "no device here"
            hint = " (or the CPU under TRITON_INTERPRET=1)" if self.triton else ""
            return f"impl {self.name!r} runs on {where}{hint}, not {kind}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"impl {self.name!r} does not support {dtype}; it takes {names}"
        if quant is not None and quant not in self.quant:
            takes = f"it takes {', '.join(self.quant)}" if self.quant else "it takes none"
            return f"impl {self.name!r} does not take {quant} quantized weights; {takes}"
        return None

    def runs_on(self) -> tuple[str, ...]:
        if self.triton and os.environ.get("TRITON_INTERPRET") == "1":
            return tuple(dict.fromkeys((*self.devices, "cpu")))
        return self.devices

    def timeable(self, device: torch.device | str) -> str | None:
        """Why a time of it on this device would mean nothing, else None."""
        if self.triton and torch.device(device).type != "cuda":
            return f"{self.name} needs a CUDA device (the CPU only interprets Triton)"
        return None

    def __call__(self, x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF, out_TD, stats,
                 **options):  # fmt: skip
        if self.own:
            return self.forward(x_TD, ids_TK.long(), weights_TK, gate_up_E2FD, down_EDF,
                                out_TD, stats, **options)  # fmt: skip
        y_TD = self.forward(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF, **options)
        if not isinstance(y_TD, torch.Tensor) or y_TD.shape != x_TD.shape:
            got = tuple(y_TD.shape) if isinstance(y_TD, torch.Tensor) else type(y_TD).__name__
            raise ValueError(f"impl {self.name!r} returned {got}, expected [T, D] = "
                             f"{tuple(x_TD.shape)}")  # fmt: skip
        if y_TD.dtype != x_TD.dtype:
            raise ValueError(f"impl {self.name!r} returned {y_TD.dtype} for {x_TD.dtype} input")
        return out_TD.copy_(y_TD)


def load(target: str) -> Callable:
    """The function named by "module:function" (dots after the colon reach attributes)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected module:function, got {target!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} for {target!r}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no {attr!r} (from {target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target!r} is a {type(obj).__name__}, not a function")
    return obj


def _own(name, dtypes=FLOATS, **kw) -> Impl:
    return Impl(name, f"moebench.impls.{name}:forward", dtypes=dtypes, origin="moebench",
                own=True, differentiable=True, quant=QUANTS, **kw)  # fmt: skip


OWN = ("naive", "padded", "sorted", "triton")
_REGISTRY: dict[str, Impl] = {
    "naive": _own("naive"),
    "padded": _own("padded"),
    "sorted": _own("sorted"),
    # tl.dot has no float64; fp32 runs exact (no TF32), fp16/bf16 accumulate in fp32.
    "triton": _own("triton", FLOATS[:3], devices=("cuda",), triton=True),
}


def _peer(name, target, requires, **kw) -> Impl:
    return Impl(name, f"moebench.peers.{target}", origin="peer", requires=requires, **kw)


# What a user would otherwise run, each a module of moebench/peers measured like our own.
PEERS = (
    # transformers' experts backends (transformers.integrations.moe)
    _peer("hf-eager", "hf:eager", ("transformers",), dtypes=FLOATS, differentiable=True),
    _peer("hf-batched_mm", "hf:batched_mm", ("transformers",), dtypes=FLOATS, differentiable=True),
    _peer("hf-grouped_mm", "hf:grouped_mm", ("transformers",), differentiable=True),
    # bf16 only: deepgemm refuses the rest, sonic-moe is built and tested for bf16.
    _peer(
        "hf-sonicmoe", "hf:sonicmoe", ("transformers",), dtypes=(torch.bfloat16,), devices=("cuda",)
    ),
    _peer(
        "hf-deepgemm", "hf:deepgemm", ("transformers",), dtypes=(torch.bfloat16,), devices=("cuda",)
    ),
    # Liger-Kernel's fused MoE (Triton). Both it and vLLM take fp32 too, but their tl.dot
    # rounds fp32 operands to TF32 on NVIDIA GPUs (Triton's default), a 5e-4 roundoff that
    # the oracle's fp32 tolerance rightly rejects: they are declared in fp16 and bf16.
    _peer(
        "liger",
        "liger:forward",
        ("liger_kernel",),
        dtypes=FLOATS[:2],
        devices=("cuda",),
        triton=True,
        differentiable=True,
    ),
    # vLLM's fused_experts (Triton GEMMs between CUDA ops: no interpreter; inference only)
    _peer("vllm", "vllm:forward", ("vllm",), dtypes=FLOATS[:2], devices=("cuda",)),
)
_REGISTRY.update((p.name, p) for p in PEERS)
PEER_NAMES = tuple(p.name for p in PEERS)


def kind(name: str) -> str:
    """ "own" (moebench's layers), "peer" or "outside" (a plug-in), by the name alone: a run
    file may name a plug-in not installed where it is read, and a lookup could import it."""
    if name in OWN:
        return "own"
    return "peer" if name in PEER_NAMES else "outside"


_discovered = False


def _discover() -> None:
    """Register the entry points of the `moebench.impls` group, once; a broken one is named
    on stderr in one line and skipped."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
        try:
            if ep.name in _REGISTRY:
                raise ValueError(f"the name {ep.name!r} is taken")
            register_impl(ep.name, ep.load(), origin="entry point")
        except Exception as e:  # a broken plug-in must not break the other impls
            what = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"moebench: skipped impl plug-in {ep.name} = {ep.value}: {what}",
                  file=sys.stderr)  # fmt: skip


def declare(*, dtypes=None, devices=None, differentiable=None, options=None, quant=None):
    """Decorate an implementation's forward with what it supports, for the entry point or
    `module:function` routes, where no register_impl call carries it."""
    given = {"dtypes": dtypes, "devices": devices, "differentiable": differentiable,
             "options": options, "quant": quant}  # fmt: skip

    def mark(fn):
        fn.__moebench__ = {k: v for k, v in given.items() if v is not None}
        return fn

    return mark


def register_impl(name: str, forward: Callable, *, dtypes=None, devices=None,
                  differentiable=None, options=None, quant=None, origin: str = "python",
                  replace: bool = False) -> Impl:  # fmt: skip
    """Register `forward` (see this module's docstring) as implementation `name`.

    dtypes: the float dtypes it takes (default fp16, bf16, fp32); devices: device types
    ("cpu", "cuda"; default both); differentiable: whether autograd flows through it;
    options: its keyword options with defaults (default: read from its signature);
    quant: the quantized weight formats it takes (moebench.quant.QUANTS; default none),
    each projection then given as a moebench.quant.QuantizedTensor.
    Unset keywords come from a `declare` decoration. replace: allow a new forward under
    a name registered before (moebench's own names and its peers' are never replaced).
    """
    impl = describe(name, forward, dtypes=dtypes, devices=devices, quant=quant,
                    differentiable=differentiable, options=options, origin=origin)  # fmt: skip
    taken = _REGISTRY.get(name)
    if taken is not None and (not replace or taken.origin in ("moebench", "peer")):
        raise ValueError(f"impl {name!r} is already registered ({taken.origin})")
    _REGISTRY[name] = impl
    return impl


def describe(name: str, forward: Callable, *, dtypes=None, devices=None,
             differentiable=None, options=None, quant=None,
             origin: str = "python") -> Impl:  # fmt: skip
    """`forward` as an Impl named `name`, checked as register_impl checks it, unregistered."""
    if not isinstance(name, str) or not name or any(c.isspace() or c == "," for c in name):
        raise ValueError(f"an impl name is a word without spaces or commas: {name!r}")
    if not callable(forward):
        raise TypeError(f"forward of impl {name!r} must be callable, got {type(forward).__name__}")
    declared = getattr(forward, "__moebench__", {})
    dtypes = tuple(dtypes or declared.get("dtypes") or Impl.dtypes)
    devices = tuple(devices or declared.get("devices") or DEVICES)
    bad = [d for d in dtypes if not (isinstance(d, torch.dtype) and d.is_floating_point)]
    if bad:
        raise ValueError(f"impl {name!r}: dtypes must be torch float dtypes, got {bad}")
    bad = [d for d in devices if d not in DEVICES]
    if bad:
        raise ValueError(f"impl {name!r}: unknown devices {bad}; known: {', '.join(DEVICES)}")
    quant = tuple(quant or declared.get("quant") or ())
    bad = [q for q in quant if q not in QUANTS]
    if bad:
        raise ValueError(f"impl {name!r}: unknown quant formats {bad}; known: {', '.join(QUANTS)}")
    params = inspect.signature(forward).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(_ARGS) and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise TypeError(
            f"forward of impl {name!r} takes {len(positional)} positional arguments; it must "
            f"take ({', '.join(_ARGS)}, **options)"
        )
    if differentiable is None:
        differentiable = declared.get("differentiable", False)
    if options is None:
        options = declared.get("options")
    return Impl(
        name,
        forward,
        dtypes=dtypes,
        devices=devices,
        differentiable=bool(differentiable),
        options=None if options is None else types.MappingProxyType(dict(options)),
        origin=origin,
        quant=quant,
    )


def unregister_impl(name: str) -> None:
    """Remove a registered name (moebench's own stay)."""
    if name in OWN:
        raise ValueError(f"impl {name!r} is moebench's own and stays registered")
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered impl: moebench's own, then peers, then the others."""
    _discover()
    return tuple(_REGISTRY)


def get(name) -> Impl:
    """The impl registered as `name` (an Impl passes through), or a `module:function`,
    registered under that name on first use."""
    if isinstance(name, Impl):
        return name
    if isinstance(name, str) and name not in _REGISTRY:
        _discover()
        if name not in _REGISTRY and ":" in name:
            return register_impl(name, load(name), origin="module:function")
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown impl {name!r}; known: {', '.join(names())} (or module:function)")
    return _REGISTRY[name]
