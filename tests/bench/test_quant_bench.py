"""The quant family: its points, a real tiny sweep of quantized experts (status, the gated
rel_err, quant_err, bytes read), asv's lookup, the report's section and plot, the
roofline's FP8 ceiling and the gate's tolerance of quantized points."""

import dataclasses

import pandas as pd
import pytest
import torch

from moebench import ExpertWeights, QuantizedWeights, quant, registry
from moebench.bench import asv, gate, grid, inputs, report, roofline, runs, sweep
from moebench.bench.oracle import tolerance
from moebench.quant import QUANTS

FAKE_CEILINGS = roofline.Ceilings(matmul_flops=1e12, copy_bytes=1e9, label="fake")
BASE = "deepseek-v3/T=16"  # tiny: D=112, F=32, E=256, K=8, a shared expert


@pytest.mark.parametrize("name", grid.SWEEP_PROFILES)
def test_quant_points_are_models_and_sonicmoe_points_in_each_format(name):
    p = grid.get_profile(name)
    tokens, models = p.quant_tokens or p.model_tokens, p.quant_models or grid.PRESETS
    bases = [pt for pt in grid.points("models", p) if pt.T in tokens]
    bases = [pt for pt in bases if pt.label.split("/")[0] in models]
    bases += grid.points("sonicmoe", p)
    points = grid.points(grid.QUANT, p)
    fits = lambda pt: pt.cfg.d_model % p.quant_block == 0 and pt.cfg.d_ff % p.quant_block == 0
    expected = [(f"{b.label}/{q}", b.cfg, b.T, q) for b in bases if fits(b) for q in QUANTS]
    assert [(pt.label, pt.cfg, pt.T, pt.quant) for pt in points] == expected
    assert {pt.family for pt in points} == {grid.QUANT}
    # The block divides every preset's shrunk D and F; sonicmoe's narrow shape is left out
    # on the small profiles, kept on the gpu.
    presets = {pt.label.split("/")[0] for pt in points}
    assert set(models) <= presets
    assert all(fits(pt) for pt in grid.points("models", p))
    narrow = [b.label for b in grid.points("sonicmoe", p) if not fits(b)]
    assert bool(narrow) == (name != "gpu")
    assert not any(pt.label.startswith(tuple(narrow)) for pt in points if narrow)


def test_the_quant_family_is_forward_only_and_out_of_the_gate():
    for name in (*grid.SWEEP_PROFILES, "gate"):
        families = grid.families(name)
        assert grid.QUANT in families and grid.QUANT + grid.TRAIN not in families
        assert all(pt.family != grid.QUANT for pt in grid.gate_grid(name)[1])
    with pytest.raises(ValueError, match=r"unknown family 'quant\+bwd'; known: .*quant"):
        grid.points(grid.QUANT + grid.TRAIN, "tiny")
    # The other families' points are what they were, quant=None.
    assert all(pt.quant is None for pt in grid.all_points("tiny") if pt.family != grid.QUANT)


def test_inputs_are_the_models_layer_quantized_a_few_experts_at_a_time(monkeypatch):
    point = next(pt for pt in grid.points(grid.QUANT, "tiny") if pt.label == f"{BASE}/int4")
    models_weights = ExpertWeights.random(point.cfg, dtype=torch.float32, seed=inputs.SEED)
    whole = models_weights.quantize("int4", 8)
    monkeypatch.setattr(quant, "_CHUNK_BYTES", 3 * 112 * 32 * 4 * 100)  # about 100 experts
    (weights, _, floats), reason = inputs.point_inputs(point, torch.device("cpu"), torch.float32, 8)
    assert reason is None and isinstance(weights, QuantizedWeights)
    assert torch.equal(floats.gate_up, models_weights.gate_up)  # the models point's layer
    for name in ("gate_up", "down"):
        for part in ("data", "scale"):
            assert torch.equal(getattr(getattr(weights, name), part),
                               getattr(getattr(whole, name), part))  # fmt: skip
    assert torch.equal(weights.shared_down, whole.shared_down)


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory):
    """A real tiny sweep: one models point and its three quant points, moebench's CPU layers
    and a peer, balanced routing."""
    points = [pt for pt in grid.points("models", "tiny") if pt.label == BASE]
    points += [pt for pt in grid.points(grid.QUANT, "tiny") if pt.label.startswith(BASE + "/")]
    impls = ["naive", "padded", "sorted", "hf-eager"]
    records = sweep.run_points(points, impls, ["balanced"], profile="tiny", check=True,
                               ceilings=FAKE_CEILINGS)  # fmt: skip
    env = {"profile": "tiny", "machine": "test", "commit": "0" * 40, "device": "cpu",
           "ceilings": dataclasses.asdict(FAKE_CEILINGS)}  # fmt: skip
    path = tmp_path_factory.mktemp("results") / "tiny-test" / "run-20260101T000000Z.json"
    return runs.write_run(path, env, records)


