"""The main job: the console summary's answer, the progress bar, and `moebench bench` end to
end on the tiny profile (sweep, asv, report, summary, log)."""

import io
import json

import pandas as pd
import pytest

from moebench import cli
from moebench.bench import job, report, webreport
from moebench.bench.records import RECORD_FIELDS

ENV = {"profile": "tiny", "machine": "box", "cpu": "a CPU", "torch_threads": 1,
       "commit": "0123456789abcdef", "duration_s": 12.5}  # fmt: skip


def records(rows) -> pd.DataFrame:
    """A run's frame from (label, E, impl, skew, time_ms, extra fields) rows."""
    out = []
    for label, E, impl, skew, time_ms, extra in rows:
        r = dict.fromkeys(RECORD_FIELDS)
        r.update(family="scale-out", label=label, E=E, impl=impl, skew=skew, status="ok",
                 time_ms=time_ms, peak_bytes=2**20 * E)  # fmt: skip
        r.update(extra)
        out.append(r)
    return pd.DataFrame(out)


def test_console_summary_answers_per_family():
    rows = []
    # sorted wins at E=8 and 16 by 2x and 1.5x, padded at E=32 by 1.5x.
    for label, E, times in [("E=8", 8, (2, 4, 1)), ("E=16", 16, (3, 6, 2)),
                            ("E=32", 32, (3, 2, 6))]:  # fmt: skip
        for impl, t in zip(("naive", "padded", "sorted"), times, strict=True):
            rows.append((label, E, impl, "balanced", t, {"imbalance_overhead": 1.0}))
            rows.append((label, E, impl, "collapse", t * 1.5, {"imbalance_overhead": 1.5}))
            rows.append((label, E, impl, "zipf:1.2", t * 1.1, {"imbalance_overhead": 1.1}))
    frame = records(rows)
    sorted_collapse = (frame["impl"] == "sorted") & (frame["skew"] == "collapse")
    frame.loc[sorted_collapse & (frame["E"] == 16), "imbalance_overhead"] = 4.0
    padded = frame["impl"] == "padded"
    frame.loc[padded, "dropped_fraction"] = 0.0
    frame.loc[padded & (frame["skew"] == "collapse"), "dropped_fraction"] = 0.9
    frame.loc[padded & (frame["skew"] == "collapse") & (frame["E"] == 32), "dropped_fraction"] = 0.5
    oom = padded & (frame["E"] == 16) & (frame["skew"] == "zipf:1.2")
    frame.loc[oom, ["status", "reason", "time_ms", "imbalance_overhead"]] = [
        "skipped", "out of memory: CUDA out of memory", None, None]  # fmt: skip
    text = report.console_summary(ENV, frame)
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ")}
    assert "tiny profile on box (a CPU, 1 torch thread(s)), commit 01234567, 12.5 s" in text
    assert "sorted at E=8..16 (1.50-2.00x); padded at E=32 (1.50x)" in lines["fastest"]
    assert "collapse: naive 1.50x, padded 1.50x, sorted 4.00x" in lines["worst"]
    assert "drops up to collapse 90% of pairs; out of memory at E=16" in lines["padded"]
    assert "naive 32 MiB (E=32), padded 32 MiB (E=32), sorted 32 MiB (E=32)" in lines["peak"]
    assert "padded 1 of 9 (out of memory: CUDA out of memory)" in lines["skipped"]


def peer_rows(triton=True):
    """Three points: triton 1 ms; the best peer hf-grouped_mm (1.5, 1.2 ms) at E=8 and 16,
    hf-eager (0.8 ms) at E=32; a plug-in not installed here; vllm and liger skipped."""
    rows = []
    for label, E, eager, grouped in [("E=8", 8, 3.0, 1.5), ("E=16", 16, 3.0, 1.2),
                                     ("E=32", 32, 0.8, 2.0)]:  # fmt: skip
        times = {"sorted": 2.0, "triton": 1.0, "hf-eager": eager, "hf-grouped_mm": grouped,
                 "not-installed-here": 4.0}  # fmt: skip
        for impl, t in times.items():
            if impl != "triton" or triton:
                rows.append((label, E, impl, "balanced", t, {}))
        for impl in ("vllm", "liger"):
            reason = "unavailable: vllm needs vllm" if impl == "vllm" else "unsupported: no CUDA"
            rows.append((label, E, impl, "balanced", None, {"status": "skipped", "reason": reason}))
    return records(rows)


