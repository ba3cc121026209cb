"""Fake runs for the gate and regress tests: seeded timings around a fixed layer."""

import json

import numpy as np
import pandas as pd

ENV = {
    "commit": "0" * 40,
    "machine": "ci-box",
    "gpu": None,
    "cuda": None,
    "torch": "2.13.0+cpu",
    "triton": "3.9.0",
    "harness_version": "1",
    "profile": "tiny",
}
IMPLS = ("naive", "padded", "sorted", "triton")
LABELS = (("E=8", 2.0), ("E=64", 5.0), ("E=512", 9.0), ("E=4096", 20.0))  # and true ms


def fake_run(
    seed, *, slow=None, factor=1.0, cv=0.02, repeats=15, err=None, env=ENV, samples=True,
    round_=0,
):  # fmt: skip
    """One round of a run whose times are drawn around fixed true costs with the given
    relative noise.

    `slow` names an impl whose every point costs `factor` times more (a float, or a dict
    from label to factor); `err` maps an impl to the rel_err its points report; without
    `samples` the records keep medians only, as runs from before samples_ms did.
    """
    rng = np.random.default_rng(seed)
    records = []
    for impl in IMPLS:
        for e, cost in LABELS:
            for skew in ("balanced", "zipf:1.2"):
                f = factor.get(e, 1.0) if isinstance(factor, dict) else factor
                true = cost * (f if impl == slow else 1.0)
                times = true * (1 + cv * rng.standard_normal(repeats))
                records.append(
                    {
                        "family": "scale-out",
                        "label": e,
                        "impl": impl,
                        "skew": skew,
                        "dtype": "float32",
                        "status": "ok",
                        "reason": "",
                        "time_ms": float(np.median(times)),
                        "p20_ms": float(np.percentile(times, 20)),
                        "p80_ms": float(np.percentile(times, 80)),
                        "cv": float(times.std() / times.mean()),
                        "repeats": repeats,
                        "samples_ms": [float(t) for t in times] if samples else None,
                        "rel_err": (err or {}).get(impl, 1e-6) if round_ == 0 else None,
                    }
                )
    return dict(env), pd.DataFrame(records)


def rounds(*runs):
    """Rounds of one code as one run, as gate.load reads a directory of them."""
    env = runs[0][0]
    return env, pd.concat([df.assign(round=r) for r, (_, df) in enumerate(runs)], ignore_index=True)


def write(path, run):
    """The run as a file, or where it holds several rounds, a directory of round-<r>.json."""
    env, df = run
    if df.get("round", pd.Series([0])).nunique() > 1:
        path.mkdir()
        for r, part in df.groupby("round"):
            write(path / f"round-{r}.json", (env, part.drop(columns="round")))
        return str(path)
    records = df.drop(columns="round", errors="ignore").to_dict("records")
    path.write_text(json.dumps({"env": env, "records": records}))
    return str(path)
