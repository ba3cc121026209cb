"""The regression gate: did the candidate make the layer slower or less accurate?

Compares a candidate with a baseline measured on the same machine and environment, in one
or more rounds a side, and prints two tables: every point (regressions first), then each
implementation and each family over all its points. `moebench gate BASELINE CANDIDATE`
gates two runs (files, or directories of rounds); `moebench regress` measures both sides
first, interleaved (moebench.bench.regress).

Time, with the statistics of moebench.bench.stats:
- a point: in each round, the Hodges-Lehmann shift between the two sides' raw repeats and
  a Mann-Whitney test; the point is slower only if every round says so (its p-value is
  the largest of the rounds'), as a busy spell hits one round, not all of them;
- an aggregate (an implementation, a family): the log ratio of medians of each of its
  points in each round, one block per worker request (family, label, round), as the
  points one request measures share its busy spells; a Wilcoxon signed-rank test over
  the blocks. A slowdown that moves every point a little is overwhelming evidence there,
  however noisy each point is alone;
- every p-value of the gate, points and aggregates, is called at a false discovery rate
  q (Benjamini-Hochberg), and a call is SLOWER (faster) only where the estimate is also
  past the threshold, the least change worth failing a commit for.

Correctness: WRONG when the candidate's rel_err exceeds its dtype's tolerance, or twice
the baseline's where the baseline already exceeded it; FAILED when it ran in the baseline
and the candidate's layer raised or returned NaN/inf.

Exit codes: 0 pass, 1 a regression (failed, wrong or slower), 2 the runs cannot be compared
(a file that is not a run, another machine or environment, a point missing on one side, a
candidate not checked against float64 where the baseline was, a baseline that cannot be
measured). asv's `compare` cannot serve as a gate: it always exits 0 and assumes lower is
better for every value.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .oracle import tolerance
from .runs import BadRun, read_run

KEY = ["family", "label", "impl", "skew", "dtype"]

# The points that one regress worker request measures, one after another: a block of the
# aggregate tests.
BLOCK = ["family", "label"]

# Fields of a run's env (moebench.bench.environment) that change timings by themselves;
# any difference refuses the gate. Commit, date and clocks may differ.
ENV_FIELDS = (
    *("machine", "cpu", "torch_threads", "gpu", "driver", "cuda"),
    *("python", "torch", "triton", "harness_version", "profile", "device", "timer", "l2"),
)


# Verdicts, in the order the table lists them: failures first, in capitals.
VERDICTS = ("FAILED", "WRONG", "SLOWER", "missing", "faster", "same", "skipped")


FAILING = ("FAILED", "WRONG", "SLOWER")


EXIT_PASS, EXIT_REGRESSION, EXIT_INCOMPARABLE = 0, 1, 2


# The least slowdown worth failing a commit for, by the runs' profile. On the shared
# 2-core CPU machine, identical code measured 4 rounds a side showed aggregate ratios
# within 0.98-1.02 and single rounds of a point 0.84-1.14 (tools/gate_trials.py, README);
# the GPU's figure is to be measured.
THRESHOLD = {"gate": 0.05, "gpu": 0.02}
DEFAULT_THRESHOLD = 0.05
# A point alone is judged on its rounds only, a few time windows: on the CPU machine one
# point of identical code stayed 9 % slower through two rounds, each round's test sure of
# it, so a point must be further off to fail by itself.
POINT_THRESHOLD = {"gate": 0.2, "gpu": 0.05}
DEFAULT_POINT_THRESHOLD = 0.2

# The timer of runs that count instructions (millions a call) instead of timing: the
# micro-benchmarks under callgrind (regress --micro). Counts of one call repeat to within
# 0.01 % on the CPU machine (62.01 million for the sorted layer at E=8, three calls), so
# no test is needed: past COUNT_THRESHOLD is SLOWER.
INSTRUCTIONS = "callgrind instructions"
COUNT_THRESHOLD = 0.02

# The false discovery rate over all of a gate's tests.
FDR = 0.05

LEVEL = 0.95  # of the printed intervals

# compare's keywords that `moebench gate` and `moebench regress` take as arguments.
RULE = ("threshold", "point_threshold", "fdr", "allow_missing")


class Incomparable(ValueError):
    """The two runs cannot be compared; the message says why."""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The gate's verdicts: `points` one row a point, `groups` one row an aggregate."""

    points: pd.DataFrame
    groups: pd.DataFrame
    threshold: float
    point_threshold: float
    fdr: float
    counted: bool  # instruction counts (millions in base_ms and cand_ms), not times

    @property
    def tests(self) -> int:
        return int(self.points["q"].notna().sum() + self.groups["q"].notna().sum())

    @property
    def failed(self) -> bool:
        return bool(
            self.points["verdict"].isin(FAILING).any() or self.groups["verdict"].eq("SLOWER").any()
        )


