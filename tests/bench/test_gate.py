"""The regression gate: planted slowdowns and drifts are caught and named, noise is not."""

import json
import re

import pandas as pd
import pytest
import torch
from gate_runs import ENV, IMPLS, fake_run, rounds, write

from moebench import cli
from moebench.bench import environment, gate, grid, oracle, regress, roofline, sweep
from moebench.layer import moe_forward


def verdicts(comparison, impl):
    table = comparison.points
    return set(table.loc[table["impl"] == impl, "verdict"])


def group(comparison, name):
    return comparison.groups.set_index("group").loc[name]


def four_rounds(seed, **kwargs):
    return rounds(*(fake_run(seed * 10 + r, round_=r, **kwargs) for r in range(4)))


def test_planted_slowdown_is_caught_and_named(tmp_path, capsys):
    base, cand = four_rounds(0), four_rounds(1, slow="sorted", factor=1.3)
    comparison = gate.compare(base, cand)
    assert verdicts(comparison, "sorted") == {"SLOWER"}
    assert all(verdicts(comparison, impl) == {"same"} for impl in IMPLS if impl != "sorted")
    assert (comparison.points["verdict"].iloc[:4] == "SLOWER").all(), "regressions come first"
    sorted_ = group(comparison, "impl sorted")
    assert sorted_["verdict"] == "SLOWER" and sorted_["low"] < 1.3 < sorted_["high"]
    assert group(comparison, "impl naive")["verdict"] == "same"

    code = cli.main(["gate", write(tmp_path / "b.json", base), write(tmp_path / "c.json", cand)])
    out = capsys.readouterr().out
    assert code == gate.EXIT_REGRESSION
    failing = out.partition("gate: FAIL")[2]
    assert "SLOWER sorted scale-out E=64 zipf:1.2 float32" in failing
    assert "SLOWER impl sorted" in failing and "impl naive" not in failing
    assert re.search(r"impl sorted: 1\.[23]\d\dx \[1\.\d{3}, 1\.\d{3}\] SLOWER", out)


def test_same_distribution_never_alarms():
    # 50 pairs of runs of one code at 2 % cv: none may alarm, at the point or aggregate.
    for seed in range(50):
        comparison = gate.compare(fake_run(2 * seed), fake_run(2 * seed + 1))
        assert set(comparison.points["verdict"]) == {"same"}, comparison.points
        assert set(comparison.groups["verdict"]) == {"same"}, comparison.groups


def test_a_slowdown_too_small_for_any_point_is_caught_in_its_aggregate():
    # 10 % slower everywhere, under 8 % noise: no point is sure in every round, the
    # implementation's 16 blocks are.
    comparison = gate.compare(
        four_rounds(0, cv=0.08, repeats=5), four_rounds(1, cv=0.08, repeats=5, slow="padded",
                                                        factor=1.1)
    )  # fmt: skip
    assert verdicts(comparison, "padded") == {"same"}
    padded = group(comparison, "impl padded")
    assert padded["verdict"] == "SLOWER" and padded["blocks"] == 16 and padded["points"] == 8
    assert padded["low"] > 1.0 and padded["q"] <= gate.FDR
    assert set(comparison.groups["verdict"]) - {"SLOWER"} == {"same"}
    assert group(comparison, "impl sorted")["verdict"] == "same"


def test_a_slowdown_below_the_threshold_is_significant_but_passes():
    base, cand = four_rounds(0, cv=0.005), four_rounds(1, cv=0.005, slow="naive", factor=1.03)
    comparison = gate.compare(base, cand)
    naive = group(comparison, "impl naive")
    assert naive["q"] <= gate.FDR and naive["low"] > 1.0 and naive["verdict"] == "same"
    assert group(gate.compare(base, cand, threshold=0.02), "impl naive")["verdict"] == "SLOWER"


