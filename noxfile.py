"""Sessions: tests, lint (and compile, bench, report, regress, targets, microbench, smoke).

Each session makes its own virtualenv with the pinned torch (the CPU build on this project's
CI machines). On a GPU runner, run against the interpreter that already has CUDA torch and
triton: `nox --no-venv -s bench` (or MOEBENCH_NOX_EXISTING_ENV=1).
"""

import json
import os
import time
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]
if os.environ.get("MOEBENCH_NOX_EXISTING_ENV") == "1":
    nox.options.force_venv_backend = "none"

# Pinned: this project's CI machines hold this release's CPU build as a local wheel, where a
# bare `torch` would pull GBs of CUDA wheels; PyPI serves its CUDA build on Linux.
TORCH = "torch==2.13.0"


def install(session: nox.Session, extras: str) -> None:
    """Install moebench with `extras` into the session's venv; nothing when there is none."""
    if isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        return
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    if not isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    """pytest on the CPU (Triton under TRITON_INTERPRET=1); extra args go to pytest."""
    install(session, "dev")
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session(name="compile")
def compile_check(session: nox.Session) -> None:
    """Every Triton config the triton layer can launch, compiled for Hopper (sm_90) with the
    installed triton and its ptxas, no GPU needed: fails on a config that does not build or
    spills registers (tools/compile_check.py; `-- --only down` narrows it)."""
    install(session, "dev")
    session.run("python", "tools/compile_check.py", *session.posargs, env={"TRITON_INTERPRET": "0"})


@nox.session
def regress(session: nox.Session) -> None:
    """The regression gate: a baseline against the working tree on the same grid, then the
    verdict table (`moebench regress`). `-- --baseline REV|RUN.json` (default: the merge base
    with main), `--rounds N`, `--threshold X`, `--output DIR`; the profile is gpu where
    CUDA is available, else the small CPU gate grid."""
    install(session, "bench")
    session.run("python", "-m", "moebench", "regress", *session.posargs)


@nox.session
def microbench(session: nox.Session) -> None:
    """pytest-benchmark: routing and permutation steps, failing where one takes twice its
    time in the baseline stored for this machine under results/microbench/<machine>/
    (stored by the first run on a machine; `-- --benchmark-save=NAME` stores another;
    `-- --benchmark-compare-fail=min:10%` adds a tighter check on a quiet machine)."""
    install(session, "dev")
    _, machine = _where(session)
    storage = Path("results", "microbench", machine)
    if any(storage.glob("*/*.json")):
        # The minimum, not the median: on a shared CPU, neighbours only ever add time; and
        # a doubling, since 5 runs of one commit on the 2-core CI machine saw minimums up
        # to 1.44x the baseline's.
        gate = ["--benchmark-compare", "--benchmark-compare-fail=min:100%"]
    else:
        session.warn(f"no microbench baseline in {storage}: storing this run as one")
        gate = ["--benchmark-save=baseline"]
    session.run(
        "pytest",
        "tests/test_microbench.py",
        "-q",
        "--benchmark-enable",
        f"--benchmark-storage=file://{storage}",
        "--benchmark-warmup=on",
        "--benchmark-max-time=0.5",
        "--benchmark-columns=min,median,iqr,rounds",
        *gate,
        *session.posargs,
        # One thread: OpenMP barriers on a busy 2-core machine stall for whole time slices.
        env={"OMP_NUM_THREADS": "1"},
    )


def _where(session: nox.Session, profile: str | None = None) -> tuple[str, str]:
    """(profile, machine): `moebench where`, in the session's interpreter; the profile is
    `profile`, else this machine's default."""
    args = ["--profile", profile] if profile else []
    out = (
        session.run("python", "-m", "moebench", "where", *args, silent=True)
        .strip()
        .splitlines()[-1]
    )
    name, machine = out.split(" ", 1)
    return name, machine


def _sweep(session: nox.Session, results: str, profile: str | None, *args) -> tuple:
    """Sweep the profile (default: this machine's) into results/<profile>-<machine>/
    run-<UTC time>.json with `args` and the session's extra args; (profile, machine, run)."""
    profile, host = _where(session, profile)
    machine = f"{profile}-{host}"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run = os.path.abspath(f"{results}/{machine}/run-{stamp}.json")
    session.run("python", "-m", "moebench", "sweep", "--profile", profile, "--output", run, *args,
                *session.posargs)  # fmt: skip
    return profile, machine, run


