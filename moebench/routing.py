"""Routing: a real top-k router, its load-balancing loss, and seeded synthetic skews.

T tokens, E experts, K experts per token, S = T*K token-expert pairs; group-limited routing
splits the experts into G = n_group groups of g = E/G contiguous ids and keeps each token's K
within M = topk_group of them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .config import SCORINGS, MoEConfig

SKEWS = ("balanced", "random", "zipf:<s>", "hot:<p>", "collapse")


@dataclasses.dataclass(frozen=True)  # checked once, here: a field cannot change after
class Routing:
    """Which K experts each token goes to, and with what weight."""

    ids: torch.Tensor  # [T, K] integer expert ids
    weights: torch.Tensor  # [T, K] float routing weights

    def __post_init__(self):
        ids, weights = self.ids, self.weights
        if not isinstance(ids, torch.Tensor) or not isinstance(weights, torch.Tensor):
            raise TypeError("Routing.ids and Routing.weights must be tensors")
        if ids.dim() != 2:
            raise ValueError(f"Routing.ids must be [T, K], got shape {tuple(ids.shape)}")
        if weights.shape != ids.shape:
            raise ValueError(
                f"Routing.weights shape {tuple(weights.shape)} != ids shape {tuple(ids.shape)}"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"Routing.ids must be an integer tensor, got {ids.dtype}")
        if not weights.dtype.is_floating_point:
            raise ValueError(f"Routing.weights must be a float tensor, got {weights.dtype}")
        if ids.device != weights.device:
            raise ValueError(
                f"Routing.ids on {ids.device} and Routing.weights on {weights.device} differ"
            )

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]

    def to(self, device) -> Routing:
        return Routing(self.ids.to(device), self.weights.to(device))


def route(
    logits_TE: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    bias_E: torch.Tensor | None = None,
    scale: float = 1.0,
    n_group: int | None = None,
    topk_group: int | None = None,
) -> Routing:
    """Top-k routing from router logits.

    scoring "softmax" (Mixtral, Qwen) or "sigmoid" (DeepSeek-V3, Llama 4). `bias_E`, as in
    DeepSeek-V3's aux-loss-free balancing, shifts which experts are selected but not their
    weights. `renormalize` rescales each token's K weights to sum to 1; `scale` multiplies
    them afterwards (DeepSeek-V3's routed scaling factor). Differentiable in `logits_TE`.

    `n_group`, `topk_group` (given together; DeepSeek-V3's config fields): group-limited
    (node- or device-limited) routing. The E experts form G = n_group groups of g = E/G
    contiguous ids; a group scores the sum of its top-2 selection scores (scores + bias_E;
    its top-1 when g = 1), each token keeps its M = topk_group best groups, and its K experts
    are the top-k of the kept groups' experts, so a token reaches at most M groups (ranks or
    nodes under expert parallelism). This follows transformers' DeepseekV3TopkRouter
    (get_topk_indices), except that the other groups' experts are masked with -inf, as in
    vLLM's grouped_topk and DeepSeek-V3's inference/model.py, rather than transformers' 0:
    a biased score below 0 would lose to a masked expert's 0. (Without a bias those two
    score a group by its best expert alone, DeepSeek-V2's rule; here it is always the top-2.)
    """
    _check_logits(logits_TE)
    num_experts = logits_TE.shape[1]
    if not _is_int(top_k):
        raise TypeError(f"top_k must be an int, got {top_k!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, E={num_experts}]")
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; known: {SCORINGS}")
    _check_groups(n_group, topk_group, num_experts, top_k)
    scores_TE = (
        logits_TE.float().softmax(-1) if scoring == "softmax" else logits_TE.float().sigmoid()
    )
    choice_TE = scores_TE
    if bias_E is not None:
        if not isinstance(bias_E, torch.Tensor) or bias_E.shape != (num_experts,):
            shape = tuple(bias_E.shape) if isinstance(bias_E, torch.Tensor) else type(bias_E)
            raise ValueError(f"router bias must be a tensor [E={num_experts}], got {shape}")
        choice_TE = scores_TE + bias_E.to(scores_TE)
    if n_group is not None:
        choice_TE = _keep_best_groups(choice_TE, n_group, topk_group)
    ids_TK = choice_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(-1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    weights_TK = weights_TK * scale
    if logits_TE.numel():
        # One host sync: NaN logits would pick experts by an unordered topk, and a +inf
        # logit (or a bias or scale that overflows) gives NaN or inf weights.
        nan, bad = torch.stack([logits_TE.isnan().sum(), (~weights_TK.isfinite()).sum()]).tolist()
        if nan:
            raise ValueError(f"router logits contain NaN: {nan} of {logits_TE.numel()}")
        if bad:
            raise ValueError(
                f"router logits give {bad} non-finite routing weights of {weights_TK.numel()} "
                "(a logit, bias or scale of inf, or a token whose logits are all -inf?)"
            )
    return Routing(ids_TK, weights_TK)


def load_balancing_loss(logits_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_e f_e * P_e; 1.0 when perfectly balanced.

    f_e is the fraction of token-expert pairs sent to expert e (not differentiable), P_e the
    mean router probability of e (differentiable). Multiply by a small coefficient (0.01 in
    Switch) and add to the training loss.
    """
    _check_logits(logits_TE)
    T, num_experts = logits_TE.shape
    if not isinstance(ids_TK, torch.Tensor) or ids_TK.dim() != 2 or ids_TK.shape[0] != T:
        shape = tuple(ids_TK.shape) if isinstance(ids_TK, torch.Tensor) else type(ids_TK).__name__
        raise ValueError(f"ids must be a tensor [T={T}, K] (Routing.ids), got {shape}")
    if ids_TK.dtype.is_floating_point or ids_TK.dtype.is_complex or ids_TK.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids_TK.dtype}")
    if T == 0:
        raise ValueError("the load-balancing loss needs at least one token, got T=0")
    lo, hi, nan = torch.stack([ids_TK.min(), ids_TK.max(), logits_TE.isnan().sum()]).tolist()
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"expert ids must be in [0, {num_experts}), got ids in [{lo}, {hi}]")
    if nan:
        raise ValueError(f"router logits contain NaN: {nan} of {logits_TE.numel()}")
    probs_E = logits_TE.float().softmax(-1).mean(0)
    counts_E = torch.bincount(ids_TK.flatten(), minlength=num_experts).to(probs_E)
    return num_experts * (counts_E / ids_TK.numel() * probs_E).sum()


