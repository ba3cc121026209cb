"""vLLM's fused_experts (the `vllm` peer): refused with its reason where vLLM is missing,
its layout mapping checked here against a pure-torch stand-in, and the real kernel checked
against the float64 oracle where vLLM and a GPU are."""

import importlib.util

import pytest
import torch

import moebench as mb
from moebench.bench.grid import SKEWS
from moebench.bench.oracle import tolerance
from moebench.peers import vllm as vllm_peer

HAS_VLLM = importlib.util.find_spec("vllm") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (37, 44, 20, 6, 3)  # T, D, F, E, K: no multiple of any block size


def make_case(skew, dtype, seed, ids=torch.int64, device=DEVICE):
    T, D, F, E, K = SHAPE
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    w = mb.ExpertWeights.random(cfg, dtype=dtype, device=device, seed=seed)
    r = mb.make_routing(T, cfg, skew=skew, seed=seed, device=device)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(T, D, generator=gen, device=device).to(dtype)
    return x, mb.Routing(r.ids.to(ids), r.weights), w


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def silu_and_mul(h):
    N = h.shape[-1] // 2
    return torch.nn.functional.silu(h[..., :N]) * h[..., N:]


def fused_experts_standin(hidden_states, w1, w2, topk_weights, topk_ids):
    """vLLM's unquantized SiLU fused_experts from its semantics: the asserts fused_experts_impl
    makes and the dtypes its router hands it, then its tests' torch_moe reference (per expert:
    silu_and_mul(x @ w1[e].T) @ w2[e].T with silu_and_mul(h) = silu(h[:N]) * h[N:], weighted
    by topk_weights and summed over the K slots)."""
    assert hidden_states.is_contiguous(), "Hidden_states must be contiguous"
    assert w1.stride(-1) == 1 and w2.stride(-1) == 1, "Stride of last dimension must be 1"
    assert hidden_states.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert topk_ids.dtype == torch.int32 and topk_weights.dtype == torch.float32
    assert topk_ids.is_contiguous() and topk_weights.is_contiguous()
    assert topk_weights.shape == topk_ids.shape
    T, D = hidden_states.shape
    E, N2, _ = w1.shape
    assert w1.shape[2] == D and w2.shape == (E, D, N2 // 2)
    K = topk_ids.shape[1]
    x_SD = hidden_states.float().repeat_interleave(K, dim=0)  # row t*K + j: pair (t, j)
    ids_S = topk_ids.flatten()
    out_SD = torch.zeros_like(x_SD)
    for e in range(E):
        mask = ids_S == e
        h = x_SD[mask] @ w1[e].float().T
        out_SD[mask] = silu_and_mul(h) @ w2[e].float().T
    out_TKD = out_SD.view(T, K, D)
    return (out_TKD * topk_weights[..., None]).sum(dim=1).to(hidden_states.dtype)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_without_vllm_it_is_unavailable_and_says_why():
    x, r, w = make_case("random", torch.bfloat16, seed=0)
    with pytest.raises(mb.Unavailable, match="vllm"):
        mb.moe_forward(x, r, w, impl="vllm")


@pytest.mark.parametrize("ids", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("skew", SKEWS)
def test_layout_mapping_reproduces_the_reference(skew, ids):
    x, r, w = make_case(skew, torch.float32, seed=SKEWS.index(skew), ids=ids, device="cpu")
    y = vllm_peer.call(fused_experts_standin, x, r.ids, r.weights, w.gate_up, w.down)
    assert rel_err(y, mb.reference(x, r, w)) < tolerance(torch.float32)


def test_mapping_copies_no_weights_and_makes_the_rest_what_vllm_asserts():
    x, r, w = make_case("random", torch.float16, seed=1, device="cpu")
    # Every other token, the routing column-major: strided views, as a caller may hand them.
    column_major = lambda t: t.T.contiguous().T[::2]
    x_TD, ids_TK, weights_TK = x[::2], column_major(r.ids), column_major(r.weights)
    assert not any(t.is_contiguous() for t in (x_TD, ids_TK, weights_TK))
    args = vllm_peer.arguments(x_TD, ids_TK, weights_TK, w.gate_up, w.down)
    assert args[1] is w.gate_up and args[2] is w.down
    y = fused_experts_standin(*args)  # its asserts are vLLM's
    routing = mb.Routing(ids_TK.contiguous(), weights_TK.contiguous())
    assert rel_err(y, mb.reference(x_TD, routing, w)) < tolerance(torch.float16)


@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vllm and CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("skew", SKEWS)
def test_vllm_matches_float64_reference_on_a_gpu(skew, dtype):
    x, r, w = make_case(skew, dtype, seed=SKEWS.index(skew), ids=torch.int32)
    y = mb.moe_forward(x, r, w, impl="vllm", out=torch.full_like(x, torch.nan))
    assert torch.isfinite(y).all()
    assert rel_err(y, mb.reference(x, r, w)) < tolerance(dtype)
