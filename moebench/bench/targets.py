"""The Triton layer's performance targets, checked against one benchmark run.

    moebench targets RUN.json

The targets are those of an H100 in bf16 (forward); on another profile the table is still
computed, labelled with the run's profile, so the same script answers on any machine:
1. useful TFLOP/s >= 550 on SonicMoE's shape (T=32768, D=4096, F=1024, E=64, K=4);
2. triton time <= sorted time at every scale-out, iso-params and models point and skew;
3. fraction of roofline >= 0.6 at every scale-out and iso-params point;
4. decode (T <= 64, models): touched-expert weight bytes / time >= 0.7 x measured copy
   bandwidth;
5. int4 decode (T <= 64, the quant family's int4 models points): bytes read (min_bytes:
   the touched experts' int4 values and scales, the shared expert, x and y) / time >= 0.7
   x measured copy bandwidth, so about 3x the bf16 layer where that is weight bound;
6. fp8 prefill at SonicMoE's shape: the bf16 layer's time / the fp8-block layer's >= 1.5.
Targets 3, 4 and 5 are given twice: with the eager time, and with the kernels' time, which is
the CUDA graph replay time where the run has one (graph_ms: the profile replays the fast
points, whose eager time is mostly host launch time) and the eager time elsewhere.

    moebench targets RUN.json --kernels 8

also reruns the worst point and the median miss of each target missed (`reruns` names them;
the CLI reruns them with moebench.bench.profiling on the run's profile, so on its device),
and lists the 8 kernels that take most of the triton layer's call there (torch.profiler)
and, on a GPU, the 8 functions that take most of its host time (cProfile).

Where the run measured peers (what a user would otherwise run: transformers' backends,
Liger, vLLM), a table follows: at each point and skew, the triton layer's time against the
fastest peer's in the same run (versus_peers).
"""

from __future__ import annotations

import pandas as pd

from .. import registry
from ..config import torch_dtype
from .grid import QUANT

SONIC_TFLOPS = 550.0
ROOFLINE = 0.6
DECODE_BANDWIDTH = 0.7
DECODE_MAX_TOKENS = 64
INT4_BANDWIDTH = 0.7
FP8_SPEEDUP = 1.5
POINT = ["family", "label", "skew"]


