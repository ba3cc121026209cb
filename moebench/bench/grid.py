"""The benchmark grid: the sweep families of docs/DESIGN.md, generated for one profile.

A profile fixes the device, dtype, the family shapes and the timing budget:
- `gpu`: the families at their real shapes in bf16 (the numbers docs/DESIGN.md talks about);
- `cpu`: a labelled small copy in fp32 (D, F and T scaled down, E up to 1024, model
  presets with D and F divided by 16, tokens divided by 16) so that a machine without a
  GPU runs the same code in minutes; Triton is skipped there;
- `tiny`: a few points of each family, for tests and the CI smoke run;
- `gate`: the CPU regression gate's few points of the cpu profile (gate_grid);
- `cli`: what `moebench compare` measures with, built for its device (device_profile).
The `quant` family is the models and sonicmoe points again, once per quantized weight
format (moebench.quant.QUANTS), forward only: quantized weights are for inference.
The profile is named explicitly or by the MOEBENCH_PROFILE environment variable, and
defaults to `gpu` where CUDA is available, else `cpu`.

D model width, F expert hidden width, E experts, K experts per token, T tokens, B the
quantization block (group) size.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .. import registry
from ..config import PRESETS, MoEConfig, torch_dtype
from ..quant import QUANTS
from ..registry import OWN

FAMILIES = ("scale-out", "iso-params", "models", "sonicmoe")
# The expert-parallel family: W ranks (processes, one per GPU on a GPU machine), each with
# its T tokens and its block of the E experts (moebench.parallel, measured by bench/ep.py).
EP = "ep"
# A family name with this suffix times forward + backward (a training step's layer work)
# on the same points: useful FLOPs are three times the forward's.
TRAIN = "+bwd"
# The quantized-experts family: each models and sonicmoe point in each format of QUANTS,
# labelled "<point>/<format>" ("deepseek-v3/T=64/int4"); inference only, never + TRAIN.
QUANT = "quant"
SKEWS = ("balanced", "random", "zipf:1.2", "hot:0.5", "collapse")
# moebench's own layers: what the gate and the regression runs measure by default.
IMPLS = OWN


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    device: str
    dtype: str
    tokens: int  # T of scale-out and iso-params
    max_experts: int  # E runs over the powers of two from 8 to this
    scale_out: tuple[int, int, int]  # D, F, K (K is capped at E)
    iso_params: tuple[int, int, int]  # D, E*F, K
    model_tokens: tuple[int, ...]  # T of the models family
    model_shrink: int  # the presets' D, F and shared F are divided by this
    warmup: int
    repeats: int
    max_time_s: float  # timing budget of one point; repeats shrink (never below 3) past it
    matmul_n: int  # the matmul ceiling is an N x N x N matmul
    copy_bytes: int  # the copy ceiling copies a buffer of this size
    check_bytes: int  # largest float64 reference (weights of the checked experts) to build
    timeout_s: int  # what the whole profile may take in one process (asv setup_cache)
    # the families timed forward + backward (each a FAMILIES name + TRAIN)
    train_families: tuple[str, ...] = ()
    # torch CPU threads while measuring; None leaves torch's default. The CPU profiles use
    # one: with more OpenMP threads than idle cores, small matmuls slow down tenfold and
    # the numbers follow the machine's load rather than the code.
    threads: int | None = None
    # These implementations' forward points whose eager median is below graph_below_ms are
    # timed again as CUDA graph replays (graph_ms): there the eager time is mostly the
    # host launching kernels, and the replay shows what the kernels take.
    graph_impls: tuple[str, ...] = ()
    graph_below_ms: float = 0.0
    # Untimed calls go on until the warm-up took warmup_s, and timed calls until they take
    # min_time_s (within max_time_s): a GPU sweep times sub-millisecond layers, and 3 warm-up
    # calls and 20 repeats (10 ms in all) left identical inputs measured 1.7x apart in the
    # first H100 run (scale-out E = 8, where every skew routes each token to all 8 experts).
    warmup_s: float = 0.0
    min_time_s: float = 0.0
    # Registered impls a sweep of this profile leaves out unless named (--impls).
    leave_out: tuple[str, ...] = ()
    # The ep family: world sizes x expert counts at one layer shape, T tokens per rank.
    ep_worlds: tuple[int, ...] = ()
    ep_experts: tuple[int, ...] = ()
    ep_shape: tuple[int, int, int, int] = (0, 0, 0, 0)  # D, F, K, T per rank
    ep_impls: tuple[str, ...] = ("sorted",)  # the local experts' impls (unless --impls)
    # Group-limited points: each token's experts on at most M ranks (make_routing's
    # n_group=W, topk_group=M), where W divides E and M ranks hold K experts.
    ep_group_limits: tuple[int, ...] = ()
    # The quant family: B, the block (group) size of its formats, and the models family's
    # presets and token counts it takes (None: all of them).
    quant_block: int = 128
    quant_models: tuple[str, ...] | None = None
    quant_tokens: tuple[int, ...] | None = None

    def experts(self) -> list[int]:
        return [2**i for i in range(3, self.max_experts.bit_length())]


PROFILES = {
    p.name: p
    for p in (
        Profile(
            name="gpu",
            device="cuda",
            dtype="bfloat16",
            tokens=4096,
            max_experts=8192,
            scale_out=(1024, 512, 8),
            iso_params=(2048, 65536, 2),
            model_tokens=(1, 64, 4096, 16384),
            model_shrink=1,
            warmup=3,
            repeats=20,
            max_time_s=0.5,
            matmul_n=8192,
            copy_bytes=2**30,
            check_bytes=4 * 2**30,
            timeout_s=3600,
            train_families=tuple(f + TRAIN for f in FAMILIES),
            graph_impls=("triton",),  # sync-free by design; the others may not capture
            graph_below_ms=5.0,
            warmup_s=0.05,
            min_time_s=0.1,
            ep_worlds=(2, 4, 8),  # NCCL within one node: the world sizes its GPUs allow
            ep_experts=(64, 256),
            ep_shape=(4096, 1024, 8, 4096),
            ep_impls=("sorted", "triton"),
            ep_group_limits=(2,),
            quant_block=128,  # DeepSeek-V3's fp8 blocks, compressed-tensors' usual group
        ),
        Profile(
            name="cpu",
            device="cpu",
            dtype="float32",
            tokens=256,
            max_experts=1024,
            scale_out=(256, 128, 8),
            iso_params=(256, 8192, 2),
            model_tokens=(1, 4, 256, 1024),
            model_shrink=16,
            warmup=1,
            repeats=9,
            max_time_s=0.4,
            matmul_n=1024,
            copy_bytes=256 * 2**20,
            check_bytes=256 * 2**20,
            timeout_s=1800,
            threads=1,
            train_families=("models" + TRAIN,),
            # transformers' batched_mm gathers each pair's expert weights (S x 3*D*F values
            # a call): 0.2-1.4 s a call here, 50-100x sorted, two thirds of the sweep; and
            # its eager loop's backward took 22-27 s a call at deepseek-v3 T=256 (100x naive).
            leave_out=("hf-batched_mm", "hf-eager"),
            # gloo ranks on this machine's cores; W=1 is the layer's own cost without peers
            ep_worlds=(1, 2, 4),
            ep_experts=(8, 64),
            ep_shape=(256, 128, 8, 256),
            ep_group_limits=(1,),
            # 128 divides none of the presets shrunk by 16 (deepseek-v3 D=448, qwen3 F=96,
            # llama4 D=320); 32 divides them all, not sonicmoe's E=256 shape (F=16).
            quant_block=32,
            # naive, padded and sorted dequantize the experts' weights on each call (the
            # reference semantics; naive and sorted the experts that received tokens):
            # 0.4-0.8 s a call at deepseek-v3 and llama4 here where every expert is touched
            # (T=256, or padded at any T), 20-40 ms at mixtral. So the cpu sweep takes
            # mixtral and qwen3, at decode and prefill, and sonicmoe's prefill shape.
            quant_models=("mixtral-8x7b", "qwen3-235b-a22b"),
            quant_tokens=(1, 256),
        ),
        Profile(
            name="tiny",
            device="cpu",
            dtype="float32",
            tokens=64,
            max_experts=32,
            scale_out=(32, 16, 4),
            iso_params=(32, 256, 2),
            model_tokens=(1, 16),
            model_shrink=64,
            warmup=1,
            repeats=3,
            max_time_s=0.05,
            matmul_n=256,
            copy_bytes=16 * 2**20,
            check_bytes=64 * 2**20,
            timeout_s=600,
            threads=1,
            train_families=("models" + TRAIN,),
            ep_worlds=(1, 2),
            ep_experts=(8,),
            ep_shape=(32, 16, 4, 32),
            ep_group_limits=(1,),
            # divides the presets shrunk by 64 (deepseek-v3 D=112, qwen3 F=24, llama4 D=80),
            # not sonicmoe's E=256 shape (F=4)
            quant_block=8,
        ),
    )
}


# The CPU gate: a few points of the cpu profile long enough (10-100 ms a call) that a
# scheduler hiccup is a small part of a repeat, each timed for longer than a sweep does.
# The cpu profile's one torch thread keeps a busy neighbour from stalling OpenMP barriers.
PROFILES["gate"] = dataclasses.replace(PROFILES["cpu"], name="gate", repeats=15, max_time_s=1.0)
GATE_POINTS = {"scale-out": ("E=8", "E=64", "E=512"), "models": ("deepseek-v3/T=256",)}
GATE_SKEWS = ("balanced", "zipf:1.2")
# The profiles a sweep runs whole (the gate's runs its GATE_POINTS only).
SWEEP_PROFILES = ("gpu", "cpu", "tiny")


def default_impls(profile: str | Profile | None = None) -> list[str]:
    """What a sweep of the profile measures unless told: every registered impl (moebench's
    own, the peers, plug-ins) but the profile's leave_out."""
    p = get_profile(profile)
    return [name for name in registry.names() if name not in p.leave_out]


