"""`moebench regress`: measure a baseline revision and the working tree on the same grid,
interleaved point by point, then gate the candidate against the baseline.

Each side is measured by a worker process (moebench/bench/worker.py, run by path with the
side's code as its working directory and PYTHONPATH), which is sent the candidate's grid:
the profile's fields and each point's shape, so that both sides measure the same points
even where the baseline's tree defines other profiles or lacks the gate's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import grid
from .environment import machine_name
from .gate import EXIT_INCOMPARABLE, INSTRUCTIONS, RULE, Incomparable, gate
from .runs import BadRun, read_run, write_run

WORKER = Path(__file__).with_name("worker.py")

# Rounds a side: each round is one block per point of the gate's paired tests, and on the
# shared CPU machine a point's ratio moved by up to 17 % from one round to the next; the
# GPU is steady enough for one.
ROUNDS = {"gate": 4, "microbench": 3}
MICRO = "microbench"  # the gate profile of regress --micro


class _Worker:
    """A fresh interpreter measuring the code at `code` on request (worker.py)."""

    def __init__(self, code: Path, profile: grid.Profile, log: Path, commit: str | None = None):
        self.code, self.log = code, log
        path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
        cmd = [sys.executable, str(WORKER), str(code), *([commit] if commit else [])]
        with open(log, "w") as stderr:
            self.proc = subprocess.Popen(
                cmd,
                cwd=code,
                env={**os.environ, "PYTHONPATH": path},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self._send(dataclasses.asdict(profile))
        self.env = self._reply()

    def measure(self, point: grid.Point, impls, skews, check: bool) -> list[dict]:
        cfg = dataclasses.asdict(point.cfg)
        self._send({"family": point.family, "label": point.label, "cfg": cfg, "T": point.T,
                    "impls": list(impls), "skews": list(skews), "check": check})  # fmt: skip
        return self._reply()

    def _send(self, message) -> None:
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died: _reply says why

    def _reply(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise Incomparable(
                f"measuring the code at {self.code} failed:\n{self.log.read_text()[-3000:]}"
            )
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait()


def _git(*args, cwd=None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise Incomparable(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _committed_run(root: Path, profile: str) -> Path | None:
    """The newest committed run of this machine and gate profile under results/."""
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


def resolve_baseline(
    spec: str | None, root: Path, profile: str, measured=("moebench",)
) -> str | Path:
    """A run file or directory to read, or the commit to measure.

    Default: the merge base of HEAD with main (or origin/main). Where that is HEAD itself
    and the `measured` paths have no uncommitted change (CI on main), the newest committed
    run of this machine and profile, else HEAD~1: the last commit is the change to gate.
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
    if base != head or _git("status", "--porcelain", "--", *measured, cwd=root):
        return base
    return _committed_run(root, profile) or _git("rev-parse", "HEAD~1", cwd=root)


def _checkout(rev: str, root: Path, into: Path) -> Path:
    """The tree of `rev`, extracted into `into` (its worker is the candidate's worker.py)."""
    archive = subprocess.run(["git", "archive", rev], cwd=root, capture_output=True)
    if archive.returncode:
        raise Incomparable(f"git archive {rev}: {archive.stderr.decode().strip()}")
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def measure_sides(sides: dict[str, _Worker], points, impls, skews, rounds: int, out: Path) -> None:
    """Each side's rounds of the points as run files out/<side>/round-<r>.json.

    The sides take turns point by point, which goes first drawn at random, so that both
    measure each point within seconds of each other: a busy spell of a shared machine then
    hits both instead of deciding the verdict. Not a fixed alternation: a neighbour running
    the same alternation (another gate, with a slowdown planted in its candidate) once kept
    in step with it and made identical code 6 % slower on every point. Correctness is
    checked in the first round only. Each
    side first measures the first point once, untimed by the gate: a fresh process's first
    calls ran up to 1.7x slower than the same calls a round later.
    """
    for worker_ in sides.values():
        worker_.measure(points[0], impls, skews, check=False)
    for r in range(rounds):
        records = {name: [] for name in sides}
        for pt in points:
            for name in random.sample(list(sides), len(sides)):
                records[name] += sides[name].measure(pt, impls, skews, check=r == 0)
        for name, worker_ in sides.items():
            write_run(out / name / f"round-{r}.json", worker_.env, records[name])
        print(f"regress: round {r + 1}/{rounds} measured", flush=True)


