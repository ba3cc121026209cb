"""Run files: `{"env": ..., "profile": ..., "records": [...]}`, one record a line, written
to a temporary file beside the destination and renamed over it, so a reader never sees
half a run."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from .records import RECORD_FIELDS


def _jsonable(value):
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_atomic(path, write) -> Path:
    """write(f), f a binary file, into a temporary file beside `path`, then rename it over
    `path`: a reader never sees half a file, and a failure leaves the previous one whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_run(path, env: dict, records: list[dict]) -> Path:
    """Write a run file atomically (write_atomic), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dump = lambda value: json.dumps(_jsonable(value), allow_nan=False)
    # One record per line: compact, and a diff of two runs reads point by point.
    text = (
        f'{{"env": {dump(env)},\n"profile": {dump(env.get("profile"))},\n"records": [\n'
        + ",\n".join(dump(r) for r in records)
        + "\n]}\n"
    )
    return write_atomic(path, lambda f: f.write(text.encode()))


class BadRun(ValueError):
    """A file that is not a readable moebench run; the message names it and says why."""


def read_run(path) -> dict:
    """A run file's content ({"env", "profile", "records"}); BadRun where it is missing,
    truncated or not a run."""
    try:
        with open(path) as f:
            run = json.load(f)
    except OSError as e:
        raise BadRun(f"{path}: cannot read the run: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRun(f"{path}: not JSON, a truncated or foreign file ({e})") from e
    if not (
        isinstance(run, dict)
        and isinstance(run.get("env"), dict)
        and isinstance(run.get("records"), list)
    ):
        raise BadRun(f"{path}: not a moebench run (no env and records)")
    return run


def load_run(path):
    """(env, pandas.DataFrame with one row per record and at least RECORD_FIELDS)."""
    import pandas as pd  # only the report and the gate need pandas

    run = read_run(path)
    frame = pd.DataFrame(run["records"])
    for column in RECORD_FIELDS:
        if column not in frame:
            frame[column] = None
    return run["env"], frame


def run_path(results_dir, env: dict) -> Path:
    """results/<profile>-<machine>/run-<UTC time>.json"""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(results_dir) / f"{env['profile']}-{env['machine']}" / f"run-{stamp}.json"
