"""transformers' experts backends (moebench.peers.hf) against the float64 oracle, and the
reasons the ones that cannot run here give."""

import pytest
import torch

import moebench as mb
from moebench import registry
from moebench.bench.grid import SKEWS
from moebench.bench.oracle import tolerance
from moebench.testing import check_impl

pytest.importorskip("transformers")
from moebench.peers import hf  # imports transformers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNNABLE = ["hf-eager", "hf-batched_mm", "hf-grouped_mm"]
CUDA_ONLY = ["hf-sonicmoe", "hf-deepgemm"]
SHAPES = {
    # name: (T, D, F, E, K). T a multiple of no block size; D and F no power of two, yet
    # rows of a multiple of 16 bytes in every dtype, as torch's grouped_mm needs.
    "odd": (37, 40, 24, 6, 3),
    "T1": (1, 56, 8, 8, 2),
    "K1": (50, 24, 40, 16, 1),
    "KeqE": (19, 40, 24, 4, 4),
}


def make_case(shape, skew, dtype, seed=0):
    T, D, F, E, K = SHAPES[shape]
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    w = mb.ExpertWeights.random(cfg, dtype=dtype, device=DEVICE, seed=seed)
    r = mb.make_routing(T, cfg, skew=skew, seed=seed, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    x = torch.randn(T, D, generator=gen, device=DEVICE).to(dtype)
    return x, mb.Routing(r.ids.int(), r.weights), w  # int32 ids, as a kernel's router may give


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("skew", SKEWS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", RUNNABLE)
def test_matches_float64_reference(impl, shape, skew):
    x, r, w = make_case(shape, skew, torch.float32, seed=len(shape) + len(skew))
    out = torch.full_like(x, float("nan"))
    y = mb.moe_forward(x, r, w, impl=impl, out=out)
    assert y is out and torch.isfinite(y).all()
    assert rel_err(y, mb.reference(x, r, w)) < tolerance(torch.float32)


@pytest.mark.parametrize("impl", RUNNABLE)
def test_every_declared_dtype(impl):
    dtypes = registry.get(impl).dtypes
    if DEVICE == "cuda" and impl == "hf-grouped_mm":
        dtypes = (torch.bfloat16,)  # torch's grouped_mm takes only bf16 on CUDA
    for dtype in dtypes:
        x, r, w = make_case("odd", "zipf:1.2", dtype, seed=3)
        y = mb.moe_forward(x, r, w, impl=impl)
        assert y.dtype == dtype
        assert rel_err(y, mb.reference(x, r, w)) < tolerance(dtype), dtype


@pytest.mark.parametrize("impl", ["hf-eager", "hf-batched_mm"])
def test_the_conformance_kit_passes_including_gradients(impl):
    assert not check_impl(impl, device=DEVICE).failed


def test_grouped_mm_refuses_rows_torch_cannot_take():
    """D=37 fp32 rows are 148 bytes: torch would fail deep inside transformers."""
    cfg = mb.MoEConfig(d_model=37, d_ff=24, num_experts=4, top_k=2)
    w = mb.ExpertWeights.random(cfg, dtype=torch.float32, device=DEVICE)
    r = mb.make_routing(5, cfg, device=DEVICE)
    x = torch.randn(5, 37, device=DEVICE)
    with pytest.raises(ValueError, match=r"hf-grouped_mm: .*multiple of 16 bytes; D=37, F=24"):
        mb.moe_forward(x, r, w, impl="hf-grouped_mm")
    # Called directly (no moe_forward to refuse the dtype first): unavailable, in one line.
    with pytest.raises(mb.Unavailable, match=r"hf-grouped_mm: torch's grouped_mm takes no "):
        hf.grouped_mm(x.double(), r.ids, r.weights, w.gate_up.double(), w.down.double())


@pytest.mark.skipif(DEVICE == "cuda", reason="the refusals of a machine without CUDA")
@pytest.mark.parametrize("impl", CUDA_ONLY)
def test_cuda_only_backends_say_why_they_cannot_run(impl):
    x, r, w = make_case("odd", "random", torch.bfloat16)
    with pytest.raises(ValueError, match=f"impl '{impl}' runs on cuda, not cpu"):
        mb.moe_forward(x, r, w, impl=impl)
    forward = getattr(hf, impl.removeprefix("hf-"))
    # transformers' own loader names what is missing: the kernels package or CUDA.
    with pytest.raises(mb.Unavailable, match=rf"^{impl}: .*(CUDA|`kernels`)") as e:
        forward(x, r.ids, r.weights, w.gate_up, w.down)
    assert "\n" not in str(e.value)
