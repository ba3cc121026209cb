"""The grid: every profile and family, the gate's grid and the CLI's device profile."""

import dataclasses

import pytest
import torch

import moebench as mb
from moebench.bench import grid


def test_gpu_scale_out_family():
    pts = grid.points("scale-out", "gpu")
    assert [pt.label for pt in pts] == [f"E={2**i}" for i in range(3, 14)]
    for pt in pts:
        cfg = pt.cfg
        assert (cfg.d_model, cfg.d_ff, cfg.top_k, pt.T) == (1024, 512, 8, 4096)
        assert cfg.dtype == "bfloat16"


def test_gpu_iso_params_family_keeps_e_times_f():
    pts = grid.points("iso-params", "gpu")
    assert [pt.cfg.num_experts for pt in pts] == [2**i for i in range(3, 14)]
    assert {pt.cfg.num_experts * pt.cfg.d_ff for pt in pts} == {65536}
    assert {(pt.cfg.d_model, pt.cfg.top_k, pt.T) for pt in pts} == {(2048, 2, 4096)}


def test_gpu_models_family_is_the_presets_at_four_token_counts():
    pts = grid.points("models", "gpu")
    assert len(pts) == 16
    by_label = {pt.label: pt for pt in pts}
    ds = by_label["deepseek-v3/T=16384"]
    assert ds.T == 16384
    assert ds.cfg == mb.preset("deepseek-v3")  # real shape, bf16
    assert {pt.T for pt in pts} == {1, 64, 4096, 16384}


def test_cpu_profile_is_a_labelled_small_copy():
    p = grid.get_profile("cpu")
    assert (p.device, p.dtype) == ("cpu", "float32")
    scale_out = grid.points("scale-out", p)
    assert scale_out[-1].cfg.num_experts == 1024
    ds = next(pt for pt in grid.points("models", p) if pt.label.startswith("deepseek-v3"))
    assert (ds.cfg.d_model, ds.cfg.d_ff, ds.cfg.d_ff_shared) == (7168 // 16, 2048 // 16, 128)
    assert (ds.cfg.num_experts, ds.cfg.top_k) == (256, 8)
    assert len(grid.all_points("tiny")) < len(grid.all_points("cpu"))


def test_profile_choice(monkeypatch):
    monkeypatch.setenv("MOEBENCH_PROFILE", "tiny")
    assert grid.get_profile().name == "tiny"
    monkeypatch.delenv("MOEBENCH_PROFILE")
    assert grid.default_profile_name() == ("gpu" if torch.cuda.is_available() else "cpu")
    # asv's forkserver imports the suites (which choose the profile) before it forks: the
    # choice must not initialize the CUDA driver, which is_available() does.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("initializes CUDA"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert grid.default_profile_name() == "gpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert grid.default_profile_name() == "cpu"
    with pytest.raises(ValueError, match="unknown profile 'huge'; known: gpu, cpu, tiny"):
        grid.get_profile("huge")
    with pytest.raises(ValueError, match="unknown family"):
        grid.points("dense", "tiny")


def test_the_gate_profile_is_a_few_cpu_points():
    p, points, skews = grid.gate_grid("gate")
    cpu = grid.get_profile("cpu")
    assert p is grid.get_profile("gate") and (p.repeats, p.max_time_s) == (15, 1.0)
    assert (p.device, p.dtype, p.threads) == (cpu.device, cpu.dtype, cpu.threads)
    assert [(pt.family, pt.label) for pt in points] == [
        ("scale-out", "E=8"), ("scale-out", "E=64"), ("scale-out", "E=512"),
        ("models", "deepseek-v3/T=256"),
    ]  # fmt: skip
    assert skews == ("balanced", "zipf:1.2")
    by_key = {(pt.family, pt.label): pt for pt in grid.all_points(cpu)}
    assert all(pt.cfg == by_key[pt.family, pt.label].cfg for pt in points)


def test_any_other_gate_profile_is_its_whole_grid_but_the_ep_and_quant_families():
    p, points, skews = grid.gate_grid("tiny")
    gated = [pt for pt in grid.all_points("tiny") if pt.family not in (grid.EP, grid.QUANT)]
    assert p.name == "tiny" and points == gated and skews == grid.SKEWS
    assert {pt.family for pt in grid.all_points("tiny")} - {pt.family for pt in gated} == {
        grid.EP,
        grid.QUANT,
    }


def test_the_ep_family_is_worlds_by_experts_with_t_tokens_per_rank():
    cpu = grid.get_profile("cpu")
    D, F, K, T = cpu.ep_shape
    points = grid.points(grid.EP, cpu)
    free = [pt for pt in points if pt.group_limit is None]
    assert [(pt.label, pt.world, pt.T) for pt in free] == [
        (f"W={W}/E={E}", W, W * T) for W in cpu.ep_worlds for E in cpu.ep_experts
    ]
    assert all((pt.cfg.d_model, pt.cfg.d_ff, pt.cfg.top_k) == (D, F, K) for pt in points)
    # Limited where W divides E and M ranks hold K experts: not at W=1, nor E=8 over 2 ranks
    # (4 experts a rank < K=8), nor E=8 over 4.
    assert [pt.label for pt in points if pt.group_limit] == ["W=2/E=64/M=1", "W=4/E=64/M=1"]
    assert grid.EP in grid.families(cpu)
    assert grid.EP not in grid.families(dataclasses.replace(cpu, ep_worlds=()))


def test_device_profile_takes_the_budget_of_its_device():
    p = grid.device_profile("cpu", "bf16", threads=2)
    assert (p.name, p.device, p.dtype, p.threads) == ("cli", "cpu", "bfloat16", 2)
    assert p.repeats == grid.get_profile("cpu").repeats
    assert grid.device_profile("cpu").dtype == "float32"
    with pytest.raises(ValueError, match="moebench measures on cpu or cuda"):
        grid.device_profile("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            grid.device_profile("cuda")


def test_a_profile_leaves_out_what_it_names():
    assert grid.default_impls("tiny") == list(mb.registry.names())
    left_out = {"hf-batched_mm", "hf-eager"}
    assert set(grid.default_impls("cpu")) == set(mb.registry.names()) - left_out
