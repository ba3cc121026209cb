"""The regress worker: measures points on request with the moebench in its working directory.

Run by path, `python worker.py ROOT [COMMIT]`, with ROOT (the side's code) as working
directory and PYTHONPATH; it takes its own folder off sys.path (as `python -P` would, on
Python 3.11+ only), so that only ROOT's moebench is importable. It reads one JSON line,
the profile's fields, and prints the environment record as one JSON line; then for each
request line {"family", "label", "cfg", "T", "impls", "skews", "check"} it prints the
point's records (every skew and impl) as one JSON line. The requests carry the candidate's
grid, so that a baseline whose tree defines other profiles (or none called "gate")
measures the same points as the candidate.
"""

import dataclasses
import json
import sys
from pathlib import Path


def check_imports(root: Path) -> None:
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


def measuring_api(root: Path):
    """(grid, sweep, environment, make_timer, torch_threads) from the tree at `root`."""
    if (root / "moebench" / "bench" / "sweep.py").exists():
        from moebench.bench import grid, sweep
        from moebench.bench.environment import environment
        from moebench.bench.timing import make_timer, torch_threads
    else:
        # A baseline from before moebench/bench/ (commit c7ee136 and older) has the same
        # API in moebench.grid, moebench.harness and moebench.sweep. Chosen by the tree's
        # files, not by an ImportError: an installed moebench would answer the new names.
        from moebench import grid, sweep
        from moebench.harness import environment, make_timer, torch_threads
    return grid, sweep, environment, make_timer, torch_threads


def _known(cls, fields: dict) -> dict:
    """The fields that this tree's dataclass `cls` has (an older tree may lack new ones)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in names}


def main(root: str, commit: str | None = None) -> None:
    root = Path(root).resolve()
    grid, sweep, environment, make_timer, torch_threads = measuring_api(root)
    from moebench.config import MoEConfig

    check_imports(root)
    profile = grid.Profile(**_known(grid.Profile, json.loads(sys.stdin.readline())))
    timer = make_timer(profile.device)
    with torch_threads(profile.threads):
        env = environment(profile.name, device=profile.device, timer=timer)
    env.update(code=str(root), **({"commit": commit, "dirty": False} if commit else {}))
    print(json.dumps(env), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        cfg = MoEConfig(**_known(MoEConfig, request["cfg"]))
        point = grid.Point(request["family"], request["label"], cfg, request["T"])
        records = sweep.run_points(
            [point],
            request["impls"],
            request["skews"],
            profile=profile,
            check=request["check"],
            timer=timer,
        )
        check_imports(root)  # the implementations are imported on first use
        print(json.dumps(records), flush=True)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    main(*sys.argv[1:])
