import hashlib
import math

import pytest
import torch

import moebench as mb

CFG = mb.MoEConfig(d_model=16, d_ff=16, num_experts=16, top_k=4)
SKEWS = ["balanced", "random", "zipf:1.2", "hot:0.5", "hot:0.1", "collapse"]


@pytest.mark.parametrize("skew", SKEWS)
def test_seed_reproduces_and_ids_are_distinct(skew):
    a = mb.make_routing(100, CFG, skew=skew, seed=7)
    b = mb.make_routing(100, CFG, skew=skew, seed=7)
    c = mb.make_routing(100, CFG, skew=skew, seed=8)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)
    assert a.ids.shape == (100, 4) and a.ids.dtype == torch.int64
    assert ((a.ids >= 0) & (a.ids < 16)).all()
    assert (a.ids.sort(-1).values.diff(dim=-1) > 0).all(), "a token picked an expert twice"
    assert torch.allclose(a.weights.sum(-1), torch.ones(100)) and (a.weights > 0).all()


def test_same_seed_same_routing_on_every_machine():
    # The CPU generator is the same everywhere; this digest was taken on the first machine
    # and catches any change to the synthetic routing that would break comparability.
    r = mb.make_routing(64, CFG, skew="zipf:1.2", seed=0)
    digest = hashlib.sha256(r.ids.numpy().tobytes() + r.weights.numpy().tobytes()).hexdigest()
    assert digest[:16] == "364690da444a67cc"


@pytest.mark.parametrize(("T", "E", "K"), [(64, 16, 4), (32, 8, 2), (48, 64, 8), (5, 16, 3)])
def test_balanced_spreads_pairs_evenly(T, E, K):
    cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=E, top_k=K)
    stats = mb.load_stats(mb.make_routing(T, cfg, skew="balanced", seed=1), E)
    counts = stats.tokens_per_expert
    assert counts.sum() == T * K
    assert counts.max() - counts.min() <= 1
    if T * K % E == 0:
        assert stats.max_over_mean == 1.0 and stats.cv == 0.0


def test_hot_gives_one_expert_its_share_of_the_pairs():
    cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=16, top_k=2)
    counts = mb.load_stats(mb.make_routing(1000, cfg, skew="hot:0.5", seed=0), 16).tokens_per_expert
    assert counts.max() == 1000 == counts.sum() // 2  # half of the 2000 pairs
    counts = mb.load_stats(mb.make_routing(1000, cfg, skew="hot:0.1", seed=0), 16).tokens_per_expert
    assert counts.max() == 200
    # With K=4 an expert can take at most one pair per token: hot:0.5 caps at T.
    counts = mb.load_stats(mb.make_routing(1000, CFG, skew="hot:0.5", seed=0), 16).tokens_per_expert
    assert counts.max() == 1000


def test_collapse_sends_every_token_to_the_same_experts():
    stats = mb.load_stats(mb.make_routing(50, CFG, skew="collapse", seed=3), 16)
    assert stats.empty_experts == 12 and sorted(stats.tokens_per_expert.tolist())[-4:] == [50] * 4


def test_zipf_popularity_falls_with_rank():
    cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=64, top_k=2)
    counts = mb.load_stats(mb.make_routing(4000, cfg, skew="zipf:1.2", seed=0), 64)
    ranked = counts.tokens_per_expert.sort(descending=True).values.double()
    assert counts.max_over_mean > 4
    assert ranked[:4].mean() > 4 * ranked[16:32].mean() > 0  # heavy head, thin tail
    random = mb.load_stats(mb.make_routing(4000, cfg, skew="random", seed=0), 64)
    assert 1.0 < random.max_over_mean < 1.5


@pytest.mark.parametrize("skew", ["zipf", "zipf:0", "hot:1.5", "hot:x", "uniform", "balanced:2"])
def test_unknown_or_bad_skew_is_named(skew):
    with pytest.raises(ValueError, match="skew"):
        mb.make_routing(8, CFG, skew=skew)


def test_route_softmax_renormalized():
    logits = torch.randn(32, 16)
    r = mb.route(logits, top_k=4)
    probs = logits.softmax(-1)
    assert torch.equal(r.ids, probs.topk(4).indices)
    assert torch.allclose(r.weights.sum(-1), torch.ones(32))
    assert torch.allclose(r.weights, probs.topk(4).values / probs.topk(4).values.sum(-1, True))


