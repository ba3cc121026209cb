"""The report: CSV and markdown tables and PNG plots from a real tiny run."""

import errno
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from matplotlib import cbook
from matplotlib.figure import Figure

from moebench import cli, registry
from moebench.bench import report, runs, targets
from moebench.bench.records import RECORD_FIELDS


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
    _, frame = runs.load_run(run_file)
    # Peers that run on this machine (transformers' on a CPU) have a plot per family.
    peers = set(targets.best_peers(frame[frame["skew"] == "balanced"])["family"])
    assert names == {
        "summary.csv",
        "summary.md",
        "plots/throughput-scale-out.png",
        "plots/throughput-models.png",
        "plots/imbalance-scale-out.png",
        "plots/imbalance-models.png",
        "plots/peak-memory.png",
        *(f"plots/peers-{family}.png" for family in peers),
    }
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = pd.read_csv(folder / "summary.csv")
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
        "best_peer",
        "vs_best_peer",
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


def peer_run(tmp_path, impls: dict) -> Path:
    """A tiny run of scale-out, balanced and collapse routing, from {impl: ms at E=8, 16}."""
    records = []
    for i, label in enumerate(("E=8", "E=16")):
        for skew in ("balanced", "collapse"):
            for impl, times in impls.items():
                r = dict.fromkeys(RECORD_FIELDS)
                r.update(family="scale-out", label=label, impl=impl, skew=skew, T=64, D=32,
                         F=16, E=8 << i, K=4, Fs=0, dtype="float32", status="ok",
                         time_ms=times[i], tokens_per_s=64e3 / times[i], roofline_fraction=0.1,
                         peak_bytes=2**20, peak_label="cpu", rel_err=1e-7,
                         imbalance_overhead=1.0)  # fmt: skip
                records.append(r)
    return runs.write_run(tmp_path / "run-1.json", {"profile": "tiny", "gpu": "H100"}, records)


TIMES = {"triton": (1.0, 1.0), "sorted": (2.0, 2.0), "hf-eager": (3.0, 0.8),
         "hf-grouped_mm": (1.5, 2.0), "not-installed-here": (0.5, 0.5)}  # fmt: skip


def test_peers_have_their_section_csv_columns_and_plot(tmp_path):
    """hf-grouped_mm is the best peer at E=8 (1.5 ms against triton's 1), hf-eager at E=16
    (0.8 ms); the plug-in, registered where the run was measured, not here, is no peer."""
    run = peer_run(tmp_path, TIMES)
    written = report.write_report(run)
    assert tmp_path / "plots" / "peers-scale-out.png" in written
    assert (tmp_path / "plots" / "peers-scale-out.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "summary.md").read_text()
    section = text.split("### Against the best peer")[1].split("###")[0]
    assert "over 1: triton is faster" in section
    assert (
        "| point | skew | best peer | peer ms | peer rel err | triton ms | vs best peer |" in text
    )
    assert "| E=8 | balanced | hf-grouped_mm | 1.5 | 1e-07 | 1 | 1.5 |" in section
    assert "| E=16 | collapse | hf-eager | 0.8 | 1e-07 | 1 | 0.8 |" in section
    assert "| E=8 | hf-eager | 3 | 2.13e+04 | - | 0.1 | 1 | 1e-07 |" in text  # its error too
    assert "| E=8 | not-installed-here | 0.5 |" in text
    table = pd.read_csv(tmp_path / "summary.csv").set_index(["point", "skew", "impl"])
    assert table.loc[("E=8", "balanced", "triton"), "best_peer"] == "hf-grouped_mm"
    assert table.loc[("E=8", "balanced", "triton"), "vs_best_peer"] == pytest.approx(1.5)
    assert table.loc[("E=16", "balanced", "sorted"), "vs_best_peer"] == pytest.approx(0.4)


def test_without_triton_the_section_compares_moebench_fastest_layer(tmp_path):
    run = peer_run(tmp_path, {k: v for k, v in TIMES.items() if k != "triton"})
    env, frame = runs.load_run(run)
    section = report.markdown(env, frame).split("### Against the best peer")[1]
    assert "moebench's fastest layer at each point" in section
    assert "| moebench | moebench ms | vs best peer |" in section
    assert "| E=16 | balanced | hf-eager | 0.8 | 1e-07 | sorted | 2 | 0.4 |" in section


def test_no_peer_section_or_plot_without_peers(tmp_path):
    run = peer_run(tmp_path, {"sorted": (2.0, 2.0), "not-installed-here": (0.5, 0.5)})
    written = report.write_report(run)
    assert not any("peers" in p.name for p in written)
    assert "best peer" not in (tmp_path / "summary.md").read_text()
    assert pd.read_csv(tmp_path / "summary.csv")["vs_best_peer"].isna().all()


def test_each_impl_has_its_own_line_style():
    """moebench's solid and filled, peers dashed and plug-ins dotted, hollow; a plug-in's
    colour is the same on every run."""
    own, peer, plugin = (report.style(i) for i in ("sorted", "hf-eager", "not-installed-here"))
    assert "ls" not in own and "mfc" not in own
    assert peer["ls"] == "--" and plugin["ls"] == ":" and peer["mfc"] == plugin["mfc"] == "none"
    colors = [report.style(i)["color"] for i in (*report.COLORS, *registry.PEER_NAMES)]
    assert len(set(colors)) == len(colors)
    assert plugin == report.style("not-installed-here")
    assert report.impl_order(["zz", "vllm", "triton", "hf-eager", "naive"]) == [
        "naive", "triton", "hf-eager", "vllm", "zz"]  # fmt: skip


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
        monkeypatch.setattr(report.targets, "markdown", lambda env, frame, **kw: "\ud800")
    else:
        monkeypatch.setattr(Figure, "savefig", _half_a_png)
    with pytest.raises((UnicodeEncodeError, OSError)):
        report.write_report(run_file)
    assert files() == before
