"""A small MoE block trains with every implementation; the aux loss prevents collapse."""

import pytest
import torch

import moebench as mb
from moebench import registry

D, F, E, K, T = 16, 32, 8, 2, 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def train(impl, aux_coef, steps, seed=0):
    """Fit tanh(x @ teacher) with a router that starts collapsed onto experts 0 and 1.

    Returns (mean loss of the first 10 steps, of the last 10, max/mean expert load after).
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = mb.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    w = mb.ExpertWeights.random(cfg, dtype=torch.float32, device=DEVICE, seed=seed)
    # Drawn on the CPU generator, then moved: the same draws on every device.
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE)
    shift = randn(D)
    shift = 2 * shift / shift.norm()  # token features share a direction ...
    router = 0.01 * randn(E, D)
    router[:2] += shift  # ... that the router's experts 0 and 1 already favour
    teacher = randn(D, D) / D**0.5
    params = [router, w.gate_up, w.down]
    for p in params:
        p.requires_grad_()
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        x = randn(T, D) + shift
        logits = x @ router.T
        r = mb.route(logits, K, renormalize=False)
        loss = (mb.moe_forward(x, r, w, impl=impl) - torch.tanh(x @ teacher)).pow(2).mean()
        opt.zero_grad()
        (loss + aux_coef * mb.load_balancing_loss(logits, r.ids)).backward()
        opt.step()
        losses.append(loss.item())
    x = randn(4096, D) + shift
    with torch.no_grad():
        load = mb.load_stats(mb.route(x @ router.T, K), E).max_over_mean
    return sum(losses[:10]) / 10, sum(losses[-10:]) / 10, load


@pytest.mark.parametrize("impl", registry.OWN)
def test_loss_falls_with_every_implementation(impl):
    steps = 60 if impl == "triton" and not torch.cuda.is_available() else 200
    first, last, _ = train(impl, aux_coef=0.1, steps=steps)
    assert last < 0.5 * first


def test_aux_loss_keeps_experts_balanced_where_training_without_it_collapses():
    _, _, collapsed = train("sorted", aux_coef=0.0, steps=200)
    _, _, balanced = train("sorted", aux_coef=0.1, steps=200)
    assert collapsed > 3.5  # E/K = 4 is total collapse onto K experts
    assert balanced < 2.0