def _is_int(value) -> bool:
    """An int or a numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_groups(n_group, topk_group, num_experts: int, top_k: int) -> None:
    if (n_group is None) != (topk_group is None):
        raise ValueError(
            f"n_group and topk_group go together: got n_group={n_group!r}, "
            f"topk_group={topk_group!r}"
        )
    if n_group is None:
        return
    if not _is_int(n_group) or n_group <= 0 or num_experts % n_group:
        raise ValueError(f"n_group={n_group!r} must be a positive int dividing E={num_experts}")
    if not _is_int(topk_group) or not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group!r} must be an int in [1, n_group={n_group}]")
    reachable = topk_group * (num_experts // n_group)
    if top_k > reachable:
        raise ValueError(
            f"top_k={top_k} exceeds the {reachable} experts that topk_group={topk_group} "
            f"groups of E/n_group={num_experts // n_group} hold"
        )


def _keep_best_groups(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """choice_TE with the experts outside each token's topk_group best groups set to -inf."""
    T, num_experts = choice_TE.shape
    choice_TGg = choice_TE.reshape(T, n_group, num_experts // n_group)
    # A group's score: its two best experts' (one's, for a group of one), as DeepSeek-V3's.
    group_TG = choice_TGg.topk(min(2, choice_TGg.shape[-1]), dim=-1).values.sum(-1)
    best_TM = group_TG.topk(topk_group, dim=-1).indices
    kept_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_TM, True)
    return choice_TGg.masked_fill(~kept_TG[..., None], -math.inf).reshape(T, num_experts)


def _check_logits(logits_TE) -> None:
    if not isinstance(logits_TE, torch.Tensor) or logits_TE.dim() != 2:
        shape = tuple(logits_TE.shape) if isinstance(logits_TE, torch.Tensor) else None
        what = f"shape {shape}" if shape is not None else type(logits_TE).__name__
        raise ValueError(f"router logits must be a tensor [T, E], got {what}")


