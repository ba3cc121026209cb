"""The regression gate: planted slowdowns and drifts are caught and named, noise is not."""

import json

import pandas as pd
import pytest
import torch
from gate_runs import ENV, IMPLS, fake_run, write

from moebench import cli
from moebench.bench import environment, gate, grid, oracle, regress, roofline, sweep
from moebench.layer import moe_forward


def verdicts(table, impl):
    return set(table.loc[table["impl"] == impl, "verdict"])


def test_planted_slowdown_is_caught_and_named(tmp_path, capsys):
    base, cand = fake_run(0), fake_run(1, slow="sorted", factor=1.2)
    table = gate.compare(base, cand)
    assert verdicts(table, "sorted") == {"SLOWER"}
    assert all(verdicts(table, impl) == {"same"} for impl in IMPLS if impl != "sorted")
    assert (table["verdict"].iloc[:4] == "SLOWER").all(), "regressions are listed first"

    code = cli.main(["gate", write(tmp_path / "b.json", base), write(tmp_path / "c.json", cand)])
    out = capsys.readouterr().out
    assert code == gate.EXIT_REGRESSION
    assert "gate: FAIL" in out and "SLOWER sorted scale-out E=64 zipf:1.2 float32" in out


def test_same_distribution_never_alarms():
    # 50 pairs of runs of one code at 2 % cv: none may alarm at the default 5 % threshold.
    for seed in range(50):
        table = gate.compare(fake_run(2 * seed), fake_run(2 * seed + 1))
        assert set(table["verdict"]) == {"same"}, table


def test_noisy_points_widen_their_own_limit():
    # At 5 % cv a 7 % slowdown is within 3 x cv: the gate must not call it.
    table = gate.compare(fake_run(0, cv=0.05), fake_run(1, cv=0.05, slow="naive", factor=1.07))
    assert verdicts(table, "naive") == {"same"}
    assert (table["limit"] > 0.09).all()


def test_improvement_is_reported_and_passes(tmp_path):
    base, cand = fake_run(0), fake_run(1, slow="padded", factor=0.7)
    table = gate.compare(base, cand)
    assert verdicts(table, "padded") == {"faster"}
    assert (
        cli.main(["gate", write(tmp_path / "b.json", base), write(tmp_path / "c.json", cand)]) == 0
    )


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
    assert set(gate.compare(fake_run(0), cand)["verdict"]) == {"same"}


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
    table = gate.compare(base, cand, allow_missing=True)
    assert list(table["verdict"]).count("missing") == 1


def test_point_skipped_on_one_side_is_refused_and_on_both_is_skipped():
    (benv, bdf), (cenv, cdf) = fake_run(0), fake_run(1)
    cdf.loc[0, ["status", "time_ms"]] = ["skipped", None]
    with pytest.raises(gate.Incomparable, match="ok only in the baseline"):
        gate.compare((benv, bdf), (cenv, cdf))
    bdf.loc[0, ["status", "time_ms"]] = ["skipped", None]
    cdf.loc[0, "reason"] = "out of memory: 80.0 GiB"
    table = gate.compare((benv, bdf), (cenv, cdf))
    assert list(table["verdict"]).count("skipped") == 1 and table["verdict"].iloc[-1] == "skipped"
    # The table says why the point did not run; points that ran have no reason.
    assert table["reason"].iloc[-1] == "out of memory: 80.0 GiB"
    assert table["reason"].iloc[:-1].isna().all()
    assert "out of memory: 80.0 GiB" in gate.format_table(table)


def test_point_that_fails_in_the_candidate_is_a_regression(tmp_path, capsys):
    base, (env, df) = fake_run(0), fake_run(1)
    df.loc[0, ["status", "time_ms", "rel_err"]] = ["skipped", None, None]
    df.loc[0, "reason"] = "failed: WrongOutput: the output holds NaN or inf"
    table = gate.compare(base, (env, df))
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
    with pytest.raises(gate.Incomparable, match=r"16 point\(s\) .* baseline only, e\.g\. naive"):
        gate.compare((benv, bdf), (cenv, cdf))
    # Neither side checked: the times are still gated.
    bdf["rel_err"] = None
    assert set(gate.compare((benv, bdf), (cenv, cdf))["verdict"]) == {"same"}


