"""The grid, the sweep runner (records, skips, imbalance) and run files."""

import dataclasses
import json
import math
import os
import re

import pytest
import torch

import moebench as mb
from moebench import cli
from moebench.bench import (
    asv,
    grid,
    inputs,
    memory,
    profiling,
    roofline,
    runs,
    sweep,
    timing,
)
from moebench.bench.records import RECORD_FIELDS
from moebench.impls import padded

FAKE_CEILINGS = roofline.Ceilings(matmul_flops=1e12, copy_bytes=1e9, label="fake")


# --- the runner on a fake device -----------------------------------------------------------


class LoadTimer:
    """A fake device on which a call takes (largest expert load) ms, so times are known."""

    label = "fake timer"
    l2 = "n/a"
    cost_ms = math.nan

    def prepare(self, fn):
        return fn

    def samples(self, fn, repeats):
        out = []
        for _ in range(repeats):
            fn()
            out.append(self.cost_ms)
        return out


def fake_forward(timer, slowdown=None, fail=None):
    """A layer whose time is the largest expert load (times `slowdown[impl]`), or that
    raises `fail[impl]`."""

    def forward(x_TD, routing, weights, impl="sorted", *, check=True, stats=None):
        if fail and impl in fail:
            raise fail[impl]
        load = float(torch.bincount(routing.ids.flatten()).max())
        timer.cost_ms = load * (slowdown or {}).get(impl, 1.0)
        if stats is not None and impl == "padded":
            stats["dropped"] = 0
        return torch.ones_like(x_TD)

    return forward


POINT = grid.points("scale-out", "tiny")[0]  # E=8, K=4, T=64: S=256, 32 pairs per expert


def run_fake(impls=("naive", "padded", "sorted"), skews=("balanced", "collapse"), **kw):
    timer = LoadTimer()
    forward = fake_forward(timer, kw.pop("slowdown", None), kw.pop("fail", None))
    return sweep.run_points(
        [POINT],
        list(impls),
        list(skews),
        profile="tiny",
        timer=timer,
        ceilings=FAKE_CEILINGS,
        forward=forward,
        **kw,
    )


def by_key(records):
    return {(r["impl"], r["skew"]): r for r in records}


def test_records_carry_the_metrics_of_the_fake_device():
    records = run_fake(repeats=4, warmup=0)
    assert len(records) == 6
    assert all(set(RECORD_FIELDS) <= set(r) for r in records)
    r = by_key(records)[("sorted", "balanced")]
    assert r["status"] == "ok" and r["reason"] is None
    assert (r["T"], r["D"], r["F"], r["E"], r["K"], r["Fs"]) == (64, 32, 16, 8, 4, 0)
    assert r["time_ms"] == r["p20_ms"] == r["p80_ms"] == 32.0  # 256 pairs / 8 experts
    assert (r["cv"], r["dtype"]) == (0.0, "float32")
    flops = 6 * 256 * 32 * 16
    assert r["flops"] == flops
    assert r["tokens_per_s"] == pytest.approx(64 / 0.032)
    assert r["tflops"] == pytest.approx(flops / 0.032 / 1e12)
    assert r["min_bytes"] == (8 * 3 * 32 * 16 + 2 * 64 * 32) * 4
    assert r["roofline_fraction"] == pytest.approx(max(flops / 1e12, r["min_bytes"] / 1e9) / 0.032)
    assert r["peak_bytes"] == 64 * 32 * 4  # the fake's output: torch.ones_like(x)
    assert r["peak_label"] == memory.CPU_PEAK_LABEL
    assert r["rel_err"] is None  # check=False


class ReplayTimer(LoadTimer):
    """Graph replays of the fake device: a tenth of the eager time (the launches gone); a
    call under `collapse` (64 ms eager) cannot be captured."""

    label = "fake graph timer"

    def __init__(self, eager):
        self.eager = eager

    def prepare(self, fn):
        fn()
        if self.eager.cost_ms > 40:
            raise RuntimeError("operation not permitted when stream is capturing")
        return fn

    def samples(self, fn, repeats):
        return [ms / 10 for ms in self.eager.samples(fn, repeats)]


