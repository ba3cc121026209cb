"""The ep family: records of the expert-parallel layer measured over gloo ranks."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import moebench.parallel as mp
from moebench import cli
from moebench.bench import ep, grid, report
from moebench.bench.oracle import tolerance
from moebench.bench.runs import load_run, read_run
from moebench.bench.sweep import run_profile

TINY = grid.PROFILES["tiny"]


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ep") / "run.json"
    return run_profile("tiny", output=path, families=[grid.EP], skews=("balanced", "hot:0.5"))


@pytest.fixture(scope="module")
def run(run_file):
    return read_run(run_file)


def test_every_world_size_is_measured_and_checked(run):
    records = run["records"]
    worlds = {r["world"] for r in records}
    assert worlds == set(TINY.ep_worlds)
    assert len(records) == len(grid.points(grid.EP, TINY)) * 2 * len(TINY.ep_impls)
    for r in records:
        assert r["status"] == "ok", r["reason"]
        assert r["rel_err"] < tolerance(r["dtype"])
        assert len(r["ranks"]) == r["world"]
        assert sum(rank["T"] for rank in r["ranks"]) == r["T"]
        # The step is the slowest rank per call: no rank's median total exceeds it.
        assert r["time_ms"] >= max(rank["total_ms"] for rank in r["ranks"]) * (1 - 1e-9)
        assert 0 < r["comm_share"] < 1
        assert r["straggler"] >= 1
    assert set(run["env"]["ep_calibration"]) == {str(w) for w in TINY.ep_worlds}


def test_the_bytes_are_the_routings_own(run):
    for r in run["records"]:
        point = next(pt for pt in grid.points(grid.EP, TINY) if pt.label == r["label"])
        routing = ep.ep_routing(point, r["skew"])
        counts = mp.row_counts(routing.ids, r["E"], r["world"])
        expect = mp.traffic(counts, r["D"], 4, slots=r["K"])  # float32 rows and weights
        for key, per_rank in expect.items():
            assert [rank[key] for rank in r["ranks"]] == per_rank, (r["label"], key)
        assert [rank["rows_recv"] for rank in r["ranks"]] == counts.sum(0).tolist()
        pairs = mp.row_counts(routing.ids, r["E"], r["world"], dedup=False)
        assert [rank["pairs_recv"] for rank in r["ranks"]] == pairs.sum(0).tolist()
        assert r["sent_bytes"] == sum(expect["dispatch_sent"]) + sum(expect["combine_sent"])
        if r["world"] == 1:
            assert r["sent_bytes"] == 0 and r["a2a_GBps"] is None


def test_a_group_limit_cuts_the_rows_sent(run):
    """M=1: every token's experts on one rank, so it sends one row, not one per rank."""
    by_key = {(r["label"], r["skew"]): r for r in run["records"]}
    for skew in ("balanced", "hot:0.5"):
        limited, free = by_key["W=2/E=8/M=1", skew], by_key["W=2/E=8", skew]
        assert limited["group_limit"] == 1 and free["group_limit"] is None
        rows = [sum(rank["rows_sent"] for rank in r["ranks"]) for r in (limited, free)]
        assert rows[0] == limited["T"] < rows[1]
        assert limited["sent_bytes"] < free["sent_bytes"]


def test_hot_routing_makes_a_straggler(run):
    """hot:0.5 sends half the pairs to one expert: its rank receives more than the others."""
    for r in run["records"]:
        if r["world"] > 1 and r["skew"] == "hot:0.5":
            received = [rank["pairs_recv"] for rank in r["ranks"]]
            assert max(received) > min(received)


def test_the_table_shows_each_record(run):
    table = ep.markdown(run["records"])
    assert table.count("\n") == len(run["records"]) + 1
    assert "| 2 | 8 | - | hot:0.5 | sorted |" in table
    assert "| 2 | 8 | 1 | hot:0.5 | sorted |" in table
    # A run of several families holds world as floats: the table still shows W=2.
    floats = ep.markdown([dict(r, world=float(r["world"])) for r in run["records"]])
    assert floats == table


def test_the_report_has_the_ep_section_plot_and_console_lines(run_file):
    written = report.write_report(run_file)
    assert run_file.parent / "plots" / "ep-comm-share.png" in written
    assert not (run_file.parent / "plots" / "throughput-ep.png").exists()
    text = (run_file.parent / "summary.md").read_text()
    assert "## ep" in text and "| 2 | 8 | - | hot:0.5 | sorted |" in text
    # The model against these ep records: every rank's bytes as measured.
    assert "## Expert parallelism: model vs measured" in text
    assert text.count("| exact |") == len(read_run(run_file)["records"])
    assert "DIFFER" not in text
    console = report.console_summary(*load_run(run_file))
    assert "comm share   W=1 " in console and "; W=2 " in console


def test_a_world_without_its_gpus_is_skipped_with_the_reason():
    gpus = dataclasses.replace(grid.PROFILES["gpu"], ep_worlds=(torch.cuda.device_count() + 1,))
    records, calibration = ep.run_ep(
        grid.points(grid.EP, gpus), ["sorted"], ["balanced"], profile=gpus
    )
    assert calibration == {}
    assert {r["status"] for r in records} == {"skipped"}
    assert "need" in records[0]["reason"] and "GPUs" in records[0]["reason"]


def test_a_failing_impl_skips_its_points_and_the_rest_are_measured():
    profile = dataclasses.replace(TINY, ep_worlds=(2,), ep_group_limits=())
    impls = ["test_parallel:_fail_on_rank_1", "test_parallel:_nan_on_rank_1", "sorted"]
    records, _ = ep.run_ep(grid.points(grid.EP, profile), impls, ["random"], profile=profile)
    failed, nan, ok = records
    assert failed["status"] == "skipped"
    assert "rank 1: RuntimeError: planted" in failed["reason"]
    assert nan["reason"] == "failed: WrongOutput: the output holds NaN or inf"
    assert ok["status"] == "ok"


def test_the_ep_command(capsys, tmp_path):
    out = tmp_path / "run.json"
    argv = ["ep", "--profile", "tiny", "--world-size", "2", "--skews", "random"]
    assert cli.main([*argv, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 2 | 8 | - | random | sorted |" in printed
    assert {r["world"] for r in read_run(out)["records"]} == {2}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--world-size", "0"], "expected positive integers"),
        (["--world-size", "4", "--experts", "2"], "E=2 experts over 4 ranks"),
        (["--impls", "nope"], "unknown impl"),
    ],
)
def test_the_ep_command_refuses_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["ep", "--profile", "tiny", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_torchrun_spreads_the_sweep_over_its_ranks(tmp_path):
    """Two gloo ranks under torchrun: each measures every other point, the ep family runs
    over both, and rank 0 writes one run file in the order one process would."""
    out = tmp_path / "run.json"
    argv = ["--profile", "tiny", "--families", "models,ep", "--impls", "sorted"]
    argv += ["--skews", "balanced", "--output", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "-m", "moebench", "sweep", *argv],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    records = read_run(out)["records"]
    expect = [pt.label for pt in grid.points("models", TINY)]
    assert [r["label"] for r in records if r["family"] == "models"] == expect
    assert all(r["status"] == "ok" for r in records if r["family"] == "models")
    ep_records = {r["label"]: r for r in records if r["family"] == grid.EP}
    assert ep_records["W=2/E=8"]["status"] == "ok"
    assert ep_records["W=1/E=8"]["reason"] == "unsupported: launched with 2 ranks"
