"""The regression gate: did the candidate make any grid point slower or less accurate?

Compares a candidate run with a baseline run of the same grid, taken on the same machine
and environment, point by point, and prints one table of every point, regressions first.

    python -m moebench.gate BASELINE CANDIDATE   # gate two runs (files, or dirs of rounds)
    python -m moebench.gate regress [--baseline REV|RUN]  # measure both sides, then gate
    python -m moebench.gate worker               # measures points on request (for regress)

Exit codes: 0 pass, 1 a regression (failed, wrong or slower), 2 the runs cannot be compared
(a file that is not a run, another machine or environment, a point missing on one side, a
candidate not checked against float64 where the baseline was, a baseline that cannot be
measured). asv's `compare` cannot serve as a gate: it always exits 0 and assumes lower is
better for every value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

KEY = ["family", "label", "impl", "skew", "dtype"]

# Fields of a run's env (moebench.harness.environment) that change timings by themselves;
# any difference refuses the gate. Commit, date and clocks may differ.
ENV_FIELDS = (
    *("machine", "cpu", "torch_threads", "gpu", "driver", "cuda"),
    *("python", "torch", "triton", "harness_version", "profile", "device", "timer", "l2"),
)

# Largest accepted rel_err = ||y - ref|| / ||ref|| against the float64 reference. The
# reference is fed the same rounded inputs, so only the layer's own rounding counts: dot
# products of length D and F accumulated in fp32 (~u32 * sqrt(D) ~ 1e-6 for D <= 7168), plus
# the hidden activation and output rounded to the storage dtype (a few units of its
# roundoff u). float32 1e-4 is 100x that and still catches TF32 sneaking into a matmul
# (u = 5e-4); float16 (u = 4.9e-4) and bfloat16 (u = 3.9e-3) allow about 10 u and 5 u.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
_DTYPE_NAMES = {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Verdicts, in the order the table lists them: failures first, in capitals.
VERDICTS = ("FAILED", "WRONG", "SLOWER", "missing", "faster", "same", "skipped")
FAILING = ("FAILED", "WRONG", "SLOWER")

EXIT_PASS, EXIT_REGRESSION, EXIT_INCOMPARABLE = 0, 1, 2
_NORMAL_P20_P80 = 1.6832  # p80 - p20 of the standard normal distribution


class Incomparable(ValueError):
    """The two runs cannot be compared; the message says why."""


def load(path: str | Path) -> tuple[dict, pd.DataFrame]:
    """A run file as (env, records), or a directory of runs of one code merged by `best_of`;
    Incomparable, naming the file, where it is not a run the gate can judge."""
    from .sweep import BadRun, read_run

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise Incomparable(f"{path}: no run files (*.json) in this directory")
        return best_of([load(f) for f in files])
    try:
        run = read_run(path)
    except BadRun as e:
        raise Incomparable(str(e)) from e
    df = pd.DataFrame(run["records"])
    # Every dtype needs a tolerance to judge its error: refuse here, where the file is known.
    for dtype in set(df.get("dtype", ())):
        try:
            tolerance(dtype)
        except ValueError as e:
            raise Incomparable(f"{path}: {e}") from e
    return run["env"], df


def best_of(runs: list[tuple[dict, pd.DataFrame]]) -> tuple[dict, pd.DataFrame]:
    """Several runs of the same code as one: per point the repeat set with the lowest median,
    and in `spread` how far the slowest run's median lies above it (max/min - 1).

    On a shared machine, interference only ever adds time, so the fastest of a few runs
    spread over time is the steadiest estimate of what the code costs, and the spread is
    the noise between runs that a single run's cv cannot see. rel_err keeps its worst
    value and a round in which the layer failed stands for the point, so that merging never
    hides an error: the sweep sees NaN/inf in checked rounds only (regress checks its first).
    """
    env = runs[0][0]
    for other, _ in runs[1:]:
        if diffs := env_differences(env, other, ("first run", "another")):
            raise Incomparable("the runs to merge differ in " + "; ".join(diffs))
    df = pd.concat([d for _, d in runs], ignore_index=True)
    failed = _failed(df["reason"]) if "reason" in df else False
    by_point = df.groupby(KEY, dropna=False)
    time = by_point["time_ms"]
    df = df.assign(
        rel_err=by_point["rel_err"].transform("max"),
        spread=time.transform("max") / time.transform("min") - 1,
        _order=np.where(failed, -np.inf, df["time_ms"].fillna(np.inf)),
    )
    best = df.sort_values("_order", kind="stable").drop_duplicates(KEY)
    return env, best.drop(columns="_order").reset_index(drop=True)


def env_differences(env_a: dict, env_b: dict, names=("baseline", "candidate")) -> list[str]:
    """One line per env field that differs between the runs, naming the field."""
    return [
        f"{field}: {names[0]} {env_a.get(field)!r}, {names[1]} {env_b.get(field)!r}"
        for field in ENV_FIELDS
        if env_a.get(field) != env_b.get(field)
    ]


def tolerance(dtype: str) -> float:
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_NAMES.get(name, name)
    if name not in TOLERANCE:
        raise ValueError(f"no correctness tolerance for dtype {dtype!r}; known: {list(TOLERANCE)}")
    return TOLERANCE[name]


def _failed(reason: pd.Series) -> pd.Series:
    """Where the layer raised or returned NaN/inf: the sweep's reason "failed: ..."."""
    return reason.str.startswith("failed:", na=False)