def load(path: str | Path) -> tuple[dict, pd.DataFrame]:
    """A run file as (env, records) with round 0, or a directory of rounds of one code
    (*.json, in the order of the numbers in their names) with rounds 0, 1, ...;
    Incomparable, naming the file, where it is not a run the gate can judge."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"), key=_natural)
        if not files:
            raise Incomparable(f"{path}: no run files (*.json) in this directory")
        runs = [load(f) for f in files]
        env = runs[0][0]
        for f, (other, _) in zip(files[1:], runs[1:], strict=True):
            if diffs := env_differences(env, other, (files[0].name, f.name)):
                raise Incomparable(f"{path}: the rounds differ in " + "; ".join(diffs))
        rounds = [df.assign(round=r) for r, (_, df) in enumerate(runs)]
        return env, pd.concat(rounds, ignore_index=True)
    try:
        run = read_run(path)
    except BadRun as e:
        raise Incomparable(str(e)) from e
    df = pd.DataFrame(run["records"])
    # Every dtype needs a tolerance to judge its error: refuse here, where the file is known.
    for dtype in set(df.get("dtype", pd.Series(dtype=object)).dropna()):
        try:
            tolerance(dtype)
        except ValueError as e:
            raise Incomparable(f"{path}: {e}") from e
    return run["env"], df.assign(round=0)


def _natural(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def env_differences(env_a: dict, env_b: dict, names=("baseline", "candidate")) -> list[str]:
    """One line per env field that differs between the runs, naming the field."""
    return [
        f"{field}: {names[0]} {env_a.get(field)!r}, {names[1]} {env_b.get(field)!r}"
        for field in ENV_FIELDS
        if env_a.get(field) != env_b.get(field)
    ]


def _failed(reason: pd.Series) -> pd.Series:
    """Where the layer raised or returned NaN/inf: the sweep's reason "failed: ..."."""
    return reason.str.startswith("failed:", na=False)


def _name(row) -> str:
    """A point as the table shows it: impl first, since that is who regressed."""
    dtype = f" {row.dtype}" if isinstance(row.dtype, str) else ""  # a micro-benchmark: none
    return f"{row.impl} {row.family} {row.label} {row.skew}{dtype}"


def _points(df: pd.DataFrame, side: str) -> pd.DataFrame:
    """One row a point: its status over all rounds (a failed round stands for the point,
    then any other skip), the median over rounds of its median time, its worst rel_err,
    and per round its median and raw repeats."""
    missing = [c for c in [*KEY, "status", "time_ms", "rel_err"] if c not in df]
    if missing:
        raise Incomparable(f"{side} run has no column {missing}: not a moebench run")
    if "round" not in df:
        df = df.assign(round=0)
    dup = df[df.duplicated([*KEY, "round"], keep=False)]
    if len(dup):
        raise Incomparable(f"{side} run has {len(dup)} records sharing a point key {KEY}")
    absent = pd.Series(None, index=df.index, dtype=object)
    reason, samples = df.get("reason", absent), df.get("samples_ms", absent)
    df = df.assign(
        reason=reason,
        samples_ms=samples,
        quant=df.get("quant", absent),  # the weights' format: its error has its tolerance
        _rank=np.where(_failed(reason), 0, 1) + df["status"].eq("ok"),
    )
    worst = df.sort_values(["_rank", "round"], kind="stable").drop_duplicates(KEY)
    ok = df[df["status"].eq("ok")].sort_values("round", kind="stable").groupby(KEY, dropna=False)
    out = worst[[*KEY, "status", "reason", "quant"]].set_index(KEY)
    out["time_ms"] = ok["time_ms"].median()
    out["rel_err"] = df.groupby(KEY, dropna=False)["rel_err"].max()
    # Per round, in order: (median, raw repeats).
    out["rounds"] = ok["time_ms"].agg(list)
    repeats = ok["samples_ms"].agg(list)
    out["rounds"] = [
        list(zip(t, r, strict=True)) if isinstance(t, list) else None
        for t, r in zip(out["rounds"], repeats.reindex(out.index), strict=True)
    ]
    return out.reset_index()


def _paired(base_rounds: list, cand_rounds: list) -> list[tuple]:
    """The two sides' rounds paired by index, the side with fewer taking its own in turn
    (a stored single run against regress's rounds)."""
    n = max(len(base_rounds), len(cand_rounds))
    return [
        (base_rounds[r % len(base_rounds)], cand_rounds[r % len(cand_rounds)]) for r in range(n)
    ]


