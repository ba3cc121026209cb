"""Triton's compiled paths checked without a GPU, through triton's real launchers built
against a stub libcuda (tools/stub_cuda/libcuda.c), each in a process of its own: the
triton layer's direct launches (moebench/impls/triton/launch.py's _run) against triton's
own, and the warm cache that a GPU session carries (tools/stub_cuda/warm_cache.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STUB = Path(__file__).resolve().parents[1] / "tools" / "stub_cuda"

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None, reason="triton builds its launchers with gcc"
)


@pytest.fixture(scope="module")
def stub_env(tmp_path_factory):
    """The environment of a process on the stub libcuda, compiling for sm_90."""
    lib = tmp_path_factory.mktemp("lib")
    stub = ["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib / "libcuda.so.1")]
    subprocess.run([*stub, str(STUB / "libcuda.c")], check=True)
    return {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_LIBCUDA_PATH": str(lib),
        "LD_LIBRARY_PATH": os.pathsep.join([str(lib), os.environ.get("LD_LIBRARY_PATH", "")]),
    }


def run_on_stub(env, script, *args, cache):
    # Its own cache: launchers built against the stub stay out of the real one.
    env = {**env, "TRITON_CACHE_DIR": str(cache)}
    command = [sys.executable, str(STUB / script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_direct_launches_pass_what_triton_passes(stub_env, tmp_path):
    """Decode at T = 1 (no schedule launch), T = 8 (the counting schedule) and prefill with
    two tile heights, TMA descriptors at both and the persistent configs: every launch's grid,
    stream, kernel, metadata and arguments as triton's run gives them, and no run once each
    kernel is compiled."""
    done = run_on_stub(stub_env, "launch_check.py", cache=tmp_path / "triton-cache")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["decode-1", "decode-8", "prefill"], lines
    # gate_up, down and the pair sum; the counting schedule; two heights and the sort's two
    assert "3 launches" in lines[0] and "4 launches" in lines[1] and "7 launches" in lines[2]
    # gate_up's weights and down's h and weights, at both heights
    assert "tiles 64 + 128, 6 TMA descriptors, persistent: down gate_up" in lines[2]


def test_a_warm_cache_leaves_nothing_to_compile(stub_env, tmp_path):
    """warm_cache.py compiles what the triton layer's tuners and calls compile at each point
    (here the tiny profile's SonicMoE family), so a second process that makes the same calls
    compiles nothing. (That the GPU machine's triton keys its entries alike is for the GPU
    call to show: it prints its libtriton.so hash and what it compiled.)"""
    cache = tmp_path / "triton-cache"
    args = ["--profile", "tiny", "--families", "sonicmoe"]
    cold = run_on_stub(stub_env, "warm_cache.py", *args, cache=cache)
    assert cold.returncode == 0, cold.stdout + cold.stderr
    kernels = int(cold.stdout.splitlines()[-1].split()[0])
    assert kernels > 10, cold.stdout  # gate_up and down candidates, schedule, pair sum
    assert cold.stdout.splitlines()[-1].endswith(f"{kernels} new")
    warm = run_on_stub(stub_env, "warm_cache.py", *args, cache=cache)
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert warm.stdout.splitlines()[-1].endswith(f"{kernels} kernels in {cache}, 0 new")