def regress(args) -> int:
    """Measure the baseline (args.baseline: a revision, or a run file or folder to read)
    and the working tree, then gate; the exit code (moebench.bench.gate). args.impls:
    default moebench's own layers (a peer's code does not change between our commits)."""
    root = Path(_git("rev-parse", "--show-toplevel"))
    profile = MICRO if args.micro else args.profile or ("gpu" if _cuda_available() else "gate")
    rounds = args.rounds or ROUNDS.get(profile, 1)
    rule = {k: getattr(args, k) for k in RULE}
    with tempfile.TemporaryDirectory(prefix="moebench-regress-") as tmp:
        out, tmp = Path(args.output or tmp), Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.micro:
            return _micro(args, root, rounds, out, tmp, rule)
        sides = {}
        try:
            p, points, skews = grid.gate_grid(profile)
            if args.families:
                points = [pt for pt in points if pt.family in args.families]
            baseline = resolve_baseline(args.baseline, root, profile)
            print(f"regress: baseline {baseline}, candidate: the working tree {root}")
            if isinstance(baseline, str):
                code = _checkout(baseline, root, tmp / "baseline-src")
                try:
                    sides["baseline"] = _Worker(code, p, out / "baseline.log", baseline)
                except Incomparable as e:
                    raise Incomparable(
                        f"the baseline {baseline} cannot be measured ({e}); pass a committed "
                        "run of this machine and profile instead: --baseline RUN.json"
                    ) from e
            sides["candidate"] = _Worker(root, p, out / "candidate.log")
            impls = args.impls or grid.IMPLS
            measure_sides(sides, points, impls, skews, rounds, out)
        except Incomparable as e:
            print(f"gate: INCOMPARABLE: {e}", file=sys.stderr)
            return EXIT_INCOMPARABLE
        finally:
            for worker_ in sides.values():
                worker_.close()
        return gate(
            out / "baseline" if "baseline" in sides else baseline, out / "candidate", **rule
        )


MICRO_TESTS = "tests/test_microbench.py"
MICRO_ENV = {"OMP_NUM_THREADS": "1"}  # OpenMP barriers on a busy 2-core machine stall


def micro_record(name: str, samples: list[float], median: float) -> dict:
    """A micro-benchmark as a gate record: the benchmark (test_route[softmax]) a point,
    its test function (route) the implementation, whose aggregate holds its variants."""
    function, _, param = name.partition("[")
    return {"family": "microbench", "label": name, "impl": function.removeprefix("test_"),
            "skew": param.removesuffix("]") or "-", "dtype": None, "status": "ok",
            "reason": None, "time_ms": median, "samples_ms": samples, "repeats": len(samples),
            "rel_err": None}  # fmt: skip


def micro_records(report: dict) -> list[dict]:
    """A pytest-benchmark JSON report as gate records, its raw rounds as repeats (ms a
    call)."""
    records = []
    for bench in report.get("benchmarks", []):
        data = bench["stats"]
        per_call = [t * 1e3 / data["iterations"] for t in data["data"]]
        records.append(
            micro_record(bench["name"], per_call, data["median"] * 1e3 / data["iterations"])
        )
    return records


def callgrind_missing() -> str | None:
    """Why instructions cannot be counted here, or None."""
    import torch

    if shutil.which("valgrind") is None:
        return "no valgrind on PATH"
    if not torch._C._valgrind_supported_platform():
        return "this torch build has no valgrind support"
    return None