def _parse_skew(skew: str) -> tuple[str, float | None]:
    if not isinstance(skew, str):
        raise ValueError(f"skew must be a string such as 'zipf:1.2', got {skew!r}")
    kind, _, arg = skew.partition(":")
    if kind in ("balanced", "random", "collapse") and not arg:
        return kind, None
    if kind in ("zipf", "hot") and arg:
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        if kind == "zipf" and value > 0:
            return kind, value
        if kind == "hot" and 0 <= value <= 1:
            return kind, value
        bounds = "s > 0" if kind == "zipf" else "0 <= p <= 1"
        raise ValueError(f"skew {skew!r}: {kind} needs a number with {bounds}")
    raise ValueError(f"unknown skew {skew!r}; known: {', '.join(SKEWS)}")


def make_routing(
    num_tokens: int,
    cfg: MoEConfig,
    skew: str = "random",
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    n_group: int | None = None,
    topk_group: int | None = None,
) -> Routing:
    """Seeded synthetic routing with distinct ids per token; the same on every machine.

    - balanced: every expert gets S/E pairs (counts differ by at most 1 when E does not divide S)
    - random: top-k of Gaussian logits, the fluctuation of an untrained router
    - zipf:<s>: expert popularity ~ 1/rank^s (K distinct draws per token, Gumbel top-k)
    - hot:<p>: one expert gets round(p*S) pairs, capped at T since a token picks an expert
      once (so for K > 1/p every token picks it); the rest spread at random
    - collapse: every token goes to the same K experts
    Expert labels are shuffled by the seed, so the hot or popular experts are not always 0.
    Weights are a softmax of Gaussian logits over each token's K slots (renormalized routing).

    `n_group`, `topk_group` (given together, as in `route`): the ids form G = n_group groups
    of g = E/G contiguous ids, and each token's K ids lie in at most M = topk_group groups.
    - random, zipf, hot: the top-k of each token's scores (by expert id) within the M groups
      `route` would keep for them; hot's expert goes to the same tokens as without a limit
    - collapse: K experts from the fewest groups
    - balanced: the experts are walked group by group. Counts still differ by at most 1 when
      any K consecutive experts of the walk lie in M groups: M = G or K + g - gcd(K, g) <= M*g
      (so whenever g divides K, and for DeepSeek-V3's 8 of 256 in 4 of 8 groups). Under a tighter
      limit, where a difference of 1 can be impossible (E=16, G=4, M=1, K=3, T=5), counts
      differ by at most 2*M/gcd(G, M), so 2 when M divides G.
    Without a limit the routing is the one make_routing gave before the limit existed.
    """
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"cfg must be a moebench.MoEConfig, got {type(cfg).__name__}")
    kind, arg = _parse_skew(skew)
    if not _is_int(num_tokens) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    T, E, K = int(num_tokens), cfg.num_experts, cfg.top_k
    _check_groups(n_group, topk_group, E, K)
    gen = torch.Generator().manual_seed(int(seed))
    label_E = torch.randperm(E, generator=gen)  # rank -> expert id
    if kind in ("balanced", "collapse"):
        if n_group is not None:
            # Relabel so that each run of g ranks is one group: consecutive ranks then span
            # the fewest groups.
            label_E = _group_by_group(label_E, E // n_group)
        if kind == "balanced":
            rank_TK = _balanced_ranks(T, E, K, n_group, topk_group)
            rank_TK = rank_TK[torch.randperm(T, generator=gen)]
        else:
            rank_TK = torch.arange(K).expand(T, K)
        ids_TK = label_E[rank_TK]
    else:
        if kind == "zipf":
            uniform_TE = torch.rand(T, E, generator=gen).clamp_min(1e-20)
            log_pop_E = -arg * torch.arange(1, E + 1, dtype=torch.float64).log().float()
            score_TE = log_pop_E - torch.log(-torch.log(uniform_TE))  # + Gumbel noise
        else:
            score_TE = torch.randn(T, E, generator=gen)
        if kind == "hot":
            hot_tokens = min(round(arg * T * K), T)
            picks_hot_T = torch.randperm(T, generator=gen) < hot_tokens
            score_TE[:, 0] = torch.where(picks_hot_T, math.inf, -math.inf)
        if n_group is None:
            ids_TK = label_E[score_TE.topk(K, dim=-1).indices]
        else:
            score_TE = score_TE[:, label_E.argsort()]  # rank space -> expert-id space
            g = E // n_group
            if kind == "hot" and topk_group * g == K:
                # Every kept group is then picked whole: a token that must not pick the hot
                # expert must not keep its group either (its -inf would tie the masked ones').
                first = int(label_E[0]) // g * g  # the hot expert's group's first id
                score_TE[~picks_hot_T, first : first + g] = -math.inf
            ids_TK = _keep_best_groups(score_TE, n_group, topk_group).topk(K, dim=-1).indices
    weights_TK = torch.randn(T, K, generator=gen).softmax(-1)
    return Routing(ids_TK.to(device), weights_TK.to(device))


def _group_by_group(label_E: torch.Tensor, g: int) -> torch.Tensor:
    """label_E reordered so each run of g ranks is one group of g contiguous ids: groups in
    the order of their best-ranked expert, ids within a group by rank."""
    E = label_E.numel()
    rank_E = label_E.argsort()  # expert id -> rank
    group_rank_E = rank_E.view(E // g, g).amin(-1).repeat_interleave(g)
    return (group_rank_E * E + rank_E).argsort()


def _balanced_ranks(T: int, E: int, K: int, n_group, topk_group) -> torch.Tensor:
    """[T, K] ranks, each token's distinct, every rank used S/E times as near as allowed;
    with a limit, each token's ranks lie in topk_group runs of g = E/n_group ranks."""
    if n_group is not None:
        g, M = E // n_group, topk_group
        # The walk below starts token t at rank t*K mod E, a multiple of gcd(K, g) into a
        # run: up to g - gcd(K, g) into it, from where K ranks can reach run M+1.
        if n_group > M and g - math.gcd(K, g) + K > M * g:
            # Then token t walks K ranks cyclically within block t % blocks of M whole runs
            # (W ranks), from where the block's previous token stopped. A block walked i times
            # counts each of its ranks floor or ceil(i*K/W) times; blocks are walked i or i+1
            # times, so counts lie in [a, a+2] per block, and a rank lies in M/gcd(G, M) blocks.
            W = M * g
            blocks = E // math.gcd(E, W)
            t_T1 = torch.arange(T)[:, None]
            within_TK = ((t_T1 // blocks) * K + torch.arange(K)) % W
            return ((t_T1 % blocks) * W + within_TK) % E
    # Pair p = t*K + j takes rank p mod E: K consecutive ranks are distinct since K <= E.
    return torch.arange(T * K).view(T, K) % E


@dataclasses.dataclass(frozen=True)
class LoadStats:
    """How evenly a routing spreads its S pairs over E experts."""

    tokens_per_expert: torch.Tensor  # [E] pairs received by each expert
    max_load: int
    mean_load: float  # S / E
    max_over_mean: float  # 1.0 is perfectly balanced
    cv: float  # coefficient of variation of the per-expert load
    empty_experts: int

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["tokens_per_expert"]
        return d


def load_stats(routing: Routing, num_experts: int) -> LoadStats:
    """Per-expert load of a routing: max/mean, coefficient of variation, empty experts."""
    ids = routing.ids.flatten()
    if not ids.numel():
        raise ValueError("an empty routing (T=0) has no expert load")
    if int(ids.min()) < 0 or int(ids.max()) >= num_experts:
        raise ValueError(
            f"expert ids must be in [0, {num_experts}), got range "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    counts_E = torch.bincount(ids.cpu(), minlength=num_experts)
    mean = ids.numel() / num_experts
    std = counts_E.double().std(correction=0).item()
    return LoadStats(
        tokens_per_expert=counts_E,
        max_load=int(counts_E.max()),
        mean_load=mean,
        max_over_mean=int(counts_E.max()) / mean,
        cv=std / mean,
        empty_experts=int((counts_E == 0).sum()),
    )
