"""moebench's layers inside transformers' MoE models (moebench.integrations.hf): tiny random
Qwen3-MoE and Mixtral models give eager's logits and greedy tokens on every layer."""

import pytest
import torch

import moebench as mb
from moebench import registry

transformers = pytest.importorskip("transformers")
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

from moebench.integrations import hf  # noqa: E402

NAMES = [f"moebench_{impl}" for impl in registry.OWN]
E = 8
COMMON = dict(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, pad_token_id=0,
    # Wider than the default 0.02, so that the experts move the logits and their argmax.
    initializer_range=0.2,
)  # fmt: skip
CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=E
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=24, num_local_experts=E
    ),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    return hf.register()


def run(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
        mask = torch.ones_like(ids)
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    return logits, tokens


@pytest.fixture(scope="module", params=CONFIGS)
def case(request):
    """A model (float32, the default dtype) in eval mode, its input ids, and eager's logits
    and greedy tokens."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()
    model.set_experts_implementation("eager")
    ids = torch.randint(1, 128, (2, 11))  # 22 tokens: a multiple of no block size
    return model, ids, *run(model, ids)


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_tokens_match_eager(case, name):
    model, ids, eager_logits, eager_tokens = case
    model.set_experts_implementation(name)
    try:
        logits, tokens = run(model, ids)
    finally:
        model.set_experts_implementation("eager")
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, eager_tokens)


def test_register_adds_each_layer_and_the_model_runs_on_it(registered, case, monkeypatch):
    assert registered == tuple(NAMES) and hf.register() == registered  # idempotent
    names = registered
    assert all(name in ALL_EXPERTS_FUNCTIONS for name in names)
    calls = []

    def spy(*args, impl, **options):
        calls.append(impl)
        return mb.moe_forward(*args, impl=impl, **options)

    monkeypatch.setattr(hf, "moe_forward", spy)
    model, ids, eager_logits, _ = case
    model.set_experts_implementation("moebench_sorted")
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        model.set_experts_implementation("eager")
    assert calls == ["sorted"] * model.config.num_hidden_layers
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-5)


def make_experts(seed=0):
    torch.manual_seed(seed)
    experts = Qwen3MoeExperts(CONFIGS["qwen3_moe"]())
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return experts


def eager(experts, x, ids, weights):
    """transformers' own eager experts forward, which skips the pairs of id E."""
    return type(experts).forward.__wrapped__(experts, x, ids, weights)


@pytest.mark.parametrize("name", NAMES)
def test_pairs_masked_by_expert_parallelism_contribute_nothing(name):
    experts = make_experts()
    experts._is_expert_parallel = True  # as transformers sets it when it splits the experts
    T = 16
    ids = torch.stack([torch.zeros(T, dtype=torch.long), torch.arange(T) % (E - 1) + 1], dim=1)
    # Another rank's expert. Moved onto expert 0, as a clamp would, these pairs would load it
    # past the padded layer's capacity (T) and drop some of its own.
    ids[:8, 1] = E
    ids[8:11] = E  # no expert here at all
    weights = torch.rand(T, 2)  # transformers zeroes the masked ones; they count for nothing
    x = torch.randn(T, 32)
    with torch.no_grad():
        y = ALL_EXPERTS_FUNCTIONS[name](experts, x, ids, weights)
        want = eager(experts, x, ids, weights)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    assert not y[8:11].any()
    assert torch.equal(ids[:8, 1], torch.full((8,), E))  # the caller's ids are left alone


def test_an_id_of_E_without_expert_parallelism_is_refused():
    experts = make_experts()
    ids = torch.tensor([[0, E]])
    with pytest.raises(ValueError, match=r"expert ids must be in \[0, 8\)"):
        ALL_EXPERTS_FUNCTIONS["moebench_naive"](experts, torch.randn(1, 32), ids, torch.ones(1, 2))


@pytest.mark.parametrize("name", NAMES)
def test_transposed_weights_are_read_as_views(name):
    experts = make_experts()
    x, ids, weights = torch.randn(9, 32), torch.randint(0, E, (9, 1)), torch.rand(9, 1)
    with torch.no_grad():
        want = eager(experts, x, ids, weights)
        experts.is_transposed = True  # [E, D, 2F] and [E, F, D], as some models hold them
        for p in ("gate_up_proj", "down_proj"):
            setattr(experts, p, torch.nn.Parameter(getattr(experts, p).mT.contiguous()))
        y = ALL_EXPERTS_FUNCTIONS[name](experts, x, ids, weights)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_a_module_moebench_cannot_compute_is_refused():
    experts = make_experts()
    experts.has_bias = True
    with pytest.raises(NotImplementedError, match="moebench_sorted: Qwen3MoeExperts has expert"):
        ALL_EXPERTS_FUNCTIONS["moebench_sorted"](
            experts, torch.randn(2, 32), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
        )
