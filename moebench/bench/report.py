"""The report: one run's records as tables (CSV, markdown) and plots (PNG).

    moebench report [RUN.json ...]

With no argument it reports the newest run in each results/<profile>-<machine>/ folder.
Beside each run (one per folder) it writes summary.csv (every record, the units in the
column names; what the layer reported of its call, e.g. the triton layer's tuned configs,
as JSON; the fastest peer at the record's point and its time / the record's), summary.md
(the machine, then per family: balanced-routing throughput and error, moebench against the
best peer, load-imbalance overhead per skew, padded's dropped fraction, what was skipped and
why; the ep family's table; expert parallelism projected from the models family and the
model against the ep family; the quant family against the unquantized layer) and plots/:
throughput-<family>.png, peak-memory.png, imbalance-<family>.png, peers-<family>.png where
peers ran, ep-comm-share.png and quant.png.

Peers (what a user would otherwise run: transformers' backends, Liger, vLLM) are compared
with moebench in their own section and plot; the other plots show moebench's layers and
plug-ins (outside impls, dotted). "Against the best peer" compares the triton layer where
the run timed it, else moebench's fastest layer at each point (targets.versus_peers).
"""

from __future__ import annotations

import json
import math
import textwrap
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt
import pandas as pd

from .. import registry
from ..quant import QUANTS
from . import ep, grid, projection, targets
from .records import tuned_kernels
from .runs import load_run, write_atomic

COLORS = {"naive": "tab:gray", "padded": "tab:orange", "sorted": "tab:blue", "triton": "tab:red"}
PEER_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black")
# Plug-ins: colours apart from the tab: ones of moebench's layers and the peers.
OUTSIDE_COLORS = ("goldenrod", "navy", "limegreen", "teal", "maroon", "deeppink", "darkkhaki")
SUMMARY_COLUMNS = {
    "family": "family",
    "label": "point",
    "impl": "impl",
    "skew": "skew",
    "T": "T",
    "D": "D",
    "F": "F",
    "E": "E",
    "K": "K",
    "Fs": "Fs",
    "dtype": "dtype",
    "quant": "quant",
    "status": "status",
    "time_ms": "time_ms",
    "p20_ms": "p20_ms",
    "p80_ms": "p80_ms",
    "cv": "cv",
    "repeats": "repeats",
    "host_ms": "host_ms",
    "graph_ms": "graph_replay_ms",
    "tokens_per_s": "tokens_per_s",
    "tflops": "useful_tflops",
    "roofline_fraction": "roofline_fraction",
    "min_bytes": "min_bytes",
    "peak_mib": "peak_mib",
    "max_over_mean": "max_over_mean_load",
    "imbalance_overhead": "imbalance_overhead",
    "dropped_fraction": "dropped_fraction",
    "rel_err": "rel_err",
    "quant_err": "quant_err",
    "best_peer": "best_peer",
    "vs_best_peer": "vs_best_peer",
    "reason": "reason",
    "layer_stats": "layer_stats_json",
}


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """The records with the report's column names; peak memory in MiB."""
    frame = _with_best_peer(frame)
    frame = frame.assign(
        peak_mib=pd.to_numeric(frame["peak_bytes"]) / 2**20,
        layer_stats=frame["layer_stats"].map(
            lambda s: json.dumps(s) if isinstance(s, dict) else None
        ),
    )
    return frame[list(SUMMARY_COLUMNS)].rename(columns=SUMMARY_COLUMNS)


def _with_best_peer(frame: pd.DataFrame) -> pd.DataFrame:
    """The records with best_peer (the fastest peer at the record's point) and vs_best_peer
    (its time / the record's: over 1, the record is faster)."""
    best = targets.best_peers(frame)[[*targets.POINT, "peer", "peer_ms"]]
    both = frame.merge(best.rename(columns={"peer": "best_peer"}), on=targets.POINT, how="left")
    ratio = both["peer_ms"] / pd.to_numeric(both["time_ms"])
    return both.drop(columns="peer_ms").assign(vs_best_peer=ratio)


_RANKS = {name: i for i, name in enumerate((*registry.OWN, *registry.PEER_NAMES))}


def impl_rank(impl: str) -> tuple[int, str]:
    """The sort key of impls: moebench's layers, then the peers (both in the registry's
    order), then plug-ins by name."""
    return _RANKS.get(impl, len(_RANKS)), impl


def impl_order(impls) -> list[str]:
    return sorted(set(impls), key=impl_rank)


def style(impl: str) -> dict:
    """An impl's line in the plots. moebench's layers: solid, filled markers; peers: dashed,
    plug-ins: dotted, both with hollow markers, so they read as others beside moebench's.
    A plug-in's colour follows from its name (crc32: Python's hash changes between runs)."""
    kind = registry.kind(impl)
    if kind == "own":
        return {"color": COLORS[impl], "marker": "o", "ms": 3}
    hollow = {"ms": 4, "mfc": "none"}
    if kind == "peer":
        color = PEER_COLORS[registry.PEER_NAMES.index(impl) % len(PEER_COLORS)]
        return {"color": color, "ls": "--", "marker": "s", **hollow}
    color = OUTSIDE_COLORS[zlib.crc32(impl.encode()) % len(OUTSIDE_COLORS)]
    return {"color": color, "ls": ":", "marker": "^", **hollow}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "/")