def _point_effect(base_rounds, cand_rounds) -> stats.Effect:
    """The median of the paired rounds' shifts, the union of their intervals, the largest
    of their p-values."""
    effects = [
        stats.two_sample(_repeats(bs, bt), _repeats(cs, ct), level=LEVEL)
        for (bt, bs), (ct, cs) in _paired(base_rounds, cand_rounds)
    ]
    return stats.Effect(
        estimate=float(np.median([e.estimate for e in effects])),
        low=min(e.low for e in effects),
        high=max(e.high for e in effects),
        p_slower=max(e.p_slower for e in effects),
        p_faster=max(e.p_faster for e in effects),
        n=len(effects),
    )


def _repeats(samples, median_ms) -> list[float]:
    """A round's raw repeats, or its median alone where the run kept none (older runs)."""
    return list(samples) if isinstance(samples, (list, tuple)) and samples else [median_ms]


def _block_effects(both: pd.DataFrame) -> pd.DataFrame:
    """Per point and paired round, log(candidate median / baseline median), with the
    point's block."""
    rows = [
        {**{k: getattr(row, k) for k in KEY}, "round": r, "d": math.log(cand[0] / base[0])}
        for row in both.itertuples()
        for r, (base, cand) in enumerate(_paired(row.rounds_base, row.rounds_cand))
    ]
    return pd.DataFrame(rows, columns=[*KEY, "round", "d"])


def _groups(both: pd.DataFrame) -> tuple[list[str], list[stats.Effect], list[int]]:
    """Each implementation's and each family's aggregate over its points."""
    d = _block_effects(both)
    names, effects, points = [], [], []
    for kind in ("impl", "family"):
        for value, members in d.groupby(kind, sort=False):
            blocks = members.groupby([*BLOCK, "round"])["d"].median()
            names.append(f"{kind} {value}")
            effects.append(stats.signed_rank(blocks.to_numpy(), level=LEVEL))
            points.append(members[KEY].drop_duplicates().shape[0])
    return names, effects, points


def compare(
    base: tuple[dict, pd.DataFrame],
    cand: tuple[dict, pd.DataFrame],
    *,
    threshold: float | None = None,
    point_threshold: float | None = None,
    fdr: float = FDR,
    allow_missing: bool = False,
) -> Comparison:
    """The verdicts of every point and aggregate; raises Incomparable with the reason.

    threshold, point_threshold: the least slowdown of an aggregate, and of a point alone,
    that fails (default: by the runs' profile, THRESHOLD and POINT_THRESHOLD).
    A point ok on one side only is refused unless `allow_missing` (verdict "missing"), and
    so is a candidate without the rel_err that the baseline has.
    """
    if diffs := env_differences(base[0], cand[0]):
        raise Incomparable("the runs come from different environments:\n  " + "\n  ".join(diffs))
    profile, counted = base[0].get("profile"), base[0].get("timer") == INSTRUCTIONS
    if threshold is None:
        threshold = COUNT_THRESHOLD if counted else THRESHOLD.get(profile, DEFAULT_THRESHOLD)
    if point_threshold is None:
        point_threshold = (
            COUNT_THRESHOLD if counted else POINT_THRESHOLD.get(profile, DEFAULT_POINT_THRESHOLD)
        )
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

    point_effects = [
        _point_effect(row.rounds_base, row.rounds_cand) if ok else stats.Effect.unknown()
        for row, ok in zip(df.itertuples(), both, strict=True)
    ]
    group_names, group_effects, group_points = _groups(df[both])
    effects = point_effects + group_effects
    # One false discovery rate over every test of the gate, each direction (counts have
    # no tests: one count a side).
    no_test = [math.nan] * len(effects)
    q_slower = stats.bh_adjust(no_test if counted else [e.p_slower for e in effects])
    q_faster = stats.bh_adjust(no_test if counted else [e.p_faster for e in effects])
    estimate = np.array([e.estimate for e in effects])
    n = len(df)
    limit = np.log1p(np.r_[np.full(n, point_threshold), np.full(len(group_effects), threshold)])
    # Counts do not move with load: the threshold alone decides.
    slower = (counted | (q_slower <= fdr)) & (estimate > limit)
    faster = (counted | (q_faster <= fdr)) & (estimate < -limit)

    quant = df["quant_base"].where(df["quant_base"].notna(), df["quant_cand"])
    tol = pd.Series(
        [
            tolerance(dtype, q if isinstance(q, str) else None)
            if isinstance(dtype, str)
            else math.nan  # a micro-benchmark has no dtype
            for dtype, q in zip(df["dtype"], quant, strict=True)
        ],
        index=df.index,
    )
    err_limit = tol.where(~(df["rel_err_base"] > tol), 2 * df["rel_err_base"])
    verdict = np.select(
        [
            failed,
            both & (df["rel_err_cand"] > err_limit),
            both & slower[:n],
            one_sided,
            both & faster[:n],
            both,
        ],
        ["FAILED", "WRONG", "SLOWER", "missing", "faster", "same"],
        default="skipped",
    )
    points = df[KEY].assign(
        base_ms=df["time_ms_base"],
        cand_ms=df["time_ms_cand"],
        **_effect_columns(point_effects, q_slower[:n], both),
        base_err=df["rel_err_base"],
        cand_err=df["rel_err_cand"],
        err_limit=err_limit.where(both),
        verdict=pd.Categorical(verdict, categories=VERDICTS, ordered=True),
        # Why a point did not run: the candidate's reason, else the baseline's.
        reason=df["reason_cand"].where(~ok_cand, None).fillna(df["reason_base"].where(~ok_base)),
    )
    points = points.sort_values(["verdict", "ratio"], ascending=[True, False], kind="stable")
    group_verdict = np.where(slower[n:], "SLOWER", np.where(faster[n:], "faster", "same"))
    groups = pd.DataFrame({"group": group_names, "points": group_points,
                           "blocks": [e.n for e in group_effects]})  # fmt: skip
    groups = groups.assign(
        **_effect_columns(group_effects, q_slower[n:], True),
        verdict=pd.Categorical(group_verdict, categories=VERDICTS, ordered=True),
    )
    return Comparison(
        points.reset_index(drop=True), groups, threshold, point_threshold, fdr, counted
    )


