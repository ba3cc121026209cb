"""The expert-parallel projection: its bytes, its alpha-beta times, the link fit, expected
against drawn counts, the projected share and the check against ep records."""

import itertools
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import moebench.parallel as mp
from moebench import cli
from moebench.bench import projection as pj
from moebench.bench.inputs import SEED
from moebench.bench.roofline import Ceilings, min_bytes
from moebench.config import MoEConfig, preset
from moebench.routing import make_routing

CEILINGS = {"matmul_flops": 800e12, "copy_bytes": 4e12}
FAST = pj.Link("fast", alpha_s=1e-5, bytes_per_s=1e9, source="test")
SLOW = pj.Link("slow", alpha_s=1e-4, bytes_per_s=1e8, source="test")


def models_record(name, T, skew="balanced", fraction=0.5, impl="triton"):
    """A single-GPU models record at `fraction` of the CEILINGS roofline."""
    cfg = preset(name)
    flops, nbytes = cfg.flops(T), min_bytes(cfg, T, cfg.num_experts, 2)
    roof_s = max(flops / CEILINGS["matmul_flops"], nbytes / CEILINGS["copy_bytes"])
    return {
        "family": "models",
        "label": f"{name}/T={T}",
        "impl": impl,
        "skew": skew,
        "T": T,
        "D": cfg.d_model,
        "F": cfg.d_ff,
        "E": cfg.num_experts,
        "K": cfg.top_k,
        "Fs": cfg.d_ff_shared,
        "dtype": "bfloat16",
        "status": "ok",
        "time_ms": roof_s / fraction * 1e3,
        "flops": flops,
        "min_bytes": nbytes,
    }


def test_the_bytes_by_link_class_add_up_to_parallel_traffic():
    # 4 ranks of 2 tokens, 2 ranks a node; E=8: experts 2r and 2r+1 on rank r.
    ids = torch.tensor([[0, 2], [1, 7], [4, 5], [3, 6], [0, 1], [6, 7], [2, 5], [3, 4]])
    counts = mp.row_counts(ids, 8, 4)
    split = pj.class_traffic(counts, d_model=16, itemsize=2, gpus_per_node=2, slots=2)
    for key, per_rank in mp.traffic(counts, 16, 2, slots=2).items():
        assert (split["intra"][key] + split["inter"][key]).tolist() == per_rank, key
    assert (
        pj.parallel_bytes(counts, 16, 2, slots=2)["combine_sent"].tolist()
        == mp.traffic(counts, 16, 2, slots=2)["combine_sent"]
    )
    # Rank 0 sends token 0's row to rank 1 (its node) and token 1's to rank 3; it receives
    # one row of rank 2's (a token with both its experts, 0 and 1, on rank 0) from the other
    # node. A row carries 2 slots of an id and a weight. Counts go to all.
    row = 16 * 2
    assert split["intra"]["dispatch_sent"][0] == (row + 2 * 8) + 8
    assert split["inter"]["dispatch_sent"][0] == (row + 2 * 8) + 2 * 8
    assert split["intra"]["combine_sent"][0] == 0
    assert split["inter"]["combine_sent"][0] == row