def device_profile(device: str, dtype: str | None = None, threads: int | None = None) -> Profile:
    """The `cli` profile: the gpu profile's budget on a CUDA device, the cpu one's on the
    CPU, in `dtype` (default the base's); ValueError where `device` cannot be measured."""
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: moebench measures on cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    base = PROFILES["gpu" if kind == "cuda" else "cpu"]
    dtype = str(torch_dtype(dtype or base.dtype)).removeprefix("torch.")
    changes = {"device": device, "dtype": dtype, "name": "cli"}
    if threads is not None:
        changes["threads"] = threads
    return dataclasses.replace(base, **changes)


def default_profile_name() -> str:
    """MOEBENCH_PROFILE, else `gpu` where CUDA is available, else `cpu`."""
    name = os.environ.get("MOEBENCH_PROFILE")
    if name:
        return name
    # device_count() asks NVML where it can; is_available() initializes the CUDA driver,
    # after which a forked child cannot use CUDA, and asv's forkserver imports the suites,
    # which call this, before it forks.
    return "gpu" if torch.cuda.device_count() > 0 else "cpu"


def get_profile(profile: str | Profile | None = None) -> Profile:
    """A profile by name (default: `default_profile_name()`); a ValueError lists the names."""
    if isinstance(profile, Profile):
        return profile
    name = profile or default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: a layer shape and a token count, named within its family."""

    family: str
    label: str  # "E=64" or "qwen3-235b-a22b/T=4096"
    cfg: MoEConfig
    T: int  # all ranks' tokens in the ep family
    world: int = 1  # ranks (the ep family)
    group_limit: int | None = None  # at most this many ranks per token (the ep family)
    quant: str | None = None  # the experts' weight format (the quant family)


def shrink(cfg: MoEConfig, factor: int, dtype: str) -> MoEConfig:
    """The layer with D, F and the shared F divided by `factor` (at least 1), in `dtype`."""
    if factor == 1:
        return cfg.replace(dtype=dtype)
    shared = cfg.shared_d_ff and max(1, cfg.shared_d_ff // factor)
    return cfg.replace(
        d_model=max(1, cfg.d_model // factor),
        d_ff=max(1, cfg.d_ff // factor),
        shared_d_ff=shared,
        dtype=dtype,
    )


def families(profile: str | Profile | None = None) -> tuple[str, ...]:
    """The forward families, the profile's forward + backward ones, quant, then ep where
    the profile has one."""
    p = get_profile(profile)
    return FAMILIES + p.train_families + (QUANT,) + ((EP,) if p.ep_worlds else ())


def points(family: str, profile: str | Profile | None = None) -> list[Point]:
    """The family's points for the profile, in sweep order (E or T ascending)."""
    p = get_profile(profile)
    if family.endswith(TRAIN) and family.removesuffix(TRAIN) in FAMILIES:
        forward = points(family.removesuffix(TRAIN), p)
        return [dataclasses.replace(pt, family=family) for pt in forward]
    if family == "scale-out":
        D, F, K = p.scale_out
        return [
            Point(
                family,
                f"E={E}",
                MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=min(K, E), dtype=p.dtype),
                p.tokens,
            )
            for E in p.experts()
        ]
    if family == "iso-params":
        D, params, K = p.iso_params
        return [
            Point(
                family,
                f"E={E}",
                MoEConfig(d_model=D, d_ff=params // E, num_experts=E, top_k=K, dtype=p.dtype),
                p.tokens,
            )
            for E in p.experts()
            if params // E >= 1
        ]
    if family == "models":
        return [
            Point(family, f"{name}/T={T}", shrink(cfg, p.model_shrink, p.dtype), T)
            for name, cfg in PRESETS.items()
            for T in p.model_tokens
        ]
    if family == EP:
        D, F, K, T = p.ep_shape
        out = []
        for W in p.ep_worlds:
            for E in p.ep_experts:
                cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=min(K, E), dtype=p.dtype)
                out.append(Point(family, f"W={W}/E={E}", cfg, W * T, world=W))
                out += [
                    Point(family, f"W={W}/E={E}/M={M}", cfg, W * T, world=W, group_limit=M)
                    for M in p.ep_group_limits
                    if M < W and E % W == 0 and cfg.top_k <= M * E // W
                ]
        return out
    if family == "sonicmoe":
        # The shapes of SonicMoE's published H100 figures (D=4096, T=32768 on the GPU), the
        # triton layer's throughput target; scaled like the presets on other profiles.
        shapes = ((1024, 64, 4), (256, 256, 16))
        cfgs = [MoEConfig(d_model=4096, d_ff=F, num_experts=E, top_k=K) for F, E, K in shapes]
        cfgs = [shrink(cfg, p.model_shrink, p.dtype) for cfg in cfgs]
        return [
            Point(family, f"E={c.num_experts}/F={c.d_ff}/K={c.top_k}", c, 8 * p.tokens)
            for c in cfgs
        ]
    if family == QUANT:
        return quant_points(p)
    raise ValueError(f"unknown family {family!r}; known: {', '.join((*FAMILIES, QUANT, EP))}")


