"""moebench: reference MoE layers and the suite that measures them."""

from .config import PRESETS, MoEConfig, preset
from .layer import IMPLS, check_inputs, impl_options, moe_forward, reference
from .quant import QUANTS, QuantizedWeights
from .registry import Unavailable, declare, register_impl, unregister_impl
from .routing import SKEWS, LoadStats, Routing, load_balancing_loss, load_stats, make_routing, route
from .weights import ExpertWeights

__version__ = "0.1.0"

__all__ = [
    "IMPLS",
    "PRESETS",
    "QUANTS",
    "SKEWS",
    "ExpertWeights",
    "LoadStats",
    "MoEConfig",
    "QuantizedWeights",
    "Routing",
    "Unavailable",
    "check_inputs",
    "declare",
    "impl_options",
    "load_balancing_loss",
    "load_stats",
    "make_routing",
    "moe_forward",
    "preset",
    "reference",
    "register_impl",
    "route",
    "unregister_impl",
]
