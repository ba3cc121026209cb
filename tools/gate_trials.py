"""How often the regression gate catches a planted slowdown, and how often it cries wolf.

    python tools/gate_trials.py OUT [--rev REV] [--plants sorted:1.1,padded:1.25] [--tries N]
    python tools/gate_trials.py OUT --regate      # the verdicts of the runs kept in OUT

Each trial is one `moebench regress --baseline REV` in a worktree of REV, with a slowdown
planted after one implementation's forward that lasts (factor - 1) x the forward's own time
(on the CPU a busy wait; on a GPU a spinning kernel queued after the forward's, its length
calibrated once per shape), or nothing planted (`same`). The trials take turns over the
plants, so that a slow spell of the machine is shared out. Both sides' runs are kept in
OUT/<plant>-<try>/, so that --regate can judge them again with this tree's gate;
OUT/trials.jsonl has each trial's wall time and verdict, and the tally is printed: for a
plant, the trials that named its implementation SLOWER, and the alarms raised on anything
else.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PLANT = """

import functools as _functools
import time as _time

import torch as _torch

_unplanted = forward
_sleep_cycles = {{}}  # on a GPU, by input shape: the cycles of torch.cuda._sleep to add


@_functools.wraps(_unplanted)
def forward(*args, **kwargs):  # planted by tools/gate_trials.py: {factor}x slower
    x = args[0]
    if x.is_cuda:  # a kernel that spins {extra} x the forward's device time, queued after it
        key = (x.shape, x.dtype, args[1].shape)
        if key not in _sleep_cycles:
            _sleep_cycles[key] = _calibrate(args, kwargs)
        out = _unplanted(*args, **kwargs)
        _torch.cuda._sleep(_sleep_cycles[key])
        return out
    start = _time.perf_counter()
    out = _unplanted(*args, **kwargs)
    end = _time.perf_counter() + {extra} * (_time.perf_counter() - start)
    while _time.perf_counter() < end:
        pass
    return out


def _device_ms(fn):
    start, end = _torch.cuda.Event(enable_timing=True), _torch.cuda.Event(enable_timing=True)
    fn()
    _torch.cuda.synchronize()
    start.record()
    for _ in range(10):
        fn()
    end.record()
    _torch.cuda.synchronize()
    return start.elapsed_time(end) / 10


def _calibrate(args, kwargs):
    per_cycle_ms = _device_ms(lambda: _torch.cuda._sleep(1_000_000)) / 1_000_000
    return max(1, round({extra} * _device_ms(lambda: _unplanted(*args, **kwargs)) / per_cycle_ms))
"""


SAME = "same"


def parse_plant(text: str) -> tuple[str, float]:
    impl, _, factor = text.partition(":")
    if impl == SAME:
        return SAME, 1.0
    if not re.fullmatch(r"[a-z_]+", impl) or not module(ROOT, impl).exists():
        raise SystemExit(f"--plants: no moebench/impls/{impl} to plant a slowdown in")
    try:
        value = float(factor)
    except ValueError:
        raise SystemExit(f"--plants: {text!r} is not IMPL:FACTOR (e.g. sorted:1.1)") from None
    if not value > 1:
        raise SystemExit(f"--plants: the factor of {text!r} must be above 1")
    return impl, value


def module(root: Path, impl: str) -> Path:
    """The file that defines an implementation's forward: impls/<impl>.py or its package."""
    path = root / "moebench/impls" / impl
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def worktree(rev: str, impl: str, factor: float, where: Path) -> Path:
    """A worktree of rev with the plant applied (uncommitted: regress measures the tree)."""
    if not where.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(where), rev],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        if impl != SAME:
            path = module(where, impl)
            extra = round(factor - 1, 6)
            path.write_text(path.read_text() + PLANT.format(factor=factor, extra=extra))
    return where