def test_console_summary_with_peers():
    """triton against the best peer: 1.5/1, 1.2/1 and 0.8/1; a peer can be the fastest."""
    text = report.console_summary(ENV, peer_rows())
    lines = {ln[2:15].strip(): ln[15:] for ln in text.splitlines() if ln.startswith("  ")}
    assert lines["vs best peer"] == (
        "triton 0.80-1.50x (faster at 2 of 3 points; hf-grouped_mm the best peer at 2 of 3)"
    )
    assert lines["fastest"] == "triton at E=8..16 (1.20-1.50x); hf-eager (peer) at E=32 (1.25x)"
    skipped = "vllm 3 of 3 (unavailable); liger 3 of 3 (unsupported); why: summary.md"
    assert lines["skipped"] == skipped
    assert "vs best peer: the fastest peer's time / moebench's" in " ".join(text.split())


def test_console_summary_without_triton_compares_moebench_fastest_layer():
    """A CPU run: sorted (2 ms) is moebench's fastest; an outside plug-in is named so."""
    frame = peer_rows(triton=False)
    frame.loc[frame["impl"] == "not-installed-here", "time_ms"] = 0.5
    text = report.console_summary(ENV, frame)
    lines = {ln[2:15].strip(): ln[15:] for ln in text.splitlines() if ln.startswith("  ")}
    assert lines["vs best peer"].startswith("sorted 0.40-0.75x (faster at 0 of 3 points;")
    assert lines["fastest"] == "not-installed-here (outside) at every point (1.60-3.00x)"


def test_console_summary_without_peers_has_no_peer_line():
    frame = peer_rows()
    text = report.console_summary(ENV, frame[~frame["impl"].str.startswith("hf-")])
    assert "best peer" not in text


def test_bar_off_a_terminal_prints_each_tenth_once_with_the_time_left():
    stream, now = io.StringIO(), [0.0]
    bar = job.Bar("sweep", stream=stream, clock=lambda: now[0])
    for i in range(1, 101):
        now[0] = i * 0.6
        bar(i / 100, f"point {i}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11  # the first update, then 10%, 20%, ... 100%
    assert lines[1].startswith("sweep [###...") and " 10% " in lines[1]
    assert "6s elapsed, 54s left  point 10" in lines[1]
    assert "1m00s elapsed, 0s left" in lines[-1]


def test_bar_on_a_terminal_redraws_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = job.Bar("asv", stream=stream, clock=lambda: 1.0)
    bar(0.5)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """`moebench bench` on a tiny grid, asv included (its web report's scripts stubbed:
    tests/bench/test_webreport.py checks them); (exit code, stdout, stderr, folder)."""
    tmp = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(tmp))  # asv keeps its machine file there
    localized = []
    mp.setattr(webreport, "localize", lambda html, **kw: localized.append(html))
    out, err = io.StringIO(), io.StringIO()
    mp.setattr("sys.stdout", out)
    mp.setattr("sys.stderr", err)
    args = ["--profile", "tiny", "--families", "scale-out", "--skews", "balanced,collapse"]
    try:
        code = cli.main(["bench", *args, "--results-dir", str(tmp), "--asv-dir", str(tmp)])
    finally:
        mp.undo()
    assert localized == [tmp / "html"]
    return code, out.getvalue(), err.getvalue(), tmp


def test_bench_ends_with_a_screenful_naming_the_files(bench):
    code, out, err, tmp = bench
    assert code == 0, err
    assert len(out.splitlines()) <= 30
    assert "scale-out:" in out and "fastest" in out and "worst skew   collapse:" in out
    words = " ".join(out.split())  # the skipped line wraps
    assert "triton 6 of 6 (unsupported: triton needs a CUDA device" in words
    (run,) = tmp.glob("tiny-*/run-*.json")
    for path in (run, run.parent / "summary.md", run.parent / "plots", tmp / "html" / "index.html",
                 run.with_suffix(".log")):  # fmt: skip
        assert path.exists() and str(path) in out
    # No target table: the tiny run on a CPU measures no triton point.
    assert "target" not in out.lower()


def test_bench_logs_the_points_and_asv_and_shows_a_bar(bench):
    _, _, err, tmp = bench
    (log,) = tmp.glob("tiny-*/run-*.log")
    text = log.read_text()
    assert "scale-out E=8 sorted collapse:" in text  # the sweep's per-point lines
    assert "families.ScaleOut.track_time_ms" in text and "asv" in text  # asv's output
    assert "families.ScaleOut" not in err
    bars = [ln for ln in err.splitlines() if ln.startswith(("sweep", "asv"))]
    assert bars and all("[" in ln and "%" in ln for ln in bars)
    assert any(ln.startswith("asv") and "100%" in ln for ln in bars)


def test_bench_records_the_run_in_asv_under_the_stable_environment(bench):
    _, _, _, tmp = bench
    (saved,) = (tmp / "asv").glob("tiny-*/*-moebench-py*.json")
    results = json.loads(saved.read_text())
    assert results["env_name"].startswith("moebench-py3.")
    assert results["params"]["python"] == results["env_name"].removeprefix("moebench-py")
    assert "families.ScaleOut.track_time_ms" in results["results"]
