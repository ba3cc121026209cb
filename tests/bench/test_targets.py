import pandas as pd
import pytest
import torch

from moebench import cli, registry
from moebench.bench import profiling, runs, targets

ENV = {"profile": "gpu", "gpu": "H100", "ceilings": {"copy_bytes": 3e12}}


def record(family, label, impl, skew="random", time_ms=1.0, **fields):
    base = dict(family=family, label=label, impl=impl, skew=skew, status="ok", time_ms=time_ms,
                T=4096, D=1024, F=512, E=64, K=8, Fs=0, dtype="bfloat16", tflops=0.0,
                roofline_fraction=0.9, touched_experts=64)  # fmt: skip
    return base | fields


def frame(triton_ms=1.0, sonic_tflops=600.0, roofline=0.9, decode_ms=0.05, replay_ms=None,
          int4_ms=0.3, fp8_ms=0.6):  # fmt: skip
    """replay_ms: the triton points' graph replay times (None: the run has no replays)."""
    # decode point: 8 experts of 3*4096*14336 bf16 weights = 2.8 GB; at 3 TB/s ~ 0.94 ms
    return pd.DataFrame([
        record("sonicmoe", "E=64/F=1024/K=4", "triton", T=32768, tflops=sonic_tflops),
        record("scale-out", "E=64", "triton", time_ms=triton_ms, roofline_fraction=roofline,
               graph_ms=replay_ms and replay_ms[0]),
        record("scale-out", "E=64", "sorted", time_ms=1.0),
        record("models", "mixtral-8x7b/T=1", "triton", skew="balanced", T=1, D=4096,
               F=14336, E=8, K=2, touched_experts=8, time_ms=decode_ms,
               graph_ms=replay_ms and replay_ms[1]),
        record("models", "mixtral-8x7b/T=1", "sorted", skew="balanced", time_ms=2.0),
        record("models", "mixtral-8x7b/T=1", "naive", skew="balanced", status="skipped"),
        # 7e8 bytes read in 0.3 ms: 0.78 of 3 TB/s; the sonicmoe point's 1 ms in 0.6: 1.67x
        record("quant", "mixtral-8x7b/T=1/int4", "triton", skew="balanced", T=1, quant="int4",
               min_bytes=7e8, time_ms=int4_ms, graph_ms=replay_ms and int4_ms),
        record("quant", "E=64/F=1024/K=4/fp8-block", "triton", T=32768, quant="fp8-block",
               time_ms=fp8_ms),
    ])  # fmt: skip


def verdicts(table):
    return dict(zip(table["target"], table["met"], strict=True))


DECODE = "decode weight bandwidth / copy bandwidth"
INT4 = "int4 decode bytes read / copy bandwidth"
FP8 = "fp8-block SonicMoE shape, speed vs the dtype (x)"


def test_all_targets_met():
    table = targets.evaluate(ENV, frame(triton_ms=0.9, decode_ms=1.2, replay_ms=(0.9, 1.2)))
    assert list(table["met"]) == [True] * 9
    bandwidth = table.set_index("target").loc[f"{DECODE} (eager)"]
    assert bandwidth["worst"] == pytest.approx(3 * 4096 * 14336 * 8 * 2 / 1.2e-3 / 3e12)


@pytest.mark.parametrize(
    ("change", "missed"),
    [
        ({"sonic_tflops": 500.0}, ["SonicMoE shape, useful TFLOP/s"]),
        ({"triton_ms": 1.1}, ["speed vs sorted (x)"]),
        ({"roofline": 0.5}, ["fraction of roofline (eager)", "fraction of roofline (kernels)"]),
        ({"decode_ms": 2.0}, [f"{DECODE} (eager)"]),
        ({"int4_ms": 0.4}, [f"{INT4} (eager)", f"{INT4} (kernels)"]),
        ({"fp8_ms": 0.7}, [FP8]),
    ],
)
def test_each_missed_target_is_named(change, missed):
    change = {"triton_ms": 0.9, "decode_ms": 1.2, "replay_ms": (0.9, 1.2)} | change
    met = verdicts(targets.evaluate(ENV, frame(**change)))
    assert [name for name, ok in met.items() if not ok] == missed