def test_route_sigmoid_bias_moves_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r = mb.route(logits, top_k=1, scoring="sigmoid", renormalize=False)
    assert r.ids.tolist() == [[0]] and torch.allclose(r.weights, torch.sigmoid(logits[:, :1]))
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    r = mb.route(logits, top_k=1, scoring="sigmoid", renormalize=False, bias_E=bias, scale=2.5)
    assert r.ids.tolist() == [[3]]
    assert torch.allclose(r.weights, 2.5 * torch.sigmoid(logits[:, 3:]))


def test_route_is_differentiable_and_checks_its_input():
    logits = torch.randn(8, 6, requires_grad=True)
    r = mb.route(logits, top_k=2)
    (r.weights * torch.arange(2.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="top_k"):
        mb.route(logits, top_k=7)
    with pytest.raises(ValueError, match="scoring"):
        mb.route(logits, top_k=2, scoring="relu")
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        mb.route(logits[0], top_k=2)
    for k in (2.0, True, "2"):
        with pytest.raises(TypeError, match="top_k must be an int"):
            mb.route(logits, top_k=k)
    with pytest.raises(
        ValueError, match=r"router bias must be a tensor \[E=6\], got <class 'list'>"
    ):
        mb.route(logits, top_k=2, bias_E=[0.0] * 6)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_refuses_nan_logits_and_non_finite_weights(scoring):
    logits = torch.randn(8, 6)
    logits[5, 2] = math.nan
    with pytest.raises(ValueError, match="router logits contain NaN: 1 of 48"):
        mb.route(logits, top_k=2, scoring=scoring)
    logits[5, 2] = math.inf
    with pytest.raises(ValueError, match="non-finite routing weights"):
        mb.route(logits, top_k=2, scoring=scoring, scale=1.0 if scoring == "softmax" else math.inf)
    with pytest.raises(ValueError, match="router logits contain NaN"):
        mb.load_balancing_loss(torch.full((8, 6), math.nan), torch.zeros(8, 2, dtype=torch.long))
    # -inf masks experts out (as group-limited routing does): that stays a valid routing.
    logits[5, 2] = -math.inf
    r = mb.route(logits, top_k=2, scoring=scoring)
    assert torch.isfinite(r.weights).all() and 2 not in r.ids[5].tolist()
    assert mb.route(torch.empty(0, 6), top_k=2).ids.shape == (0, 2)


def test_load_balancing_loss():
    T, E = 64, 8
    uniform = torch.zeros(T, E)
    balanced = mb.make_routing(T, mb.MoEConfig(8, 8, E, 2), skew="balanced").ids
    assert mb.load_balancing_loss(uniform, balanced).item() == pytest.approx(1.0)
    skewed = torch.zeros(T, E)
    skewed[:, 0] = 5.0
    collapsed = torch.zeros(T, 1, dtype=torch.long)
    assert mb.load_balancing_loss(skewed, collapsed) > 4.0
    logits = torch.randn(T, E, requires_grad=True)
    mb.load_balancing_loss(logits, mb.route(logits, 2).ids).backward()
    assert logits.grad.abs().sum() > 0


LONG = torch.long


@pytest.mark.parametrize(
    ("logits", "ids", "message"),
    [
        (torch.randn(3, 4), torch.zeros(7, 2, dtype=LONG), r"ids must be a tensor \[T=3, K\]"),
        (torch.randn(3, 4), torch.full((3, 2), 4), r"ids must be in \[0, 4\), got ids in \[4, 4\]"),
        (torch.randn(3, 4), torch.full((3, 2), -1), r"expert ids must be in \[0, 4\)"),
        (torch.randn(3, 4), torch.zeros(3, 2), "ids must be an integer tensor"),
        (torch.randn(4), torch.zeros(4, 2, dtype=LONG), r"logits must be a tensor \[T, E\]"),
        (torch.randn(0, 4), torch.zeros(0, 2, dtype=LONG), "at least one token"),
    ],
    ids=["tokens", "id-too-large", "id-negative", "float-ids", "1-d-logits", "no-tokens"],
)
def test_load_balancing_loss_names_bad_input(logits, ids, message):
    with pytest.raises(ValueError, match=message):
        mb.load_balancing_loss(logits, ids)


def test_routing_checks_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        mb.Routing(torch.zeros(4, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        mb.Routing(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="integer"):
        mb.Routing(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="float"):
        mb.Routing(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 4\)"):
        mb.load_stats(mb.Routing(torch.full((2, 1), 4), torch.ones(2, 1)), 4)
    with pytest.raises(ValueError, match=r"an empty routing \(T=0\) has no expert load"):
        mb.load_stats(mb.Routing(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)), 4)


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    cfg = mb.MoEConfig(8, 8, 4, 2)
    r = mb.make_routing(np.int64(6), cfg, seed=np.int64(3))
    assert torch.equal(r.ids, mb.make_routing(6, cfg, seed=3).ids)
    assert mb.route(torch.randn(6, 4), np.int64(2)).ids.shape == (6, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_tokens": True}, ValueError, "num_tokens must be a positive int, got True"),
        ({"seed": 1.5}, ValueError, r"seed must be an int in \[0, 2\*\*63\), got 1.5"),
        ({"seed": 2**70}, ValueError, "seed must be an int"),
        ({"skew": None}, ValueError, "skew must be a string such as 'zipf:1.2', got None"),
        ({"cfg": "mixtral-8x7b"}, TypeError, "cfg must be a moebench.MoEConfig, got str"),
    ],
    ids=["bool-tokens", "float-seed", "huge-seed", "no-skew", "preset-name"],
)
def test_make_routing_names_bad_arguments(kwargs, error, message):
    args = {"num_tokens": 4, "cfg": mb.MoEConfig(8, 8, 4, 2), **kwargs}
    with pytest.raises(error, match=message):
        mb.make_routing(**args)


def test_unlimited_make_routing_is_unchanged():
    # Taken with make_routing as it was before n_group/topk_group: without a limit every
    # skew must give the same routing, so runs stay comparable across commits.
    digest = hashlib.sha256()
    for E, K in [(16, 4), (64, 8), (8, 2)]:
        cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=E, top_k=K)
        for skew in ["balanced", "random", "zipf:1.2", "hot:0.3", "collapse"]:
            for seed in [0, 5]:
                r = mb.make_routing(37, cfg, skew=skew, seed=seed)
                digest.update(r.ids.numpy().tobytes() + r.weights.numpy().tobytes())
    assert digest.hexdigest() == "f05b375c33a1e9b0e268ed9805fc2db8eb1fa769b2deb6b67cdc63d1550548c9"