def _name(row) -> str:
    """A point as the table shows it: impl first, since that is who regressed."""
    return f"{row.impl} {row.family} {row.label} {row.skew} {row.dtype}"


def _points(df: pd.DataFrame, side: str) -> pd.DataFrame:
    missing = [c for c in [*KEY, "status", "time_ms", "cv", "rel_err"] if c not in df]
    if missing:
        raise Incomparable(f"{side} run has no column {missing}: not a moebench run")
    dup = df[df.duplicated(KEY, keep=False)]
    if len(dup):
        raise Incomparable(f"{side} run has {len(dup)} records sharing a point key {KEY}")
    # The gate's cv is that of the bulk of the repeats, (p80 - p20) / median over the same
    # for a normal distribution: std/mean is dominated by the few repeats that a busy
    # machine preempts, and those do not move the median being compared.
    cv = df["cv"]
    if {"p20_ms", "p80_ms"} <= set(df):
        cv = ((df["p80_ms"] - df["p20_ms"]) / df["time_ms"] / _NORMAL_P20_P80).fillna(cv)
    # A single run has no spread between runs; merged rounds (best_of) do.
    spread = df.get("spread", 0.0)
    reason = df.get("reason", pd.Series(None, index=df.index, dtype=object))
    return df[[*KEY, "status", "time_ms", "rel_err"]].assign(cv=cv, spread=spread, reason=reason)