def test_kernel_rows_use_the_replays():
    """Host-bound eager times miss; the graph replays of the same points meet the targets."""
    table = targets.evaluate(ENV, frame(triton_ms=0.9, roofline=0.3, decode_ms=4.0,
                                        replay_ms=(0.3, 1.2)))  # fmt: skip
    met = verdicts(table)
    assert not met["fraction of roofline (eager)"] and not met[f"{DECODE} (eager)"]
    assert met["fraction of roofline (kernels)"] and met[f"{DECODE} (kernels)"]
    worst = table.set_index("target")["worst"]
    assert worst["fraction of roofline (kernels)"] == pytest.approx(0.3 * 0.9 / 0.3)
    assert worst[f"{DECODE} (kernels)"] == pytest.approx(worst[f"{DECODE} (eager)"] * 4.0 / 1.2)


def test_a_run_without_replays_leaves_the_kernel_rows_unmeasured():
    table = targets.evaluate(ENV, frame(triton_ms=0.9, decode_ms=1.2)).set_index("target")
    assert table.loc["fraction of roofline (eager)", "met"]
    for row in ("fraction of roofline (kernels)", f"{DECODE} (kernels)"):
        assert table.loc[row, "met"] is None and table.loc[row, "at"] == "no points"


def test_a_run_without_triton_says_not_measured():
    table = targets.evaluate({"profile": "cpu"}, frame()[lambda f: f["impl"] != "triton"])
    assert table["met"].isna().all() and (table["at"] == "no points").all()
    assert "not measured" in targets.markdown({"profile": "cpu"}, frame().iloc[2:3])


def test_a_run_without_touched_experts_leaves_the_decode_rows_unmeasured(tmp_path):
    """Older runs lack the column; load_run fills it with None."""
    records = frame(triton_ms=0.9, decode_ms=1.2, replay_ms=(0.9, 1.2))
    records = records.drop(columns="touched_experts").to_dict("records")
    run = runs.write_run(tmp_path / "run-1.json", ENV, records)
    table = targets.evaluate(*runs.load_run(run)).set_index("target")
    decode = [f"{DECODE} (eager)", f"{DECODE} (kernels)"]
    for row in decode:
        assert table.loc[row, "met"] is None and table.loc[row, "at"] == "no points"
    assert table.drop(index=decode)["met"].tolist() == [True] * 7


@pytest.mark.parametrize("content", [None, '{"env": {"profile": "gpu"}, "rec', "[]"],
                         ids=["missing", "truncated", "not a run"])  # fmt: skip
def test_a_bad_run_file_is_one_line_and_exit_2(tmp_path, capsys, content):
    path = tmp_path / "run-1.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["targets", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"moebench: error: {path}: ") and captured.err.count("\n") == 1
    assert captured.out == ""


def test_kernels_rerun_each_missed_targets_worst_point(tmp_path, capsys):
    """--kernels N reruns the worst point of each missed target on the run's profile (tiny:
    the CPU, where triton runs under the interpreter) and lists its N largest ops; a point
    that the profile no longer has is named instead."""
    env = {"profile": "tiny", "ceilings": {"copy_bytes": 3e12}}
    shape = dict(T=64, D=32, F=16, E=16, K=4, dtype="float32")
    records = [
        record("scale-out", "E=16", "triton", time_ms=0.9, roofline_fraction=0.3, **shape),
        record("scale-out", "E=16", "sorted", time_ms=1.0, **shape),
        record("iso-params", "E=99", "triton", time_ms=1.0, **shape),
        record("iso-params", "E=99", "sorted", time_ms=0.5, **shape),
    ]
    run = runs.write_run(tmp_path / "run-1.json", env, records)
    assert cli.main(["targets", str(run), "--kernels", "3"]) == 0
    out = capsys.readouterr().out
    _, _, listing = out.partition("Where the triton layer's time goes")
    speed, _, roofline = listing.partition("scale-out E=16 random: worst for fraction of roofline")
    assert "iso-params E=99 random: worst for speed vs sorted (x)" in speed
    assert "no breakdown: ValueError: profile tiny has no point iso-params E=99 here" in speed
    if torch.cuda.is_available():  # the tiny profile runs on the CPU, without the interpreter
        assert "needs a CUDA device" in roofline
    else:  # the total, a header, three ops
        assert "us per call in" in roofline and len(roofline.strip().splitlines()) == 1 + 2 + 3


