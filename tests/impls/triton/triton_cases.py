"""Inputs, runs and checks shared by the `triton` layer's tests (tests/impls/triton/).

T tokens, D model width, F expert hidden width, E experts, K experts per token, S = T*K.
Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes
stay small. The oracle is moebench.reference (the naive loop in float64) and the bound
the shared tolerance table's.
"""

import torch

import moebench as mb
import moebench.impls.triton as triton_layer
from moebench.bench.oracle import tolerance
from moebench.impls.triton import configs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Shapes crossing the interpreter's 32-wide blocks, a token alone, K == E, a hot expert.
CASES = {
    "T1-K1": dict(T=1, D=32, F=16, E=4, K=1),
    "K=E": dict(T=5, D=16, F=32, E=4, K=4),
    "T37-D40-F24": dict(T=37, D=40, F=24, E=6, K=2),
    "hot-expert": dict(T=37, D=24, F=40, E=5, K=2, hot_expert=2),
}


def make_case(T, D, F, E, K, dtype, *, hot_expert=None, seed=0):
    """(x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF) on DEVICE; each token's K ids
    distinct, hot_expert first in every token's list when given."""
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if hot_expert is not None:
        rest = [
            torch.tensor([e for e in row.tolist() if e != hot_expert][: K - 1], dtype=torch.long)
            for row in ids_TK
        ]
        ids_TK = torch.stack([torch.cat([torch.tensor([hot_expert]), r]) for r in rest])
    weights_TK = torch.rand(T, K, generator=g)
    x_TD = torch.randn(T, D, generator=g)
    gate_up_E2FD = torch.randn(E, 2 * F, D, generator=g) / D**0.5
    down_EDF = torch.randn(E, D, F, generator=g) / F**0.5
    to = dict(device=DEVICE)
    return (
        x_TD.to(dtype=dtype, **to),
        ids_TK.to(**to),
        weights_TK.to(**to),
        gate_up_E2FD.to(dtype=dtype, **to),
        down_EDF.to(dtype=dtype, **to),
    )


def reference(case):
    """The float64 oracle's output for a case, on the CPU."""
    x_TD, ids_TK, weights_TK, gate_up_E2FD, down_EDF = (t.cpu() for t in case)
    routing = mb.Routing(ids_TK, weights_TK)
    return mb.reference(x_TD, routing, mb.ExpertWeights(gate_up_E2FD, down_EDF))


def run(case, combine="pairs"):
    """Call forward on a NaN-poisoned output; return it and the stats."""
    x_TD = case[0]
    out_TD = torch.full_like(x_TD, float("nan"))
    stats = {}
    assert triton_layer.forward(*case, out_TD, stats, combine=combine) is out_TD
    assert not out_TD.isnan().any(), "some output elements were not written"
    return out_TD, stats


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def assert_matches(out, case, dtype):
    """out within the dtype's tolerance of the float64 oracle."""
    err = rel_err(out, reference(case))
    assert err < tolerance(dtype), err


# Backward: gradients of x, the routing weights, gate_up and down through the autograd op.


def leaves(case):
    """Fresh leaf copies of the differentiable inputs: x, weights, gate_up, down."""
    return [t.detach().clone().requires_grad_() for t in (case[0], *case[2:])]


def reference_grads(case, dy_TD):
    """Float64 autograd through the oracle, on the CPU."""
    x, w, gate_up, down = leaves([t.double().cpu() for t in case])
    routing = mb.Routing(case[1].cpu(), w)
    mb.reference(x, routing, mb.ExpertWeights(gate_up, down)).backward(dy_TD.double().cpu())
    return [t.grad for t in (x, w, gate_up, down)]


def run_backward(case, dy_TD, combine="pairs", requires_grad=(True,) * 4):
    """forward into a NaN-poisoned out, then backward(dy); the four grads (None if not asked)."""
    x, w, gate_up, down = inputs = leaves(case)
    for t, flag in zip(inputs, requires_grad, strict=True):
        t.requires_grad_(flag)
    out = torch.full_like(x, float("nan"))
    triton_layer.forward(x, case[1], w, gate_up, down, out, None, combine=combine)
    out.backward(dy_TD)
    return [t.grad for t in inputs]


def idle_experts(ids_TK, E):
    idle = torch.ones(E, dtype=torch.bool)
    idle[ids_TK.flatten().cpu()] = False
    return idle


def assert_grads_match(got, want, ids_TK, dtype):
    """Each gradient within the dtype's tolerance of float64 autograd; idle experts' weight
    gradients exactly zero."""
    for name, g, w in zip(("x", "weights", "gate_up", "down"), got, want, strict=True):
        assert g.dtype == (torch.float32 if name == "weights" else dtype), name
        assert rel_err(g, w) < tolerance(dtype), name
    idle = idle_experts(ids_TK, got[2].shape[0]).to(got[2].device)
    assert (got[2][idle] == 0).all() and (got[3][idle] == 0).all(), "idle expert gradient"


def random_dy(T, D, dtype, seed=5):
    """dy_TD drawn on the CPU generator: the same draws on every device."""
    dy_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(seed))
    return dy_TD.to(dtype=dtype, device=DEVICE)


# Each config an autotuner can pick, forced in turn, at decode, at prefill in 128-row tiles
# (the TMA configs) and at narrow experts in 16-row tiles. On a GPU every config runs (the
# conftest has the other tests take each tuner's first); the interpreter, whose cost is per
# program and op, runs the last of each list (at prefill, a TMA config).
FORCED = {
    "decode": dict(T=16, D=128, F=128, E=8, K=2),
    "prefill": dict(T=256, D=64, F=128, E=4, K=2),
    "narrow": dict(T=128, D=64, F=16, E=64, K=2),
}
FORCED_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def tuners_and_configs(kernel, name):
    """(the FORCED shape `name`, its dtype, the tuners a call there uses for `kernel` as
    configs.force_configs selects them, the configs they can pick there)."""
    shape = FORCED[name]
    path = configs.path_for(shape["T"])
    block_m = configs.block_m_for(path, configs.pow2(shape["T"]), shape["K"], shape["E"])
    if kernel == "expert_grad":
        space = configs.expert_grad_configs(interpreted=False)
        return shape, FORCED_DTYPE, {"kernel": kernel}, _runnable(space)
    if kernel == "swiglu_backward":
        selector = {"kernel": kernel, "path": path}
        space = configs.swiglu_backward_configs(path, interpreted=False)
    else:
        tma = path == "prefill"  # 16-bit, aligned inputs: the TMA tuners
        selector = {"kernel": kernel, "path": path, "tma": tma}
        space = configs.forward_configs(path, kernel, tma, interpreted=False)
    kept = configs.prune(kernel)(space, {"F": shape["F"]}, BLOCK_M=block_m)
    return shape, FORCED_DTYPE, selector, _runnable(kept)


def _runnable(space):
    """All of them on a GPU, the last under the interpreter."""
    return space if DEVICE == "cuda" else space[-1:]


def forced_runs(selector, space, run_one):
    """run_one(config) with each config forced in turn; the configs that failed, with why."""
    from triton.runtime.errors import OutOfResources

    failures = []
    for config in space:
        with configs.force_configs(configs=config, **selector):
            try:
                run_one(config)
            except OutOfResources:  # what the autotuner skips on this device
                continue
            except AssertionError as e:
                failures.append((config.all_kwargs(), str(e).splitlines()[0]))
    return failures
