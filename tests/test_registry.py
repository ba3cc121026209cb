"""The registry: outside implementations from Python, entry points and module:function, each
usable wherever an impl name is, and refused clearly where they cannot run."""

import os
import subprocess
import sys
from pathlib import Path

import outside_kernels as kernels
import pytest
import torch

import moebench as mb
from moebench import cli, registry
from moebench.bench import grid, sweep
from moebench.bench.oracle import tolerance

CFG = mb.MoEConfig(d_model=32, d_ff=16, num_experts=8, top_k=2)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Registrations and discoveries of a test stay in that test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_discovered", False)


def case(T=21, dtype=torch.float32):
    w = mb.ExpertWeights.random(CFG, dtype=dtype, seed=1)
    r = mb.make_routing(T, CFG, skew="zipf:1.2", seed=1)
    return torch.randn(T, CFG.d_model, dtype=dtype), r, w


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def test_a_registered_forward_joins_impls_and_runs():
    mb.register_impl("mine", kernels.correct)
    assert "mine" in mb.IMPLS and "mine" in list(mb.IMPLS)
    x, r, w = case()
    y = mb.IMPLS["mine"](x, r, w)
    assert rel_err(y, mb.reference(x, r, w)) < tolerance(torch.float32)
    assert mb.impl_options("mine") == {"scale": 1.0}  # read from its signature
    y2 = mb.moe_forward(x, r, w, impl="mine", scale=2.0)
    assert torch.allclose(y2, 2 * y)
    with pytest.raises(TypeError, match=r"impl 'mine' has no option \['capacity_factor'\]"):
        mb.moe_forward(x, r, w, impl="mine", capacity_factor=1.0)
    mb.unregister_impl("mine")
    assert "mine" not in mb.IMPLS


def test_declared_capabilities_are_enforced_before_the_call():
    calls = []
    mb.register_impl("gpu-only", lambda *a: calls.append(1), devices=("cuda",))
    x, r, w = case()
    with pytest.raises(ValueError, match="impl 'gpu-only' runs on cuda, not cpu"):
        mb.moe_forward(x, r, w, impl="gpu-only")
    x16, r16, w16 = case(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"impl 'mine' does not support torch\.float64"):
        mb.register_impl("mine", kernels.ignores_weights)  # default dtypes: fp16, bf16, fp32
        mb.moe_forward(x16, r16, w16, impl="mine")
    assert not calls


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda x: x[:-1], r"impl 'bad' returned \(20, 32\), expected \[T, D\] = \(21, 32\)"),
        (lambda x: x.double(), "impl 'bad' returned torch.float64 for torch.float32 input"),
        (lambda x: None, "impl 'bad' returned NoneType"),
    ],
)
def test_a_wrong_return_is_named(returned, message):
    mb.register_impl("bad", lambda x, ids, w, gu, d: returned(x))
    with pytest.raises(ValueError, match=message):
        mb.moe_forward(*case(), impl="bad")


@pytest.mark.parametrize(
    ("name", "forward", "kw", "message"),
    [
        ("sorted", kernels.correct, {}, "impl 'sorted' is already registered \\(moebench\\)"),
        ("hf-eager", kernels.correct, {"replace": True}, "already registered \\(peer\\)"),
        ("a,b", kernels.correct, {}, "an impl name is a word"),
        ("x", 3, {}, "forward of impl 'x' must be callable"),
        ("x", lambda x, ids: x, {}, "takes 2 positional arguments"),
        ("x", kernels.correct, {"dtypes": ["fp32"]}, "dtypes must be torch float dtypes"),
        ("x", kernels.correct, {"devices": ["tpu"]}, "unknown devices \\['tpu'\\]"),
    ],
)
def test_bad_registrations_are_refused(name, forward, kw, message):
    with pytest.raises((ValueError, TypeError), match=message):
        mb.register_impl(name, forward, **kw)