def groups_per_token(ids, group_size, n_group):
    """How many groups of group_size contiguous ids each token's ids touch."""
    touched = torch.zeros(ids.shape[0], n_group, dtype=torch.bool)
    return touched.scatter_(1, ids // group_size, True).sum(1)


def distinct(ids):
    return bool((ids.sort(-1).values.diff(dim=-1) > 0).all())


# (E, K, n_group, topk_group): DeepSeek-V3's 256/8/8/4 shape scaled down, one group per
# token, a limit that K fills exactly, groups of one expert, a limit that divides nothing.
LIMITS = [(64, 8, 8, 4), (16, 3, 4, 1), (16, 4, 4, 1), (8, 3, 8, 3), (12, 7, 3, 2)]


@pytest.mark.parametrize(("E", "K", "G", "M"), LIMITS)
@pytest.mark.parametrize("skew", SKEWS)
def test_make_routing_keeps_each_token_within_topk_group_groups(skew, E, K, G, M):
    cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=E, top_k=K)
    r = mb.make_routing(200, cfg, skew=skew, seed=3, n_group=G, topk_group=M)
    assert r.ids.shape == (200, K) and distinct(r.ids)
    assert groups_per_token(r.ids, E // G, G).max() <= M
    assert torch.allclose(r.weights.sum(-1), torch.ones(200))
    assert torch.equal(r.ids, mb.make_routing(200, cfg, skew, 3, n_group=G, topk_group=M).ids)


@pytest.mark.parametrize("skew", ["random", "zipf:1.2", "hot:0.3"])
def test_make_routing_limit_of_every_group_changes_nothing(skew):
    unlimited = mb.make_routing(300, CFG, skew=skew, seed=4)
    limited = mb.make_routing(300, CFG, skew=skew, seed=4, n_group=4, topk_group=4)
    assert torch.equal(unlimited.ids, limited.ids)


def test_make_routing_limit_binds():
    # Unlimited random routing of 4 of 16 experts spreads over more than one group of 4.
    cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=16, top_k=4)
    assert groups_per_token(mb.make_routing(100, cfg, seed=1).ids, 4, 4).max() > 1
    limited = mb.make_routing(100, cfg, seed=1, n_group=4, topk_group=1).ids
    assert (groups_per_token(limited, 4, 4) == 1).all()
    # collapse: 6 experts in groups of 4 take 2 groups, the fewest possible.
    cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=16, top_k=6)
    collapsed = mb.make_routing(10, cfg, "collapse", seed=2, n_group=4, topk_group=3).ids
    assert (collapsed == collapsed[0]).all() and groups_per_token(collapsed, 4, 4).max() == 2