@pytest.mark.parametrize("below_ms", [50.0, 100.0])
def test_fast_points_of_graph_impls_are_replayed_too(below_ms):
    profile = dataclasses.replace(
        grid.get_profile("tiny"), graph_impls=("sorted",), graph_below_ms=below_ms
    )
    timer = LoadTimer()
    timer.host_ms = 0.5  # what a CUDA timer reports after its samples
    records = by_key(
        sweep.run_points(
            [POINT],
            ["naive", "sorted"],
            ["balanced", "collapse"],
            profile=profile,
            timer=timer,
            graph_timer=ReplayTimer(timer),
            ceilings=FAKE_CEILINGS,
            forward=fake_forward(timer),
            repeats=3,
            warmup=0,
        )
    )
    balanced, collapse = records[("sorted", "balanced")], records[("sorted", "collapse")]
    assert balanced["graph_ms"] == pytest.approx(3.2) and balanced["time_ms"] == 32.0
    assert balanced["host_ms"] == 0.5
    assert records[("naive", "balanced")]["graph_ms"] is None  # not a graph impl
    # 64 ms eager: not replayed below 50 ms; refused by the capture below 100 ms, and the
    # eager numbers stand either way.
    assert collapse["status"] == "ok" and collapse["time_ms"] == 64.0
    assert collapse["graph_ms"] is None
    if below_ms > 64:
        assert collapse["graph_reason"].startswith("RuntimeError: operation not permitted")
    else:
        assert collapse["graph_reason"] is None


def test_imbalance_overhead_and_load_are_relative_to_balanced():
    records = by_key(run_fake())
    collapse = records[("naive", "collapse")]
    assert collapse["time_ms"] == 64.0  # every token on the same 4 experts
    assert collapse["max_over_mean"] == 2.0
    assert collapse["touched_experts"] == 4
    assert collapse["imbalance_overhead"] == pytest.approx(2.0)
    assert records[("naive", "balanced")]["imbalance_overhead"] == 1.0
    assert records[("padded", "collapse")]["dropped_fraction"] == 0.0
    assert records[("sorted", "collapse")]["dropped_fraction"] is None


def test_a_planted_slowdown_shows_in_the_times():
    base = by_key(run_fake())
    slow = by_key(run_fake(slowdown={"sorted": 1.25}))
    for skew in ("balanced", "collapse"):
        ratio = slow[("sorted", skew)]["time_ms"] / base[("sorted", skew)]["time_ms"]
        assert ratio == pytest.approx(1.25)
        assert slow[("naive", skew)]["time_ms"] == base[("naive", skew)]["time_ms"]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (torch.OutOfMemoryError("padded layer: buffers need 9 GiB"), "out of memory: padded layer"),
        (ValueError("impl 'padded' does not support torch.float64"), "unsupported: impl 'padded'"),
        (NotImplementedError("no kernel for K=3"), "unsupported: no kernel for K=3"),
        (RuntimeError("CUDA error: misaligned address"), "failed: RuntimeError: CUDA error"),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                "memory: you tried to allocate 1600000000000 bytes"
            ),
            "out of memory: [enforce fail",
        ),
    ],
    ids=["oom", "value-error", "not-implemented", "other-error", "cpu-oom"],
)
def test_a_failing_point_is_skipped_with_its_reason_and_the_sweep_goes_on(error, reason):
    records = run_fake(fail={"padded": error})
    for r in records:
        if r["impl"] == "padded":
            assert r["status"] == "skipped"
            assert r["reason"].startswith(reason)
            assert r["time_ms"] is None and r["imbalance_overhead"] is None
        else:
            assert r["status"] == "ok"
            assert r["time_ms"] > 0


def test_a_layer_returning_nan_fails_its_point(monkeypatch):
    def forward(x_TD, routing, weights, impl="sorted", **kw):
        y = mb.moe_forward(x_TD, routing, weights, impl=impl, **kw)
        return y.index_fill_(0, torch.tensor([0]), float("nan")) if impl == "naive" else y

    records = by_key(
        sweep.run_points(
            [POINT], ["naive", "sorted"], ["balanced"], profile="tiny", forward=forward, check=True
        )
    )
    assert records[("naive", "balanced")]["status"] == "skipped"
    assert records[("naive", "balanced")]["reason"] == (
        "failed: WrongOutput: the output holds NaN or inf"
    )
    assert records[("sorted", "balanced")]["status"] == "ok"


