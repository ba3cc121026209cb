"""Sessions: tests, lint (and bench, report, regress).

Where there is no GPU, each session makes its own virtualenv with the pinned CPU torch
build. On a GPU runner, run against the interpreter that already has CUDA torch and
triton: `nox --no-venv -s bench` (or MOEBENCH_NOX_EXISTING_ENV=1).
"""

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]
if os.environ.get("MOEBENCH_NOX_EXISTING_ENV") == "1":
    nox.options.force_venv_backend = "none"

CPU_TORCH = "torch==2.13.0"  # the CPU build; a bare `torch` pulls GBs of CUDA wheels


def install(session: nox.Session, extras: str) -> None:
    """Install moebench with `extras` into the session's venv; nothing when there is none."""
    if isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        return
    session.install(CPU_TORCH)
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