def test_one_busy_round_does_not_fail_a_point():
    # A point twice as slow in one of four rounds (a busy spell) is not slower.
    runs = [fake_run(10 + r, round_=r) for r in range(4)]
    busy = runs[2][1]
    busy.loc[busy["impl"] == "sorted", "samples_ms"] = busy.loc[
        busy["impl"] == "sorted", "samples_ms"
    ].map(lambda times: [2 * t for t in times])
    busy.loc[busy["impl"] == "sorted", "time_ms"] *= 2
    comparison = gate.compare(four_rounds(0), rounds(*runs))
    assert verdicts(comparison, "sorted") == {"same"}
    assert group(comparison, "impl sorted")["verdict"] == "same"
    # In every round it is.
    every = [fake_run(10 + r, round_=r, slow="sorted", factor=2.0) for r in range(4)]
    assert verdicts(gate.compare(four_rounds(0), rounds(*every)), "sorted") == {"SLOWER"}


def test_a_baseline_without_repeats_is_gated_by_its_aggregates():
    # Runs from before samples_ms keep medians only: no point can be tested alone.
    base = rounds(*(fake_run(r, round_=r, samples=False) for r in range(4)))
    cand = four_rounds(1, slow="sorted", factor=1.2)
    comparison = gate.compare(base, cand)
    assert verdicts(comparison, "sorted") == {"same"}
    assert comparison.points["low"].isna().all() and comparison.points["q"].isna().all()
    assert group(comparison, "impl sorted")["verdict"] == "SLOWER"


def test_improvement_is_reported_and_passes(tmp_path):
    base, cand = four_rounds(0), four_rounds(1, slow="padded", factor=0.7)
    comparison = gate.compare(base, cand)
    assert verdicts(comparison, "padded") == {"faster"}
    assert group(comparison, "impl padded")["verdict"] == "faster"
    assert (
        cli.main(["gate", write(tmp_path / "b.json", base), write(tmp_path / "c.json", cand)]) == 0
    )


def test_rounds_are_read_in_their_numbers_order(tmp_path):
    # round-10 after round-2: rounds are paired by index with the other side's.
    for r in range(11):
        write(tmp_path / f"round-{r}.json", fake_run(r, round_=r, slow="naive", factor=1 + r))
    df = gate.load(tmp_path)[1]
    naive = df[(df["impl"] == "naive") & (df["label"] == "E=8") & (df["skew"] == "balanced")]
    assert list(naive.sort_values("round")["time_ms"].round()) == [2.0 * (1 + r) for r in range(11)]


def test_rounds_of_unequal_count_pair_in_turn():
    base, cand = fake_run(0), four_rounds(1, slow="sorted", factor=1.3)
    comparison = gate.compare(base, cand)
    assert group(comparison, "impl sorted")["blocks"] == 16  # 4 labels x 4 candidate rounds
    assert verdicts(comparison, "sorted") == {"SLOWER"}


@pytest.mark.parametrize("field", ["machine", "gpu", "torch", "harness_version", "profile", "l2"])
def test_other_environment_is_refused_naming_the_field(tmp_path, capsys, field):
    cand = fake_run(1, env={**ENV, field: "something else"})
    with pytest.raises(gate.Incomparable, match=field):
        gate.compare(fake_run(0), cand)
    code = cli.main(
        ["gate", write(tmp_path / "b.json", fake_run(0)), write(tmp_path / "c.json", cand)]
    )
    assert code == gate.EXIT_INCOMPARABLE
    assert f"{field}: baseline" in capsys.readouterr().err


def test_commit_and_date_may_differ():
    cand = fake_run(1, env={**ENV, "commit": "1" * 40, "date": "tomorrow"})
    assert set(gate.compare(fake_run(0), cand).points["verdict"]) == {"same"}


def unknown_dtype_run():
    env, df = fake_run(1)
    df.loc[5, "dtype"] = "int8"
    return json.dumps({"env": env, "records": df.to_dict("records")})


# A candidate file that is not a run the gate can judge, and what the message says about it.
BAD_FILES = {
    "missing": (None, "No such file"),
    "empty": ("", "not JSON"),
    "truncated": ('{"env": {"machine": "ci-box"}, "records": [{"family": "scale-', "not JSON"),
    "no env": ('{"records": []}', "not a moebench run"),
    "a list": ("[1, 2]", "not a moebench run"),
    "unknown dtype": (unknown_dtype_run(), "no correctness tolerance for dtype 'int8'"),
}