def test_a_routing_that_does_not_fit_skips_its_points_and_the_sweep_goes_on(monkeypatch):
    make = sweep.make_routing

    def make_routing(T, cfg, *, skew, **kw):
        if skew == "collapse":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: 10 TB")
        return make(T, cfg, skew=skew, **kw)

    monkeypatch.setattr(sweep, "make_routing", make_routing)
    records = run_fake()
    for r in records:
        if r["skew"] == "collapse":
            assert r["status"] == "skipped"
            assert r["reason"].startswith("out of memory: DefaultCPUAllocator")
        else:
            assert r["status"] == "ok"


def test_padded_capacity_oom_from_the_real_layer_is_skipped(monkeypatch):
    def no_room(nbytes, device):
        raise torch.OutOfMemoryError(f"padded layer: capacity buffers need {nbytes} bytes")

    monkeypatch.setattr(padded, "_check_fits", no_room)
    records = sweep.run_points(
        [POINT], ["padded", "sorted"], ["balanced"], profile="tiny", ceilings=FAKE_CEILINGS
    )
    pad, srt = records
    assert pad["status"] == "skipped"
    assert pad["reason"].startswith("out of memory: padded layer: capacity buffers need")
    assert srt["status"] == "ok"


def test_weights_that_do_not_fit_skip_the_whole_point(monkeypatch):
    monkeypatch.setattr(inputs, "free_memory", lambda device: 1000)
    records = run_fake()
    assert {r["status"] for r in records} == {"skipped"}
    assert records[0]["reason"].startswith("out of memory: weights need")


def test_triton_is_skipped_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (r,) = run_fake(impls=["triton"], skews=["balanced"])
    assert r["status"] == "skipped"
    assert r["reason"] == "unsupported: triton needs a CUDA device (the CPU only interprets Triton)"


def test_weights_are_generated_once_per_point(monkeypatch):
    calls = []
    original = mb.ExpertWeights.random.__func__

    def counting(cls, *args, **kwargs):
        calls.append(1)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(mb.ExpertWeights, "random", classmethod(counting))
    pts = grid.points("scale-out", "tiny")[:2]
    sweep.run_points(
        pts,
        ["naive", "sorted"],
        ["balanced", "random", "collapse"],
        profile="tiny",
        timer=LoadTimer(),
        ceilings=FAKE_CEILINGS,
        forward=fake_forward(LoadTimer()),
    )
    assert len(calls) == len(pts)


def test_real_layers_on_the_tiny_profile():
    records = sweep.run_points(
        [POINT], list(grid.IMPLS), ["balanced", "zipf:1.2"], profile="tiny", check=True
    )
    ran = [r for r in records if r["status"] == "ok"]
    assert {r["impl"] for r in ran} >= {"naive", "padded", "sorted"}
    for r in ran:
        assert r["p20_ms"] <= r["time_ms"] <= r["p80_ms"]
        assert r["repeats"] >= 1 and r["peak_bytes"] > 0
        assert r["rel_err"] < 1e-5  # fp32 on the CPU against float64
        assert (r["dropped_fraction"] is not None) == (r["impl"] == "padded")
    zipf_padded = by_key(records)[("padded", "zipf:1.2")]
    assert 0 < zipf_padded["dropped_fraction"] < 1  # capacity factor 1.25 under a skew
    # Dropped pairs are not useful work: 6*D*F FLOPs each come off.
    dropped = zipf_padded["layer_stats"]["dropped"]
    cfg = POINT.cfg
    assert zipf_padded["flops"] == cfg.flops(POINT.T) - 6 * dropped * cfg.d_model * cfg.d_ff
    assert by_key(records)[("sorted", "zipf:1.2")]["flops"] == cfg.flops(POINT.T)
    # What each layer reported of its call, without the padded layer's drop mask.
    reported = {r["impl"]: set(r["layer_stats"]) for r in ran}
    assert reported["padded"] == {"capacity", "dropped"}
    assert reported["sorted"] == {"grouped_mm"} and reported["naive"] == {"launches"}
    assert zipf_padded["layer_stats"]["dropped"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_is_replayed_as_a_cuda_graph_on_the_gpu():
    """The real capture: the triton layer is sync-free, so its graph replays; the replay
    issues no launches of its own, so it is not slower than the eager call."""
    profile = dataclasses.replace(
        grid.get_profile("tiny"), device="cuda", dtype="bfloat16", graph_impls=("triton",),
        graph_below_ms=1e3,
    )  # fmt: skip
    records = sweep.run_points(
        [POINT], ["sorted", "triton"], ["balanced", "collapse"], profile=profile,
        graph_timer=timing.make_timer("cuda", cuda_graph=True),
    )  # fmt: skip
    for r in records:
        assert r["status"] == "ok" and r["host_ms"] > 0, r
        if r["impl"] == "triton":
            assert r["graph_reason"] is None and 0 < r["graph_ms"] <= 1.5 * r["time_ms"], r
            assert {"BLOCK_N", "num_warps"} <= set(r["layer_stats"]["config"]["down"]), r
        else:
            assert r["graph_ms"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 8])
