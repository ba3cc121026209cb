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


def fake_run(seed, *, slow=None, factor=1.0, cv=0.02, repeats=15, err=None, env=ENV):
    """A run whose times are drawn around fixed true costs with the given relative noise.

    `slow` names an impl whose every point costs `factor` times more; `err` maps an impl to
    the rel_err its points report.
    """
    rng = np.random.default_rng(seed)
    records = []
    for impl in IMPLS:
        for e, cost in (("E=8", 2.0), ("E=64", 5.0)):
            for skew in ("balanced", "zipf:1.2"):
                true = cost * (factor if impl == slow else 1.0)
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
                        "rel_err": (err or {}).get(impl, 1e-6),
                    }
                )
    return dict(env), pd.DataFrame(records)


def write(path, run):
    env, df = run
    path.write_text(json.dumps({"env": env, "records": df.to_dict("records")}))
    return str(path)