def test_kernels_reruns_every_missed_target_when_all_were_measured(monkeypatch):
    """Every target measured and missed: one rerun per worst point, each target named at
    its point (the rerun itself stubbed: the listing is under test)."""
    reruns = []

    def op_breakdown(point, impl, skew, *, profile):
        reruns.append((point.family, point.label, impl, skew, profile))
        kernels = [{"name": "_gate_up_kernel", "time_us": 3.0, "calls": 1.0}]
        return profiling.Breakdown(kernels, [{"name": "jit.py:1 run", "time_us": 9.0, "calls": 2}])

    monkeypatch.setattr(cli.profiling, "op_breakdown", op_breakdown)
    missed = frame(sonic_tflops=500.0, triton_ms=1.1, roofline=0.3, decode_ms=4.0,
                   replay_ms=(1.1, 4.0))  # fmt: skip
    text = cli.breakdowns(ENV, missed, 3)
    assert reruns == [  # in the order of the targets they are worst for first
        ("sonicmoe", "E=64/F=1024/K=4", "triton", "random", "gpu"),
        ("models", "mixtral-8x7b/T=1", "triton", "balanced", "gpu"),  # 2 ms vs 4 ms
        ("scale-out", "E=64", "triton", "random", "gpu"),
    ]
    assert "mixtral-8x7b/T=1 balanced: worst for speed vs sorted (x); decode weight" in text
    assert "E=64 random: worst for fraction of roofline (eager); fraction of roofline (k" in text
    assert text.count("_gate_up_kernel") == 3
    # the gpu profile: each point's host functions too
    assert text.count("host time issuing one call") == 3 and text.count("jit.py:1 run") == 3


def test_kernels_also_rerun_the_median_miss_of_each_missed_target(monkeypatch):
    """Roofline missed at 0.1, 0.3 and 0.5 and met at 0.7: the worst point is the 0.1 one,
    the median miss the 0.3 one; a target with one missed point reruns it once."""
    reruns = []

    def op_breakdown(point, impl, skew, *, profile):
        reruns.append((point.label, skew))
        return profiling.Breakdown([], [])

    monkeypatch.setattr(cli.profiling, "op_breakdown", op_breakdown)
    rows = [
        record("scale-out", "E=64", impl, skew=skew, time_ms=t, roofline_fraction=f)
        for skew, f in (("balanced", 0.3), ("random", 0.7), ("hot:0.5", 0.5), ("collapse", 0.1))
        for impl, t in (("triton", 0.9), ("sorted", 1.0))
    ]
    sonic = record("sonicmoe", "E=64/F=1024/K=4", "triton", T=32768, tflops=600.0)
    missed = pd.DataFrame([sonic, *rows])
    table = targets.evaluate(ENV, missed).set_index("target")
    roofline = table.loc["fraction of roofline (eager)"]
    assert roofline["point"] == ("scale-out", "E=64", "collapse")
    assert roofline["typical"] == ("scale-out", "E=64", "balanced")
    assert table.loc["SonicMoE shape, useful TFLOP/s", "typical"] is None  # 600: met
    text = cli.breakdowns(ENV, missed, 3)
    assert reruns == [("E=64", "collapse"), ("E=64", "balanced")]
    assert "E=64 balanced: median miss of fraction of roofline (eager)" in text