def micro_instructions(code: Path, out: Path) -> list[dict]:
    """Each micro-benchmark's instructions a call (millions) in the tree at `code`, counted
    by callgrind (callgrind_plugin.py): one call each after a warm-up call."""
    out.mkdir(parents=True)
    names = out / "names.json"
    # The plugin by itself on the path, after the measured tree: a baseline may lack it.
    shutil.copy(WORKER.with_name("callgrind_plugin.py"), out)
    path = os.pathsep.join(filter(None, [str(code), str(out), os.environ.get("PYTHONPATH")]))
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out / 'callgrind.out'}",
           "--collect-atstart=no", "--dump-line=no", sys.executable, "-m", "pytest",
           MICRO_TESTS, "-q", "-o", "addopts=", "-p", "no:cacheprovider", "-p", "no:benchmark",
           "-p", "callgrind_plugin"]  # fmt: skip
    env = {**os.environ, **MICRO_ENV, "PYTHONPATH": path, "MOEBENCH_CALLGRIND_NAMES": str(names)}
    done = subprocess.run(cmd, cwd=code, capture_output=True, text=True, env=env)
    if done.returncode:
        raise Incomparable(
            f"counting the micro-benchmarks of {code} failed:\n{done.stdout[-3000:]}"
        )
    dumps = sorted(out.glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
    counts = [int(re.search(r"^summary: (\d+)", p.read_text(), re.M)[1]) / 1e6 for p in dumps]
    return [
        micro_record(n, [c], c) for n, c in zip(json.loads(names.read_text()), counts, strict=True)
    ]


def _micro_round(code: Path, report: Path) -> list[dict]:
    """One pytest-benchmark run of the micro-benchmarks of the tree at `code`."""
    if not (code / MICRO_TESTS).exists():
        raise Incomparable(f"{code} has no {MICRO_TESTS} to measure")
    path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", MICRO_TESTS, "-q", "-p", "no:cacheprovider",
           "--benchmark-enable", "--benchmark-warmup=on", "--benchmark-max-time=0.5",
           f"--benchmark-json={report}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=code, capture_output=True, text=True,
                          env={**os.environ, **MICRO_ENV, "PYTHONPATH": path})  # fmt: skip
    if done.returncode:
        raise Incomparable(f"the micro-benchmarks of {code} failed:\n{done.stdout[-3000:]}")
    return micro_records(json.loads(report.read_text()))


def measure_micro(codes: dict[str, Path], rounds: int, out: Path) -> None:
    """Each side's rounds of the micro-benchmarks as out/<side>/round-<r>.json, the sides
    taking turns, which goes first drawn at random (measure_sides says why)."""
    env = {"machine": machine_name(), "profile": "microbench"}
    for r in range(rounds):
        for name in random.sample(list(codes), len(codes)):
            records = _micro_round(codes[name], out / f"{name}-{r}.pytest.json")
            write_run(out / name / f"round-{r}.json", env, records)
        print(f"regress: round {r + 1}/{rounds} of the micro-benchmarks measured", flush=True)


def _micro(args, root: Path, rounds: int, out: Path, tmp: Path, rule: dict) -> int:
    """regress --micro: the micro-benchmarks of a baseline revision and the working tree."""
    try:
        baseline = resolve_baseline(args.baseline, root, MICRO, ("moebench", MICRO_TESTS))
        if not isinstance(baseline, str):
            raise Incomparable(f"--micro measures a git revision, not a stored run: {baseline}")
        print(f"regress: micro-benchmarks of {baseline} and of the working tree {root}")
        codes = {"baseline": _checkout(baseline, root, tmp / "baseline-src"), "candidate": root}
        measure_micro(codes, rounds, out)
        verdict = gate(out / "baseline", out / "candidate", **rule)
        if reason := callgrind_missing():
            print(f"regress: instructions not counted: {reason}")
            return verdict
        # The second tier: instruction counts, which do not move with the machine's load.
        env = {"machine": machine_name(), "profile": MICRO, "timer": INSTRUCTIONS}
        for name, code in codes.items():
            records = micro_instructions(code, out / "instructions" / name)
            write_run(out / "instructions" / f"{name}.json", env, records)
        print("regress: the micro-benchmarks' instructions, counted by callgrind", flush=True)
    except Incomparable as e:
        print(f"gate: INCOMPARABLE: {e}", file=sys.stderr)
        return EXIT_INCOMPARABLE
    counted = gate(
        out / "instructions" / "baseline.json", out / "instructions" / "candidate.json", **rule
    )
    return max(verdict, counted)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
