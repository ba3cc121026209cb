"""Layer configuration and the seed's model presets at their real layer shapes.

Dimensions: D model width (d_model), F routed expert hidden width (d_ff), E routed experts
(num_experts), K experts per token (top_k), Fs shared hidden width
(num_shared_experts * shared_d_ff).
"""

from __future__ import annotations

import dataclasses

import torch

ACTIVATIONS = ("swiglu",)
SCORINGS = ("softmax", "sigmoid")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype from its name ("bf16", "bfloat16", ...); a ValueError lists the known names."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: routed SwiGLU experts, optional shared experts, and its router."""

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 0
    shared_d_ff: int | None = None  # hidden width of one shared expert; default d_ff
    activation: str = "swiglu"
    scoring: str = "softmax"  # how the router turns logits into scores
    renormalize: bool = True  # top-k weights rescaled to sum to 1
    dtype: str = "bfloat16"
    name: str = "custom"

    def __post_init__(self):
        for field in ("d_model", "d_ff", "num_experts", "top_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoEConfig.{field} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}: "
                "each token's experts are distinct"
            )
        shared = self.num_shared_experts
        if not isinstance(shared, int) or isinstance(shared, bool) or shared < 0:
            raise ValueError(
                f"MoEConfig.num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}"
            )
        width = self.shared_d_ff
        if width is not None and (
            not isinstance(width, int) or isinstance(width, bool) or width <= 0
        ):
            raise ValueError(
                f"MoEConfig.shared_d_ff must be a positive int or None, got {self.shared_d_ff!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"MoEConfig.activation={self.activation!r} is unknown; known: {ACTIVATIONS}"
            )
        if self.scoring not in SCORINGS:
            raise ValueError(f"MoEConfig.scoring={self.scoring!r} is unknown; known: {SCORINGS}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(
                f"MoEConfig.renormalize must be True or False, got {self.renormalize!r}"
            )
        if not isinstance(self.name, str):
            raise ValueError(f"MoEConfig.name must be a string, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"MoEConfig.dtype={self.dtype!r} is unknown; known: {', '.join(DTYPES)}"
            )

    @property
    def d_ff_shared(self) -> int:
        """Fs: total hidden width of the shared experts, fused into one SwiGLU MLP."""
        return self.num_shared_experts * (self.shared_d_ff or self.d_ff)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    def flops(self, num_tokens: int) -> int:
        """Useful forward FLOPs: 6*S*D*F routed + 6*T*D*Fs shared (3 matmuls, 2 FLOPs each)."""
        routed = 6 * num_tokens * self.top_k * self.d_model * self.d_ff
        return routed + 6 * num_tokens * self.d_model * self.d_ff_shared


# Router settings follow each model's released configuration.
PRESETS: dict[str, MoEConfig] = {
    cfg.name: cfg
    for cfg in (
        MoEConfig(name="mixtral-8x7b", d_model=4096, d_ff=14336, num_experts=8, top_k=2),
        MoEConfig(
            name="deepseek-v3",
            d_model=7168,
            d_ff=2048,
            num_experts=256,
            top_k=8,
            num_shared_experts=1,
            scoring="sigmoid",
        ),
        MoEConfig(name="qwen3-235b-a22b", d_model=4096, d_ff=1536, num_experts=128, top_k=8),
        MoEConfig(
            name="llama4-maverick",
            d_model=5120,
            d_ff=8192,
            num_experts=128,
            top_k=1,
            num_shared_experts=1,
            scoring="sigmoid",
            renormalize=False,
        ),
    )
}


def preset(name: str) -> MoEConfig:
    """The named model's MoE layer at its real shape; a ValueError lists the valid names."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
