"""`moebench` / `python -m moebench`: the table, progress, and one-line errors."""

import re
import subprocess
import sys

import pytest

from moebench import cli
from moebench.bench import runs

SHAPE = ["--d-model", "32", "--d-ff", "16", "--experts", "8", "--top-k", "2"]
# These read the CPU's table and profiler; on a GPU machine the CLI would default to cuda.
CPU = ["--device", "cpu"]


def test_compares_impls_and_skews(capsys, tmp_path):
    out = tmp_path / "run.json"
    argv = [*SHAPE, *CPU, "--tokens", "1,16", "--impls", "naive,sorted,padded"]
    argv += ["--skews", "balanced,collapse", "--repeats", "3", "--check", "--json", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("custom: D=32 F=16 E=8 K=2 Fs=0, float32 on cpu")
    header = printed[1].split()
    assert header[:5] == ["T", "weights", "impl", "skew", "time"]
    for column in ("tokens/s", "TFLOP/s", "max/mean", "imbalance", "dropped"):
        assert column in header
    rows = printed[2:]
    assert len(rows) == 2 * 3 * 2
    assert rows[0].split()[:4] == ["1", "float32", "naive", "balanced"]
    env, frame = runs.load_run(out)
    assert env["profile"] == "cli" and len(frame) == 12
    assert (frame["rel_err"] < 1e-5).all()


def test_compares_quantized_weights(capsys):
    """--quant: each format beside the dtype's layer, checked against its own oracle, with
    the quantization's error beside it; a bad format or block is one line."""
    shape = ["--d-model", "64", "--d-ff", "32", "--experts", "8", "--top-k", "2"]
    argv = [*shape, *CPU, "--tokens", "5", "--impls", "sorted,hf-eager", "--repeats", "2"]
    argv += ["--quant", "none,int8,int4", "--block", "32", "--check"]
    assert cli.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[1:3] for row in rows] == [
        ["float32", "sorted"], ["float32", "hf-eager"], ["int8", "sorted"],
        ["int8", "hf-eager"], ["int4", "sorted"], ["int4", "hf-eager"],
    ]  # fmt: skip
    skipped = " ".join(rows[3][4:])
    assert skipped == (
        "skipped: unsupported: impl 'hf-eager' does not take int8 quantized weights; it takes none"
    )
    quant_err = {row[1]: row[-1] for row in rows if row[2] == "sorted"}
    assert quant_err["float32"] == "-"
    assert 0 < float(quant_err["int8"]) < float(quant_err["int4"]) < 0.5
    bad_inputs = {
        "int3": "unknown quantization format 'int3'",
        "fp8-block": r"fp8-block blocks of 32x32 do not divide a \[N=32, K=48\]",
    }
    for bad, message in bad_inputs.items():
        with pytest.raises(SystemExit):
            cli.main([*SHAPE[:1], "48", *SHAPE[2:], *CPU, "--quant", bad, "--block", "32"])
        assert re.search(message, capsys.readouterr().err)


