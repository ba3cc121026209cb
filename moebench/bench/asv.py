"""asv glue: the records asv reports, from one sweep run, looked up per parameter set;
and the environment asv records them under.

asv.conf.json loads this module as an asv plugin (`"plugins"`), which defines the
environment type "moebench": asv's `existing` environment (the interpreter that runs asv,
with its own torch build) named by the Python version alone. asv names `existing` by the
interpreter's path, so each checkout, nox venv or CI clone of one machine would start a
new series in the web report instead of extending the machine's history.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from asv import util
from asv.environment import ExistingEnvironment

from . import grid
from .environment import asv_machine
from .runs import read_run, write_atomic
from .sweep import run_profile

PERCENT = re.compile(r"^\[\s*(\d+(?:\.\d+)?)%\]")  # asv's progress prefix, "[ 42.50%]"


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


class MachineEnvironment(ExistingEnvironment):
    """asv's existing environment, keyed by "moebench-py<X.Y>" instead of the path."""

    tool_name = "moebench"

    def __init__(self, conf, python, requirements, tagged_env_vars):
        super().__init__(conf, python, requirements, tagged_env_vars)
        # The base class reports the interpreter's path as the environment's Python.
        code = "import sys; print('%d.%d' % sys.version_info[:2])"
        self._python = util.check_output([self._executable, "-c", code]).strip()

    @property
    def name(self) -> str:
        return f"{self.tool_name}-py{self._python}"


def read_config(path) -> dict:
    """asv.conf.json as a dict (asv allows // comment lines; json does not), with repo,
    benchmark_dir, results_dir and html_dir made absolute against the file's folder."""
    path = Path(path)
    text = path.read_text()
    conf = json.loads("\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("//")))
    for key in ("repo", "benchmark_dir", "results_dir", "html_dir"):
        conf[key] = str((path.parent / conf[key]).resolve())
    return conf


def config_under(path, folder) -> Path:
    """A copy of the asv config at `path` whose results and web report go under `folder`
    (a trial run leaves results/ alone: asv writes machine.json even with --dry-run)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    conf = read_config(path)
    conf.update(results_dir=str(Path(folder, "asv")), html_dir=str(Path(folder, "html")))
    out = Path(folder, "asv.conf.json")
    write_atomic(out, lambda f: f.write(json.dumps(conf, indent=4).encode()))
    return out


def write_machine(name: str) -> None:
    """Record every field of this machine in asv's machine file under `name`: `asv machine
    --yes` keeps only the fields that differ from its defaults."""
    from asv.machine import Machine, MachineCollection

    fields = {**Machine.get_defaults(), **asv_machine(), "machine": name}
    MachineCollection.save(name, {key: fields[key] for key, _ in Machine.fields})


def run_asv(args: list[str], config, log, progress=None, env=None) -> int:
    """`asv ARGS --config CONFIG` in this interpreter, from the config's repo (asv loads
    the plugin in this module from there), its output into the open file `log`;
    progress(fraction) follows asv's percentages. Returns asv's exit status."""
    repo = read_config(config)["repo"]
    cmd = [sys.executable, "-m", "asv", *args, "--config", str(Path(config).resolve())]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    with subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, **(env or {})}) as proc:  # fmt: skip
        for line in proc.stdout:
            log.write(line)
            match = PERCENT.match(line)
            if match and progress is not None:
                progress(float(match[1]) / 100)
    log.flush()
    return proc.returncode


def record(run, profile: str, machine: str, commit: str, config, log, progress=None) -> int:
    """asv's record of the sweep run file `run` (the suites read it instead of measuring
    again), at `commit`, under the asv machine `machine`. Returns asv's exit status."""
    write_machine(machine)
    args = ["run", "--set-commit-hash", commit, "--machine", machine]
    env = {"MOEBENCH_PROFILE": profile, "MOEBENCH_RUN": str(Path(run).resolve())}
    return run_asv(args, config, log, progress, env)


def publish(config, log) -> Path:
    """asv's web report of every result under the config's results_dir, with the scripts
    it loads from CDNs kept beside it (webreport.localize): it opens offline. Returns its
    index.html."""
    status = run_asv(["publish"], config, log)
    if status != 0:
        raise RuntimeError(f"asv publish exited with {status}")
    from . import webreport  # its scripts: only for publishing

    html = Path(read_config(config)["html_dir"])
    webreport.localize(html)
    return html / "index.html"