def test_correctness_drift_is_caught(capsys, tmp_path):
    base, cand = fake_run(0), fake_run(1, err={"triton": 3e-4})
    table = gate.compare(base, cand)
    assert verdicts(table, "triton") == {"WRONG"}
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


def test_best_of_takes_the_fastest_run_and_the_worst_error(tmp_path):
    quiet, (env, busy) = fake_run(0), fake_run(1, factor=1.5, slow="naive", err={"naive": 5e-5})
    merged = gate.best_of([quiet, (env, busy)])[1].set_index(gate.KEY)
    naive = merged.xs("naive", level="impl")
    assert (naive["time_ms"] < 6).all() and (naive["rel_err"] == 5e-5).all()
    assert (naive["spread"] > 0.3).all(), "the busy run's 1.5x shows as spread"
    assert (merged.xs("sorted", level="impl")["spread"] < 0.1).all()
    write(tmp_path / "r1.json", quiet)
    write(tmp_path / "r2.json", (env, busy))
    assert len(gate.load(tmp_path)[1]) == len(quiet[1])


def test_a_round_that_failed_stands_for_the_point():
    # The sweep finds NaN/inf only in checked rounds: regress checks its first round only.
    (env, failing), later = fake_run(1), fake_run(2)
    failing.loc[0, ["status", "time_ms", "rel_err"]] = ["skipped", None, None]
    failing.loc[0, "reason"] = "failed: WrongOutput: the output holds NaN or inf"
    later[1]["rel_err"] = None
    cand = gate.best_of([(env, failing), later])
    assert cand[1].loc[0, "status"] == "skipped"
    assert verdicts(gate.compare(fake_run(0), cand), "naive") == {"FAILED", "same"}


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
        ["b.json", "c.json", "--noise-mult", "nan"],
        ["b.json", "c.json", "--noise-mult", "x"],
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
CPU_RULE = {"threshold": gate.THRESHOLD["gate"]}


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


def sides(env, base_forward=None, cand_forward=None, rounds=2):
    """Baseline and candidate runs, alternated, each side merged by best_of."""

    def run(forward):
        records = sweep.run_points(
            POINTS, IMPLS_CPU, ["balanced"], profile="cpu", repeats=15, check=True,
            forward=forward, ceilings=CEILINGS,
        )  # fmt: skip
        return env, pd.DataFrame(records)

    sides = [(run(base_forward), run(cand_forward)) for _ in range(rounds)]
    return gate.best_of([b for b, _ in sides]), gate.best_of([c for _, c in sides])


def test_planted_slowdown_in_a_real_sweep_is_named(cpu_env):
    table = gate.compare(*sides(cpu_env, cand_forward=padded_three_times), **CPU_RULE)
    assert verdicts(table, "padded") == {"SLOWER"}, gate.format_table(table)
    assert "SLOWER" not in verdicts(table, "naive") | verdicts(table, "sorted")


def test_same_code_never_alarms_in_five_real_comparisons(cpu_env):
    for _ in range(5):
        table = gate.compare(*sides(cpu_env), **CPU_RULE)
        assert not table["verdict"].isin(gate.FAILING).any(), gate.format_table(table)


def test_correctness_drift_in_a_real_sweep_is_caught(cpu_env):
    table = gate.compare(*sides(cpu_env, cand_forward=sorted_drifting, rounds=1))
    assert verdicts(table, "sorted") == {"WRONG"}, gate.format_table(table)
    assert "WRONG" not in verdicts(table, "naive") | verdicts(table, "padded")


def naive_raising(x_TD, routing, weights, impl, **options):
    """The layer with the naive implementation broken."""
    if impl == "naive":
        raise RuntimeError("planted failure")
    return moe_forward(x_TD, routing, weights, impl=impl, **options)


def test_failing_layer_in_a_real_sweep_is_a_regression(cpu_env):
    table = gate.compare(*sides(cpu_env, cand_forward=naive_raising, rounds=1))
    assert verdicts(table, "naive") == {"FAILED"}, gate.format_table(table)
    assert table["reason"].iloc[0] == "failed: RuntimeError: planted failure"
