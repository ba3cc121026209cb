import pandas as pd
import pytest

from moebench import targets

ENV = {"profile": "gpu", "gpu": "H100", "ceilings": {"copy_bytes": 3e12}}


def record(family, label, impl, skew="random", time_ms=1.0, **fields):
    base = dict(family=family, label=label, impl=impl, skew=skew, status="ok", time_ms=time_ms,
                T=4096, D=1024, F=512, E=64, K=8, Fs=0, dtype="bfloat16", tflops=0.0,
                roofline_fraction=0.9, touched_experts=64)  # fmt: skip
    return base | fields


def frame(triton_ms=1.0, sonic_tflops=600.0, roofline=0.9, decode_ms=0.05):
    # decode point: 8 experts of 3*4096*14336 bf16 weights = 2.8 GB; at 3 TB/s ~ 0.94 ms
    return pd.DataFrame([
        record("sonicmoe", "E=64/F=1024/K=4", "triton", T=32768, tflops=sonic_tflops),
        record("scale-out", "E=64", "triton", time_ms=triton_ms, roofline_fraction=roofline),
        record("scale-out", "E=64", "sorted", time_ms=1.0),
        record("models", "mixtral-8x7b/T=1", "triton", skew="balanced", T=1, D=4096,
               F=14336, E=8, K=2, touched_experts=8, time_ms=decode_ms),
        record("models", "mixtral-8x7b/T=1", "sorted", skew="balanced", time_ms=2.0),
        record("models", "mixtral-8x7b/T=1", "naive", skew="balanced", status="skipped"),
    ])  # fmt: skip


def verdicts(table):
    return dict(zip(table["target"], table["met"], strict=True))


def test_all_targets_met():
    table = targets.evaluate(ENV, frame(triton_ms=0.9, decode_ms=1.2))
    assert list(table["met"]) == [True, True, True, True]
    bandwidth = table.set_index("target").loc["decode weight bandwidth / copy bandwidth"]
    assert bandwidth["worst"] == pytest.approx(3 * 4096 * 14336 * 8 * 2 / 1.2e-3 / 3e12)


@pytest.mark.parametrize(
    ("change", "missed"),
    [
        ({"sonic_tflops": 500.0}, "SonicMoE shape, useful TFLOP/s"),
        ({"triton_ms": 1.1}, "speed vs sorted (x)"),
        ({"roofline": 0.5}, "fraction of roofline"),
        ({"decode_ms": 2.0}, "decode weight bandwidth / copy bandwidth"),
    ],
)
def test_each_missed_target_is_named(change, missed):
    met = verdicts(targets.evaluate(ENV, frame(**{"triton_ms": 0.9, "decode_ms": 1.2} | change)))
    assert [name for name, ok in met.items() if not ok] == [missed]


def test_a_run_without_triton_says_not_measured():
    table = targets.evaluate({"profile": "cpu"}, frame()[lambda f: f["impl"] != "triton"])
    assert table["met"].isna().all() and (table["at"] == "no points").all()
    assert "not measured" in targets.markdown({"profile": "cpu"}, frame().iloc[2:3])