@pytest.mark.parametrize(
    ("E", "K", "G", "M", "p", "tokens"),
    [
        (16, 2, 4, 1, 0.1, 200),
        (16, 2, 4, 1, 0.5, 1000),  # capped at T
        (16, 4, 4, 1, 0.1, 400),  # K fills the one kept group: the hot group is avoided whole
        (16, 4, 4, 1, 0.05, 200),
        (64, 8, 8, 4, 0.02, 160),
        (12, 7, 3, 2, 0.05, 350),
    ],
)
def test_hot_expert_keeps_its_tokens_under_a_limit(E, K, G, M, p, tokens):
    cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=E, top_k=K)
    limited = mb.make_routing(1000, cfg, skew=f"hot:{p}", seed=0, n_group=G, topk_group=M)
    unlimited = mb.make_routing(1000, cfg, skew=f"hot:{p}", seed=0)
    hot = int(torch.randperm(E, generator=torch.Generator().manual_seed(0))[0])  # rank 0's id
    assert int((limited.ids == hot).sum()) == tokens
    assert torch.equal((limited.ids == hot).any(1), (unlimited.ids == hot).any(1))


def balanced_bound(E, K, G, M):
    """make_routing's documented guarantee for balanced with a group limit."""
    g = E // G
    if M == G or K + g - math.gcd(K, g) <= M * g:
        return 1
    return 2 * M // math.gcd(G, M)


def test_balanced_under_a_limit_spreads_pairs_as_documented():
    for G in range(1, 6):
        for g in range(1, 5):
            for M in range(1, G + 1):
                for K in range(1, M * g + 1):
                    cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=G * g, top_k=K)
                    for T in (5, 13, 40):
                        r = mb.make_routing(T, cfg, "balanced", seed=T, n_group=G, topk_group=M)
                        counts = torch.bincount(r.ids.flatten(), minlength=G * g)
                        assert distinct(r.ids) and groups_per_token(r.ids, g, G).max() <= M
                        spread = int(counts.max() - counts.min())
                        assert spread <= balanced_bound(G * g, K, G, M), (G, g, M, K, T)