def judge(trial: Path) -> tuple[int, list[str], dict[str, float]]:
    """(exit code, failing lines, each implementation's estimated ratio) of this tree's
    gate on a trial's kept runs."""
    done = subprocess.run(
        [sys.executable, "-m", "moebench", "gate", str(trial / "baseline"),
         str(trial / "candidate")],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    return done.returncode, failing(done.stdout), ratios(done.stdout)


def ratios(stdout: str) -> dict[str, float]:
    """The gate's estimate for each implementation: its lines `impl sorted: 1.115x [...]`."""
    found = re.findall(r"^impl (\S+): ([\d.]+)x ", stdout, flags=re.M)
    return {impl: float(ratio) for impl, ratio in found}


def failing(stdout: str) -> list[str]:
    """The gate's lines that name what failed: `SLOWER impl ...` and the like."""
    return [line.strip() for line in stdout.splitlines()
            if re.match(r"\s*(FAILED|WRONG|SLOWER) ", line)]  # fmt: skip


def alarms(plant: str, failing_lines: list[str]) -> tuple[bool, bool]:
    """(caught, other): whether the gate named the planted implementation (a point of it or
    its aggregate) SLOWER, and whether it raised any other alarm. A family's aggregate
    holds the planted implementation's points, so it is neither."""
    impl = plant.partition(":")[0]
    own = (f"SLOWER {impl} ", f"SLOWER impl {impl}")
    caught = any(line.startswith(own) or line == own[1] for line in failing_lines)
    family = impl != SAME
    other = any(
        not (line.startswith(own) or line == own[1] or (family and " family " in f" {line}"))
        for line in failing_lines
    )
    return caught, other


def tally(rows: list[dict]) -> str:
    """The table of trials by plant; the estimates are the planted implementation's (for
    identical code, every implementation's)."""
    head = "| plant | trials | caught | other alarms | estimated ratio | gate wall time (s) |"
    lines = [head, "|---" * 6 + "|"]
    for plant in dict.fromkeys(r["plant"] for r in rows):
        runs = [r for r in rows if r["plant"] == plant]
        marks = [alarms(plant, r["failing"]) for r in runs]
        walls = sorted(r["wall_s"] for r in runs)
        impl = plant.partition(":")[0]
        found = sorted(
            v for r in runs for k, v in r.get("ratios", {}).items() if plant == SAME or k == impl
        )
        span = f"{found[0]:.3f}-{found[-1]:.3f}" if found else "-"
        caught = "-" if plant == SAME else sum(c for c, _ in marks)
        lines.append(
            f"| {plant} | {len(runs)} | {caught} | {sum(o for _, o in marks)} | {span} | "
            f"{walls[0]:.0f}-{walls[-1]:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--rev", default="HEAD", help="the code both sides run (default HEAD)")
    ap.add_argument("--plants", default="same,sorted:1.1,padded:1.1,sorted:1.25,padded:1.25,"
                    "sorted:1.5,padded:1.5")  # fmt: skip
    ap.add_argument("--tries", type=int, default=10)
    ap.add_argument("--regress-args", default="", help='for each regress, e.g. "--families models"')
    ap.add_argument("--regate", action="store_true", help="judge the kept runs again")
    args = ap.parse_args()
    log = args.out / "trials.jsonl"
    if args.regate:
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        for row in rows:
            row["exit"], row["failing"], row["ratios"] = judge(args.out / row["trial"])
        print(tally(rows))
        return
    rev = subprocess.run(["git", "rev-parse", args.rev], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    plants = [parse_plant(p) for p in args.plants.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    kept = log.read_text().splitlines() if log.exists() else []
    done = {json.loads(line)["trial"] for line in kept}
    for attempt in range(args.tries):
        for impl, factor in plants:
            name = SAME if impl == SAME else f"{impl}:{factor:g}"
            trial = f"{name.replace(':', '-')}-{attempt}"
            if trial in done:  # a campaign stopped midway goes on where it was
                continue
            tree = worktree(rev, impl, factor, args.out / "trees" / name.replace(":", "-"))
            start = time.monotonic()
            run = subprocess.run(
                [sys.executable, "-m", "moebench", "regress", "--baseline", rev,
                 "--output", str(args.out / trial), *shlex.split(args.regress_args)],
                cwd=tree, capture_output=True, text=True,
            )  # fmt: skip
            wall = time.monotonic() - start
            (args.out / trial / "regress.log").write_text(run.stdout + run.stderr)
            row = {"trial": trial, "plant": name, "rev": rev, "wall_s": round(wall, 1),
                   "exit": run.returncode, "failing": failing(run.stdout)}  # fmt: skip
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{trial}: exit {run.returncode} in {wall:.0f} s {row['failing']}", flush=True)


if __name__ == "__main__":
    main()
