"""The report: CSV and markdown tables and PNG plots from a real tiny run."""

import errno
import json
import shutil

import pandas as pd
import pytest
from matplotlib import cbook
from matplotlib.figure import Figure

from moebench import cli
from moebench.bench import report, runs


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "tiny-test" / "run-20260101T000000Z.json"
    args = ["--profile", "tiny", "--families", "scale-out,models", "--skews", "balanced,collapse"]
    cli.main(["sweep", *args, "--output", str(out)])
    return out


def test_report_writes_tables_and_plots_beside_the_run(run_file):
    written = report.write_report(run_file)
    folder = run_file.parent
    names = {p.relative_to(folder).as_posix() for p in written}
    assert names == {
        "summary.csv",
        "summary.md",
        "plots/throughput-scale-out.png",
        "plots/throughput-models.png",
        "plots/imbalance-scale-out.png",
        "plots/imbalance-models.png",
        "plots/peak-memory.png",
    }
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = pd.read_csv(folder / "summary.csv")
    _, frame = runs.load_run(run_file)
    assert len(table) == len(frame)  # every record, skipped ones included
    for column in (
        "time_ms",
        "tokens_per_s",
        "useful_tflops",
        "roofline_fraction",
        "peak_mib",
        "imbalance_overhead",
        "dropped_fraction",
        "max_over_mean_load",
        "reason",
        "layer_stats_json",
    ):
        assert column in table.columns
    ok = table[table["status"] == "ok"]
    padded = ok[ok["impl"] == "padded"]["layer_stats_json"].map(json.loads)
    assert len(padded) and all(s["capacity"] > 0 for s in padded)
    assert (ok["peak_mib"] * 2**20).round().tolist() == frame.loc[
        frame["status"] == "ok", "peak_bytes"
    ].tolist()


def test_markdown_summary_sections(run_file):
    env, frame = runs.load_run(run_file)
    text = report.markdown(env, frame)
    assert text.startswith("# moebench: tiny profile on")
    for heading in (
        "## scale-out",
        "## models",
        "### Balanced routing",
        "### Load-imbalance overhead",
        "### Dropped fraction (padded",
    ):
        assert heading in text
    assert "unsupported: triton needs a CUDA device" in text  # the skipped list
    assert "| E=8 | naive |" in text
    assert "deepseek-v3/T=16" in text
    assert f"commit `{env['commit']}`" in text
    assert "- each measurement: 1 warm-up calls, then 3 timed calls, about" in text
    floors = {**env["timing"], "warmup": 3, "warmup_s": 0.05, "repeats": 20, "min_time_s": 0.1}
    text = report.markdown({**env, "timing": floors}, frame)
    assert "3 warm-up calls and at least 0.05 s of them, then 20 timed calls and at least" in text


def test_tuned_triton_kernels_are_listed(run_file):
    """Where triton records report their configs (GPU runs), each family lists them."""
    env, frame = runs.load_run(run_file)
    config = {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_SIZE_M": 8, "num_warps": 8, "num_stages": 3}
    stats = {
        "path": "prefill", "block_m": 16, "big_m": 128, "tile_slots": 99,
        "combine": "store-pairs", "config": {
            "gate_up": {**config, "TMA": True},
            "down": {**config, "BLOCK_N": 256, "BLOCK_K": 16, "N_BLOCKS": 8},
        },
    }  # fmt: skip
    rows = (frame["impl"] == "triton") & (frame["skew"] == "balanced")
    rows &= frame["family"] == "scale-out"
    frame.loc[rows, "status"] = "ok"
    frame["layer_stats"] = [
        stats if r else s for r, s in zip(rows, frame["layer_stats"], strict=True)
    ]
    text = report.markdown(env, frame)
    assert "| E=8 | prefill | 128 + 16 | 128x64 w8 s3 TMA | 256x16 w8 s3 8 col blocks |" in text
    assert text.count("Tuned triton kernels") == 1  # models has no triton record with configs


def test_markdown_table_format():
    table = pd.DataFrame({"point": ["E=8", "E=16"], "time": [1.23456, float("nan")]})
    assert report.markdown_table(table) == (
        "| point | time |\n|---|---|\n| E=8 | 1.23 |\n| E=16 | - |"
    )


def test_latest_run_per_folder(tmp_path):
    for folder, names in {"cpu-a": ["run-1.json", "run-2.json"], "gpu-b": ["run-9.json"]}.items():
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_text("{}")
    (tmp_path / "asv").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in report.latest_runs(tmp_path)] == [
        "cpu-a/run-2.json",
        "gpu-b/run-9.json",
    ]
    assert cli.main(["report", "--results-dir", str(tmp_path / "asv")]) == 2


@pytest.mark.parametrize("bad", ["missing", "truncated", "not a run"])
def test_a_bad_run_file_is_one_line_and_exit_2(run_file, tmp_path, capsys, bad):
    path = tmp_path / "run-1.json"
    if bad == "truncated":
        path.write_text(run_file.read_text()[:300])
    elif bad == "not a run":
        path.write_text('{"results": []}')
    assert cli.main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moebench: error: {path}: ") and err.count("\n") == 1
    assert not (tmp_path / "summary.md").exists()


def test_a_missing_results_dir_is_named(tmp_path, capsys):
    assert cli.main(["report", "--results-dir", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"moebench: error: {tmp_path / 'nowhere'}: no such folder\n"


def test_two_runs_in_one_folder_are_refused(run_file, tmp_path, capsys):
    """A folder holds one summary: the second run's would overwrite the first's."""
    runs = [tmp_path / "run-A.json", tmp_path / "run-B.json"]
    for run in runs:
        shutil.copy(run_file, run)
    assert cli.main(["report", *(str(run) for run in runs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moebench: error: run-A.json and run-B.json are both in ")
    assert str(tmp_path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-A.json", "run-B.json"]


def _half_a_png(fig, fname, **kwargs):
    with cbook.open_file_cm(fname, "wb") as f:
        f.write(b"\x89PNG\r\n")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["summary.md", "plot"])
def test_a_failed_write_keeps_the_previous_files(run_file, monkeypatch, failing):
    """Each file is written beside itself and renamed: a failure midway leaves the previous
    report whole and no temporary file behind."""
    report.write_report(run_file)
    files = lambda: {p: p.read_bytes() for p in run_file.parent.rglob("*") if p.is_file()}
    before = files()
    if failing == "summary.md":
        # UTF-8 has no spelling for a lone surrogate: the write fails once the file is open.
        monkeypatch.setattr(report.targets, "markdown", lambda env, frame: "\ud800")
    else:
        monkeypatch.setattr(Figure, "savefig", _half_a_png)
    with pytest.raises((UnicodeEncodeError, OSError)):
        report.write_report(run_file)
    assert files() == before