def test_replace_swaps_an_outside_forward():
    mb.register_impl("mine", kernels.ignores_weights)
    with pytest.raises(ValueError, match="already registered"):
        mb.register_impl("mine", kernels.correct)
    mb.register_impl("mine", kernels.correct, replace=True)
    x, r, w = case()
    assert rel_err(mb.IMPLS["mine"](x, r, w), mb.reference(x, r, w)) < 1e-4


def plugin(tmp_path, entry, module="moekern", source=None):
    """A distribution outside moebench, as pip would install it: a module and its
    dist-info with an entry point in moebench's group."""
    (tmp_path / f"{module}.py").write_text(
        source or "from outside_kernels import correct as forward\n"
    )
    info = tmp_path / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[moebench.impls]\n{entry}\n")
    return tmp_path


def test_an_entry_point_shows_up_in_impls_and_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin(tmp_path, "moekern = moekern:forward")))
    assert "moekern" in mb.IMPLS
    spec = registry.get("moekern")
    assert spec.origin == "entry point" and spec.differentiable  # declared by the function
    x, r, w = case()
    assert rel_err(mb.moe_forward(x, r, w, impl="moekern"), mb.reference(x, r, w)) < 1e-4


def test_a_broken_entry_point_is_named_once_and_skipped(tmp_path, monkeypatch, capsys):
    source = "raise ImportError('no CUDA')\n"
    folder = plugin(tmp_path, "broken = brokenkern:forward", "brokenkern", source)
    monkeypatch.syspath_prepend(str(folder))
    names = list(mb.IMPLS)
    assert "broken" not in names and set(registry.OWN) <= set(names)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moebench: skipped impl plug-in broken = brokenkern:forward: no CUDA"]
    list(mb.IMPLS)
    assert capsys.readouterr().err == ""  # discovered once
    x, r, w = case()
    mb.moe_forward(x, r, w, impl="sorted")  # moebench's own still run


def test_a_plugin_runs_in_the_cli_of_a_fresh_process(tmp_path):
    folder = plugin(tmp_path, "moekern = moekern:forward")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO / "tests")])}
    shape = ["--d-model", "32", "--d-ff", "16", "--experts", "8", "--top-k", "2", "--tokens", "8"]
    argv = [*shape, "--impls", "moekern,sorted", "--check", "--repeats", "1", "--warmup", "0"]
    run = [sys.executable, "-m", "moebench", *argv]
    out = subprocess.run(run, capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    out = out.stdout
    rows = [line.split() for line in out.splitlines() if " moekern " in f" {line} "]
    assert len(rows) == 1 and float(rows[0][-1]) < tolerance(torch.float32), out


def test_module_function_works_where_an_impl_name_does(capsys):
    target = "outside_kernels:correct"
    shape = ["--d-model", "32", "--d-ff", "16", "--experts", "8", "--top-k", "2", "--tokens", "8"]
    assert cli.main([*shape, "--impls", target, "--check", "--repeats", "1"]) == 0
    assert target in capsys.readouterr().out
    x, r, w = case()
    assert rel_err(mb.moe_forward(x, r, w, impl=target), mb.reference(x, r, w)) < 1e-4


@pytest.mark.parametrize(
    ("impl", "message"),
    [("no_such_module:f", "cannot import 'no_such_module'"), ("nope", "unknown impl 'nope'")],
)
def test_the_cli_refuses_an_impl_it_cannot_find(impl, message, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["compare", "--preset", "mixtral-8x7b", "--impls", impl])
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_the_sweep_skips_what_cannot_run_with_its_reason():
    mb.register_impl("forward-only", kernels.ignores_weights)
    missing = registry.Impl("absent", "absent_pkg:forward", requires=("absent_pkg",))
    registry._REGISTRY["absent"] = missing
    points = grid.points("models" + grid.TRAIN, grid.get_profile("tiny"))[:1]
    records = sweep.run_points(points, ["forward-only", "absent"], ["balanced"], profile="tiny")
    reasons = {r["impl"]: r["reason"] for r in records}
    assert reasons == {
        "forward-only": "unsupported: forward-only is not differentiable",
        "absent": "unavailable: absent needs absent_pkg (not installed)",
    }
