"""Expert weights in the Hugging Face transformers MoE layout.

E experts, D model width, F expert hidden width, Fs shared hidden width.
gate_up [E, 2F, D] (gate rows, then up rows), down [E, D, F];
shared_gate_up [2*Fs, D], shared_down [D, Fs].
"""

from __future__ import annotations

import dataclasses

import torch

from .config import MoEConfig, torch_dtype


def _shape(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else tuple(t.shape)


class LayerSizes:
    """The sizes a layer's weights give: gate_up [E, 2F, D] and down [E, D, F] (tensors,
    or moebench.quant.QuantizedTensor), shared_down [D, Fs] or None. ExpertWeights and
    QuantizedWeights both read them here."""

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def d_model(self) -> int:
        return self.gate_up.shape[2]

    @property
    def d_ff(self) -> int:
        return self.down.shape[2]

    @property
    def d_ff_shared(self) -> int:
        return 0 if self.shared_down is None else self.shared_down.shape[1]

    @property
    def device(self) -> torch.device:
        return self.gate_up.device


@dataclasses.dataclass(frozen=True)  # checked once, here: a field cannot change after
class ExpertWeights(LayerSizes):
    gate_up: torch.Tensor  # [E, 2F, D]
    down: torch.Tensor  # [E, D, F]
    shared_gate_up: torch.Tensor | None = None  # [2*Fs, D]
    shared_down: torch.Tensor | None = None  # [D, Fs]

    def __post_init__(self):
        gate_up, down = self.gate_up, self.down
        for name in ("gate_up", "down", "shared_gate_up", "shared_down"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) and (t is not None or name in ("gate_up", "down")):
                raise TypeError(f"ExpertWeights.{name} must be a tensor, got {type(t).__name__}")
        if gate_up.dim() != 3 or gate_up.shape[1] % 2 or 0 in gate_up.shape:
            raise ValueError(
                f"gate_up must be [E, 2F, D] with E, F, D >= 1, got shape {_shape(gate_up)}"
            )
        if not gate_up.dtype.is_floating_point:
            raise ValueError(f"expert weights must be floating point, got {gate_up.dtype}")
        E, F2, D = gate_up.shape
        if down.shape != (E, D, F2 // 2):
            raise ValueError(
                f"down must be [E, D, F] = {(E, D, F2 // 2)} to match gate_up {_shape(gate_up)}, "
                f"got {_shape(down)}"
            )
        if (self.shared_gate_up is None) != (self.shared_down is None):
            raise ValueError("shared_gate_up and shared_down must be given together")
        if self.shared_gate_up is not None:
            sgu, sd = self.shared_gate_up, self.shared_down
            if sgu.dim() != 2 or sgu.shape[1] != D or sgu.shape[0] % 2 or not sgu.shape[0]:
                raise ValueError(f"shared_gate_up must be [2*Fs, D={D}], got {_shape(sgu)}")
            if sd.shape != (D, sgu.shape[0] // 2):
                raise ValueError(
                    f"shared_down must be [D, Fs] = {(D, sgu.shape[0] // 2)}, got {_shape(sd)}"
                )
        for name, t in self.tensors().items():
            if t.dtype != gate_up.dtype or t.device != gate_up.device:
                raise ValueError(
                    f"{name} is {t.dtype} on {t.device}, gate_up is {gate_up.dtype} on "
                    f"{gate_up.device}: all weights must share dtype and device"
                )

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("gate_up", "down", "shared_gate_up", "shared_down")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @classmethod
    def random(
        cls,
        cfg: MoEConfig,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> ExpertWeights:
        """Gaussian weights scaled by 1/sqrt(fan_in), drawn on `device` straight in `dtype`
        (no float32 copy of a whole model). Reproducible for the same seed and device type."""
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a moebench.MoEConfig, got {type(cfg).__name__}")
        dtype = torch_dtype(dtype or cfg.dtype)
        if not dtype.is_floating_point:
            raise ValueError(f"expert weights must be floating point, got {dtype}")
        gen = torch.Generator(device=device).manual_seed(seed)
        D, F, E, Fs = cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.d_ff_shared

        def normal(shape, fan_in):
            t = torch.empty(shape, dtype=dtype, device=device)
            return t.normal_(0.0, fan_in**-0.5, generator=gen)

        return cls(
            gate_up=normal((E, 2 * F, D), D),
            down=normal((E, D, F), F),
            shared_gate_up=normal((2 * Fs, D), D) if Fs else None,
            shared_down=normal((D, Fs), Fs) if Fs else None,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up.dtype

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one routed expert (gate, up and down)."""
        return 3 * self.d_model * self.d_ff * self.gate_up.element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def quantize(self, fmt: str, block: int = 128):
        """The routed experts quantized: a moebench.quant.QuantizedWeights in `fmt`
        ("fp8-block", "int8" or "int4"; see moebench/quant.py), `block` its block size."""
        from .quant import quantize

        return quantize(self, fmt, block)

    def to(self, device=None, dtype=None) -> ExpertWeights:
        """A copy on `device` and/or in `dtype` (a torch dtype or a name such as "bf16")."""
        dtype = None if dtype is None else torch_dtype(dtype)
        return ExpertWeights(
            **{n: t.to(device=device, dtype=dtype) for n, t in self.tensors().items()}
        )