def test_phase_times_follow_the_alpha_beta_model_on_two_nodes():
    # Rank 2 exchanges no rows with the other node: its combine pays NVLink's alpha only.
    counts = [[5, 1, 0, 0], [0, 3, 0, 4], [0, 0, 6, 2], [3, 0, 0, 1]]
    D, itemsize, G = 8, 2, 2
    row = D * itemsize
    times = pj.phase_seconds(torch.tensor(counts), D, itemsize, G, FAST, SLOW, slots=1)
    for r in range(4):
        intra = [p for p in range(4) if p != r and p // G == r // G]
        inter = [p for p in range(4) if p // G != r // G]
        for phase, calls, per_pair, count_bytes in (
            ("dispatch", 4, row + 8, 8),
            ("combine", 1, row, 0),
        ):
            slowest = 0.0
            alpha = FAST.alpha_s
            for peers, link in ((intra, FAST), (inter, SLOW)):
                sent = sum(counts[r][p] for p in peers) * per_pair + len(peers) * count_bytes
                recv = sum(counts[p][r] for p in peers) * per_pair + len(peers) * count_bytes
                slowest = max(slowest, max(sent, recv) / link.bytes_per_s)
                alpha = max(alpha, link.alpha_s) if max(sent, recv) else alpha
            assert times[phase][r].item() == pytest.approx(calls * alpha + slowest, rel=1e-12)
    # By hand: rank 0's dispatch receives 3 rows of 24 bytes (16 of values, an id and a
    # weight) and 2 x 8 count bytes from the other node; rank 2's combine gets its 2 rows of
    # 16 bytes back from rank 3, on its node.
    assert times["dispatch"][0].item() == pytest.approx(4 * 1e-4 + (3 * 24 + 16) / 1e8)
    assert times["combine"][2].item() == pytest.approx(1e-5 + 2 * 16 / 1e9)


def test_fit_link_recovers_alpha_and_bandwidth():
    sizes = [256, 4096, 65536, 1 << 20]
    exact = [50e-6 + b * 3 / 2e9 for b in sizes]
    link = pj.fit_link("gloo", sizes, exact, world=4)
    assert link.alpha_s == pytest.approx(50e-6, rel=1e-6)
    assert link.bytes_per_s == pytest.approx(2e9, rel=1e-6)
    assert link.kind == "fitted"
    noisy = [t * (1 + 0.02 * (-1) ** i) for i, t in enumerate(exact)]
    link = pj.fit_link("gloo", sizes, noisy, world=4)
    assert link.bytes_per_s == pytest.approx(2e9, rel=0.05)
    assert link.alpha_s == pytest.approx(50e-6, rel=0.2)
    # Noise that puts the intercept below zero: alpha 0, slope through the origin.
    link = pj.fit_link("gloo", [1000, 2000], [0.5e-6, 2.5e-6], world=2)
    assert link.alpha_s == 0 and link.bytes_per_s == pytest.approx(1e3 / 1.1e-6)
    one = pj.fit_link("self", sizes, [3e-6, 1e-6, 2e-6, 9e-6], world=1)
    assert one.alpha_s == pytest.approx(2.5e-6) and math.isinf(one.bytes_per_s)
    with pytest.raises(ValueError, match="two different sizes"):
        pj.fit_link("gloo", [256, 256], [1e-5, 1e-5], world=2)
    with pytest.raises(ValueError, match="does not grow"):
        pj.fit_link("gloo", [256, 4096], [1e-5, 1e-6], world=2)


def test_every_link_cites_its_figures():
    for link in pj.LINKS.values():
        assert link.alpha_s > 0 and link.bytes_per_s > 0
        assert link.kind in ("achieved", "nominal")
        assert "github.com" in link.source or "nvidia.com" in link.source, link.name
    assert set(pj.DEFAULT_LINKS) <= set(pj.LINKS)
    assert pj.links_markdown().count("\n") == len(pj.LINKS) + 1


@pytest.mark.parametrize("skew", ["balanced", "random", "zipf:1.2", "hot:0.5"])
@pytest.mark.parametrize(("E", "K", "T", "W"), [(64, 8, 256, 16), (128, 1, 2048, 16)])
def test_expected_counts_agree_with_the_drawn_routing(skew, E, K, T, W):
    """Where both are feasible, the expected counts (budget 0) give the straggler's phase
    times, received pairs and touched experts within 5 % of a routing drawn whole: the
    stated tolerance at >= 2048 pairs per rank, the drawn routing's own noise."""
    cfg = MoEConfig(d_model=4096, d_ff=256, num_experts=E, top_k=K)
    drawn = pj.rank_counts(cfg, skew, W, T, budget=1 << 40)
    expected = pj.rank_counts(cfg, skew, W, T, budget=0)
    assert drawn[3] == "exact"
    assert expected[3] == ("mean" if skew == "random" else "sampled")
    assert expected[1].sum().item() == pytest.approx(W * T * K)
    times = [
        pj.phase_seconds(rows, 4096, 2, 8, *pj.DEFAULT_LINKS, slots=K)
        for rows, _, _, _ in (drawn, expected)
    ]
    for phase in pj.CALLS:
        assert times[1][phase].max().item() == pytest.approx(times[0][phase].max().item(), rel=0.05)
    for which in (0, 1, 2):  # received rows, received pairs, touched experts
        agg = (lambda c: c.double().sum(0)) if which < 2 else (lambda t: t.double())
        assert agg(expected[which]).max().item() == pytest.approx(
            agg(drawn[which]).max().item(), rel=0.05
        )


def test_collapse_counts_are_exact_in_closed_form():
    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=16, top_k=4)
    rows, pairs, touched, how = pj.rank_counts(cfg, "collapse", 8, 5, budget=0)
    ids = make_routing(40, cfg, "collapse", seed=SEED).ids
    assert how == "exact"
    assert torch.equal(rows, mp.row_counts(ids, 16, 8))
    assert torch.equal(pairs, mp.row_counts(ids, 16, 8, dedup=False))
    assert touched.sum() == 4


def test_share_grows_with_the_world_at_a_bandwidth_bound_point():
    frame = pj.project(
        [models_record("deepseek-v3", 4096)], CEILINGS, worlds=(8, 16, 32, 64, 128, 256)
    )
    shares = frame.sort_values("W")["comm_share"].tolist()
    assert all(a < b for a, b in itertools.pairwise(shares)), shares
    assert frame["sampled"].all() and set(frame["counts"]) == {"sampled"}  # balanced
    assert (frame["nodes"] == frame["W"] // 8).all()


def test_one_gpu_takes_the_single_gpu_time_at_a_compute_bound_point():
    """W=1: the rank is the one-GPU layer, and the model gives back its measured time."""
    record = models_record("qwen3-235b-a22b", 16384, fraction=0.6)
    frame = pj.project([record], Ceilings(**CEILINGS, label=""), worlds=(1,))
    assert frame["compute_ms"].item() == pytest.approx(record["time_ms"], rel=1e-9)
    assert frame["dispatch_bytes"].item() == 0 and frame["combine_bytes"].item() == 0


def test_the_projection_picks_the_fastest_impl_and_leaves_out_w_above_e():
    records = [
        models_record("mixtral-8x7b", 64, fraction=0.5, impl="sorted"),
        models_record("mixtral-8x7b", 64, fraction=0.8, impl="triton"),
        models_record("mixtral-8x7b", 64, skew="zipf:1.2"),
    ]
    frame = pj.project(records, CEILINGS, worlds=(8, 16))
    assert set(frame["W"]) == {8} and set(frame["impl"]) == {"triton"}
    only = pj.project(records, CEILINGS, worlds=(8,), impl="sorted", skews=["balanced"])
    assert set(only["impl"]) == {"sorted"} and len(only) == 1


def test_markdown_shows_a_share_per_preset_and_world():
    records = [
        models_record(name, T, skew)
        for name in ("qwen3-235b-a22b", "mixtral-8x7b")
        for T in (64, 4096)
        for skew in ("balanced", "zipf:1.2")
    ]
    frame = pj.project(records, CEILINGS, worlds=(8, 16))
    table = pj.markdown(frame)
    assert table.startswith("| preset | T per GPU | skew | W=8 | W=16 |")
    assert "| mixtral-8x7b | 64 (decode) | balanced |" in table
    assert "–" in table  # mixtral has 8 experts: no W=16
    assert "≈" in table  # qwen at 4096 tokens per GPU: expected counts
    with pytest.raises(ValueError, match="T=128 is not projected"):
        pj.markdown(frame, decode_T=128)


def test_bad_input_is_refused_with_a_clear_error():
    records = [models_record("qwen3-235b-a22b", 64)]
    with pytest.raises(ValueError, match="unknown preset"):
        pj.project(records, CEILINGS, presets=["gpt-9"])
    with pytest.raises(ValueError, match="unknown skew"):
        pj.project(records, CEILINGS, skews=["zipf:3"])
    with pytest.raises(ValueError, match="whole number of nodes"):
        pj.project(records, CEILINGS, worlds=(8, 12))
    with pytest.raises(ValueError, match="unknown link"):
        pj.project(records, CEILINGS, links=("nvlink9", "ib-ndr-deepep"))
    with pytest.raises(ValueError, match="env\\['ceilings'\\]"):
        pj.project(records, {"matmul_flops": 1.0})
    other = dict(records[0], family="scale-out", label="E=64")
    with pytest.raises(ValueError, match="no ok records of the models family"):
        pj.project([other], CEILINGS)
    with pytest.raises(ValueError, match="no ok records of the ep family"):
        pj.validate({}, records)


def ep_run(link, worlds=(2, 4), skews=("balanced", "hot:0.5")):
    """A small ep run whose bytes are the routing's and whose phase times are `link`'s."""
    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=8, top_k=2)
    T, itemsize = 24, 4
    records, calibration = [], {}
    for W in worlds:
        sizes = [256, 4096, 65536]
        seconds = [link.alpha_s + b * (W - 1) / link.bytes_per_s for b in sizes]
        calibration[str(W)] = {"bytes_per_peer": sizes, "seconds": seconds}
        for skew in skews:
            ids = make_routing(T, cfg, skew, seed=SEED).ids
            counts = mp.row_counts(ids, 8, W)
            pairs = mp.row_counts(ids, 8, W, dedup=False)
            traffic = mp.traffic(counts, cfg.d_model, itemsize, slots=cfg.top_k)
            times = pj.phase_seconds(counts, cfg.d_model, itemsize, W, link, link, cfg.top_k)
            ranks = [
                {
                    "T": stop - start,
                    **{key: values[r] for key, values in traffic.items()},
                    "rows_recv": int(counts[:, r].sum()),
                    "pairs_recv": int(pairs[:, r].sum()),
                }
                for r, (start, stop) in enumerate(mp.token_blocks(T, W))
            ]
            records.append(
                {
                    "family": "ep",
                    "label": f"W={W}/E=8",
                    "impl": "sorted",
                    "skew": skew,
                    "status": "ok",
                    "T": T,
                    "D": cfg.d_model,
                    "F": cfg.d_ff,
                    "E": 8,
                    "K": cfg.top_k,
                    "Fs": 0,
                    "dtype": "float32",
                    "world": W,
                    "dispatch_ms": times["dispatch"].max().item() * 1e3,
                    "combine_ms": times["combine"].max().item() * 1e3,
                    "ranks": ranks,
                }
            )
    return {"ep_calibration": calibration}, records


def test_validate_finds_the_measured_bytes_and_times():
    link = pj.Link("gloo", alpha_s=80e-6, bytes_per_s=1.5e9, source="test")
    env, records = ep_run(link)
    frame = pj.validate(env, records)
    assert len(frame) == 4 and frame["bytes_exact"].all()
    for phase in pj.CALLS:
        assert frame[f"{phase}_ratio"].tolist() == pytest.approx([1.0] * 4, rel=1e-6)
    assert frame["alpha_us"].tolist() == pytest.approx([80.0] * 4, rel=1e-6)
    records[1]["ranks"][0]["dispatch_sent"] += 1
    frame = pj.validate(env, records)
    assert frame["bytes_exact"].tolist() == [True, False, True, True]
    table = pj.validation_markdown(frame)
    assert table.count("DIFFER") == 1 and table.count("| exact |") == 3
    # A calibration whose times do not grow with the bytes (gloo's latency alone, W=4 on a
    # busy 2-core machine): no link for W=4; its bytes are still checked, W=2 keeps its fit.
    calibration = env["ep_calibration"]["4"]
    calibration["seconds"] = sorted(calibration["seconds"], reverse=True)
    frame = pj.validate(env, records)
    no_fit = frame["W"] == 4
    assert no_fit.any() and (~no_fit).any()
    assert frame.loc[no_fit, "no_link"].str.contains("does not grow with the bytes").all()
    assert frame.loc[no_fit, "dispatch_ratio"].isna().all()
    assert frame.loc[~no_fit, "no_link"].isna().all()
    assert frame.loc[~no_fit, "dispatch_ratio"].tolist() == pytest.approx([1.0] * 2, rel=1e-6)
    table = pj.validation_markdown(frame)
    assert table.count("no link fitted") == no_fit.sum()
    assert {line.count("|") for line in table.splitlines()} == {10}
    del env["ep_calibration"]["4"]
    with pytest.raises(ValueError, match="no world size 4"):
        pj.validate(env, records)


H200_RUN = Path(__file__).parents[2] / "results" / "gpu-h200" / "run-20261126T035724Z.json"


def test_the_project_command_on_a_gpu_run(capsys, tmp_path):
    csv = tmp_path / "rows.csv"
    argv = ["project", str(H200_RUN), "--worlds", "8,16", "--csv", str(csv)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| deepseek-v3 | 64 (decode) | balanced |" in out and "on NVIDIA H200" in out
    assert "model vs measured" not in out  # the run has no ep family
    rows = pd.read_csv(csv)
    assert set(rows["W"]) == {8, 16} and (rows["comm_share"].between(0, 1)).all()
    assert cli.main(["project", str(H200_RUN), "--links"]) == 0
    assert "ib-ndr-deepep" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "64"], "give two, decode and prefill"),
        (["--intra", "nvlink9"], "invalid choice"),
        (["--worlds", "8,12"], "whole number of nodes"),
    ],
)
def test_the_project_command_refuses_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["project", str(H200_RUN), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_summary_needs_models_or_ep_records():
    record = dict(models_record("mixtral-8x7b", 64), family="scale-out", label="E=8")
    with pytest.raises(ValueError, match="nothing to project"):
        pj.summary({"profile": "gpu", "ceilings": CEILINGS}, [record])
