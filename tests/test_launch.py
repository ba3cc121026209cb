"""The triton layer's direct launches (fused._run), checked without a GPU: triton's real
launchers, built against a stub libcuda (tests/stub_cuda/libcuda.c), receive the same
arguments from a direct launch as from triton's JITFunction.run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STUB = Path(__file__).parent / "stub_cuda"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="triton builds its launchers with gcc")
def test_direct_launches_pass_what_triton_passes(tmp_path):
    """Decode at T = 1 (no schedule launch), T = 8 (the counting schedule) and prefill with
    two tile heights, TMA descriptors at both and the persistent configs: every launch's grid,
    stream, kernel, metadata and arguments as triton's run gives them, and no run once each
    kernel is compiled."""
    lib = tmp_path / "lib"
    lib.mkdir()
    stub = ["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib / "libcuda.so.1")]
    subprocess.run([*stub, str(STUB / "libcuda.c")], check=True)
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_LIBCUDA_PATH": str(lib),
        "LD_LIBRARY_PATH": os.pathsep.join([str(lib), os.environ.get("LD_LIBRARY_PATH", "")]),
        # Its own cache: launchers built against the stub stay out of the real one.
        "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"),
    }
    done = subprocess.run(
        [sys.executable, str(STUB / "launch_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["decode-1", "decode-8", "prefill"], lines
    # gate_up, down and the pair sum; the counting schedule; two heights and the sort's two
    assert "3 launches" in lines[0] and "4 launches" in lines[1] and "7 launches" in lines[2]
    # gate_up's weights and down's h and weights, at both heights
    assert "tiles 64 + 128, 6 TMA descriptors, persistent: down gate_up" in lines[2]