def _bench(session: nox.Session, results: str, profile: str | None, asv_args=()) -> str:
    """Sweep the profile into a run file under `results`, then record it with asv (whose
    suites read that file instead of measuring again). Returns the run file."""
    profile, machine, run = _sweep(session, results, profile)
    env = {"MOEBENCH_PROFILE": profile, "MOEBENCH_RUN": run}
    commit = session.run("git", "rev-parse", "HEAD", external=True, silent=True).strip()
    # Every field of the machine, with the GPU beside the CPU (asv's own `asv machine`
    # keeps only the fields that differ from its defaults).
    session.run("python", "-m", "moebench", "asv-machine", machine, silent=True)
    session.run("asv", "run", "--environment", "existing", "--set-commit-hash", commit,
                "--machine", machine, *asv_args, env=env)  # fmt: skip
    return run


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark: every implementation over the sweep families on this machine's
    profile (gpu with CUDA, else the labelled cpu one; MOEBENCH_PROFILE=gpu|cpu|tiny
    chooses), written to results/<profile>-<machine>/run-<time>.json and recorded by asv
    under results/asv, then the triton layer's target table of the run (each
    target "not measured" where the run has no points for it: Triton needs CUDA). Extra
    args go to `moebench sweep`, e.g. `nox -s bench -- --families models
    --flush-l2`."""
    install(session, "bench")
    run = _bench(session, "results", os.environ.get("MOEBENCH_PROFILE"))
    session.run("python", "-m", "moebench", "targets", run)


@nox.session
def targets(session: nox.Session) -> None:
    """The triton layer's targets (set for an H100): the forward families for
    `sorted` and `triton` only, then the report (summary.md, its tuned kernels and target
    table), the target table printed, and the 8 largest kernels (torch.profiler) and host
    functions (cProfile) of the triton layer at the worst point and the median miss of each
    target missed, rerun. No asv: the run file is the record. Extra args go to the sweep
    and override these, e.g. `-- --families models --flush-l2`."""
    install(session, "bench")
    families = "sonicmoe,scale-out,iso-params,models"
    _, _, run = _sweep(session, "results", os.environ.get("MOEBENCH_PROFILE"),
                       "--families", families, "--impls", "sorted,triton")  # fmt: skip
    session.run("python", "-m", "moebench", "report", run)
    session.run("python", "-m", "moebench", "targets", run, "--kernels", "8")


@nox.session
def report(session: nox.Session) -> None:
    """asv's HTML report (results/html) and, beside the newest run of each
    results/<profile>-<machine>/: summary.csv, summary.md and plots/*.png."""
    install(session, "bench")
    if os.path.isdir("results/asv"):
        session.run("asv", "publish")
    session.run("python", "-m", "moebench", "report", *session.posargs)


def _asv_config(folder: str) -> str:
    """asv.conf.json with its results and HTML under `folder`: a trial run leaves the
    repository's results/ alone (asv writes machine.json even with --dry-run)."""
    text = Path("asv.conf.json").read_text()
    conf = json.loads("\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("//")))
    root = os.getcwd()
    conf.update(
        repo=root,
        benchmark_dir=os.path.join(root, "benchmarks"),
        results_dir=os.path.join(folder, "asv"),
        html_dir=os.path.join(folder, "html"),
    )
    path = os.path.join(folder, "asv.conf.json")
    Path(path).write_text(json.dumps(conf, indent=4))
    return path


@nox.session
def smoke(session: nox.Session) -> None:
    """The bench and report sessions end to end on the tiny profile, in a throwaway folder:
    the CI check that the benchmark still runs (two minutes on 2 cores)."""
    install(session, "bench")
    tmp = os.path.abspath(session.create_tmp())
    config = ["--config", _asv_config(tmp)]
    tiny = {"MOEBENCH_PROFILE": "tiny"}
    session.run("asv", "check", *config, "--environment", "existing", env=tiny)
    run = _bench(session, tmp, "tiny", asv_args=config)
    session.run("python", "-m", "moebench", "targets", run)
    session.run("python", "-m", "moebench", "report", run)
    session.run("asv", "publish", *config)