def _timed(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The records of one origin that ran and have a time, times as floats."""
    ok = frame[(frame["status"] == "ok") & (frame["impl"].map(registry.kind) == kind)]
    ok = ok.assign(time_ms=pd.to_numeric(ok["time_ms"]))
    return ok[ok["time_ms"].notna()]


def _fastest_at_each_point(records: pd.DataFrame) -> pd.DataFrame:
    """One record per point (family, label, skew): the fastest; in the run's order."""
    return records.sort_values("time_ms", kind="stable").drop_duplicates(POINT).sort_index()


def best_peers(frame: pd.DataFrame) -> pd.DataFrame:
    """At each point where a peer ran: the fastest peer (`peer`), its time (`peer_ms`) and
    its error against the oracle (`peer_rel_err`)."""
    best = _fastest_at_each_point(_timed(frame, "peer"))
    names = {"impl": "peer", "time_ms": "peer_ms", "rel_err": "peer_rel_err"}
    # reindex: a frame not read by load_run may lack rel_err; it is then empty.
    return best.reindex(columns=[*POINT, *names]).rename(columns=names)


def versus_peers(frame: pd.DataFrame) -> pd.DataFrame:
    """moebench against the best peer at each point where both ran: POINT, peer, peer_ms,
    peer_rel_err, `ours` (the layer compared), ours_ms and vs_best_peer = peer_ms / ours_ms
    (over 1: ours is faster).

    `ours` is the triton layer where the run timed it anywhere (a GPU run: is the triton
    layer faster than what one would otherwise use?), its points only; else moebench's
    fastest layer at each point (a CPU run, where triton is not timed: how do moebench's
    layers compare with the peers?)."""
    own = _timed(frame, "own")
    if (own["impl"] == "triton").any():
        own = own[own["impl"] == "triton"]
    ours = _fastest_at_each_point(own)[[*POINT, "impl", "time_ms"]]
    both = ours.rename(columns={"impl": "ours", "time_ms": "ours_ms"}).merge(
        best_peers(frame), on=POINT
    )
    return both.assign(vs_best_peer=both["peer_ms"] / both["ours_ms"])


def _verdict(target: str, required: str, points: pd.DataFrame, value: pd.Series, met: pd.Series):
    """One target's row: the worst point decides (the lowest value; all values are
    "higher is better"). `typical` is the median of the points that miss (the lower
    middle one), where the worst is often an extreme of its own."""
    if points.empty:
        return {"target": target, "required": required, "worst": None, "at": "no points",
                "points": 0, "met": None, "point": None, "typical": None}  # fmt: skip
    worst = value.idxmin()
    at = lambda i: (points.loc[i, "family"], points.loc[i, "label"], points.loc[i, "skew"])
    missed = value[~met.astype(bool)].sort_values(kind="stable")
    return {
        "target": target,
        "required": required,
        "worst": float(value.loc[worst]),
        "at": " ".join(at(worst)),
        "points": len(points),
        "met": bool(met.all()),
        "point": at(worst),
        "typical": at(missed.index[(len(missed) - 1) // 2]) if len(missed) else None,
    }


def _weight_bytes(rows: pd.DataFrame) -> pd.Series:
    # astype: an empty column keeps its string dtype through map, which pandas with pyarrow
    # strings then refuses to multiply.
    itemsize = rows["dtype"].map(lambda name: torch_dtype(name).itemsize).astype("int64")
    per_expert = 3 * rows["D"] * rows["F"]
    return (rows["touched_experts"] * per_expert + 3 * rows["D"] * rows["Fs"]) * itemsize


def _kernel_ms(rows: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(rows["graph_ms"]).fillna(rows["time_ms"])


def evaluate(env: dict, frame: pd.DataFrame) -> pd.DataFrame:
    """The six targets for the triton layer of one run: worst value, where, met or not
    (None where the run cannot measure it: no triton point, no replays, no touched_experts,
    no quant points)."""
    for column in ("graph_ms", "quant", "min_bytes"):  # runs from before them
        if column not in frame:
            frame = frame.assign(**{column: None})
    ok = frame[frame["status"] == "ok"].reset_index(drop=True)
    tri = ok[ok["impl"] == "triton"]
    rows = []

    # The SonicMoE shape (E=64 of the sonicmoe family) under random routing.
    sonic_shape = lambda rows: rows[(rows["E"] == 64) & (rows["skew"] == "random")]
    sonic = sonic_shape(tri[tri["family"] == "sonicmoe"])
    rows.append(
        _verdict(
            "SonicMoE shape, useful TFLOP/s",
            f">= {SONIC_TFLOPS:g}",
            sonic,
            sonic["tflops"],
            sonic["tflops"] >= SONIC_TFLOPS,
        )
    )

    key = ["family", "label", "skew"]
    families = ["scale-out", "iso-params", "models"]
    srt = ok[ok["impl"] == "sorted"][[*key, "time_ms"]]
    both = tri[tri["family"].isin(families)].merge(srt, on=key, suffixes=("", "_sorted"))
    speedup = both["time_ms_sorted"] / both["time_ms"]
    rows.append(_verdict("speed vs sorted (x)", ">= 1.0", both, speedup, speedup >= 1.0))

    replayed = pd.to_numeric(tri["graph_ms"]).notna().any()
    grids = tri[tri["family"].isin(["scale-out", "iso-params"])]
    decode = tri[(tri["family"] == "models") & (tri["T"] <= DECODE_MAX_TOKENS)]
    decode = decode[decode["touched_experts"].notna()]  # older runs lack it: not measured
    # The models points are the quant family's only ones with so few tokens.
    int4 = tri[(tri["family"] == QUANT) & (tri["quant"] == "int4")]
    int4 = int4[(int4["T"] <= DECODE_MAX_TOKENS) & int4["min_bytes"].notna()]
    copy_bw = (env.get("ceilings") or {}).get("copy_bytes")
    for timing in ("eager", "kernels"):
        if timing == "kernels" and not replayed:  # a run without replays: not measured
            grids, decode, int4 = grids.iloc[:0], decode.iloc[:0], int4.iloc[:0]
        ms = _kernel_ms if timing == "kernels" else (lambda rows: rows["time_ms"])
        frac = grids["roofline_fraction"] * grids["time_ms"] / ms(grids)
        rows.append(
            _verdict(
                f"fraction of roofline ({timing})",
                f">= {ROOFLINE:g}",
                grids,
                frac,
                frac >= ROOFLINE,
            )
        )
        bandwidths = (
            ("decode weight bandwidth", decode, _weight_bytes, DECODE_BANDWIDTH),
            ("int4 decode bytes read", int4, lambda r: pd.to_numeric(r["min_bytes"]),
             INT4_BANDWIDTH),
        )  # fmt: skip
        for name, part, nbytes, least in bandwidths:
            bandwidth = nbytes(part) / (ms(part) * 1e-3) / copy_bw if copy_bw else None
            rows.append(
                _verdict(
                    f"{name} / copy bandwidth ({timing})",
                    f">= {least:g}",
                    part if copy_bw else part.iloc[:0],
                    bandwidth,
                    bandwidth >= least if copy_bw else None,
                )
            )

    # fp8-block at the SonicMoE shape against the same point in the dtype.
    fp8 = tri[(tri["family"] == QUANT) & (tri["quant"] == "fp8-block")]
    fp8 = fp8.assign(base=fp8["label"].str.rsplit("/", n=1).str[0])
    bf16 = tri[tri["family"] == "sonicmoe"][["label", "skew", "time_ms"]]
    fp8 = sonic_shape(fp8.merge(bf16, left_on=["base", "skew"], right_on=["label", "skew"],
                                suffixes=("", "_dtype")))  # fmt: skip
    speedup = fp8["time_ms_dtype"] / fp8["time_ms"]
    rows.append(
        _verdict(
            "fp8-block SonicMoE shape, speed vs the dtype (x)",
            f">= {FP8_SPEEDUP:g}",
            fp8,
            speedup,
            speedup >= FP8_SPEEDUP,
        )
    )
    return pd.DataFrame(rows)


def markdown(env: dict, frame: pd.DataFrame, per_point: bool = True) -> str:
    """The targets table; with per_point, the triton layer against the best peer at each
    point after it, where the run measured both (the report and the job's console say that
    their own way)."""
    table = evaluate(env, frame)
    lines = [
        f"Targets of the triton layer (set for an H100 in bf16; this run: profile "
        f"{env.get('profile')}, {env.get('gpu') or env.get('cpu')})",
        "",
        "| target | required | worst | at | points | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in table.itertuples():
        worst = "-" if row.worst is None or pd.isna(row.worst) else f"{row.worst:.3g}"
        met = {True: "yes", False: "**no**"}.get(row.met, "not measured")
        lines.append(
            f"| {row.target} | {row.required} | {worst} | {row.at} | {row.points} | {met} |"
        )
    versus = versus_peers(frame)
    if per_point and (versus["ours"] == "triton").any():
        lines += [
            "",
            "The triton layer against the fastest peer measured at each point (vs best peer: "
            "the peer's time / triton's; over 1: triton is faster)",
            "",
            "| family | point | skew | triton ms | best peer | peer ms | vs best peer |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r.family} | {r.label} | {r.skew} | {r.ours_ms:.3g} | {r.peer} | "
            f"{r.peer_ms:.3g} | {r.vs_best_peer:.2f}x |"
            for r in versus.itertuples()
        ]
    return "\n".join(lines) + "\n"


def reruns(env: dict, frame: pd.DataFrame) -> dict[tuple, dict[str, list[str]]]:
    """The points to rerun for a breakdown: the worst point and the median miss of each
    target missed, as {(family, label, skew): {role: [targets]}} ({} when none is missed)."""
    points: dict[tuple, dict[str, list[str]]] = {}
    table = evaluate(env, frame)
    for role, column in (("worst for", "point"), ("median miss of", "typical")):
        for row in table[table["met"].eq(False)].itertuples():  # None: not measured
            if column == "typical" and row.typical == row.point:
                continue  # one missed point, or the median miss is the worst
            roles = points.setdefault(getattr(row, column), {})
            roles.setdefault(role, []).append(row.target)
    return points
