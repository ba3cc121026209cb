"""Sessions: tests, lint (and compile, bench, report, regress, targets, microbench, smoke).

Each session makes its own virtualenv with the pinned torch (the CPU build on this project's
CI machines). On a GPU runner, run against the interpreter that already has CUDA torch and
triton: `nox --no-venv -s bench` (or MOEBENCH_NOX_EXISTING_ENV=1).
"""

import os
import time

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
    verdicts of every point, implementation and family (`moebench regress`). `-- --baseline
    REV|RUN.json` (default: the merge base with main), `--rounds N`, `--threshold X`,
    `--fdr Q`, `--output DIR`; the profile is gpu where CUDA is available, else the small
    CPU gate grid."""
    install(session, "bench")
    session.run("python", "-m", "moebench", "regress", *session.posargs)


@nox.session
def microbench(session: nox.Session) -> None:
    """The micro-benchmarks (tests/test_microbench.py: routing and permutation steps) of a
    baseline revision and the working tree, 3 rounds each in turn under pytest-benchmark,
    then their instructions under callgrind where valgrind is installed, and the gate's
    verdicts (`moebench regress --micro`; `-- --baseline REV`, `--rounds N`, `--output DIR`)."""
    install(session, "dev")
    session.run("python", "-m", "moebench", "regress", "--micro", *session.posargs)


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


@nox.session
def bench(session: nox.Session) -> None:
    """The main job (`moebench bench`): every implementation over the sweep families on
    this machine's profile (gpu with CUDA, else the labelled cpu one; MOEBENCH_PROFILE=
    gpu|cpu|tiny chooses) into results/<profile>-<machine>/run-<time>.json, recorded by
    asv under results/asv, then the report (summary.md, plots/, and asv's web report in
    results/html, which opens offline) and a console summary; a progress bar meanwhile,
    the details in run-<time>.log. Extra args go to `moebench bench`, e.g. `nox -s bench
    -- --families models --flush-l2`."""
    install(session, "bench")
    profile = os.environ.get("MOEBENCH_PROFILE")
    session.run("python", "-m", "moebench", "bench", *(["--profile", profile] if profile else []),
                *session.posargs)  # fmt: skip


@nox.session
def targets(session: nox.Session) -> None:
    """The triton layer's targets (set for an H100): the forward families for
    `sorted` and `triton` only, then the report (summary.md, its tuned kernels and target
    table), the target table printed, and the 8 largest kernels (torch.profiler) and host
    functions (cProfile) of the triton layer at the worst point and the median miss of each
    target missed, rerun. No asv: the run file is the record. Extra args go to the sweep
    and override these, e.g. `-- --families models --flush-l2`."""
    install(session, "bench")
    profile, machine = _where(session, os.environ.get("MOEBENCH_PROFILE"))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run = os.path.abspath(f"results/{profile}-{machine}/run-{stamp}.json")
    families = "sonicmoe,scale-out,iso-params,models,quant"
    session.run("python", "-m", "moebench", "sweep", "--profile", profile, "--output", run,
                "--families", families, "--impls", "sorted,triton", *session.posargs)  # fmt: skip
    session.run("python", "-m", "moebench", "report", run)
    session.run("python", "-m", "moebench", "targets", run, "--kernels", "8")


@nox.session
def report(session: nox.Session) -> None:
    """Beside the newest run of each results/<profile>-<machine>/: summary.csv, summary.md
    and plots/*.png; and asv's web report of results/asv in results/html, with the
    scripts it loads kept beside it so that it opens offline."""
    install(session, "bench")
    html = ["--html"] if os.path.isdir("results/asv") else []
    session.run("python", "-m", "moebench", "report", *session.posargs, *html)


@nox.session
def smoke(session: nox.Session) -> None:
    """The main job end to end on the tiny profile, in a throwaway folder (asv's results
    and web report included): the CI check that the benchmark still runs."""
    install(session, "bench")
    tmp = os.path.abspath(session.create_tmp())
    session.run("python", "-m", "moebench", "bench", "--profile", "tiny", "--results-dir", tmp,
                "--asv-dir", tmp, *session.posargs)  # fmt: skip