@pytest.mark.parametrize(
    ("E", "K", "G", "M", "T", "spread"),
    [
        (256, 8, 8, 4, 1000, 1),  # DeepSeek-V3's shape; S/E = 31.25
        (256, 8, 8, 4, 1024, 0),
        (64, 8, 8, 1, 40, 0),  # g divides K: whole groups
        (16, 3, 4, 1, 5, 2),  # 15 pairs in threes within groups of 4: 1 each is impossible
        (16, 3, 4, 1, 64, 0),
    ],
)
def test_balanced_under_a_limit_exact_cases(E, K, G, M, T, spread):
    cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=E, top_k=K)
    counts = mb.load_stats(
        mb.make_routing(T, cfg, "balanced", seed=1, n_group=G, topk_group=M), E
    ).tokens_per_expert
    assert int(counts.max() - counts.min()) == spread and counts.sum() == T * K


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("E", "K", "G", "M"), LIMITS)
def test_route_keeps_each_token_within_topk_group_groups(E, K, G, M, scoring, with_bias):
    logits = torch.randn(64, E, generator=torch.Generator().manual_seed(E + K))
    bias = torch.linspace(-0.5, 0.5, E) if with_bias else None
    limited = mb.route(logits, K, scoring=scoring, bias_E=bias, n_group=G, topk_group=M)
    assert distinct(limited.ids) and groups_per_token(limited.ids, E // G, G).max() <= M
    assert torch.allclose(limited.weights.sum(-1), torch.ones(64))
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    assert torch.allclose(
        limited.weights, scores.gather(1, limited.ids) / scores.gather(1, limited.ids).sum(-1, True)
    )
    every = mb.route(logits, K, scoring=scoring, bias_E=bias, n_group=G, topk_group=G)
    unlimited = mb.route(logits, K, scoring=scoring, bias_E=bias)
    assert torch.equal(every.ids, unlimited.ids) and torch.equal(every.weights, unlimited.weights)


def test_route_group_limit_picks_the_best_groups():
    # Groups {0,1} {2,3} {4,5} {6,7}. Experts 0 and 2 score best alone, but the groups'
    # top-2 sums rank group 3 first (0.953 + 0.948), then group 0 (0.982 + 0.018).
    logits = torch.tensor([[4.0, -4.0, 3.5, -4.0, -4.0, -4.0, 3.0, 2.9]])
    kw = {"scoring": "sigmoid", "renormalize": False}
    assert mb.route(logits, 2, **kw).ids.tolist() == [[0, 2]]
    assert mb.route(logits, 2, **kw, n_group=4, topk_group=1).ids.tolist() == [[6, 7]]
    assert mb.route(logits, 2, **kw, n_group=4, topk_group=2).ids.tolist() == [[0, 6]]
    # The bias chooses the group (expert 3's +2 lifts group 1), the weights stay unbiased.
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    r = mb.route(logits, 2, **kw, bias_E=bias, n_group=4, topk_group=1)
    assert r.ids.tolist() == [[3, 2]] and torch.allclose(r.weights, logits[:, [3, 2]].sigmoid())
    # Biased scores below 0 still beat the masked experts (a mask of 0, as transformers'
    # DeepseekV3TopkRouter uses, would pick masked experts here).
    r = mb.route(logits, 2, **kw, bias_E=torch.full((8,), -1.0), n_group=4, topk_group=1)
    assert r.ids.tolist() == [[6, 7]]
    # Groups of one expert score by their top-1: the limit is then plain top-k.
    assert torch.equal(
        mb.route(logits, 2, **kw, n_group=8, topk_group=2).ids, mb.route(logits, 2, **kw).ids
    )


def test_route_group_limit_is_differentiable_and_takes_no_tokens():
    logits = torch.randn(8, 16, requires_grad=True)
    r = mb.route(logits, top_k=4, n_group=4, topk_group=2)
    (r.weights * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert mb.route(torch.empty(0, 16), 4, n_group=4, topk_group=2).ids.shape == (0, 4)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"n_group": 4}, "n_group and topk_group go together: got n_group=4, topk_group=None"),
        ({"topk_group": 2}, "n_group and topk_group go together: got n_group=None, topk_group=2"),
        ({"n_group": 3, "topk_group": 1}, "n_group=3 must be a positive int dividing E=16"),
        ({"n_group": 0, "topk_group": 1}, "n_group=0 must be a positive int dividing E=16"),
        ({"n_group": 4.0, "topk_group": 1}, "n_group=4.0 must be a positive int dividing E=16"),
        ({"n_group": 4, "topk_group": 0}, r"topk_group=0 must be an int in \[1, n_group=4\]"),
        ({"n_group": 4, "topk_group": 5}, r"topk_group=5 must be an int in \[1, n_group=4\]"),
        ({"n_group": 4, "topk_group": True}, r"topk_group=True must be an int in \[1, n_group"),
        (
            {"n_group": 8, "topk_group": 2},
            "top_k=6 exceeds the 4 experts that topk_group=2 groups of E/n_group=2 hold",
        ),
    ],
    ids=[
        "no-topk_group",
        "no-n_group",
        "not-dividing",
        "zero",
        "float",
        "no-group",
        "too-many-groups",
        "bool",
        "too-few-experts",
    ],
)
def test_group_limit_names_bad_arguments(groups, message):
    cfg = mb.MoEConfig(d_model=8, d_ff=8, num_experts=16, top_k=6)
    with pytest.raises(ValueError, match=message):
        mb.make_routing(8, cfg, **groups)
    # Checked before the logits: these NaN logits would raise their own error after.
    with pytest.raises(ValueError, match=message):
        mb.route(torch.full((4, 16), math.nan), 6, **groups)