def compare(
    base: tuple[dict, pd.DataFrame],
    cand: tuple[dict, pd.DataFrame],
    *,
    threshold: float = 0.05,
    noise_mult: float = 3.0,
    allow_missing: bool = False,
) -> pd.DataFrame:
    """The verdict of every point, failures first; raises Incomparable with the reason.

    A point is SLOWER when cand/base - 1 > limit = max(threshold, noise), noise being
    noise_mult x the larger cv (from p20/p80, robust to preempted repeats) or, for merged
    rounds, the larger spread between rounds; it is faster when base/cand - 1 > limit.
    It is WRONG when the candidate's rel_err exceeds its dtype's tolerance, or, where the
    baseline already exceeded it, twice the baseline's. It is FAILED when it ran in the
    baseline and the candidate's layer raised or returned NaN/inf (reason "failed: ...").
    Any other point ok on one side only is refused unless `allow_missing` (verdict
    "missing"), and so is a candidate without the rel_err that the baseline has.
    """
    if diffs := env_differences(base[0], cand[0]):
        raise Incomparable("the runs come from different environments:\n  " + "\n  ".join(diffs))
    df = _points(base[1], "baseline").merge(
        _points(cand[1], "candidate"), on=KEY, how="outer", suffixes=("_base", "_cand")
    )
    ok_base, ok_cand = df["status_base"].eq("ok"), df["status_cand"].eq("ok")
    # A layer that broke is the worst regression, not a point that could not run.
    failed = ok_base & ~ok_cand & _failed(df["reason_cand"])
    one_sided = (ok_base != ok_cand) & ~failed
    if one_sided.any() and not allow_missing:
        lines = [
            f"{_name(row)}: ok only in the {'baseline' if row.status_base == 'ok' else 'candidate'}"
            for row in df[one_sided].itertuples()
        ]
        raise Incomparable(
            f"{len(lines)} point(s) ran on one side only (pass --allow-missing to gate the "
            "rest):\n  " + "\n  ".join(lines)
        )
    both = ok_base & ok_cand
    # Without the candidate's error, a WRONG point would pass as "same".
    unchecked = both & df["rel_err_base"].notna() & df["rel_err_cand"].isna()
    if unchecked.any():
        raise Incomparable(
            f"{unchecked.sum()} point(s) checked against float64 in the baseline only, e.g. "
            f"{_name(next(df[unchecked].itertuples()))}: measure both with the same "
            "--check/--no-check setting"
        )

    ratio = df["time_ms_cand"] / df["time_ms_base"]
    # The noise this comparison faces: within a run, noise_mult x the larger cv; between
    # runs of the same code, the larger spread of its rounds. A point timed once (no cv)
    # in a single run is held to the threshold alone.
    noise = pd.concat(
        [noise_mult * df[["cv_base", "cv_cand"]].max(axis=1), df["spread_base"], df["spread_cand"]],
        axis=1,
    ).max(axis=1)
    noise = noise.fillna(0.0)
    limit = noise.clip(lower=threshold)
    tol = df["dtype"].map(tolerance)
    err_limit = tol.where(~(df["rel_err_base"] > tol), 2 * df["rel_err_base"])
    verdict = np.select(
        [
            failed,
            both & (df["rel_err_cand"] > err_limit),
            both & (ratio - 1 > limit),
            one_sided,
            both & (1 / ratio - 1 > limit),
            both,
        ],
        ["FAILED", "WRONG", "SLOWER", "missing", "faster", "same"],
        default="skipped",
    )
    out = df[KEY].assign(
        base_ms=df["time_ms_base"],
        cand_ms=df["time_ms_cand"],
        ratio=ratio.where(both),
        noise=noise.where(both),
        limit=limit.where(both),
        base_err=df["rel_err_base"],
        cand_err=df["rel_err_cand"],
        err_limit=err_limit.where(both),
        verdict=pd.Categorical(verdict, categories=VERDICTS, ordered=True),
        # Why a point did not run: the candidate's reason, else the baseline's.
        reason=df["reason_cand"].where(~ok_cand, None).fillna(df["reason_base"].where(~ok_base)),
    )
    out = out.sort_values(["verdict", "ratio"], ascending=[True, False], kind="stable")
    return out.reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    """The verdict table as fixed-width text: times in ms, noise and limit in %."""
    formatters = {"base_ms": "{:.3f}".format, "cand_ms": "{:.3f}".format, "ratio": "{:.3f}".format}
    formatters |= {c: "{:.1%}".format for c in ("noise", "limit")}
    formatters |= {c: "{:.1e}".format for c in ("base_err", "cand_err", "err_limit")}
    return table.to_string(index=False, formatters=formatters, na_rep="-")


def summary(table: pd.DataFrame) -> str:
    """One line: the verdict counts, then each failing point by name."""
    counts = table["verdict"].value_counts()
    line = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts.get(v, 0))
    failing = table[table["verdict"].isin(FAILING)]
    if failing.empty:
        return f"gate: PASS ({line})"
    names = [f"{r.verdict} {_name(r)}" for r in failing.itertuples()]
    return f"gate: FAIL ({line}):\n  " + "\n  ".join(names)