def _frame(path):
    return runs.load_run(path)[1]


def test_quant_records_are_checked_against_the_quantized_oracle(quant_run):
    frame = _frame(quant_run)
    quant = frame[frame["family"] == grid.QUANT]
    ours = quant[quant["impl"] != "hf-eager"]
    assert len(ours) == 9 and (ours["status"] == "ok").all()
    for r in ours.itertuples():
        assert r.quant == r.label.rsplit("/", 1)[1]
        assert 0 <= r.rel_err <= tolerance(r.dtype, r.quant)
    peer = quant[quant["impl"] == "hf-eager"]
    assert (peer["status"] == "skipped").all()
    assert peer["reason"].str.contains("does not take .* quantized weights").all()
    # quant_err: the quantization's own error, the same for every layer at a point (no
    # drops under balanced routing), larger for 4 bits than 8; none for the float layer.
    errs = ours.groupby("quant")["quant_err"].agg(["min", "max"])
    assert (errs["max"] - errs["min"] < 1e-12).all()
    assert 1e-4 < errs.loc["int8", "max"] < errs.loc["int4", "min"] < 0.2
    assert 0 < errs.loc["fp8-block", "min"] < 0.1
    assert frame.loc[frame["family"] == "models", "quant_err"].isna().all()


def test_bytes_read_count_the_touched_experts_stored_bytes(quant_run):
    frame = _frame(quant_run)
    point = next(pt for pt in grid.points("models", "tiny") if pt.label == BASE)
    cfg, sorted_ = point.cfg, frame[frame["impl"] == "sorted"].set_index("label")
    floats = ExpertWeights.random(cfg, dtype=torch.float32)
    touched = sorted_.loc[BASE, "touched_experts"]
    dense = (3 * cfg.d_ff_shared + 2 * point.T) * cfg.d_model * 4  # shared expert, x, y
    assert sorted_.loc[BASE, "min_bytes"] == touched * 3 * cfg.d_model * cfg.d_ff * 4 + dense
    for fmt in QUANTS:
        row = sorted_.loc[f"{BASE}/{fmt}"]
        assert row["touched_experts"] == touched
        expert = floats.quantize(fmt, 8).expert_nbytes
        assert row["min_bytes"] == touched * expert + dense
    mb = sorted_["min_bytes"]
    assert mb[f"{BASE}/int4"] < mb[f"{BASE}/int8"] < mb[BASE]
    assert mb[f"{BASE}/int4"] < mb[f"{BASE}/fp8-block"] < mb[BASE]


def test_asv_looks_up_quant_points(quant_run, monkeypatch):
    monkeypatch.setenv("MOEBENCH_RUN", str(quant_run))
    records = asv.asv_records(grid.get_profile("tiny"), quant_run.parent)
    metrics = ("min_bytes", "time_ms")
    got = asv.asv_lookup(records, grid.QUANT, f"{BASE}/int4", "sorted", "balanced", metrics)
    assert got["quant"] == "int4" and got["min_bytes"] > 0
    with pytest.raises(NotImplementedError, match="does not take int4"):
        asv.asv_lookup(records, grid.QUANT, f"{BASE}/int4", "hf-eager", "balanced", metrics)


