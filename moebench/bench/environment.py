"""The environment record that goes with every result: machine, versions, clocks, the
timer, the commit and the harness version."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from .roofline import Ceilings

# Bump when a change to this file changes what the numbers mean (the gate refuses to
# compare runs of different harness versions).
HARNESS_VERSION = "1"


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _version(package: str) -> str | None:
    # Read from the installed metadata: importing triton just to ask costs seconds.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu(device) -> dict:
    """Name, driver and clocks of the GPU; nvidia-smi is asked because torch does not
    report the driver or clocks."""
    if not torch.cuda.is_available():
        return {"gpu": None, "driver": None, "clocks": None}
    index = torch.device(device).index or 0
    fields = "driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit"
    smi = _run(["nvidia-smi", f"--id={index}", f"--query-gpu={fields}", "--format=csv,noheader"])
    driver, clocks = None, None
    if smi:
        values = [v.strip() for v in smi.splitlines()[0].split(",")]
        driver = values[0]
        clocks = dict(zip(fields.split(",")[1:], values[1:], strict=False))
    return {"gpu": torch.cuda.get_device_name(index), "driver": driver, "clocks": clocks}


def git_commit(cwd=None) -> tuple[str | None, bool | None]:
    """HEAD's hash and whether tracked files have uncommitted changes, for the checkout
    that holds this package (asv runs suites from a temporary directory)."""
    where = str(cwd or Path(__file__).resolve().parent)
    commit = _run(["git", "-C", where, "rev-parse", "HEAD"])
    status = _run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"])
    return commit, (None if commit is None else bool(status))


def machine_name() -> str:
    """MOEBENCH_MACHINE, else the host name: names the results directory."""
    return os.environ.get("MOEBENCH_MACHINE") or platform.node() or "unknown"


def asv_machine() -> dict:
    """This machine in asv's terms (`asv machine --yes` alone records only the name).
    asv splits a machine's history at every change of these fields, so they name the
    hardware and the OS family only; the kernel build, which differs between hosts of one
    kind, is in each run file's `platform`."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "os": platform.system(),
        "arch": platform.machine(),
        "cpu": f"{_cpu_model()}{gpu}",
        "num_cpu": str(os.cpu_count()),
        "ram": f"{ram / 2**30:.0f}GB",
    }


def environment(
    profile: str | None = None,
    *,
    device=None,
    timer=None,
    ceilings: Ceilings | None = None,
) -> dict:
    """Everything a result depends on besides the code: machine, versions, clocks, the
    timer and L2 mode, the commit and the harness version."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    commit, dirty = git_commit()
    return {
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_name(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **_gpu(device),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "moebench": _version("moebench"),
        "harness_version": HARNESS_VERSION,
        "device": str(device),
        "timer": timer.label if timer is not None else None,
        "l2": timer.l2 if timer is not None else None,
        "profile": profile,
        "ceilings": dataclasses.asdict(ceilings) if ceilings is not None else None,
    }