def quant_points(p: Profile) -> list[Point]:
    """The quant family: the models points of quant_models at quant_tokens and the
    sonicmoe points, each in every format of QUANTS. Points whose D or F the profile's
    block B does not divide are left out for every format (fp8-block's BxB blocks and
    int4's 1xB groups cover whole rows and columns of both projections; int8 alone would
    run), so that the formats compare on the same points."""
    tokens = p.model_tokens if p.quant_tokens is None else p.quant_tokens
    models = PRESETS if p.quant_models is None else p.quant_models
    base = [pt for pt in points("models", p) if pt.T in tokens and pt.label.split("/")[0] in models]
    base += points("sonicmoe", p)
    B = p.quant_block
    return [
        dataclasses.replace(pt, family=QUANT, label=f"{pt.label}/{fmt}", quant=fmt)
        for pt in base
        if pt.cfg.d_model % B == 0 and pt.cfg.d_ff % B == 0
        for fmt in QUANTS
    ]


def all_points(profile: str | Profile | None = None) -> list[Point]:
    return [pt for family in families(profile) for pt in points(family, profile)]


def gate_grid(profile: str | Profile):
    """(profile, points, skews) of a gate run: "gate" is the CPU gate's GATE_POINTS and
    GATE_SKEWS; any other profile means every point and skew of that profile."""
    p = get_profile(profile)
    if p.name != "gate":
        # quant points are measured by the sweep and reported; the gate leaves them out.
        return p, [pt for pt in all_points(p) if pt.family not in (EP, QUANT)], SKEWS
    pts = [pt for fam, labels in GATE_POINTS.items() for pt in points(fam, p) if pt.label in labels]
    return p, pts, GATE_SKEWS