def test_triton_decode_launches_on_the_gpu(T):
    """Decode's schedule is one counting kernel, no sort (none at all for one token); then
    one launch of each GEMM and of the sum of each token's K rows, each launched straight
    (triton/launch.py's _run), none through triton's JITFunction.run once compiled."""
    cfg = mb.MoEConfig(d_model=256, d_ff=128, num_experts=16, top_k=4)
    point = grid.Point("cli", "decode", cfg, T)
    profile = dataclasses.replace(grid.get_profile("tiny"), device="cuda", dtype="bfloat16")
    breakdown = profiling.op_breakdown(point, "triton", "balanced", profile=profile, calls=5)
    launches = {r["name"]: r["calls"] for r in breakdown.kernels}
    kernels = ["_gate_up_kernel", "_down_kernel", "_pair_sum_kernel"]
    kernels += ["_counted_schedule_kernel"] if T > 1 else []
    for kernel in kernels:
        assert launches.get(kernel) == 1, launches
    assert not any("sort" in name.lower() for name in launches), launches
    assert len(launches) == len(kernels), launches
    host = {r["name"]: r["calls"] for r in breakdown.host}
    direct = [c for name, c in host.items() if re.fullmatch(r"triton/launch\.py:\d+ _run", name)]
    assert direct == [len(kernels)], breakdown.host[:20]
    assert not any(re.fullmatch(r"runtime/jit\.py:\d+ run", name) for name in host), host


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_decode_past_16_tokens_launches_tall_tiles_apart():
    """Decode at T = 32 under collapse (every token on the same 4 experts, 32 rows each):
    each GEMM runs twice, over the 64-row tiles and over the (empty) 16-row ones."""
    cfg = mb.MoEConfig(d_model=256, d_ff=128, num_experts=16, top_k=4)
    point = grid.Point("cli", "decode", cfg, 32)
    profile = dataclasses.replace(grid.get_profile("tiny"), device="cuda", dtype="bfloat16")
    rows = profiling.op_breakdown(point, "triton", "collapse", profile=profile, calls=5).kernels
    launches = {r["name"]: r["calls"] for r in rows}
    for kernel in ("_gate_up_kernel", "_down_kernel"):
        assert launches.get(kernel) == 2, launches
    assert "_counted_schedule_kernel" not in launches, launches


def test_progress_is_reported_for_each_record():
    seen = []
    run_fake(progress=lambda done, total, r: seen.append((done, total, r["impl"])))
    assert [s[0] for s in seen] == list(range(1, 7))
    assert {s[1] for s in seen} == {6}


def test_progress_printer_stays_quiet_on_short_runs(capsys):
    now = [0.0]
    progress = sweep.Progress(after_s=2.0, clock=lambda: now[0])
    record = {"family": "f", "label": "E=8", "impl": "naive", "skew": "balanced"}
    now[0] = 1.0
    progress(1, 4, {**record, "status": "ok", "time_ms": 1.5})
    assert capsys.readouterr().err == ""
    now[0] = 3.0
    progress(2, 4, {**record, "status": "skipped", "reason": "out of memory: x"})
    err = capsys.readouterr().err
    assert "[2/4]" in err and "~3s left" in err and "out of memory: x" in err


# --- run files ----------------------------------------------------------------------------


ENV = {"profile": "tiny", "machine": "test-box", "commit": "0" * 40}


def test_run_file_round_trip_turns_nan_into_null(tmp_path):
    records = run_fake()
    records[0]["cv"] = math.nan
    path = runs.write_run(tmp_path / "run.json", ENV, records)
    raw = json.loads(path.read_text())
    assert raw["profile"] == "tiny" and raw["env"] == ENV
    assert raw["records"][0]["cv"] is None
    env, frame = runs.load_run(path)
    assert env == ENV
    assert len(frame) == 6
    assert set(RECORD_FIELDS) <= set(frame.columns)
    assert list(frame["impl"][:3]) == ["naive", "padded", "sorted"]