def test_report_has_a_quant_section_and_plot(quant_run):
    written = report.write_report(quant_run)
    names = {p.name for p in written}
    assert "quant.png" in names and "throughput-quant.png" not in names
    assert (quant_run.parent / "plots" / "quant.png").read_bytes()[:4] == b"\x89PNG"
    text = (quant_run.parent / "summary.md").read_text()
    section = text.split("## quant", 1)[1].split("\n## ", 1)[0]
    assert "### Against the unquantized layer" in section
    frame = _frame(quant_run)
    versus = report.versus_unquantized(frame)
    assert len(versus) == 9 and set(versus["point"]) == {BASE}
    for r in versus.itertuples():
        base = frame[(frame["label"] == BASE) & (frame["impl"] == r.impl)].iloc[0]
        assert r.speedup == pytest.approx(base["time_ms"] / r.time_ms)
        assert r.base_bytes == base["min_bytes"]
        assert f"| {BASE} | {r.quant} | {r.impl} | {report._fmt(r.tokens_per_s)} |" in section
    csv = pd.read_csv(quant_run.parent / "summary.csv")
    assert {"quant", "quant_err", "min_bytes"} <= set(csv.columns)
    assert report.quant_impl(frame) == "sorted"


def test_console_summary_answers_what_each_format_costs(quant_run):
    """The main job's screen: per format, sorted's speed against the same layer in the
    dtype, the bytes it reads relative to it, and the quantization error."""
    env, frame = runs.load_run(quant_run)
    lines = report.console_summary(env, frame).splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("vs dtype"))
    end = next(i for i in range(at + 1, len(lines)) if not lines[i].startswith(" " * 15))
    text = " ".join(line.strip() for line in lines[at:end]).removeprefix("vs dtype")
    parts = dict(part.strip().split(": ", 1) for part in text.split(";"))
    assert set(parts) == {f"{q} (sorted)" for q in QUANTS}
    both = report.versus_unquantized(frame)
    both = both[both["impl"] == "sorted"]
    for fmt in QUANTS:
        speed, nbytes, err = parts[f"{fmt} (sorted)"].split(", ")
        row = both[both["quant"] == fmt].iloc[0]
        assert speed == f"{row['speedup']:.2f}x the speed"
        assert nbytes == f"{row['min_bytes'] / row['base_bytes']:.2f}x the bytes"
        assert err == f"quant err {row['quant_err']:.2g}"


def test_fp8_points_take_the_fp8_ceiling_where_one_was_measured():
    flops, nbytes = 4e12, 1e6  # compute bound: 4 s at 1 TFLOP/s
    assert FAKE_CEILINGS.roofline_ms(flops, nbytes, "fp8-block") == pytest.approx(4e3)
    fp8 = dataclasses.replace(FAKE_CEILINGS, fp8_matmul_flops=2e12)
    assert fp8.roofline_ms(flops, nbytes, "fp8-block") == pytest.approx(2e3)
    assert fp8.roofline_ms(flops, nbytes, "int4") == pytest.approx(4e3)
    assert fp8.roofline_ms(flops, nbytes) == pytest.approx(4e3)
    assert not roofline.has_fp8_matmul("cpu")
    assert roofline.fp8_matmul_flops("cpu", None, 64, warmup=1, repeats=1) is None
    # Run files from before the field build Ceilings as they did.
    assert roofline.Ceilings(1e12, 1e9, "old").fp8_matmul_flops is None


def test_the_gate_judges_a_quant_point_by_its_formats_tolerance():
    """fp8-block in fp32 may err by 2e-3 (oracle.QUANT_TOLERANCE); the dtype's 1e-4 would
    call its last-bit steps WRONG."""
    fp8_tol = tolerance("float32", "fp8-block")
    assert fp8_tol > 10 * tolerance("float32")

    def run(err):
        record = dict(family=grid.QUANT, label=f"{BASE}/fp8-block", impl="sorted",
                      skew="balanced", dtype="float32", quant="fp8-block", status="ok",
                      time_ms=1.0, rel_err=err, samples_ms=[1.0] * 9)  # fmt: skip
        return {"profile": "tiny"}, pd.DataFrame([record])

    ok = gate.compare(run(fp8_tol / 20), run(fp8_tol / 2)).points
    assert list(ok["verdict"]) != ["WRONG"]
    wrong = gate.compare(run(fp8_tol / 20), run(2 * fp8_tol)).points
    assert list(wrong["verdict"]) == ["WRONG"]


def test_impls_taking_quantized_weights_are_the_quant_suites():
    assert [i for i in grid.default_impls("tiny") if registry.get(i).quant] == list(grid.IMPLS)
