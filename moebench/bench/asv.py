"""asv glue: the records asv reports, from one sweep run, looked up per parameter set."""

from __future__ import annotations

import os

from . import grid
from .runs import read_run
from .sweep import run_profile


def asv_records(profile: grid.Profile, results_dir) -> dict:
    """The records asv reports, keyed by (family, label, impl, skew): the run file named by
    MOEBENCH_RUN (what `nox -s bench` measured just before), else a fresh run of the
    profile written under results_dir."""
    path = os.environ.get("MOEBENCH_RUN") or run_profile(profile, results_dir=results_dir)
    run = read_run(path)
    if run["profile"] != profile.name:
        raise ValueError(
            f"{path} is a {run['profile']!r} run; the suites were built for profile "
            f"{profile.name!r} (set MOEBENCH_PROFILE to match)"
        )
    return {(r["family"], r["label"], r["impl"], r["skew"]): r for r in run["records"]}


def asv_lookup(records: dict, family, label, impl, skew, metrics) -> dict:
    """The record of one asv parameter combination; NotImplementedError (asv: skipped)
    with the reason when the sweep skipped it or lacks one of `metrics`."""
    record = records.get((family, label, impl, skew))
    if record is None:
        raise NotImplementedError(f"{family} {label} {impl} {skew}: not in this run")
    if record["status"] != "ok":
        raise NotImplementedError(record["reason"])
    missing = [m for m in metrics if record.get(m) is None]
    if missing:
        raise NotImplementedError(f"{', '.join(missing)} not measured for this point")
    return record