def test_preset_shrunk_and_skipped_triton(capsys):
    argv = [
        "--preset",
        "mixtral-8x7b",
        "--shrink",
        "64",
        "--tokens",
        "4",
        "--impls",
        "triton",
        *CPU,
    ]
    assert cli.main([*argv, "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "mixtral-8x7b: D=64 F=224 E=8 K=2" in out
    assert "skipped: unsupported: triton needs a CUDA device" in out


def test_kernels_lists_where_a_call_goes(capsys):
    """The naive loop over 8 experts at balanced routing: a matmul pair and an index_add_
    per expert, so 16 mm and 8 index_add_ per call."""
    argv = [*SHAPE, *CPU, "--tokens", "16", "--impls", "naive,sorted", "--repeats", "2"]
    assert cli.main([*argv, "--kernels", "40"]) == 0
    out = capsys.readouterr().out
    _, found, tail = out.partition("Where a call's time goes (ops' self CPU time")
    assert found
    blocks = tail.split("custom/T=16 balanced ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["naive", "sorted"]
    naive = {line.split()[-1]: line.split() for line in blocks[0].splitlines()[3:]}
    assert float(naive["aten::mm"][2]) == 16 and float(naive["aten::index_add_"][2]) == 8
    assert "aten::_grouped_mm" in blocks[1]
    # Per call: the listed times add up to no more than the stated total.
    total = float(blocks[0].splitlines()[1].split()[0])
    assert sum(float(parts[0]) for parts in naive.values()) <= total * 1.001


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "gpt-5"], "unknown preset 'gpt-5'; valid presets: deepseek-v3"),
        ([*SHAPE, "--skews", "zipf"], "unknown skew 'zipf'"),
        ([*SHAPE, "--skews", "hot:2"], "hot needs a number with 0 <= p <= 1"),
        ([*SHAPE, "--impls", "sorted,fast"], "unknown impl 'fast'; known: naive, padded"),
        ([*SHAPE, "--dtype", "int8"], "unknown dtype 'int8'"),
        ([*SHAPE, "--tokens", "0"], "expected positive integers"),
        (["--d-model", "32"], "give --preset or all of --d-model, --d-ff, --experts, --top-k"),
        (["--preset", "deepseek-v3", "--experts", "8"], "not both"),
        (["--d-model", "32", "--d-ff", "16", "--experts", "4", "--top-k", "8"], "top_k=8"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        ([*SHAPE, "--kernels", "-1"], "argument --kernels: must be >= 0, got -1"),
        ([*SHAPE, "--threads", "0"], "argument --threads: must be >= 1, got 0"),
        ([*SHAPE, "--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        ([*SHAPE, "--warmup", "-5"], "argument --warmup: must be >= 0, got -5"),
        ([*SHAPE, "--repeats", "many"], "argument --repeats: expected an integer, got 'many'"),
        ([*SHAPE, "--device", "meta"], "--device meta: moebench measures on cpu or cuda"),
        ([*SHAPE, "--json", "."], "--json .: cannot write a file there"),
    ],
    ids=[
        *("preset", "skew", "skew-arg", "impl", "dtype", "tokens", "shape", "both", "k>e"),
        *("flag", "kernels", "threads", "repeats", "warmup", "repeats-word", "device", "json"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moebench: error: ")
    assert message in err


def test_python_dash_m_runs_the_cli_without_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "moebench", "--preset", "nope"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.startswith("moebench: error: unknown preset 'nope'")
    assert "Traceback" not in done.stderr


def test_compare_is_the_default_command(capsys):
    argv = [*SHAPE, *CPU, "--tokens", "4", "--impls", "sorted", "--repeats", "1"]
    assert cli.main(["compare", *argv]) == 0
    named = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == named.splitlines()[0]


def test_where_prints_the_profile_and_machine(capsys, monkeypatch):
    monkeypatch.setenv("MOEBENCH_MACHINE", "box")
    assert cli.main(["where", "--profile", "tiny"]) == 0
    assert capsys.readouterr().out == "tiny box\n"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["where", "--profile", "huge"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("moebench: error: unknown profile 'huge'")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--profile", "gate"], "argument --profile: invalid choice: 'gate'"),
        (["sweep", "--impls", "fast"], "argument --impls: unknown impl 'fast'"),
        (["sweep", "--families", ""], "argument --families: an empty list"),
        (["regress", "--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
        (["gate", "b.json"], "the following arguments are required: candidate"),
        (["targets", "run.json", "--kernels", "x"], "argument --kernels: expected an integer"),
        (["targets", "/nowhere/run.json"], "/nowhere/run.json: cannot read the run"),
        (["report", "--results-dir", "/nowhere"], "/nowhere: no such folder"),
        (["bench", "--profile", "huge"], "argument --profile: invalid choice: 'huge'"),
        (["bench", "--skews", "lopsided"], "argument --skews: unknown skew ['lopsided']"),
        (["report", "--html", "--asv-config", "/nowhere/c.json"], "/nowhere/c.json: no such asv"),
        (["bench", "--asv-config", "/nowhere/c.json"], "/nowhere/c.json: no such file"),
        (["frob"], "argument command: invalid choice: 'frob' (choose from 'bench'"),
    ],
    ids=[
        "sweep-profile",
        "sweep-impl",
        "sweep-families",
        "rounds",
        "gate",
        "kernels",
        "run",
        "results",
        "bench-profile",
        "bench-skew",
        "report-html",
        "bench-asv-config",
        "command",
    ],
)
def test_every_command_says_bad_input_in_one_line_with_exit_2(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moebench: error: ")
    assert message in err


def test_no_command_prints_the_commands_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "{bench,compare,sweep,report,targets,ep,project,gate,regress" in capsys.readouterr().err


def test_report_without_run_files_is_bad_input(tmp_path, capsys):
    assert cli.main(["report", "--results-dir", str(tmp_path)]) == 2
    assert "no run files under" in capsys.readouterr().err