@pytest.mark.parametrize("bad", BAD_FILES)
def test_file_that_is_not_a_run_is_incomparable_in_one_line(tmp_path, capsys, bad):
    text, problem = BAD_FILES[bad]
    path = tmp_path / "c.json"
    if text is not None:
        path.write_text(text)
    assert cli.main(["gate", write(tmp_path / "b.json", fake_run(0)), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gate: INCOMPARABLE: {path}: ") and err.count("\n") == 1
    assert problem in err


def test_empty_directory_of_rounds_is_incomparable(tmp_path, capsys):
    (tmp_path / "rounds").mkdir()
    cand = write(tmp_path / "c.json", fake_run(1))
    assert cli.main(["gate", str(tmp_path / "rounds"), cand]) == gate.EXIT_INCOMPARABLE
    assert f"{tmp_path / 'rounds'}: no run files" in capsys.readouterr().err


def test_point_missing_on_one_side_is_refused_unless_allowed():
    base, (env, df) = fake_run(0), fake_run(1)
    cand = (env, df.drop(index=3))
    with pytest.raises(
        gate.Incomparable, match=r"naive scale-out E=64 zipf:1\.2 float32: ok only in the baseline"
    ):
        gate.compare(base, cand)
    table = gate.compare(base, cand, allow_missing=True).points
    assert list(table["verdict"]).count("missing") == 1


def test_point_skipped_on_one_side_is_refused_and_on_both_is_skipped():
    (benv, bdf), (cenv, cdf) = fake_run(0), fake_run(1)
    cdf.loc[0, ["status", "time_ms"]] = ["skipped", None]
    with pytest.raises(gate.Incomparable, match="ok only in the baseline"):
        gate.compare((benv, bdf), (cenv, cdf))
    bdf.loc[0, ["status", "time_ms"]] = ["skipped", None]
    cdf.loc[0, "reason"] = "out of memory: 80.0 GiB"
    table = gate.compare((benv, bdf), (cenv, cdf)).points
    assert list(table["verdict"]).count("skipped") == 1 and table["verdict"].iloc[-1] == "skipped"
    # The table says why the point did not run; points that ran have no reason.
    assert table["reason"].iloc[-1] == "out of memory: 80.0 GiB"
    assert table["reason"].iloc[:-1].isna().all()
    assert "out of memory: 80.0 GiB" in gate.format_table(table)


def test_point_that_fails_in_the_candidate_is_a_regression(tmp_path, capsys):
    base, (env, df) = fake_run(0), fake_run(1)
    df.loc[0, ["status", "time_ms", "rel_err"]] = ["skipped", None, None]
    df.loc[0, "reason"] = "failed: WrongOutput: the output holds NaN or inf"
    table = gate.compare(base, (env, df)).points
    assert list(table["verdict"]).count("FAILED") == 1 and table["verdict"].iloc[0] == "FAILED"
    assert table["reason"].iloc[0] == "failed: WrongOutput: the output holds NaN or inf"
    code = cli.main(
        ["gate", write(tmp_path / "b.json", base), write(tmp_path / "c.json", (env, df))]
    )
    out = capsys.readouterr().out
    assert code == gate.EXIT_REGRESSION
    assert "FAILED naive scale-out E=8 balanced float32" in out.partition("gate: FAIL")[2]
    # Out of memory is no verdict on the code: the point is still refused.
    df.loc[0, "reason"] = "out of memory: 80.0 GiB"
    with pytest.raises(gate.Incomparable, match="ok only in the baseline"):
        gate.compare(base, (env, df))


def test_candidate_unchecked_where_the_baseline_was_checked_is_refused():
    (benv, bdf), (cenv, cdf) = fake_run(0), fake_run(1)
    cdf["rel_err"] = None
    with pytest.raises(gate.Incomparable, match=r"32 point\(s\) .* baseline only, e\.g\. naive"):
        gate.compare((benv, bdf), (cenv, cdf))
    # Neither side checked: the times are still gated.
    bdf["rel_err"] = None
    assert set(gate.compare((benv, bdf), (cenv, cdf)).points["verdict"]) == {"same"}


def test_correctness_drift_is_caught(capsys, tmp_path):
    base, cand = fake_run(0), fake_run(1, err={"triton": 3e-4})
    assert verdicts(gate.compare(base, cand), "triton") == {"WRONG"}
    assert (
        cli.main(["gate", write(tmp_path / "b.json", base), write(tmp_path / "c.json", cand)]) == 1
    )
    assert "WRONG triton" in capsys.readouterr().out


def test_error_over_tolerance_in_the_baseline_may_not_double():
    base = fake_run(0, err={"padded": 1e-3})
    assert verdicts(gate.compare(base, fake_run(1, err={"padded": 1.5e-3})), "padded") == {"same"}
    assert verdicts(gate.compare(base, fake_run(1, err={"padded": 2.5e-3})), "padded") == {"WRONG"}


def test_tolerance_table_knows_short_and_torch_names():
    assert oracle.tolerance("bf16") == oracle.tolerance("torch.bfloat16") == 2e-2
    with pytest.raises(ValueError, match="int8"):
        oracle.tolerance("int8")


def test_a_round_that_failed_stands_for_the_point():
    # The sweep finds NaN/inf only in checked rounds: regress checks its first round only.
    (env, failing), later = fake_run(1), fake_run(2, round_=1)
    failing.loc[0, ["status", "time_ms", "rel_err"]] = ["skipped", None, None]
    failing.loc[0, "reason"] = "failed: WrongOutput: the output holds NaN or inf"
    comparison = gate.compare(
        rounds(fake_run(0), fake_run(3, round_=1)), rounds((env, failing), later)
    )
    assert verdicts(comparison, "naive") == {"FAILED", "same"}


def test_the_worst_error_of_the_rounds_counts():
    base = rounds(fake_run(0), fake_run(1, round_=1))
    cand = rounds(fake_run(2), fake_run(3, round_=1))
    cand[1].loc[(cand[1]["round"] == 1) & (cand[1]["impl"] == "sorted"), "rel_err"] = 1e-3
    assert verdicts(gate.compare(base, cand), "sorted") == {"WRONG"}


@pytest.mark.parametrize(
    "argv",
    [
        ["regress", "--rounds", "0"],
        ["regress", "--rounds", "-1"],
        ["regress", "--rounds", "1.5"],
        ["regress", "--threshold", "nan"],
        ["b.json", "c.json", "--threshold", "nan"],
        ["b.json", "c.json", "--threshold", "-0.1"],
        ["b.json", "c.json", "--threshold", "inf"],
        ["b.json", "c.json", "--fdr", "nan"],
        ["b.json", "c.json", "--fdr", "1"],
        ["b.json", "c.json", "--fdr", "0"],
        ["b.json", "c.json", "--fdr", "x"],
    ],
    ids=" ".join,
)
def test_bad_rule_arguments_are_argparse_errors(monkeypatch, capsys, argv):
    monkeypatch.setattr(regress, "regress", lambda args: pytest.fail(f"ran with {args}"))
    monkeypatch.setattr(cli, "gate", lambda *a, **rule: pytest.fail(f"ran with {rule}"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv if argv[0] == "regress" else ["gate", *argv])
    assert exit_.value.code == 2
    assert f"error: argument {argv[-2]}: " in capsys.readouterr().err


def test_good_rule_arguments_are_taken(monkeypatch):
    monkeypatch.setattr(regress, "regress", lambda args: (args.rounds, args.threshold))
    assert cli.main(["regress", "--rounds", "2", "--threshold", "0"]) == (2, 0.0)


# --- end to end: real sweeps through moebench.bench.sweep ---------------------------------

# One point of the cpu profile: ~10 ms a call, long enough that one preemption does not
# cover a whole point's repeats (the tiny profile's 0.3 ms calls are at its mercy).
POINTS = [pt for pt in grid.points("scale-out", "cpu") if pt.label == "E=8"]
IMPLS_CPU = ("naive", "padded", "sorted")
CEILINGS = roofline.Ceilings(matmul_flops=1e11, copy_bytes=1e10, label="fixed for tests")


def padded_three_times(x_TD, routing, weights, impl, **options):
    """The layer with the padded implementation's work done three times: a planted 3x."""
    for _ in range(2 if impl == "padded" else 0):
        moe_forward(x_TD, routing, weights, impl=impl, **options)
    return moe_forward(x_TD, routing, weights, impl=impl, **options)


def sorted_drifting(x_TD, routing, weights, impl, **options):
    """The layer with the sorted implementation's output off by about 1e-3."""
    y_TD = moe_forward(x_TD, routing, weights, impl=impl, **options)
    if impl == "sorted":
        y_TD += 1e-3 * y_TD.abs().mean() * torch.randn_like(y_TD)
    return y_TD


@pytest.fixture(scope="module")
def cpu_env():
    return environment.environment("cpu")


def sides(env, base_forward=None, cand_forward=None, n_rounds=2):
    """Baseline and candidate runs, alternated, as rounds of each side."""

    def run(forward, r):
        records = sweep.run_points(
            POINTS, IMPLS_CPU, ["balanced", "zipf:1.2"], profile="cpu", repeats=15,
            check=r == 0, forward=forward, ceilings=CEILINGS,
        )  # fmt: skip
        return env, pd.DataFrame(records)

    pairs = [(run(base_forward, r), run(cand_forward, r)) for r in range(n_rounds)]
    return rounds(*(b for b, _ in pairs)), rounds(*(c for _, c in pairs))


def test_planted_slowdown_in_a_real_sweep_is_named(cpu_env):
    comparison = gate.compare(*sides(cpu_env, cand_forward=padded_three_times))
    assert verdicts(comparison, "padded") == {"SLOWER"}, gate.format_table(comparison.points)
    assert "SLOWER" not in verdicts(comparison, "naive") | verdicts(comparison, "sorted")


def test_same_code_never_alarms_in_five_real_comparisons(cpu_env):
    # 4 rounds, as the CPU gate takes: one busy round must not decide a point.
    for _ in range(5):
        comparison = gate.compare(*sides(cpu_env, n_rounds=4))
        assert not comparison.failed, gate.format_table(comparison.points)


def test_correctness_drift_in_a_real_sweep_is_caught(cpu_env):
    comparison = gate.compare(*sides(cpu_env, cand_forward=sorted_drifting, n_rounds=1))
    assert verdicts(comparison, "sorted") == {"WRONG"}, gate.format_table(comparison.points)
    assert "WRONG" not in verdicts(comparison, "naive") | verdicts(comparison, "padded")


def naive_raising(x_TD, routing, weights, impl, **options):
    """The layer with the naive implementation broken."""
    if impl == "naive":
        raise RuntimeError("planted failure")
    return moe_forward(x_TD, routing, weights, impl=impl, **options)


def test_failing_layer_in_a_real_sweep_is_a_regression(cpu_env):
    comparison = gate.compare(*sides(cpu_env, cand_forward=naive_raising, n_rounds=1))
    assert verdicts(comparison, "naive") == {"FAILED"}, gate.format_table(comparison.points)
    assert comparison.points["reason"].iloc[0] == "failed: RuntimeError: planted failure"


def counted(seed, factor=1.0, impl="sorted"):
    """One count a point, as the micro-benchmarks' callgrind runs give."""
    env, df = fake_run(seed, cv=1e-4, repeats=1, slow=impl, factor=factor)
    return {**env, "timer": gate.INSTRUCTIONS}, df


def test_instruction_counts_are_judged_by_the_threshold_alone(tmp_path, capsys):
    # One count a side is no sample for a test; counts do not move with load.
    comparison = gate.compare(counted(0), counted(1, factor=1.03))
    assert comparison.counted and verdicts(comparison, "sorted") == {"SLOWER"}
    assert group(comparison, "impl sorted")["verdict"] == "SLOWER"
    assert all(verdicts(comparison, impl) == {"same"} for impl in IMPLS if impl != "sorted")
    assert verdicts(gate.compare(counted(0), counted(1, factor=1.01)), "sorted") == {"same"}
    code = cli.main(["gate", write(tmp_path / "b.json", counted(0)),
                     write(tmp_path / "c.json", counted(1, factor=1.03))])  # fmt: skip
    assert code == gate.EXIT_REGRESSION
    assert "millions of instructions a call" in capsys.readouterr().out