def markdown_table(frame: pd.DataFrame) -> str:
    lines = [
        "| " + " | ".join(map(str, frame.columns)) + " |",
        "|" + "|".join("---" for _ in frame.columns) + "|",
    ]
    lines += ["| " + " | ".join(map(_fmt, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _ordered(frame: pd.DataFrame, family: str, profile: str) -> list[str]:
    """The family's point labels in sweep order (E or T ascending), as far as they ran."""
    order = [pt.label for pt in grid.points(family, profile)] if profile in grid.PROFILES else []
    seen = list(dict.fromkeys(frame.loc[frame["family"] == family, "label"]))
    return [label for label in order if label in seen] + [lb for lb in seen if lb not in order]


def _pivot(frame: pd.DataFrame, family: str, profile: str, value: str, rows, columns):
    part = frame[frame["family"] == family]
    table = part.pivot_table(index=rows, columns=columns, values=value, aggfunc="first")
    labels = _ordered(frame, family, profile)
    if isinstance(table.index, pd.MultiIndex):
        keys = sorted(table.index, key=lambda k: (labels.index(k[0]), k[1:]))
    else:
        keys = [label for label in labels if label in table.index]
    return table.reindex(keys)


def _env_lines(env: dict) -> list[str]:
    ceilings = env.get("ceilings") or {}
    device = env.get("gpu") or f"{env.get('cpu')}, torch threads: {env.get('torch_threads')}"
    lines = [
        f"- commit `{env.get('commit')}`" + (" (uncommitted changes)" if env.get("dirty") else ""),
        f"- {env.get('date')}, machine `{env.get('machine')}`, device {device}",
        f"- driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env.get('torch')}, "
        f"triton {env.get('triton')}, Python {env.get('python')}",
        f"- timer: {env.get('timer')}; L2: {env.get('l2')}; harness version "
        f"{env.get('harness_version')}; run took {env.get('duration_s')} s",
    ]
    if env.get("commit_note"):
        lines.append(f"- note: {env['commit_note']}")
    if env.get("partial"):
        lines.append("- **partial run**: the sweep stopped before its last point")
    if env.get("clocks"):
        lines.append(f"- clocks: {env['clocks']}")
    timing = env.get("timing")
    if timing:
        floor = lambda s: f" and at least {s:g} s of them" if s else ""
        lines.append(
            f"- each measurement: {timing['warmup']} warm-up calls{floor(timing['warmup_s'])}, "
            f"then {timing['repeats']} timed calls{floor(timing['min_time_s'])}, about "
            f"{timing['max_time_s']:g} s at most"
        )
    if ceilings:
        lines.append(
            f"- measured ceilings: matmul {ceilings['matmul_flops'] / 1e12:.3g} TFLOP/s, "
            f"copy {ceilings['copy_bytes'] / 1e9:.3g} GB/s ({ceilings['label']})"
        )
    return lines


def _shapes(part: pd.DataFrame) -> str:
    """The family's layer shapes: one line for a sweep, a table of the models."""
    first = part.iloc[0]
    if first["family"].removesuffix(grid.TRAIN) in ("models", "sonicmoe", grid.QUANT):
        models = part.assign(model=part["label"].str.split("/").str[0])
        models = models.drop_duplicates("model")[["model", "D", "F", "E", "K", "Fs"]]
        return markdown_table(models)
    shape = f"D={first['D']}, K={first['K']}, T={first['T']}"
    fs = sorted(part["F"].unique())
    if len(fs) == 1:
        return f"{shape}, F={fs[0]}"
    return f"{shape}, F from {fs[-1]} to {fs[0]} (E*F fixed)"


def markdown(env: dict, frame: pd.DataFrame) -> str:
    profile = env.get("profile")
    out = [f"# moebench: {profile} profile on {env.get('machine')}", "", *_env_lines(env), ""]
    out.append(
        "Times are medians in ms; tokens/s = T / time; TFLOP/s count useful FLOPs only "
        "(6*S*D*F + 6*T*D*Fs, less 6*D*F per pair padded dropped); roofline = the least "
        "time this device can take (measured ceilings) / the time; peak MiB = memory "
        "allocated above inputs and weights; "
        "imbalance = time / time under balanced routing; dropped = pairs dropped / S. "
        "On a GPU, host ms = host time to issue one call with nothing queued (near the "
        "time: the call is bound by its launches, or waits for the GPU) and replay ms = the "
        "same call as a CUDA graph replay (the kernels alone; fast triton points only)."
    )
    versus = targets.versus_peers(frame)
    for family in dict.fromkeys(frame["family"]):
        part = frame[frame["family"] == family]
        ok = part[part["status"] == "ok"]
        if family == grid.EP:
            out += ["", f"## {family}", "", *_ep_section(env, part), ""]
            continue
        out += ["", f"## {family}", ""]
        out += [_shapes(part), ""]
        if family == grid.QUANT:
            out += _quant_section(env, frame)
        balanced = ok[ok["skew"] == "balanced"]
        if len(balanced):
            columns = {"label": "point", "impl": "impl", "time_ms": "time ms",
                       "tokens_per_s": "tokens/s", "tflops": "TFLOP/s",
                       "roofline_fraction": "roofline", "peak_mib": "peak MiB",
                       "rel_err": "rel err"}  # fmt: skip
            # GPU runs: how long issuing a call took, and the graph replay of fast points.
            for timing, name in (("host_ms", "host ms"), ("graph_ms", "replay ms")):
                if pd.to_numeric(balanced[timing]).notna().any():
                    columns[timing] = name
            table = balanced.assign(peak_mib=balanced["peak_bytes"] / 2**20)[list(columns)]
            order = _ordered(frame, family, profile)
            rank = {"label": order.index, "impl": impl_rank}
            table = table.sort_values(["label", "impl"], key=lambda s: s.map(rank[s.name]))
            table.columns = list(columns.values())
            out += ["### Balanced routing", "", markdown_table(table), ""]
            configs = _triton_configs(balanced)
            if len(configs):
                configs = configs.sort_values("point", key=lambda s: s.map(order.index))
                out += ["Tuned triton kernels (balanced routing): tile heights (rows), then "
                        "each kernel's BLOCK_N x BLOCK_K, warps, stages:", ""]  # fmt: skip
                out += [markdown_table(configs), ""]
        against = versus[versus["family"] == family]
        if len(against):
            note, table = _versus_table(against)
            out += ["### Against the best peer", "", note, "", markdown_table(table), ""]
        unbalanced = ok[ok["skew"] != "balanced"]
        if unbalanced["imbalance_overhead"].notna().any():
            table = _pivot(ok, family, profile, "imbalance_overhead", ["label", "impl"], "skew")
            table = table[[s for s in grid.SKEWS if s in table.columns and s != "balanced"]]
            out += ["### Load-imbalance overhead (time / balanced time)", ""]
            out += [markdown_table(table.reset_index().rename(columns={"label": "point"})), ""]
            loads = _pivot(part, family, profile, "max_over_mean", "label", "skew")
            loads = loads[[s for s in grid.SKEWS if s in loads.columns]]
            out += ["Max/mean expert load of each routing:", ""]
            out += [markdown_table(loads.reset_index().rename(columns={"label": "point"})), ""]
        padded = ok[ok["impl"] == "padded"]
        if len(padded):
            table = _pivot(padded, family, profile, "dropped_fraction", "label", "skew")
            table = table[[s for s in grid.SKEWS if s in table.columns]]
            out += ["### Dropped fraction (padded, capacity factor 1.25)", ""]
            out += [markdown_table(table.reset_index().rename(columns={"label": "point"})), ""]
        skipped = part[part["status"] != "ok"]
        if len(skipped):
            reasons = skipped.groupby(["reason", "impl"], sort=False)["label"].agg(
                lambda s: ", ".join(dict.fromkeys(s))
            )
            table = reasons.reset_index()[["impl", "label", "reason"]]
            table.columns = ["impl", "points", "reason"]
            out += ["### Skipped", "", markdown_table(table), ""]
    if (frame["family"].isin(("models", grid.EP)) & (frame["status"] == "ok")).any():
        out += ["", projection.summary(env, frame)]
    return "\n".join(out).rstrip() + "\n"


def _ep_section(env: dict, part: pd.DataFrame) -> list[str]:
    first = part.iloc[0]
    ranks = "NCCL, one GPU per rank" if env.get("device") == "cuda" else "gloo processes"
    return [
        f"The layer expert-parallel over W ranks ({ranks}): D={first['D']}, F={first['F']}, "
        f"K={first['K']}, T={int(first['T'] // first['world'])} tokens per rank, experts in "
        "contiguous blocks. step = per call the slowest rank's time, median ms; dispatch, "
        "local (experts) and combine: the straggler's, the rank whose experts take longest "
        "(it waits least, so its all-to-alls are the transfers); comm share = (dispatch + "
        "combine) / the sum of the straggler's three; straggler = its experts' time / the "
        "mean rank's; "
        "MB sent over all ranks; GB/s = the mean rank's bytes sent / the straggler's "
        "dispatch + combine.",
        "",
        ep.markdown(part.to_dict("records")),
    ]


def versus_unquantized(frame: pd.DataFrame) -> pd.DataFrame:
    """Each quant record that ran beside its unquantized twin, the models or sonicmoe
    record of the same point, impl and skew: `point` (the twin's label), its time
    (`base_ms`), bytes read (`base_bytes`) and tokens/s (`base_tokens_per_s`), and
    speedup = base_ms / time_ms (over 1: the quantized layer is faster)."""
    ok = _ok(frame)
    quant = ok[ok["family"] == grid.QUANT]
    quant = quant.assign(point=quant["label"].str.rsplit("/", n=1).str[0])
    base = ok[ok["family"].isin(("models", "sonicmoe"))][
        ["label", "impl", "skew", "time_ms", "min_bytes", "tokens_per_s"]
    ].rename(columns={"label": "point", "time_ms": "base_ms", "min_bytes": "base_bytes",
                      "tokens_per_s": "base_tokens_per_s"})  # fmt: skip
    both = quant.merge(base, on=["point", "impl", "skew"], how="left")
    return both.assign(speedup=both["base_ms"] / pd.to_numeric(both["time_ms"]))


def _quant_section(env: dict, frame: pd.DataFrame) -> list[str]:
    """The quant family against the unquantized layer, balanced routing."""
    both = versus_unquantized(_ok(frame, "balanced"))
    if both.empty:
        return []
    order = _ordered(frame, grid.QUANT, env.get("profile"))
    rank = {"label": order.index, "impl": impl_rank}
    both = both.sort_values(["label", "impl"], key=lambda s: s.map(rank[s.name]))
    table = both.assign(
        mb=both["min_bytes"] / 1e6,
        bytes_ratio=both["min_bytes"] / both["base_bytes"],
        quant_err=both["quant_err"].astype(float),
    )
    columns = {"point": "point", "quant": "format", "impl": "impl", "tokens_per_s": "tokens/s",
               "base_tokens_per_s": "unquantized tokens/s", "speedup": "speedup",
               "mb": "MB read", "bytes_ratio": "bytes / unquantized", "rel_err": "rel err",
               "quant_err": "quant err"}  # fmt: skip
    table = table[list(columns)]
    table.columns = list(columns.values())
    return [
        "### Against the unquantized layer (balanced routing)",
        "",
        "The same point, impl and routing in the layer's dtype (the models or sonicmoe "
        "family): speedup = its time / the quantized layer's (over 1: quantized is faster); "
        "MB read = the least bytes moved (touched experts' stored values and scales, the "
        "shared expert, x and y); rel err = against the oracle of the quantized layer (the "
        "gated correctness); quant err = that oracle against the unquantized layer's, on "
        "the same tokens (the quantization's own error).",
        "",
        markdown_table(table),
        "",
    ]


def _versus_table(versus: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """The note and table of one family's "Against the best peer" (targets.versus_peers)."""
    columns = {"label": "point", "skew": "skew", "peer": "best peer", "peer_ms": "peer ms",
               "peer_rel_err": "peer rel err", "ours": "moebench", "ours_ms": "moebench ms",
               "vs_best_peer": "vs best peer"}  # fmt: skip
    if set(versus["ours"]) == {"triton"}:
        del columns["ours"]
        columns["ours_ms"] = "triton ms"
        note = ("The triton layer against the fastest peer at each point: vs best peer = the "
                "peer's time / triton's (over 1: triton is faster).")  # fmt: skip
    else:
        note = ("The triton layer was not timed (on a CPU it only runs interpreted): "
                "moebench's fastest layer at each point against the fastest peer; vs best "
                "peer = the peer's time / moebench's (over 1: moebench's is faster).")  # fmt: skip
    table = versus[list(columns)]
    table.columns = list(columns.values())
    return note, table


def _triton_configs(records: pd.DataFrame) -> pd.DataFrame:
    """point, path, tile heights and the tuned gate_up and down configs of the triton
    records that report them."""
    rows = []
    for r in records[records["impl"] == "triton"].itertuples():
        kernels = tuned_kernels(r.layer_stats)
        if kernels:
            rows.append({"point": r.label, **kernels})
    return pd.DataFrame(rows)


def _panels(frame: pd.DataFrame, family: str) -> list[tuple[str, pd.DataFrame, str]]:
    """(title, records, x column) per panel: E for the sweeps, T per preset for models."""
    part = frame[frame["family"] == family]
    if family.removesuffix(grid.TRAIN) != "models":
        return [(family, part, "E")]
    preset = part["label"].str.split("/").str[0]
    return [(name, part[preset == name], "T") for name in dict.fromkeys(preset)]


def _impls(frame: pd.DataFrame) -> list[str]:
    """The impls of the plots other than the peers': moebench's layers and plug-ins."""
    return [i for i in impl_order(frame["impl"]) if registry.kind(i) != "peer"]


def _lines(ax, frame: pd.DataFrame, x: str, value: str, impls) -> None:
    for impl in impls:
        series = frame[frame["impl"] == impl].sort_values(x)
        if series[value].notna().any():
            ax.plot(series[x], series[value], label=impl, **style(impl))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("E (experts)" if x == "E" else "T (tokens)")
    ax.grid(True, alpha=0.3)


def _title(env: dict) -> str:
    device = env.get("gpu") or env.get("cpu")
    return f"{env.get('profile')} profile, {device}, commit {str(env.get('commit'))[:8]}"


def _figure(rows: int, cols: int):
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1, 3.2 * rows), squeeze=False)
    return fig, axes


def _save(fig, path, title: str) -> None:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _ok(frame: pd.DataFrame, skew: str | None = None) -> pd.DataFrame:
    """The records that ran (under `skew` only, when given)."""
    keep = frame["status"] == "ok"
    if skew is not None:
        keep &= frame["skew"] == skew
    return frame[keep]


def plot_throughput(env, frame, family, path) -> None:
    """Balanced routing: tokens/s (top) and fraction of roofline (bottom) against E, or
    against T for each model."""
    balanced = _ok(frame, "balanced")
    panels = _panels(balanced, family)
    impls = _impls(balanced)
    fig, axes = _figure(2, len(panels))
    for col, (title, part, x) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        _lines(top, part, x, "tokens_per_s", impls)
        _lines(bottom, part, x, "roofline_fraction", impls)
        top.set_yscale("log")
        bottom.set_yscale("log")
        top.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("tokens/s (higher is better)")
    axes[1][0].set_ylabel("fraction of roofline")
    axes[0][0].legend(fontsize=8)
    _save(fig, path, f"{family}, balanced routing: {_title(env)}")


def plot_peak_memory(env, frame, path) -> None:
    """Balanced routing: peak memory above inputs and weights against E (or T per model)."""
    ok = _ok(frame, "balanced")
    ok = ok.assign(peak_mib=ok["peak_bytes"] / 2**20)
    panels = [panel for family in dict.fromkeys(ok["family"]) for panel in _panels(ok, family)]
    impls = _impls(ok)
    cols = min(3, len(panels))
    fig, axes = _figure(math.ceil(len(panels) / cols), cols)
    for ax, (title, part, x) in zip(axes.flat, panels, strict=False):
        _lines(ax, part, x, "peak_mib", impls)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("peak MiB")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    axes[0][0].legend(fontsize=8)
    label = ok["peak_label"].iloc[0] if len(ok) else ""
    _save(fig, path, f"peak memory above inputs and weights ({label}): {_title(env)}")


def plot_imbalance(env, frame, family, path) -> None:
    """Time under each skewed routing / time under balanced routing: one column per skew
    (one row per model for the models family)."""
    ok = _ok(frame)
    skews = [s for s in grid.SKEWS if s != "balanced" and s in set(ok["skew"])]
    panels = _panels(ok, family)
    impls = _impls(ok)
    fig, axes = _figure(len(panels), len(skews))
    for row, (title, part, x) in enumerate(panels):
        for col, skew in enumerate(skews):
            ax = axes[row][col]
            _lines(ax, part[part["skew"] == skew], x, "imbalance_overhead", impls)
            ax.axhline(1.0, color="black", lw=0.8)
            models = family.removesuffix(grid.TRAIN) == "models"
            ax.set_title(f"{title}, {skew}" if models else skew, fontsize=9)
        axes[row][0].set_ylabel("time / balanced time")
    axes[0][0].legend(fontsize=8)
    _save(fig, path, f"{family}, load-imbalance overhead (lower is better): {_title(env)}")


def plot_peers(env, frame, family, path) -> None:
    """Balanced routing, every impl: tokens/s (top) and the fastest peer's time / the impl's
    (bottom; over 1: faster than every peer) against E, or against T for each model."""
    balanced = _with_best_peer(_ok(frame, "balanced"))
    panels = _panels(balanced, family)
    impls = impl_order(balanced["impl"])
    fig, axes = _figure(2, len(panels))
    for col, (title, part, x) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        _lines(top, part, x, "tokens_per_s", impls)
        _lines(bottom, part, x, "vs_best_peer", impls)
        bottom.axhline(1.0, color="black", lw=0.8)
        top.set_yscale("log")
        bottom.set_yscale("log")
        top.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("tokens/s (higher is better)")
    axes[1][0].set_ylabel("best peer's time / time")
    axes[0][0].legend(fontsize=7, ncol=2)
    _save(fig, path, f"{family} and peers, balanced: {_title(env)}")


QUANT_STYLES = {"fp8-block": ("tab:purple", "s"), "int8": ("tab:green", "^"),
                "int4": ("tab:red", "v"), None: ("black", "o")}  # fmt: skip


def quant_impl(frame: pd.DataFrame) -> str | None:
    """The layer quant.png shows: triton where the run timed it on quantized weights, else
    the first of sorted, padded and naive that it timed."""
    ok = _ok(frame)
    timed = set(ok.loc[ok["family"] == grid.QUANT, "impl"])
    return next((i for i in ("triton", "sorted", "padded", "naive") if i in timed), None)


def plot_quant(env, frame, path) -> None:
    """Balanced routing, one layer (quant_impl): tokens/s (top) and bytes read (bottom)
    against T per format, and the unquantized layer's, one column per model (a sonicmoe
    shape is one T)."""
    impl = quant_impl(frame)
    both = versus_unquantized(_ok(frame, "balanced"))
    both = both[both["impl"] == impl]
    model = both["point"].str.split("/").str[0]
    panels = list(dict.fromkeys(model))
    fig, axes = _figure(2, len(panels))
    for col, name in enumerate(panels):
        part = both[model == name]
        base = part.drop_duplicates("point").assign(quant=None)
        base = base.assign(tokens_per_s=base["base_tokens_per_s"], min_bytes=base["base_bytes"])
        for fmt, series in [(None, base), *((q, part[part["quant"] == q]) for q in QUANTS)]:
            color, marker = QUANT_STYLES[fmt]
            series = series.sort_values("T")
            label = fmt or f"unquantized ({part['dtype'].iloc[0]})"
            for row, value in enumerate(("tokens_per_s", "min_bytes")):
                ax = axes[row][col]
                ax.plot(series["T"], series[value], color=color, marker=marker, ms=4, label=label)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("T (tokens)")
                ax.grid(True, alpha=0.3)
        axes[0][col].set_title(name, fontsize=9)
    axes[0][0].set_ylabel("tokens/s (higher is better)")
    axes[1][0].set_ylabel("bytes read (min_bytes)")
    axes[0][0].legend(fontsize=7)
    _save(fig, path, f"quantized experts, {impl}, balanced routing: {_title(env)}")


def plot_ep(env, frame, path) -> None:
    """The ep family: the communication share (top) and the straggler ratio (bottom)
    against the world size, one colour per skew (a line per local impl, dotted where the
    routing is group-limited to M ranks), one column per E."""
    ok = _ok(frame)
    ok = ok[ok["family"] == grid.EP]
    experts = sorted(set(ok["E"]))
    fig, axes = _figure(2, len(experts))
    skews = [s for s in grid.SKEWS if s in set(ok["skew"])]
    for col, E in enumerate(experts):
        part = ok[ok["E"] == E]
        impls = impl_order(part["impl"])
        limits = part["group_limit"].fillna(0).astype(int)
        for skew, impl, limit in [
            (s, i, m) for s in skews for i in impls for m in sorted(set(limits))
        ]:
            keep = (part["skew"] == skew) & (part["impl"] == impl) & (limits == limit)
            series = part[keep].sort_values("world")
            label = skew if len(impls) == 1 else f"{skew}, {impl}"
            label += f", M={limit}" if limit else ""
            color = f"C{skews.index(skew)}"
            dashes = ("-", "--", ":", "-.")[(impls.index(impl) + 2 * bool(limit)) % 4]
            for row, value in enumerate(("comm_share", "straggler")):
                ax = axes[row][col]
                ax.plot(series["world"], series[value], marker="o", ls=dashes, color=color,
                        label=label)  # fmt: skip
                ax.set_xscale("log", base=2)
                ax.set_xticks(sorted(set(ok["world"])), [str(w) for w in sorted(set(ok["world"]))])
                ax.set_xlabel("W (ranks)")
                ax.grid(True, alpha=0.3)
        axes[0][col].set_title(f"E={E}", fontsize=9)
        axes[0][col].set_ylim(0, 1)
    axes[0][0].set_ylabel("communication share of the step")
    axes[1][0].set_ylabel("straggler: slowest rank's experts / mean")
    axes[0][0].legend(fontsize=7)
    _save(fig, path, f"expert parallel\n{_title(env)}")


def write_report(run_path) -> list[Path]:
    """summary.csv, summary.md and plots/ beside the run file; returns the paths."""
    run_path = Path(run_path)
    env, frame = load_run(run_path)
    out_dir = run_path.parent
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    written = [out_dir / "summary.csv", out_dir / "summary.md"]
    write_atomic(written[0], lambda f: summary(frame).to_csv(f, index=False))
    # The per-point comparison with the peers is in markdown's own section already.
    text = markdown(env, frame) + "\n" + targets.markdown(env, frame, per_point=False)
    write_atomic(written[1], lambda f: f.write(text.encode()))
    ok = frame[frame["status"] == "ok"]
    peers = set(targets.best_peers(_ok(frame, "balanced"))["family"])
    for family in dict.fromkeys(ok["family"]):
        if family == grid.EP:
            path = plots / "ep-comm-share.png"
            plot_ep(env, frame, path)
            written.append(path)
            continue
        if family == grid.QUANT:  # its own plot: one line per format, not per impl
            if len(versus_unquantized(_ok(frame, "balanced"))):
                plot_quant(env, frame, plots / "quant.png")
                written.append(plots / "quant.png")
            continue
        path = plots / f"throughput-{family}.png"
        plot_throughput(env, frame, family, path)
        written.append(path)
        if family in peers:
            path = plots / f"peers-{family}.png"
            plot_peers(env, frame, family, path)
            written.append(path)
        if (ok.loc[ok["family"] == family, "skew"] != "balanced").any():
            path = plots / f"imbalance-{family}.png"
            plot_imbalance(env, frame, family, path)
            written.append(path)
    # The quant family's peaks are in its table: its points share E and T across formats.
    if (~ok["family"].isin((grid.EP, grid.QUANT))).any():
        per_impl = frame[~frame["family"].isin((grid.EP, grid.QUANT))]
        plot_peak_memory(env, per_impl, plots / "peak-memory.png")
        written.append(plots / "peak-memory.png")
    return written


def latest_runs(results_dir="results") -> list[Path]:
    """The newest run file of each results/<profile>-<machine>/ folder (names sort by time)."""
    folders = sorted(p for p in Path(results_dir).iterdir() if p.is_dir())
    return [sorted(f.glob("run-*.json"))[-1] for f in folders if any(f.glob("run-*.json"))]


# --- the console summary: the answer `moebench bench` ends with ---------------------------


def console_summary(env: dict, frame: pd.DataFrame, width: int = 100) -> str:
    """A screenful: per family, the fastest impl at each point (balanced routing; a peer or
    plug-in named as such), moebench against the best peer (targets.versus_peers), each
    impl's overhead under the worst skew, where padded drops pairs or runs out of memory,
    and each impl's peak memory; then what was skipped."""
    profile = env.get("profile")
    device = env.get("gpu") or f"{env.get('cpu')}, {env.get('torch_threads')} torch thread(s)"
    out = [f"{profile} profile on {env.get('machine')} ({device}), commit "
           f"{str(env.get('commit'))[:8]}, {env.get('duration_s')} s"]  # fmt: skip
    if env.get("partial"):
        out.append("partial run: the sweep stopped before its last point")
    legend = ("fastest: balanced routing (the next fastest's time / its time); worst skew: "
              "time / balanced time, each impl's largest; peak memory: above inputs and "
              "weights, each impl's largest")  # fmt: skip
    versus = targets.versus_peers(frame)
    if len(versus):
        legend += "; vs best peer: the fastest peer's time / moebench's, each point and skew"
    out.append(textwrap.fill(legend, width))

    def line(name: str, text: str) -> None:
        if text:
            head, indent = f"  {name:<13}", " " * 15
            wrap = textwrap.TextWrapper(width, head, indent, break_on_hyphens=False)
            out.append(wrap.fill(text))

    for family in dict.fromkeys(frame["family"]):
        part = frame[frame["family"] == family]
        models = family.removesuffix(grid.TRAIN) == "models"
        out += ["", f"{family}:"]
        if family == grid.EP:
            line("comm share", _ep_range(part, "comm_share", "{:.0%}"))
            line("straggler", _ep_range(part, "straggler", "{:.2f}"))
            continue
        line("fastest", _fastest(part, _ordered(frame, family, profile), models))
        if family == grid.QUANT:
            line("vs dtype", _versus_unquantized(frame))
        line("vs best peer", _versus(versus[versus["family"] == family]))
        line("worst skew", _worst_skew(part))
        line("padded", _padded(part, _ordered(frame, family, profile)))
        line("peak memory", _peaks(part))
    out.append("")
    line("skipped", _skipped(frame))
    return "\n".join(out) + "\n"


def _span(labels: list[str]) -> str:
    """ "E=8..512", "mixtral-8x7b/T=1..64": the last label without what the first shares."""
    first, last = labels[0], labels[-1]
    if first == last:
        return first
    head, _, number = first.rpartition("=")
    if head and last.startswith(head + "=") and number.isdigit():
        last = last[len(head) + 1 :]
    return f"{first}..{last}"


def _fastest(part: pd.DataFrame, order: list[str], models: bool) -> str:
    """Runs of points with one winner and its margin over the next fastest impl:
    "sorted at E=32..8192 (1.21-3.10x)"; a run does not cross from one model to another."""
    times = _ok(part, "balanced").pivot_table(index="label", columns="impl", values="time_ms")
    group = (lambda label: label.split("/")[0]) if models else (lambda label: "")
    runs: list[tuple[str, list[str], list[float]]] = []
    for label in [lb for lb in order if lb in times.index]:
        row = times.loc[label].dropna().sort_values()
        if row.empty:
            continue
        margin = row.iloc[1] / row.iloc[0] if len(row) > 1 else math.nan
        last = runs[-1] if runs else None
        if last and last[0] == row.index[0] and group(last[1][-1]) == group(label):
            last[1].append(label)
            last[2].append(margin)
        else:
            runs.append((row.index[0], [label], [margin]))

    def margins(values):
        values = [m for m in values if not math.isnan(m)]
        return f" ({_range(values)})" if values else ""

    if len({impl for impl, _, _ in runs}) == 1:
        impl, _, _ = runs[0]
        return f"{_named(impl)} at every point" + margins([m for run in runs for m in run[2]])
    return "; ".join(f"{_named(impl)} at {_span(labels)}{margins(m)}" for impl, labels, m in runs)


def _range(values) -> str:
    """ "1.21-3.10x", or "1.50x" where they agree to two decimals."""
    lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
    return f"{lo if lo == hi else f'{lo}-{hi}'}x"


def _named(impl: str) -> str:
    """An impl's name, marked where it is not moebench's: "hf-grouped_mm (peer)"."""
    kind = registry.kind(impl)
    return impl if kind == "own" else f"{impl} ({kind})"


def _versus(versus: pd.DataFrame) -> str:
    """ "triton 0.80-1.60x (faster at 9 of 14 points; hf-grouped_mm the best peer at 12 of 14)":
    the range of targets.versus_peers' ratios over one family."""
    if versus.empty:
        return ""
    ours = set(versus["ours"])
    ours = ours.pop() if len(ours) == 1 else "moebench's fastest"
    ratio, n = versus["vs_best_peer"], len(versus)
    peers = versus["peer"].value_counts()
    return (f"{ours} {_range(ratio)} (faster at {(ratio > 1).sum()} of {n} points; "
            f"{peers.index[0]} the best peer at {peers.iloc[0]} of {n})")  # fmt: skip


def _ep_range(part: pd.DataFrame, value: str, fmt: str) -> str:
    """Per world size, the range of `value` over E, skews and impls, and where it peaks:
    "W=2 35-60% (most at E=64 hot:0.5)"."""
    ok = _ok(part)
    out = []
    for world, group in ok.groupby("world"):
        top = group.loc[group[value].idxmax()]
        span = f"{fmt.format(group[value].min())}-{fmt.format(group[value].max())}"
        out.append(f"W={int(world)} {span} (most at E={top['E']} {top['skew']})")
    return "; ".join(out)


def _versus_unquantized(frame: pd.DataFrame) -> str:
    """The quant family's line "vs dtype": per format, quant_impl's speed against the same
    layer unquantized, in the run's dtype (balanced routing, the range over the points),
    the bytes it reads relative to it (the median) and the quantization's error: "int4
    (sorted): 0.41-0.93x the speed, 0.62x the bytes, quant err 0.15-0.2"."""
    impl = quant_impl(frame)
    both = versus_unquantized(_ok(frame, "balanced"))
    both = both[(both["impl"] == impl) & both["base_ms"].notna()]
    parts = []
    for fmt in QUANTS:
        rows = both[both["quant"] == fmt]
        if rows.empty:
            continue
        ratio = (pd.to_numeric(rows["min_bytes"]) / pd.to_numeric(rows["base_bytes"])).median()
        err = pd.to_numeric(rows["quant_err"]).dropna()
        text = f"{fmt} ({impl}): {_range(rows['speedup'])} the speed, {ratio:.2f}x the bytes"
        if len(err):
            lo, hi = f"{err.min():.2g}", f"{err.max():.2g}"
            text += f", quant err {lo if lo == hi else f'{lo}-{hi}'}"
        parts.append(text)
    return "; ".join(parts)


def _worst_skew(part: pd.DataFrame) -> str:
    """The skew with the largest overhead, and each impl's largest overhead under it."""
    skewed = _ok(part)
    skewed = skewed[(skewed["skew"] != "balanced") & skewed["imbalance_overhead"].notna()]
    if skewed.empty:
        return ""
    skew = skewed.loc[skewed["imbalance_overhead"].astype(float).idxmax(), "skew"]
    under = skewed[skewed["skew"] == skew]
    worst = under.loc[under.groupby("impl")["imbalance_overhead"].idxmax()]
    worst = worst.sort_values("impl", key=lambda s: s.map(impl_rank))
    return f"{skew}: " + ", ".join(
        f"{r.impl} {r.imbalance_overhead:.2f}x" for r in worst.itertuples()
    )


def _padded(part: pd.DataFrame, order: list[str]) -> str:
    """The largest fraction of pairs padded drops under each skew, and where it ran out of
    memory."""
    padded = part[part["impl"] == "padded"]
    drops = _ok(padded)
    drops = drops[drops["dropped_fraction"].astype(float) > 0]
    said = []
    for skew in [s for s in grid.SKEWS if s in set(drops["skew"])]:
        worst = drops[drops["skew"] == skew]["dropped_fraction"].astype(float).max()
        said.append(f"{skew} {worst:.0%}" if worst >= 0.005 else f"{skew} <1%")
    out = f"drops up to {', '.join(said)} of pairs" if said else ""
    oom = padded[padded["reason"].fillna("").str.startswith("out of memory")]
    if len(oom):
        labels = [lb for lb in order if lb in set(oom["label"])]
        out += ("; " if out else "") + f"out of memory at {', '.join(labels)}"
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return ""


def _peaks(part: pd.DataFrame) -> str:
    """Each impl's largest peak (memory above inputs and weights) over the family."""
    ok = _ok(part)
    ok = ok[ok["peak_bytes"].notna()]
    if ok.empty:
        return ""
    peak = ok.loc[ok.groupby("impl")["peak_bytes"].idxmax()]
    peak = peak.sort_values("impl", key=lambda s: s.map(impl_rank))
    return ", ".join(f"{r.impl} {_size(r.peak_bytes)} ({r.label})" for r in peak.itertuples())


def _skipped(frame: pd.DataFrame) -> str:
    """Per moebench layer: how many records were skipped, and the commonest reason. Peers
    and plug-ins, many of which cannot run on a given machine, only by the kind of their
    commonest reason ("unavailable", "unsupported"), those alike in one group; summary.md
    says why."""
    said, others = [], {}
    for impl, rows in frame[frame["status"] != "ok"].groupby("impl", sort=False):
        reasons = rows["reason"].value_counts()
        total = (frame["impl"] == impl).sum()
        if registry.kind(impl) == "own":
            other = f" and {len(reasons) - 1} other reasons" if len(reasons) > 1 else ""
            said.append(f"{impl} {len(rows)} of {total} ({reasons.index[0]}{other})")
        else:
            kind = reasons.index[0].split(":")[0]
            others.setdefault((len(rows), total, kind), []).append(impl)
    for (count, total, kind), impls in others.items():
        each = " each" if len(impls) > 1 else ""
        said.append(f"{', '.join(impls)} {count} of {total}{each} ({kind})")
    return "; ".join(said) + ("; why: summary.md" if others else "")
