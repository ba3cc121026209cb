"""Quantized expert weights: FP8 block-scaled (w8a8), INT8 per channel and INT4 per group
(w8a16, w4a16), in the layouts real checkpoints ship them in.

E experts, D model width, F expert hidden width; a projection is [E, N, K]: N outputs, K
the reduction (gate_up N = 2F, K = D; down N = D, K = F). B the block (group) size.

| format    | values                    | scales                      | activations        |
| --------- | ------------------------- | --------------------------- | ------------------ |
| fp8-block | float8_e4m3fn [E, N, K]   | fp32 [E, N/B, K/B], BxB     | fp8, a row's B     |
| int8      | int8 [E, N, K], +-127     | x's dtype [E, N, 1], a row  | x's dtype          |
| int4      | int32 [E, N, K/8]         | x's dtype [E, N, K/B], 1xB  | x's dtype          |

A weight is value * scale. fp8-block is DeepSeek-V3's checkpoint layout as transformers
loads it (the scale is `weight_scale_inv`); its activations are quantized at run time
(scale = amax / 448 over B columns of a row) before each matmul, x's before gate_up and
h = silu(gate) * up's, stored in x's dtype, before down. int8 and int4 are
compressed-tensors' `int-quantized` (channel) and `pack-quantized` (group) layouts: int4
values in [-8, 7] are stored as v + 8 in 4 bits, value k at bits 4*(k % 8) of word k // 8.
The routed experts are quantized; the shared expert stays in x's dtype.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import torch

from .config import torch_dtype
from .weights import ExpertWeights, LayerSizes, _shape

FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
ACT_EPS = 1e-10  # the least amax an fp8 activation scale divides by (an all-zero block)
BLOCK = 128
# The fp32 (float64) copy that quantize and dequantize make at a time: a few experts, not
# the 45 GB of deepseek-v3's experts in fp32.
_CHUNK_BYTES = 2**28


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    storage: torch.dtype  # what `data` holds
    per_element: int  # values a stored element packs
    qmax: float  # the largest magnitude quantize() stores
    activations: bool  # activations quantized at run time (w8a8)

    def scale_block(self, block: int, K: int) -> tuple[int, int]:
        """(rows, columns) of a projection that one scale covers."""
        if self.name == "fp8-block":
            return block, block
        return 1, (K if self.name == "int8" else block)


FORMATS = {
    f.name: f
    for f in (
        Format("fp8-block", torch.float8_e4m3fn, 1, FP8_MAX, True),  # DeepSeek-V3's
        Format("int8", torch.int8, 1, 127, False),  # compressed-tensors' int-quantized
        Format("int4", torch.int32, 8, 7, False),  # compressed-tensors' pack-quantized
    )
}
QUANTS = tuple(FORMATS)


def get_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}")
    return FORMATS[fmt]


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """One projection of every expert, quantized: logically [E, N, K]."""

    fmt: str
    data: torch.Tensor  # see the module's table
    scale: torch.Tensor  # [E, N / rows, K / columns] of Format.scale_block
    block: int
    # The dtype activations are stored in before fp8 quantization (the layer's x dtype).
    act_dtype: torch.dtype

    def __post_init__(self):
        f = get_format(self.fmt)
        data, scale = self.data, self.scale
        if not isinstance(data, torch.Tensor) or not isinstance(scale, torch.Tensor):
            raise TypeError(f"{self.fmt} data and scale must be tensors")
        if data.dtype != f.storage:
            raise ValueError(f"{self.fmt} values must be {f.storage}, got {data.dtype}")
        if data.dim() != 3 or 0 in data.shape:
            raise ValueError(f"{self.fmt} values must be [E, N, K], got shape {_shape(data)}")
        if not scale.dtype.is_floating_point or scale.dtype.itemsize < 2:
            raise ValueError(
                f"{self.fmt} scales must be float16, bfloat16 or float32, got {scale.dtype}"
            )
        if scale.device != data.device:
            raise ValueError(f"{self.fmt} scales are on {scale.device}, values on {data.device}")
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"the block size must be a positive int, got {self.block!r}")
        if self.fmt == "int4" and self.block % 8:
            raise ValueError(f"int4 packs 8 values a word: block {self.block} is no multiple of 8")
        E, N, K = self.shape
        rows, cols = f.scale_block(self.block, K)
        if N % rows or K % cols:
            raise ValueError(
                f"{self.fmt} blocks of {rows}x{cols} do not divide a [N={N}, K={K}] projection"
            )
        if tuple(scale.shape) != (E, N // rows, K // cols):
            raise ValueError(
                f"{self.fmt} scales of a [E={E}, N={N}, K={K}] projection in {rows}x{cols} "
                f"blocks must be {(E, N // rows, K // cols)}, got {_shape(scale)}"
            )

    @property
    def format(self) -> Format:
        return FORMATS[self.fmt]

    @property
    def shape(self) -> tuple[int, int, int]:
        E, N, k = self.data.shape
        return E, N, k * self.format.per_element

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale))

    def values(self) -> torch.Tensor:
        """The stored values as [E, N, K]: fp8 as stored, integers as int8."""
        if self.fmt != "int4":
            return self.data
        shifts = torch.arange(0, 32, 4, device=self.device, dtype=torch.int32)
        nibbles = (self.data[..., None] >> shifts) & 0xF  # [E, N, K/8, 8]; & drops the sign
        return (nibbles.to(torch.int8) - 8).flatten(2)

    def dequantize(self, dtype: torch.dtype | str | None = None) -> torch.Tensor:
        """value * scale as [E, N, K] in `dtype` (default the activations'): exact in
        float64; otherwise computed in fp32 (exact for the integer formats' 16-bit scales)
        and rounded to `dtype`, a few experts at a time."""
        dtype = torch_dtype(dtype or self.act_dtype)
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        E, N, K = self.shape
        rows, cols = self.format.scale_block(self.block, K)
        out = torch.empty(E, N, K, dtype=dtype, device=self.device)
        step = max(1, _CHUNK_BYTES // (N * K * wide.itemsize))
        for lo in range(0, E, step):
            part = self.select(slice(lo, lo + step))
            blocks = _blocks(part.values().to(wide), rows, cols)
            dense = blocks * part.scale.to(wide)[:, :, None, :, None]
            out[lo : lo + step] = dense.flatten(3).flatten(1, 2)
        return out

    def select(self, experts: torch.Tensor | slice) -> QuantizedTensor:
        """The projections of these experts (an index tensor or a slice), in that order."""
        return dataclasses.replace(self, data=self.data[experts], scale=self.scale[experts])

    def to(self, device) -> QuantizedTensor:
        return dataclasses.replace(self, data=self.data.to(device), scale=self.scale.to(device))


def _blocks(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[E, N, K] -> [E, N/rows, rows, K/cols, cols]."""
    E, N, K = w.shape
    return w.reshape(E, N // rows, rows, K // cols, cols)


def quantize_tensor(w: torch.Tensor, fmt: str, block: int = BLOCK) -> QuantizedTensor:
    """Quantize a projection [E, N, K] (round to nearest, symmetric, scale = amax / qmax),
    a few experts at a time."""
    f = get_format(fmt)
    E, N, K = w.shape
    rows, cols = f.scale_block(block, K)
    if N % rows or K % cols:
        raise ValueError(f"{fmt} blocks of {rows}x{cols} do not divide a [N={N}, K={K}] projection")
    scale_dtype = torch.float32 if fmt == "fp8-block" else w.dtype
    data = torch.empty(E, N, K // f.per_element, dtype=f.storage, device=w.device)
    scale = torch.empty(E, N // rows, K // cols, dtype=scale_dtype, device=w.device)
    step = max(1, _CHUNK_BYTES // (N * K * 4))
    for lo in range(0, E, step):
        blocks = _blocks(w[lo : lo + step].float(), rows, cols)
        amax = blocks.abs().amax(dim=(2, 4), keepdim=True)
        # Rounded to the stored dtype first, so that the values are quantized by the scale
        # that dequantize() multiplies by.
        s = (amax / f.qmax).to(scale_dtype).float()
        q = (blocks / s.clamp_min(torch.finfo(scale_dtype).tiny)).flatten(3).flatten(1, 2)
        if fmt == "fp8-block":
            data[lo : lo + step] = q.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        else:
            q = q.round().clamp(-f.qmax - (fmt == "int4"), f.qmax).to(torch.int8)
            data[lo : lo + step] = pack_int4(q) if fmt == "int4" else q
        scale[lo : lo + step] = s.squeeze(4).squeeze(2)
    return QuantizedTensor(fmt, data, scale, block, w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [..., K] -> int32 [..., K/8], compressed-tensors' packing."""
    nibbles = (q.to(torch.int64) + 8).unflatten(-1, (-1, 8))
    shifts = torch.arange(0, 32, 4, device=q.device)
    words = (nibbles << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@dataclasses.dataclass(frozen=True)
class QuantizedWeights(LayerSizes):
    """A layer's weights with its routed experts quantized in one format; moe_forward and
    reference take it where they take ExpertWeights. gate_up [E, 2F, D], down [E, D, F];
    the shared expert (shared_gate_up [2*Fs, D], shared_down [D, Fs]) stays in `dtype`,
    the dtype of x and y."""

    gate_up: QuantizedTensor
    down: QuantizedTensor
    dtype: torch.dtype
    shared_gate_up: torch.Tensor | None = None
    shared_down: torch.Tensor | None = None

    def __post_init__(self):
        gu, dn = self.gate_up, self.down
        for name in ("gate_up", "down"):
            if not isinstance(getattr(self, name), QuantizedTensor):
                raise TypeError(f"QuantizedWeights.{name} must be a moebench.quant.QuantizedTensor")
        if (gu.fmt, gu.block) != (dn.fmt, dn.block):
            raise ValueError(
                f"gate_up is {gu.fmt} in blocks of {gu.block}, down {dn.fmt} in blocks of "
                f"{dn.block}: both projections share one format"
            )
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"QuantizedWeights.dtype must be a float dtype, got {self.dtype!r}")
        E, F2, D = gu.shape
        if F2 % 2 or dn.shape != (E, D, F2 // 2):
            raise ValueError(
                f"down must be [E, D, F] = {(E, D, F2 // 2)} to match gate_up {gu.shape}, "
                f"got {dn.shape}"
            )
        if gu.device != dn.device:
            raise ValueError(f"gate_up is on {gu.device}, down on {dn.device}")
        # The shared expert's checks are ExpertWeights' own.
        self.dense_shared()

    @property
    def fmt(self) -> str:
        return self.gate_up.fmt

    @property
    def block(self) -> int:
        return self.gate_up.block

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one routed expert: its values and its scales."""
        return (self.gate_up.nbytes + self.down.nbytes) // self.num_experts

    @property
    def nbytes(self) -> int:
        shared = (self.shared_gate_up, self.shared_down)
        dense = sum(t.numel() * t.element_size() for t in shared if t is not None)
        return self.gate_up.nbytes + self.down.nbytes + dense

    def dense_shared(self) -> dict[str, torch.Tensor]:
        """The shared expert's tensors by name (checked as ExpertWeights checks them)."""
        if self.shared_gate_up is None and self.shared_down is None:
            return {}
        probe = ExpertWeights(
            gate_up=torch.empty(1, 2, self.d_model, dtype=self.dtype, device=self.device),
            down=torch.empty(1, self.d_model, 1, dtype=self.dtype, device=self.device),
            shared_gate_up=self.shared_gate_up,
            shared_down=self.shared_down,
        )
        return {n: t for n, t in probe.tensors().items() if n.startswith("shared")}

    def dequantize(self, dtype: torch.dtype | str | None = None) -> ExpertWeights:
        """ExpertWeights of value * scale in `dtype` (default the layer's)."""
        dtype = torch_dtype(dtype or self.dtype)
        shared = {n: t.to(dtype) for n, t in self.dense_shared().items()}
        return ExpertWeights(self.gate_up.dequantize(dtype), self.down.dequantize(dtype), **shared)

    def select(self, experts: torch.Tensor) -> QuantizedWeights:
        """These experts' weights (an index tensor, renumbered in its order), the shared too."""
        return dataclasses.replace(
            self, gate_up=self.gate_up.select(experts), down=self.down.select(experts)
        )

    def to(self, device=None, dtype=None) -> QuantizedWeights:
        """A copy on `device`; `dtype` changes the layer's x dtype and the shared expert's,
        never the quantized values or their scales."""
        dtype = self.dtype if dtype is None else torch_dtype(dtype)
        shared = {n: t.to(device=device, dtype=dtype) for n, t in self.dense_shared().items()}
        return QuantizedWeights(
            self.gate_up.to(device), self.down.to(device), dtype=dtype, **shared
        )

    # -- Checkpoint layouts ---------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The routed experts in their checkpoint layout, per expert, keyed as a layer's
        state dict keys them: `experts.{e}.{gate,up,down}_proj.{name}`, names as in
        `from_state_dict`."""
        F = self.d_ff
        out = {}
        for e in range(self.num_experts):
            projections = {
                "gate": _rows(self.gate_up, e, 0, F),
                "up": _rows(self.gate_up, e, F, 2 * F),
                "down": _rows(self.down, e, 0, self.d_model),
            }
            for proj, (data, scale, shape) in projections.items():
                key = f"experts.{e}.{proj}_proj."
                if self.fmt == "fp8-block":
                    out[key + "weight"], out[key + "weight_scale_inv"] = data, scale
                elif self.fmt == "int8":
                    out[key + "weight"], out[key + "weight_scale"] = data, scale
                else:
                    out[key + "weight_packed"], out[key + "weight_scale"] = data, scale
                    out[key + "weight_shape"] = torch.tensor(shape)
        return out

    @classmethod
    def from_state_dict(
        cls,
        tensors: Mapping[str, torch.Tensor],
        fmt: str,
        dtype: torch.dtype | str = torch.bfloat16,
        *,
        shared_gate_up: torch.Tensor | None = None,
        shared_down: torch.Tensor | None = None,
    ) -> QuantizedWeights:
        """A layer's quantized experts from its state dict (keys relative to the MoE block),
        tensors taken as they are stored:

        - `fp8-block`: DeepSeek-V3's per-expert `experts.{e}.{gate,up,down}_proj.weight`
          (float8_e4m3fn [N, K]) and `.weight_scale_inv` (fp32 [N/B, K/B]), or the fused
          `gate_up_proj`, `gate_up_proj_scale_inv`, `down_proj`, `down_proj_scale_inv`
          [E, ...] of transformers' FP8 experts;
        - `int8`: `experts.{e}.{proj}_proj.weight` (int8 [N, K]) and `.weight_scale` ([N, 1]);
        - `int4`: `experts.{e}.{proj}_proj.weight_packed` (int32 [N, K/8]), `.weight_scale`
          ([N, K/B]) and `.weight_shape` ([N, K]).

        B is read from the scales' shape. dtype: the layer's x dtype.
        """
        f = get_format(fmt)
        dtype = torch_dtype(dtype)
        if fmt == "fp8-block" and "gate_up_proj" in tensors:
            pairs = {p: (_get(tensors, f"{p}_proj"), _get(tensors, f"{p}_proj_scale_inv"))
                     for p in ("gate_up", "down")}  # fmt: skip
        else:
            pairs = _per_expert(tensors, fmt)
        projections = {
            name: QuantizedTensor(fmt, data, scale, _block(f, data, scale, name), dtype)
            for name, (data, scale) in pairs.items()
        }
        return cls(
            projections["gate_up"],
            projections["down"],
            dtype=dtype,
            shared_gate_up=shared_gate_up,
            shared_down=shared_down,
        )


def _rows(t: QuantizedTensor, e: int, lo: int, hi: int):
    """Expert e's rows lo:hi of a projection: (values, scales, logical [N, K])."""
    rows = t.format.scale_block(t.block, t.shape[2])[0]
    return t.data[e, lo:hi], t.scale[e, lo // rows : hi // rows], [hi - lo, t.shape[2]]


def _get(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        near = ", ".join(sorted(tensors)[:6]) or "none"
        raise ValueError(f"the state dict has no {key!r} (its keys start: {near})")
    return tensors[key]


_EXPERT_KEY = re.compile(r"experts\.(\d+)\.(gate|up|down)_proj\.")


def _per_expert(tensors, fmt):
    """{"gate_up": (values, scales), "down": ...} stacked from per-expert keys."""
    names = {"fp8-block": ("weight", "weight_scale_inv"), "int8": ("weight", "weight_scale"),
             "int4": ("weight_packed", "weight_scale")}[fmt]  # fmt: skip
    experts = sorted({int(m.group(1)) for k in tensors if (m := _EXPERT_KEY.match(k))})
    if experts != list(range(len(experts))) or not experts:
        raise ValueError(
            f"a {fmt} state dict holds experts.0 .. experts.{{E-1}}; found experts {experts[:8]}"
        )

    def stack(proj, name):
        return torch.stack([_get(tensors, f"experts.{e}.{proj}_proj.{name}") for e in experts])

    if fmt == "int4":
        for e in experts:
            for proj in ("gate", "up", "down"):
                shape = _get(tensors, f"experts.{e}.{proj}_proj.weight_shape").tolist()
                packed = _get(tensors, f"experts.{e}.{proj}_proj.weight_packed")
                if [packed.shape[0], packed.shape[1] * 8] != shape:
                    raise ValueError(
                        f"experts.{e}.{proj}_proj: weight_shape {shape} is not what "
                        f"weight_packed {_shape(packed)} unpacks to (8 values a word, K % 8 == 0)"
                    )
    out = {}
    for name in names:
        out.setdefault("gate_up", []).append(torch.cat([stack("gate", name), stack("up", name)], 1))
        out.setdefault("down", []).append(stack("down", name))
    return {k: tuple(v) for k, v in out.items()}


def _block(f: Format, data: torch.Tensor, scale: torch.Tensor, name: str) -> int:
    """The block size that the scales' shape says, checked by QuantizedTensor."""
    if data.dim() != 3 or scale.dim() != 3 or 0 in scale.shape:
        raise ValueError(
            f"{name}: values must be [E, N, K] and scales [E, rows, columns], got "
            f"{_shape(data)} and {_shape(scale)}"
        )
    K = data.shape[2] * f.per_element
    if f.name == "int8":
        return BLOCK
    block = K // scale.shape[2]
    if block * scale.shape[2] != K:
        raise ValueError(f"{name}: {scale.shape[2]} scale columns do not divide K={K}")
    return block


def quantize(weights: ExpertWeights, fmt: str, block: int = BLOCK) -> QuantizedWeights:
    """The routed experts of `weights` in `fmt` (see the module's table); x's dtype and the
    shared expert stay the weights' own."""
    if not isinstance(weights, ExpertWeights):
        raise TypeError(f"quantize takes moebench.ExpertWeights, got {type(weights).__name__}")
    get_format(fmt)
    if weights.dtype == torch.float64:
        raise ValueError("quantize float16, bfloat16 or float32 weights (a layer runs in those)")
    shared = {n: t for n, t in weights.tensors().items() if n.startswith("shared")}
    return QuantizedWeights(
        quantize_tensor(weights.gate_up, fmt, block),
        quantize_tensor(weights.down, fmt, block),
        dtype=weights.dtype,
        **shared,
    )


def quantize_activations(a_MK: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 activations: (values float8_e4m3fn [M, K], scales fp32 [M, K/B]), a scale per row
    per B columns, amax / 448 computed in fp32."""
    M, K = a_MK.shape
    blocks = a_MK.float().view(M, K // block, block)
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(ACT_EPS) / FP8_MAX
    values = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return values.view(M, K), scale.squeeze(-1)


class _Dequantized(Sequence):
    """A QuantizedTensor's experts, each dequantized when it is read."""

    def __init__(self, w: QuantizedTensor, dtype: torch.dtype):
        self.w, self.dtype = w, dtype

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.w.select(slice(e, e + 1)).dequantize(self.dtype)[0]

    def __len__(self) -> int:
        return self.w.shape[0]


def experts(w, dtype: torch.dtype) -> Sequence[torch.Tensor]:
    """Each expert's projection by expert id: a tensor's views (one unbind: its backward
    stacks the experts' gradients once, where w[e] would add a full-size zero tensor per
    expert), a QuantizedTensor's dequantized in `dtype` as each is read."""
    return _Dequantized(w, dtype) if isinstance(w, QuantizedTensor) else w.unbind(0)


def dense(w, dtype: torch.dtype) -> torch.Tensor:
    """A projection as a float tensor in `dtype`: a QuantizedTensor dequantized, a tensor as
    it is. The reference semantics of naive, padded and sorted."""
    return w.dequantize(dtype) if isinstance(w, QuantizedTensor) else w


def activations(a_MK: torch.Tensor, w) -> torch.Tensor:
    """The activations that multiply projection `w`, as its format sees them: for fp8-block
    rounded to the layer's dtype, quantized per row per block and multiplied back (in a's
    dtype); otherwise a itself."""
    if not isinstance(w, QuantizedTensor) or not w.format.activations or not a_MK.numel():
        return a_MK
    values, scale = quantize_activations(a_MK.to(w.act_dtype), w.block)
    wide = torch.float64 if a_MK.dtype == torch.float64 else torch.float32  # exact in float64
    scaled = values.to(wide).view(*scale.shape, -1) * scale.to(wide)[..., None]
    return scaled.view(a_MK.shape).to(a_MK.dtype)
