"""asv: every suite is discovered and passes `asv check`, and a real `asv run` reports the
numbers of a sweep run file, skipped points as skipped. In the existing environment, on
the tiny profile."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from moebench import cli, registry
from moebench.bench import asv, grid, runs

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIME, IMBALANCE, DROPPED = ("time_ms", "peak_bytes"), ("imbalance_overhead",), ("dropped_fraction",)
SUITES = {
    f"families.{cls}.track_{metric}"
    for cls, metrics in [
        *((family, TIME) for family in ("ScaleOut", "IsoParams", "Models", "SonicMoE")),
        *((f"{family}Imbalance", IMBALANCE) for family in ("ScaleOut", "IsoParams", "Models")),
        ("SonicMoEImbalance", IMBALANCE),
        *((f"{family}Dropped", DROPPED) for family in ("ScaleOut", "IsoParams", "Models")),
        ("ModelsTrain", TIME),  # the tiny profile times models forward + backward
        ("Quant", TIME),
        ("QuantBytesRead", ("bytes_read", "read_GBps")),
        ("ExpertParallel", ("step_ms", "comm_share", "straggler")),
    ]
    for metric in metrics
}
DISCOVER = """
import json
from asv_runner.discovery import disc_benchmarks
print(json.dumps({b.name: [b.param_names, b._params] for b in disc_benchmarks("benchmarks")}))
"""


def run(args, tmp_path, **env):
    # HOME: asv keeps its machine file there; keep the user's out of the test.
    env = {**os.environ, "MOEBENCH_PROFILE": "tiny", "HOME": str(tmp_path), **env}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_asv_discovers_every_suite_with_the_profile_grid(tmp_path):
    done = run([sys.executable, "-c", DISCOVER], tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert set(found) == SUITES
    names, params = found["families.ScaleOut.track_time_ms"]
    labels = [pt.label for pt in grid.points("scale-out", "tiny")]
    assert names == ["point", "impl", "skew"]
    assert params == [labels, list(registry.names()), list(grid.SKEWS)]
    assert "balanced" not in found["families.ModelsImbalance.track_imbalance_overhead"][1][2]
    assert found["families.IsoParamsDropped.track_dropped_fraction"][1][1] == ["padded"]
    ep_labels = [pt.label for pt in grid.points(grid.EP, "tiny")]
    assert found["families.ExpertParallel.track_comm_share"][1][:2] == [ep_labels, ["sorted"]]


def test_gpu_profile_adds_the_replay_suites(tmp_path):
    """The gpu grid is built from code, so it is discovered without a GPU."""
    done = run([sys.executable, "-c", DISCOVER], tmp_path, MOEBENCH_PROFILE="gpu")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    replays = {name for name in found if name.endswith("track_replay_time_ms")}
    assert replays == {f"families.{f}Replay.track_replay_time_ms"
                       for f in ("ScaleOut", "IsoParams", "Models")}  # fmt: skip
    names, params = found["families.ModelsReplay.track_replay_time_ms"]
    assert names == ["point", "impl", "skew"]
    assert params == [[pt.label for pt in grid.points("models", "gpu")], ["triton"],
                      list(grid.SKEWS)]  # fmt: skip


def asv_config(folder):
    """The repository's asv.conf.json with results under `folder`: asv writes machine.json
    even with --dry-run, and a test must not write into results/."""
    conf = asv.read_config(ROOT / "asv.conf.json")
    assert (conf["environment_type"], conf["plugins"]) == ("moebench", [".moebench.bench.asv"])
    return ["--config", str(asv.config_under(ROOT / "asv.conf.json", folder))]


def test_asv_check_in_the_machine_environment(tmp_path):
    check = ["check", *asv_config(tmp_path)]
    done = run([sys.executable, "-m", "asv", *check], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No problems found" in done.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "run.json"
    cli.main(["sweep", "--profile", "tiny", "--families", "scale-out", "--output", str(out)])
    return out


def test_asv_run_reports_the_run_file(tiny_run, tmp_path):
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    if not commit:
        pytest.skip("not a git checkout")
    machine = ["--machine", "pytest-tiny"]
    done = run([sys.executable, "-m", "asv", "machine", "--yes", *machine], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    args = ["run", *asv_config(tmp_path)]
    args += ["--set-commit-hash", commit, *machine, "--bench", "ScaleOut(Imbalance|Dropped)"]
    done = run([sys.executable, "-m", "asv", *args], tmp_path, MOEBENCH_RUN=str(tiny_run))
    assert done.returncode == 0, done.stdout + done.stderr
    _, frame = runs.load_run(tiny_run)
    padded = frame[(frame["impl"] == "padded") & (frame["label"] == "E=32")]
    collapse = padded[padded["skew"] == "collapse"].iloc[0]
    assert collapse["dropped_fraction"] == 0.84375  # 4 experts keep 10 of their 64 pairs
    lines = done.stdout.splitlines()
    assert any("E=32" in ln and "collapse" in ln and "0.84375" in ln for ln in lines)
    imbalance = frame[(frame["impl"] == "sorted") & (frame["label"] == "E=8")]
    zipf = imbalance[imbalance["skew"] == "zipf:1.2"].iloc[0]["imbalance_overhead"]
    assert any(
        "E=8" in ln and "sorted" in ln and "zipf:1.2" in ln and str(float(zipf))[:8] in ln
        for ln in lines
    )
    # Triton has no CUDA here: skipped by the sweep, shown by asv as n/a.
    assert any("triton" in ln and "n/a" in ln for ln in lines)
    # Recorded against the commit, under the machine's name.
    (saved,) = (tmp_path / "asv" / "pytest-tiny").glob(f"{commit[:8]}-moebench-py*.json")
    results = json.loads(saved.read_text())
    assert results["commit_hash"] == commit
    assert "families.ScaleOutDropped.track_dropped_fraction" in results["results"]


def test_two_interpreters_of_one_machine_extend_one_history(tiny_run, tmp_path):
    """Runs from two interpreter paths (two checkouts' nox venvs, say) at two commits
    form one series in the web report: asv's `existing` environment, named by the path,
    split them."""
    commits = subprocess.run(["git", "rev-list", "--max-count=2", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()  # fmt: skip
    if len(commits) < 2:
        pytest.skip("needs a git checkout with two commits")
    # A second interpreter path: a venv that sees this one's packages.
    venv = tmp_path / "other checkout" / ".nox" / "bench"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    here = [p for p in sys.path if p.endswith("site-packages")]
    (site / "here.pth").write_text(f"import site; list(map(site.addsitedir, {here!r}))\n")
    config = asv_config(tmp_path)
    done = run([sys.executable, "-m", "asv", "machine", "--yes", "--machine", "pytest-tiny"],
               tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for python, commit in [
        (sys.executable, commits[1]),
        (str(venv / "bin" / "python"), commits[0]),
    ]:
        args = [python, "-m", "asv", "run", *config, "--set-commit-hash", commit,
                "--machine", "pytest-tiny", "--bench", "ScaleOutDropped"]  # fmt: skip
        done = run(args, tmp_path, MOEBENCH_RUN=str(tiny_run))
        assert done.returncode == 0, done.stdout + done.stderr
    saved = sorted(p.name for p in (tmp_path / "asv" / "pytest-tiny").glob("*-moebench-*.json"))
    assert len(saved) == 2 and len({name.split("-", 1)[1] for name in saved}) == 1
    done = run([sys.executable, "-m", "asv", "publish", *config], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    graphs = list((tmp_path / "html" / "graphs").rglob("families.ScaleOutDropped.*.json"))
    series = [g for g in graphs if "machine-pytest-tiny" in str(g)]
    assert len(series) == 1  # one series, with both commits on it
    assert len(json.loads(series[0].read_text())) == 2