def gate(baseline, candidate, *, threshold: float, noise_mult: float, allow_missing: bool) -> int:
    """Load, compare, print the table and the verdict; the exit code."""
    try:
        table = compare(
            load(baseline),
            load(candidate),
            threshold=threshold,
            noise_mult=noise_mult,
            allow_missing=allow_missing,
        )
    except Incomparable as e:
        print(f"gate: INCOMPARABLE: {e}", file=sys.stderr)
        return EXIT_INCOMPARABLE
    print(format_table(table))
    print(
        f"ratio = candidate / baseline median; limit = max(threshold {threshold:.0%}, noise); "
        f"noise = max({noise_mult:g} x larger cv, spread between rounds)"
    )
    print(summary(table))
    return EXIT_REGRESSION if table["verdict"].isin(FAILING).any() else EXIT_PASS


# --- measuring: the gate's grid, one point at a time ------------------------------------

# The CPU gate: a few points of the cpu profile long enough (10-100 ms a call) that a
# scheduler hiccup is a small part of a repeat, each timed for longer than a sweep does.
# The cpu profile's one torch thread keeps a busy neighbour from stalling OpenMP barriers.
CPU_GATE = {"scale-out": ("E=8", "E=64", "E=512"), "models": ("deepseek-v3/T=256",)}
CPU_GATE_SKEWS = ("balanced", "zipf:1.2")
# Threshold per gate profile: the GPU's numbers are steady enough for 5 %. On the shared
# 2-core CI machine, 7 regressions of one commit against itself (168 point comparisons)
# saw best-of-3 medians up to 1.98x apart (2.48x with a second gate running beside it),
# so the CPU gate only calls a doubling: gross slowdowns, such as a lost fast path.
THRESHOLD = {"gpu": 0.05, "gate": 1.0}


def gate_grid(profile: str):
    """(profile, points, skews) of a gate run: "gate" is the CPU gate; any grid profile
    name ("gpu", "cpu", "tiny") means every point and skew of that profile."""
    from . import grid

    if profile != "gate":
        p = grid.get_profile(profile)
        return p, grid.all_points(p), grid.SKEWS
    cpu = grid.get_profile("cpu")
    p = dataclasses.replace(cpu, name="gate", repeats=25, max_time_s=1.0)
    pts = [
        pt for fam, labels in CPU_GATE.items() for pt in grid.points(fam, cpu) if pt.label in labels
    ]
    return p, pts, CPU_GATE_SKEWS


def _check_imports(root: Path) -> None:
    """Raise if a moebench module came from outside `root`: an installed moebench can stand
    in for a module that the measured tree lacks, and would be measured in its place."""
    strays = [
        name
        for name, module in sys.modules.items()
        if name.partition(".")[0] == "moebench"
        and not Path(getattr(module, "__file__", None) or root).resolve().is_relative_to(root)
    ]
    if strays:
        raise ImportError(f"{root} lacks {strays}: they came from another moebench")


def worker(profile: str, commit: str | None) -> None:
    """Serve measurements of the gate grid with the moebench on sys.path: print the env as
    one JSON line, then for each request line [family, label, check] on stdin the point's
    records (every skew and impl) as one JSON line."""
    from . import grid, harness, sweep

    root = Path(__file__).resolve().parents[1]
    _check_imports(root)
    p, points, skews = gate_grid(profile)
    by_name = {(pt.family, pt.label): pt for pt in points}
    timer = harness.make_timer(p.device)
    with harness.torch_threads(p.threads):
        env = harness.environment(p.name, device=p.device, timer=timer)
    env.update(code=str(root), **({"commit": commit, "dirty": False} if commit else {}))
    print(json.dumps(env), flush=True)
    for line in sys.stdin:
        family, label, check = json.loads(line)
        point = by_name.get((family, label))
        records = []
        if point is not None:
            records = sweep.run_points(
                [point], grid.IMPLS, skews, profile=p, check=check, timer=timer
            )
        _check_imports(root)  # the implementations are imported on first use
        print(json.dumps(records), flush=True)