def test_kernels_with_no_target_missed_reruns_nothing():
    met = frame(triton_ms=0.9, decode_ms=1.2, replay_ms=(0.9, 1.2))
    assert cli.breakdowns(ENV, met, 8) == "No target missed: no point to rerun.\n"


def test_kernels_must_not_be_negative(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["targets", str(tmp_path / "run-1.json"), "--kernels", "-1"])
    assert exit_.value.code == 2 and "must be >= 0, got -1" in capsys.readouterr().err


def test_origin_of_an_impl_by_its_name_alone():
    """A plug-in installed where the run was measured, not here, is outside; nothing is
    imported to tell."""
    kinds = {i: registry.kind(i) for i in ("sorted", "triton", "hf-grouped_mm", "vllm")}
    assert kinds == {"sorted": "own", "triton": "own", "hf-grouped_mm": "peer", "vllm": "peer"}
    assert registry.kind("not-installed-here") == "outside"
    assert registry.kind("some_module:forward") == "outside"


def peers_frame(triton=True):
    """Two points: at E=64 hf-grouped_mm (1.5 ms) is the best peer and triton (1 ms) 1.5x
    faster; at E=128 hf-eager (0.8 ms) beats triton. The plug-in is faster still, but it is
    no peer."""
    times = {
        "E=64": {"triton": 1.0, "sorted": 2.0, "hf-eager": 3.0, "hf-grouped_mm": 1.5,
                 "not-installed-here": 0.5},
        "E=128": {"triton": 1.0, "sorted": 1.6, "hf-eager": 0.8, "hf-grouped_mm": 2.0,
                  "not-installed-here": 0.5},
    }  # fmt: skip
    rows = [
        record("scale-out", label, impl, time_ms=ms, rel_err=1e-3 if impl == "hf-eager" else 0)
        for label, impls in times.items()
        for impl, ms in impls.items()
    ]
    rows.append(record("scale-out", "E=64", "vllm", status="skipped", time_ms=None))
    if not triton:  # a CPU run: triton is not timed
        rows = [r | {"status": "skipped"} if r["impl"] == "triton" else r for r in rows]
    return pd.DataFrame(rows)


def test_triton_against_the_fastest_peer_at_each_point():
    versus = targets.versus_peers(peers_frame())
    assert versus["label"].tolist() == ["E=64", "E=128"]
    assert versus["ours"].tolist() == ["triton", "triton"]
    assert versus["peer"].tolist() == ["hf-grouped_mm", "hf-eager"]
    assert versus["vs_best_peer"].tolist() == pytest.approx([1.5, 0.8])  # the peer's / triton's
    assert versus["peer_rel_err"].tolist() == [0, 1e-3]
    text = targets.markdown(ENV, peers_frame())
    assert "| scale-out | E=64 | random | 1 | hf-grouped_mm | 1.5 | 1.50x |" in text
    assert "| scale-out | E=128 | random | 1 | hf-eager | 0.8 | 0.80x |" in text
    # The report and the job's console say it their own way.
    assert "best peer" not in targets.markdown(ENV, peers_frame(), per_point=False)


def test_without_triton_moebench_fastest_layer_meets_the_peers():
    """A CPU run: the comparison is with moebench's fastest layer; the targets say nothing
    of it, being the triton layer's."""
    versus = targets.versus_peers(peers_frame(triton=False))
    assert versus["ours"].tolist() == ["sorted", "sorted"]
    assert versus["vs_best_peer"].tolist() == pytest.approx([1.5 / 2.0, 0.8 / 1.6])
    assert "best peer" not in targets.markdown(ENV, peers_frame(triton=False))


def test_no_peer_table_without_peers():
    assert targets.versus_peers(frame()).empty
    assert "best peer" not in targets.markdown(ENV, frame())
