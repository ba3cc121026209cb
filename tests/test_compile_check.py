"""tools/compile_check.py: spills in a Triton config are found for sm_90 without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "compile_check.py"

# Compiled (not interpreted) kernels: a fresh interpreter without TRITON_INTERPRET.
SCRIPT = """
import json, sys, triton
sys.path.insert(0, sys.argv[1])
import compile_check as cc
cc._install_driver()
# Three [128, 64] fp32 accumulators on 4 warps: 192 registers a thread before any operand.
config = triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "GROUP_SIZE_M": 8}, num_warps=4,
                       num_stages=3).all_kwargs()
tall, short = (cc.Case("swiglu_backward", "prefill", m, config) for m in (128, 64))
results = {name: cc.compile_case(case)._asdict() for name, case in
           (("tall", tall), ("short", short))}
for r in results.values():
    r.pop("case")
listed = cc.cases()
# The quantized kernels: int4's unpacking and fp8's scaled fp8 dots, at decode's height.
int4, fp8 = (next(c for c in listed if c.quant == q and c.kernel == "gate_up"
                  and c.variant == "decode") for q in ("int4", "fp8-block"))
results.update(int4=cc.compile_case(int4)._asdict(), fp8=cc.compile_case(fp8)._asdict())
for r in results.values():
    r.pop("case", None)
print(json.dumps({
    "results": results,
    "tall_listed": any(c.kernel == tall.kernel and c.block_m == 128 and c.config == config
                       for c in listed),
    "groups": sorted({f"{c.kernel}/{c.variant}/{c.block_m}" for c in listed}),
    "persistent": sorted({f"{c.kernel}/{c.variant}/{c.block_m}" for c in listed
                          if c.config.get("PERSISTENT")}),
    "quant": sorted({f"{c.kernel}/{c.variant}/{c.quant}" for c in listed if c.quant}),
    "quant_tma": any(c.config.get("TMA") for c in listed if c.quant),
}))
"""


def test_spilling_config_is_found_and_pruned():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(TOOL.parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    tall, short = out["results"]["tall"], out["results"]["short"]
    assert tall["error"] is None and tall["spill_bytes"] > 0, tall
    assert short["error"] is None and short["spill_bytes"] == 0 and short["regs"] > 0, short
    assert tall["wgmma"] and short["wgmma"], "BLOCK_M >= 64 bf16 dots should be wgmma on sm_90"
    # The layer's pruning never offers the spilling config at that height.
    assert not out["tall_listed"]
    groups = set(out["groups"])
    for kernel in ("gate_up", "down", "swiglu_backward"):
        assert f"{kernel}/decode/16" in groups and f"{kernel}/big-prefill/128" in groups
        assert f"{kernel}/big-decode/64" in groups
        assert {f"{kernel}/prefill/{m}" for m in (16, 32, 64, 128)} <= groups
    assert {"expert_grad/gate_up/0", "expert_grad/down/0"} <= groups
    assert {f"schedule/{k}/0" for k in ("rows", "slots", "counted")} <= groups
    assert "combine/pairs/0" in groups
    # The persistent configs: prefill's tuned tiles of 64 and 128 rows (TMA needs 64).
    assert out["persistent"] == [f"{k}/prefill/{m}" for k in ("down", "gate_up") for m in (128, 64)]
    # Quantized weights: every format on both paths and the big tiles, through pointers.
    assert set(out["quant"]) == {
        f"{k}/{v}/{q}" for k in ("gate_up", "down") for q in ("int8", "int4", "fp8-block")
        for v in ("decode", "prefill", "big-decode", "big-prefill")
    } | {"quantize_rows/fp8/fp8-block"}  # fmt: skip
    assert not out["quant_tma"]
    for name in ("int4", "fp8"):
        r = out["results"][name]
        assert r["error"] is None and r["spill_bytes"] == 0 and r["regs"] > 0, r


def test_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, str(TOOL), "--only", "down"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unset TRITON_INTERPRET" in done.stderr
