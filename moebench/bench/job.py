"""The main job, `moebench bench` (what `nox -s bench` runs): the profile's sweep, asv's
record of it, the report, and an answer on the console.

1. sweep: every implementation over the profile's families, into
   results/<profile>-<machine>/run-<time>.json;
2. asv records that run for the commit (the suites read the run file, nothing is measured
   twice), under results/asv;
3. the report: summary.md, summary.csv and plots/ beside the run, and asv's web report
   (results/html) with the scripts it loads kept beside it, so it opens offline;
4. the console summary (report.console_summary), the triton layer's targets where the run
   measured the triton layer (against the peers: the summary's range, not each point), and
   where the files are.

The console shows a progress bar with the time left for steps 1 and 2; the sweep's
per-point lines and asv's output go to the log beside the run file (run-<time>.log).
A step that fails is named, and the steps after it still run on what was measured.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from . import asv, grid, report, sweep, targets
from .environment import git_commit, machine_name
from .runs import load_run, run_path


class Bar:
    """One line of progress with the time left, redrawn in place on a terminal; elsewhere
    (a CI log) one line per tenth of the way, so a log stays short."""

    def __init__(self, label: str, stream=None, clock=time.monotonic, width: int = 30):
        self.label, self.width, self.clock = label, width, clock
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = clock()
        self.shown = -1  # the last tenth printed off a terminal

    def __call__(self, fraction: float, note: str = "") -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        elapsed = self.clock() - self.start
        left = elapsed / fraction * (1 - fraction) if fraction > 0 else None
        eta = "" if left is None else f"  {_clock(elapsed)} elapsed, {_clock(left)} left"
        filled = round(fraction * self.width)
        text = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {fraction:4.0%}{eta}"
        if self.tty:
            # One row of the terminal: a wrapped line would not be redrawn by the \r.
            columns = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + f"{text}  {note}"[:columns].ljust(columns))
        elif int(fraction * 10) > self.shown:
            self.shown = int(fraction * 10)
            self.stream.write(f"{text}  {note}\n")
        self.stream.flush()

    def close(self, note: str = "done") -> None:
        self(1.0, note)
        if self.tty:
            self.stream.write("\n")


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def main_job(
    profile=None,
    *,
    results_dir="results",
    output=None,
    asv_config="asv.conf.json",
    asv_dir=None,
    sweep_options: dict | None = None,
    stream=None,
) -> int:
    """Run the job; returns 0, or 1 when asv or the web report failed (the run file and the
    summary stand). asv_config None leaves asv out; asv_dir puts asv's results and web
    report under that folder instead of the config's."""
    stream = stream or sys.stdout
    p = grid.get_profile(profile)
    run = Path(output or run_path(results_dir, {"profile": p.name, "machine": machine_name()}))
    run.parent.mkdir(parents=True, exist_ok=True)
    log_path = run.with_suffix(".log")
    failed = []
    with open(log_path, "w") as log:
        lines = sweep.Progress(stream=log, after_s=0)
        bar = Bar(f"sweep {p.name:<5}")

        def progress(done, total, record):
            lines(done, total, record)
            bar(done / total, f"{record['family']} {record['label']}")

        sweep.run_profile(p.name, output=run, progress=progress, **(sweep_options or {}))
        bar.close()
        html = None
        if asv_config:
            config = asv.config_under(asv_config, asv_dir) if asv_dir else Path(asv_config)
            html, error = _asv(run, p.name, config, log)
            failed += [error] if error else []
        report.write_report(run)
    env, frame = load_run(run)
    print(report.console_summary(env, frame), file=stream)
    if (frame[frame["impl"] == "triton"]["status"] == "ok").any():
        # Per point against the peers is too long for a screen: the summary has its range.
        print(targets.markdown(env, frame, per_point=False), file=stream)
    print("Files:", file=stream)
    print(f"  run       {run}", file=stream)
    print(f"  summary   {run.parent / 'summary.md'} (and summary.csv)", file=stream)
    print(f"  plots     {run.parent / 'plots'}/", file=stream)
    if html:
        serve = f"python -m http.server -d {html.parent}"
        print(f"  web       {html} (works offline; serve it: {serve})", file=stream)
    print(f"  log       {log_path} (per point, and asv's output)", file=stream)
    for error in failed:
        print(f"moebench: error: {error}; see {log_path}", file=sys.stderr)
    return 1 if failed else 0


def _asv(run: Path, profile: str, config: Path, log) -> tuple[Path | None, str | None]:
    """Record the run with asv and publish the web report: (its index.html or None, what
    failed or None)."""
    commit, _ = git_commit()
    if commit is None:
        return None, "asv needs a git checkout to record the run against a commit"
    machine = f"{profile}-{machine_name()}"
    bar = Bar("asv   ")
    status = asv.record(run, profile, machine, commit, config, log, bar)
    bar.close()
    if status != 0:
        return None, f"asv run exited with {status}"
    try:
        return asv.publish(config, log), None
    except Exception as e:  # the run, its summary and asv's results stand
        return None, f"the web report: {e}"