class _Worker:
    """A fresh interpreter measuring the code at `code` on request (see `worker`)."""

    def __init__(self, code: Path, profile: str, log: Path, commit: str | None = None):
        self.code, self.log = code, log
        path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "moebench.gate", "worker", "--profile", profile]
        with open(log, "w") as stderr:
            self.proc = subprocess.Popen(
                [*cmd, *(["--commit", commit] if commit else [])],
                cwd=code,
                env={**os.environ, "PYTHONPATH": path},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.env = self._reply()

    def measure(self, family: str, label: str, check: bool) -> list[dict]:
        self.proc.stdin.write(json.dumps([family, label, check]) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def _reply(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise Incomparable(
                f"measuring the code at {self.code} failed:\n{self.log.read_text()[-3000:]}"
            )
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# --- regress: the baseline revision against the working tree ---------------------------


def _git(*args, cwd=None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise Incomparable(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _committed_run(root: Path, profile: str) -> Path | None:
    """The newest committed run of this machine and gate profile under results/."""
    from .harness import machine_name
    from .sweep import BadRun, read_run

    runs = []
    for name in _git("ls-files", "results", cwd=root).splitlines():
        if not name.endswith(".json"):
            continue
        try:
            env = read_run(root / name)["env"]
        except BadRun:  # asv's and pytest-benchmark's files live there too
            continue
        if env.get("machine") == machine_name() and env.get("profile") == profile:
            runs.append((env.get("date") or "", root / name))
    return max(runs)[1] if runs else None


def resolve_baseline(spec: str | None, root: Path, profile: str) -> str | Path:
    """A run file or directory to read, or the commit to measure.

    Default: the merge base of HEAD with main (or origin/main). Where that is HEAD itself
    and the package has no uncommitted change (CI on main), the newest committed run of
    this machine and profile, else HEAD~1: the last commit is the change to gate.
    """
    if spec and Path(spec).exists():
        return Path(spec)
    if spec:
        return _git("rev-parse", "--verify", f"{spec}^{{commit}}", cwd=root)
    branches = _git("branch", "--all", "--format=%(refname:short)", cwd=root).splitlines()
    main = next((b for b in ("main", "origin/main") if b in branches), None)
    if main is None:
        raise Incomparable("no branch main or origin/main: pass --baseline REV")
    head = _git("rev-parse", "HEAD", cwd=root)
    base = _git("merge-base", "HEAD", main, cwd=root)
    if base != head or _git("status", "--porcelain", "--", "moebench", cwd=root):
        return base
    return _committed_run(root, profile) or _git("rev-parse", "HEAD~1", cwd=root)


def _checkout(rev: str, root: Path, into: Path) -> Path:
    """The tree of `rev` with this gate.py as its worker, so that both sides run one grid."""
    archive = subprocess.run(["git", "archive", rev], cwd=root, capture_output=True)
    if archive.returncode:
        raise Incomparable(f"git archive {rev}: {archive.stderr.decode().strip()}")
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    shutil.copy(Path(__file__), into / "moebench" / "gate.py")
    return into


def measure_sides(sides: dict[str, _Worker], points, rounds: int, out: Path) -> None:
    """Each side's rounds of the points as run files out/<side>/round-<r>.json.

    The sides take turns point by point, the first alternating, so that both measure each
    point within seconds of each other: a busy spell of a shared machine then hits both
    instead of deciding the verdict. Correctness is checked in the first round only.
    """
    from . import sweep

    for r in range(rounds):
        records = {name: [] for name in sides}
        for i, pt in enumerate(points):
            order = list(sides) if (r + i) % 2 == 0 else list(sides)[::-1]
            for name in order:
                records[name] += sides[name].measure(pt.family, pt.label, check=r == 0)
        for name, worker_ in sides.items():
            sweep.write_run(out / name / f"round-{r}.json", worker_.env, records[name])
        print(f"regress: round {r + 1}/{rounds} measured", flush=True)


def regress(args) -> int:
    root = Path(_git("rev-parse", "--show-toplevel"))
    profile = args.profile or ("gpu" if _cuda_available() else "gate")
    # The CPU gate takes the best of 3 rounds a side; the GPU is steady enough for one.
    rounds = args.rounds or (3 if profile == "gate" else 1)
    rule = {
        "threshold": THRESHOLD.get(profile, 0.05) if args.threshold is None else args.threshold,
        "noise_mult": args.noise_mult,
        "allow_missing": args.allow_missing,
    }
    with tempfile.TemporaryDirectory(prefix="moebench-regress-") as tmp:
        out, tmp = Path(args.output or tmp), Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        sides = {}
        try:
            baseline = resolve_baseline(args.baseline, root, profile)
            print(f"regress: baseline {baseline}, candidate: the working tree {root}")
            if isinstance(baseline, str):
                code = _checkout(baseline, root, tmp / "baseline-src")
                sides["baseline"] = _Worker(code, profile, out / "baseline.log", baseline)
            sides["candidate"] = _Worker(root, profile, out / "candidate.log")
            _, points, _ = gate_grid(profile)
            if args.families:
                points = [pt for pt in points if pt.family in args.families.split(",")]
            measure_sides(sides, points, rounds, out)
        except Incomparable as e:
            print(f"gate: INCOMPARABLE: {e}", file=sys.stderr)
            return EXIT_INCOMPARABLE
        finally:
            for worker_ in sides.values():
                worker_.close()
        return gate(
            out / "baseline" if "baseline" in sides else baseline, out / "candidate", **rule
        )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- command line ------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    if not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0 (float alone would take "nan" and "-1")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _rule_args(p: argparse.ArgumentParser, threshold_default) -> None:
    p.add_argument(
        "--threshold",
        type=_non_negative,
        default=threshold_default,
        help="least slowdown that fails",
    )
    p.add_argument(
        "--noise-mult", type=_non_negative, default=3.0, help="limit >= this x the larger cv"
    )
    p.add_argument("--allow-missing", action="store_true", help="gate the points ok on both sides")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in ("worker", "regress") else "compare"
    p = argparse.ArgumentParser(
        prog=f"python -m moebench.gate{'' if command == 'compare' else ' ' + command}"
    )
    if command == "worker":
        p.add_argument("--profile", default="gate", help='"gate" (the CPU gate) or a grid profile')
        p.add_argument("--commit", help="the commit being measured, when not a git checkout")
        args = p.parse_args(argv[1:])
        worker(args.profile, args.commit)
        return 0
    if command == "regress":
        p.add_argument(
            "--baseline",
            help="git revision, or run file or directory (default: merge base with main)",
        )
        p.add_argument("--rounds", type=_positive_int, help="runs per side, alternated")
        p.add_argument("--profile", help='"gate" (CPU, default without CUDA) or "gpu"')
        p.add_argument("--families", help="comma-separated families (default: the profile's)")
        p.add_argument("--output", help="keep the runs in this directory")
        _rule_args(p, None)
        return regress(p.parse_args(argv[1:]))
    p.description = (
        "Gate a candidate run against a baseline: exit 0 pass, 1 regression, 2 incomparable."
    )
    p.add_argument("baseline", help="run file, or a directory of runs of one code (best of)")
    p.add_argument("candidate", help="run file, or a directory of runs of one code (best of)")
    _rule_args(p, 0.05)
    args = p.parse_args(argv)
    rule = {
        "threshold": args.threshold,
        "noise_mult": args.noise_mult,
        "allow_missing": args.allow_missing,
    }
    return gate(args.baseline, args.candidate, **rule)


if __name__ == "__main__":
    sys.exit(main())