def test_a_failed_write_leaves_the_previous_run_and_no_temporary_file(tmp_path):
    path = runs.write_run(tmp_path / "run.json", ENV, run_fake())
    before = path.read_text()
    with pytest.raises(TypeError):
        runs.write_run(path, ENV, [{"family": object()}])
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["run.json"]


def test_the_run_file_appears_by_rename_from_its_own_directory(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((os.path.dirname(src), os.path.dirname(dst)))
        with open(src) as f:
            assert json.load(f)["profile"] == "tiny"  # complete before the rename
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    runs.write_run(tmp_path / "sub" / "run.json", ENV, [])
    assert renames == [(str(tmp_path / "sub"), str(tmp_path / "sub"))]


def test_run_path_names_profile_and_machine(tmp_path):
    path = runs.run_path(tmp_path, ENV)
    assert path.parent == tmp_path / "tiny-test-box"
    assert path.name.startswith("run-") and path.suffix == ".json"


# --- what asv reads ------------------------------------------------------------------------


def test_asv_records_and_lookup(tmp_path, monkeypatch):
    records = run_fake(fail={"padded": torch.OutOfMemoryError("no room")})
    path = runs.write_run(tmp_path / "run.json", ENV, records)
    monkeypatch.setenv("MOEBENCH_RUN", str(path))
    cache = asv.asv_records(grid.get_profile("tiny"), tmp_path)
    assert len(cache) == 6
    ok = asv.asv_lookup(cache, "scale-out", "E=8", "sorted", "collapse", ("time_ms",))
    assert ok["time_ms"] == 64.0
    with pytest.raises(NotImplementedError, match="out of memory: no room"):
        asv.asv_lookup(cache, "scale-out", "E=8", "padded", "collapse", ("time_ms",))
    with pytest.raises(NotImplementedError, match="dropped_fraction not measured"):
        asv.asv_lookup(cache, "scale-out", "E=8", "sorted", "collapse", ("dropped_fraction",))
    with pytest.raises(NotImplementedError, match="not in this run"):
        asv.asv_lookup(cache, "scale-out", "E=16", "sorted", "collapse", ("time_ms",))
    with pytest.raises(ValueError, match="'tiny' run; the suites were built for profile 'cpu'"):
        asv.asv_records(grid.get_profile("cpu"), tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--families", ""], "--families: an empty list; known: scale-out"),
        (["--skews", ","], "--skews: an empty list; known: balanced"),
        (["--output", "."], "--output . is a folder; give the run file's path"),
    ],
    ids=["no-families", "no-skews", "output-folder"],
)
def test_sweep_command_refuses_bad_arguments_before_measuring(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--profile", "tiny", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_run_files_that_are_not_runs_are_named(tmp_path):
    cases = {"missing.json": None, "cut.json": '{"env": {', "list.json": "[]",
             "other.json": '{"records": []}'}  # fmt: skip
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(runs.BadRun, match=name):
            runs.load_run(tmp_path / name)


def test_sweep_command_writes_a_run_of_the_profile(tmp_path, capsys):
    out = tmp_path / "run.json"
    args = ["--profile", "tiny", "--families", "scale-out", "--impls", "sorted,padded"]
    args += ["--skews", "balanced,collapse", "--output", str(out)]
    assert cli.main(["sweep", *args]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    env, frame = runs.load_run(out)
    assert env["profile"] == "tiny" and env["duration_s"] > 0
    assert env["ceilings"]["matmul_flops"] > 0
    assert env["torch_threads"] == 1  # the tiny profile's
    assert env["timing"] == sweep.timing_options(grid.get_profile("tiny"))
    assert len(frame) == 3 * 2 * 2
    assert set(frame["status"]) == {"ok"}


def test_timing_options_take_the_profile_floors_unless_counts_are_given():
    gpu = grid.get_profile("gpu")
    assert sweep.timing_options(gpu) == {
        "warmup": 3, "warmup_s": 0.05, "repeats": 20, "min_time_s": 0.1, "max_time_s": 0.5
    }  # fmt: skip
    given = sweep.timing_options(gpu, repeats=7, warmup=1)
    assert (given["repeats"], given["min_time_s"], given["warmup"], given["warmup_s"]) == (
        7, 0.0, 1, 0.0
    )  # fmt: skip
    cpu = sweep.timing_options(grid.get_profile("cpu"))
    assert cpu["warmup_s"] == cpu["min_time_s"] == 0.0  # the CPU profiles time by count


def test_sweep_times_with_the_profile_floors(monkeypatch):
    seen = []
    fixed = timing.Timing(median_ms=1.0, p20_ms=1.0, p80_ms=1.0, cv=0.0, repeats=3, label="")
    monkeypatch.setattr(sweep, "measure", lambda fn, timer, **kw: seen.append(kw) or fixed)
    tiny = dataclasses.replace(grid.get_profile("tiny"), warmup_s=0.02, min_time_s=0.03)
    sweep.run_points([POINT], ["sorted"], ["balanced"], profile=tiny, ceilings=FAKE_CEILINGS)
    assert seen == [sweep.timing_options(tiny)] and seen[0]["min_time_s"] == 0.03


def test_a_stopped_sweep_keeps_the_points_it_finished(tmp_path):
    out = tmp_path / "run.json"
    labels = [pt.label for pt in grid.points("scale-out", "tiny")]

    def progress(done, total, record):
        if record["label"] == labels[2]:
            raise KeyboardInterrupt  # a timeout or Ctrl-C during the third point

    with pytest.raises(KeyboardInterrupt):
        sweep.run_profile(
            "tiny", output=out, families=["scale-out"], impls=["sorted"],
            skews=["balanced", "random"], check=False, progress=progress,
        )  # fmt: skip
    env, frame = runs.load_run(out)
    assert env["partial"] is True and env["duration_s"] > 0
    assert list(frame["label"]) == [labels[0]] * 2 + [labels[1]] * 2
    assert set(frame["status"]) == {"ok"}
    sweep.run_profile("tiny", output=out, families=["scale-out"], impls=["sorted"],
                      skews=["balanced"], check=False)  # fmt: skip
    env, frame = runs.load_run(out)
    assert "partial" not in env and len(frame) == len(labels)


def test_train_families_count_the_padded_layers_drops():
    (point,) = [p for p in grid.points("models+bwd", "tiny") if p.label == "qwen3-235b-a22b/T=16"]
    (rec,) = sweep.run_points([point], ["padded"], ["collapse"], profile="tiny")
    assert rec["status"] == "ok", rec["reason"]
    dropped = round(rec["dropped_fraction"] * point.T * point.cfg.top_k)
    assert dropped > 0  # every token on the same K experts, capacity 1.25 x the mean
    per_pair = 6 * point.cfg.d_model * point.cfg.d_ff
    assert rec["flops"] == 3 * (point.cfg.flops(point.T) - dropped * per_pair)


class _DoubleGradient(torch.autograd.Function):
    """Identity forward; twice the gradient backward: a planted backward bug."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def test_train_families_check_every_gradient_against_float64():
    (point,) = [p for p in grid.points("models+bwd", "tiny") if p.label == "deepseek-v3/T=16"]
    impls = ["naive", "padded", "sorted"]
    records = sweep.run_points([point], impls, ["zipf:1.2"], profile="tiny", check=True)
    for r in records:
        assert r["status"] == "ok", r["reason"]
        assert r["rel_err"] < 1e-5, r["impl"]  # fp32 against float64
    assert records[1]["dropped_fraction"] > 0  # the padded layer's drops are accounted for

    def broken(x, routing, weights, **kw):  # a layer whose dx is twice the true one
        return mb.moe_forward(_DoubleGradient.apply(x), routing, weights, **kw)

    (rec,) = sweep.run_points(
        [point], ["sorted"], ["zipf:1.2"], profile="tiny", check=True, forward=broken
    )
    assert rec["rel_err"] == pytest.approx(1.0, rel=1e-3)  # ||2 dx - dx|| / ||dx||


def test_train_families_time_forward_and_backward():
    point = grid.points("models+bwd", "tiny")[0]
    assert point.family == "models+bwd" and "models+bwd" in grid.families("tiny")
    calls = []

    def forward(x, routing, weights, **kw):
        # Each timed call must see fresh leaves: no gradient kept from the previous step.
        calls.append(all(t.requires_grad and t.grad is None for t in weights.tensors().values()))
        return mb.moe_forward(x, routing, weights, **kw)

    (rec,) = sweep.run_points([point], ["sorted"], ["random"], profile="tiny", forward=forward)
    assert rec["status"] == "ok", rec["reason"]
    assert rec["flops"] == 3 * point.cfg.flops(point.T)
    assert rec["tflops"] == pytest.approx(rec["flops"] / (rec["time_ms"] * 1e-3) / 1e12)
    assert len(calls) >= 3 and all(calls)
