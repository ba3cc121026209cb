"""moebench regress: choosing the baseline, and measuring it, before the move too."""

import subprocess
from pathlib import Path

import pytest
from gate_runs import ENV, fake_run, write

from moebench import cli
from moebench.bench import environment, gate, grid, regress

ROOT = Path(__file__).resolve().parents[2]
PRE_MOVE = "c7ee136"  # the last commit with moebench/sweep.py, grid.py, harness.py, gate.py


def git(repo, *args):
    out = subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True)
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git repository with two commits on main; a package without the harness."""
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "moebench").mkdir()
    for n in (1, 2):
        (tmp_path / "moebench" / "__init__.py").write_text(f"VERSION = {n}\n")
        git(tmp_path, "add", "-A")
        git(tmp_path, "commit", "-q", "-m", f"commit {n}")
    return tmp_path


def test_baseline_is_the_merge_base_with_main(repo):
    main = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", "feature")
    (repo / "moebench" / "__init__.py").write_text("VERSION = 3\n")
    git(repo, "commit", "-q", "-am", "feature")
    assert regress.resolve_baseline(None, repo, "gate") == main
    assert regress.resolve_baseline("HEAD", repo, "gate") == git(repo, "rev-parse", "HEAD")


def test_on_clean_main_the_baseline_is_the_committed_run_else_the_parent(repo):
    assert regress.resolve_baseline(None, repo, "gate") == git(repo, "rev-parse", "HEAD~1")
    env, df = fake_run(0, env={**ENV, "machine": environment.machine_name(), "profile": "gate"})
    run = repo / "results" / "gate-box" / "run.json"
    run.parent.mkdir(parents=True)
    write(run, (env, df))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "results")
    assert regress.resolve_baseline(None, repo, "gate") == run
    assert regress.resolve_baseline(None, repo, "gpu") == git(repo, "rev-parse", "HEAD~1")


def test_committed_files_that_are_not_runs_are_passed_over(repo):
    env = {**ENV, "machine": environment.machine_name(), "profile": "gate"}
    run = repo / "results" / "gate-box" / "run.json"
    run.parent.mkdir(parents=True)
    write(run, fake_run(0, env=env))
    (run.parent / "run-truncated.json").write_text(run.read_text()[:200])
    (repo / "results" / "benchmarks.json").write_text('{"version": 2}')
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "results")
    assert regress.resolve_baseline(None, repo, "gate") == run


def test_a_baseline_without_a_package_is_refused(repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    code = cli.main(["regress", "--baseline", "HEAD~1", "--profile", "tiny", "--rounds", "1"])
    assert code == gate.EXIT_INCOMPARABLE
    assert "measuring the code at" in capsys.readouterr().err


def _has_commit(rev: str) -> bool:
    done = subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=ROOT)
    return done.returncode == 0


@pytest.mark.skipif(not _has_commit(PRE_MOVE), reason=f"{PRE_MOVE} is not in this clone")
def test_a_baseline_from_before_the_move_measures_the_candidates_grid(tmp_path):
    """The worker runs the candidate's points on the old layout (no moebench/bench/, no
    "gate" profile) through the pre-move module names."""
    code = regress._checkout(PRE_MOVE, ROOT, tmp_path / "old")
    assert not (code / "moebench" / "bench").exists()
    p, points, skews = grid.gate_grid("tiny")
    worker = regress._Worker(code, p, tmp_path / "old.log", PRE_MOVE)
    try:
        assert worker.env["code"] == str(code.resolve()) and worker.env["commit"] == PRE_MOVE
        records = worker.measure(points[0], grid.IMPLS, skews[:1], check=True)
    finally:
        worker.close()
    assert {r["impl"] for r in records} == set(grid.IMPLS)
    assert all(r["label"] == points[0].label for r in records)
    assert {r["status"] for r in records if r["impl"] != "triton"} == {"ok"}


def test_an_unmeasurable_baseline_says_so_and_suggests_a_run_file(repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    code = cli.main(["regress", "--baseline", "HEAD~1", "--profile", "tiny", "--rounds", "1"])
    assert code == gate.EXIT_INCOMPARABLE
    err = capsys.readouterr().err
    assert "cannot be measured" in err and "--baseline RUN.json" in err


MICRO_BENCH = """
def test_loop(benchmark):
    benchmark(lambda: sum(range({n})))
"""


def micro_repo(repo, monkeypatch, committed: int, working: int):
    """The repo with a micro-benchmark summing `committed` numbers in its last commit and
    `working` in its working tree, as the current directory; the benchmark's file."""
    (repo / "tests").mkdir()
    bench = repo / "tests" / "test_microbench.py"
    bench.write_text(MICRO_BENCH.format(n=committed))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a micro-benchmark")
    bench.write_text(MICRO_BENCH.format(n=working))
    monkeypatch.chdir(repo)
    return bench


def test_micro_gate_measures_both_revisions_and_names_the_slower_one(repo, monkeypatch, capsys):
    bench = micro_repo(repo, monkeypatch, 2000, 6000)  # the working tree: 3x the work
    # The times only: the instruction counts have a test of their own (minutes under valgrind).
    monkeypatch.setattr(regress, "callgrind_missing", lambda: "not counted in this test")
    code = cli.main(["regress", "--micro", "--rounds", "2", "--output", str(repo / "out")])
    out, err = capsys.readouterr()
    assert code == gate.EXIT_REGRESSION, out + err
    assert "SLOWER loop microbench test_loop -\n" in out
    base = gate.load(repo / "out" / "baseline")[1]
    assert list(base["round"]) == [0, 1] and len(base["samples_ms"][0]) >= 3
    # The same code passes.
    bench.write_text(MICRO_BENCH.format(n=2000))
    assert "instructions not counted: not counted in this test" in out
    assert cli.main(["regress", "--micro", "--baseline", "HEAD"]) == gate.EXIT_PASS


def test_micro_gate_refuses_a_tree_without_micro_benchmarks(repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    assert cli.main(["regress", "--micro", "--rounds", "1"]) == gate.EXIT_INCOMPARABLE
    assert "has no tests/test_microbench.py" in capsys.readouterr().err


@pytest.mark.skipif(regress.callgrind_missing() is not None, reason="needs valgrind")
def test_micro_gate_counts_instructions_as_its_second_tier(repo, monkeypatch, capsys):
    # callgrind makes a call 100-3000x slower: one benchmark, one round (about 2 minutes).
    micro_repo(repo, monkeypatch, 2000, 2100)  # 5 % more work
    code = cli.main(["regress", "--micro", "--rounds", "1", "--output", str(repo / "out")])
    out = capsys.readouterr().out
    assert code == gate.EXIT_REGRESSION, out
    counts = out.partition("instructions, counted by callgrind")[2]
    assert "SLOWER impl loop" in counts and "millions of instructions a call" in counts
    base, cand = (gate.load(repo / "out" / "instructions" / f"{side}.json")[1]["time_ms"][0]
                  for side in ("baseline", "candidate"))  # fmt: skip
    # Not exactly 1.05: the call's fixed cost, and Python specializing the loop's bytecode.
    assert 1.02 < cand / base < 1.15