def _effect_columns(effects: list[stats.Effect], q, valid) -> dict:
    """ratio, its interval (low, high) and the adjusted p-value of slowing (q)."""

    def column(values):  # an infinite bound (too few repeats or blocks to test) shows as -
        values = np.asarray(values, float)
        return np.where(valid & np.isfinite(values) & (values > 0), values, np.nan)

    return {
        "ratio": column([math.exp(e.estimate) for e in effects]),
        "low": column([math.exp(e.low) for e in effects]),
        "high": column([math.exp(e.high) for e in effects]),
        "q": column(q),
    }


def format_table(table: pd.DataFrame) -> str:
    """A verdict table as fixed-width text: times in ms."""
    formatters = {c: "{:.3f}".format for c in ("base_ms", "cand_ms", "ratio", "low", "high")}
    formatters |= {c: "{:.1e}".format for c in ("q", "base_err", "cand_err", "err_limit")}
    return table.to_string(index=False, formatters=formatters, na_rep="-")


def legend(comparison: Comparison) -> str:
    if comparison.counted:
        return (
            "base_ms, cand_ms: millions of instructions a call (callgrind); ratio = candidate "
            f"/ baseline; SLOWER: ratio > {1 + comparison.threshold:g} (a point: > "
            f"{1 + comparison.point_threshold:g})"
        )
    return (
        f"ratio = candidate / baseline (Hodges-Lehmann); low-high its {LEVEL:.0%} interval; "
        f"q = the p-value of a slowdown adjusted for all {comparison.tests} tests of points "
        f"and aggregates; SLOWER: q <= {comparison.fdr:g} and ratio > "
        f"{1 + comparison.threshold:g} (a point: > {1 + comparison.point_threshold:g})"
    )


def summary(comparison: Comparison) -> str:
    """The aggregates' estimates, then one line: the verdict counts and each failing point
    and aggregate by name."""
    table, groups = comparison.points, comparison.groups
    bound = lambda v: "-" if np.isnan(v) else f"{v:.3f}"
    lines = [
        f"{g.group}: {g.ratio:.3f}x [{bound(g.low)}, {bound(g.high)}] {g.verdict}"
        for g in groups.itertuples()
    ]
    counts = table["verdict"].value_counts()
    line = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts.get(v, 0))
    failing = [
        f"{r.verdict} {_name(r)}" for r in table[table["verdict"].isin(FAILING)].itertuples()
    ]
    failing += [f"SLOWER {g.group}" for g in groups[groups["verdict"].eq("SLOWER")].itertuples()]
    if not failing:
        return "\n".join([*lines, f"gate: PASS ({line})"])
    return "\n".join([*lines, f"gate: FAIL ({line}):\n  " + "\n  ".join(failing)])


def gate(baseline, candidate, **rule) -> int:
    """Load, compare (`rule`: compare's keywords), print the tables and the verdict; the
    exit code."""
    try:
        comparison = compare(load(baseline), load(candidate), **rule)
    except Incomparable as e:
        print(f"gate: INCOMPARABLE: {e}", file=sys.stderr)
        return EXIT_INCOMPARABLE
    print(format_table(comparison.points))
    print()
    print(format_table(comparison.groups))
    print(legend(comparison))
    print(summary(comparison))
    return EXIT_REGRESSION if comparison.failed else EXIT_PASS
