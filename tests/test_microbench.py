"""Micro-benchmarks of the steps around the expert GEMMs: routing and permutation.

T tokens, E experts, K experts per token, S = T*K token-expert pairs.
Under pytest's default `--benchmark-disable` each body runs once, as a plain test of its
result. `nox -s microbench` (`moebench regress --micro`) times them with pytest-benchmark
in a baseline revision and the working tree in turn, counts their instructions under
callgrind, and gates both as the layer gate does.
"""

import pytest
import torch

import moebench as mb
from moebench.impls.padded import slots

T = 2048
CFG = mb.MoEConfig(d_model=64, d_ff=32, num_experts=128, top_k=8)


@pytest.fixture(scope="module")
def ids_TK():
    return mb.make_routing(T, CFG, skew="zipf:1.2", seed=0).ids


@pytest.mark.parametrize("skew", ["balanced", "random", "zipf:1.2", "hot:0.5"])
def test_make_routing(benchmark, skew):
    r = benchmark(mb.make_routing, T, CFG, skew=skew, seed=0)
    assert r.ids.shape == (T, CFG.top_k)
    assert (r.ids.sort(-1).values.diff(dim=-1) > 0).all(), "a token's K experts are distinct"


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route(benchmark, scoring):
    logits_TE = torch.randn(T, CFG.num_experts, generator=torch.Generator().manual_seed(0))
    r = benchmark(mb.route, logits_TE, top_k=CFG.top_k, scoring=scoring)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(T))


def test_sort_pairs_by_expert(benchmark, ids_TK):
    """The sorted layer's permutation: pair order by expert and each expert's segment end."""

    def permute(ids_TK):
        ids_S = ids_TK.flatten()
        order_S = torch.argsort(ids_S, stable=True)
        return order_S, torch.bincount(ids_S, minlength=CFG.num_experts).cumsum(0)

    order_S, ends_E = benchmark(permute, ids_TK)
    counts_E = ends_E.diff(prepend=ends_E.new_zeros(1))
    expected_S = torch.arange(CFG.num_experts).repeat_interleave(counts_E)
    assert torch.equal(ids_TK.flatten()[order_S], expected_S)


def test_capacity_slots(benchmark, ids_TK):
    """The padded layer's slot of each pair within its expert, in token order."""
    slot_S, counts_E = benchmark(slots, ids_TK, CFG.num_experts)
    ids_S = ids_TK.flatten()
    row_S = ids_S * T * CFG.top_k + slot_S
    assert row_S.unique().numel() == ids_S.numel(), "two pairs share a slot"
    assert (slot_S < counts_E[ids_S]).all()


def test_load_stats(benchmark, ids_TK):
    stats = benchmark(mb.load_stats, mb.Routing(ids_TK, torch.ones(ids_TK.shape)), CFG.num_experts)
    assert stats.tokens_per_expert.sum() == ids_TK.numel() and stats.max_over_mean > 1
