"""`moebench` / `python -m moebench`: a quick comparison of implementations on one shape.

    moebench --preset qwen3-235b-a22b --tokens 64 --impls naive,sorted --skews balanced,zipf:1.2
    moebench --d-model 1024 --d-ff 512 --experts 256 --top-k 8 --tokens 4096

Measures with the same harness as the benchmark (sweep.run_points) and prints one row per
tokens x skew x impl. Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

from . import grid, sweep
from .config import PRESETS, MoEConfig, preset, torch_dtype
from .harness import environment, make_timer
from .layer import IMPLS
from .routing import make_routing

COLUMNS = (
    ("T", "T", "{}"),
    ("impl", "impl", "{}"),
    ("skew", "skew", "{}"),
    ("time_ms", "time ms", "{:.4g}"),
    ("cv", "cv", "{:.2f}"),
    ("host_ms", "host ms", "{:.3g}"),  # GPU: host time to issue one call, nothing queued
    ("tokens_per_s", "tokens/s", "{:.4g}"),
    ("tflops", "TFLOP/s", "{:.3g}"),
    ("roofline_fraction", "roofline", "{:.3f}"),
    ("peak_bytes", "peak MiB", "{:.4g}"),
    ("max_over_mean", "max/mean", "{:.2f}"),
    ("imbalance_overhead", "imbalance", "{:.2f}"),
    ("dropped_fraction", "dropped", "{:.3f}"),
    ("rel_err", "rel err", "{:.1e}"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage block: the message names the bad value and the valid ones.
        print(f"moebench: error: {message}", file=sys.stderr)
        sys.exit(2)


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _count(least: int):
    """An argparse type: an integer of at least `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="moebench",
        description="Time MoE layer implementations on one layer shape.",
        epilog="The full benchmark is `nox -s bench`; this is for quick comparisons.",
    )
    shape = p.add_argument_group("layer (a preset, or the four shape options)")
    shape.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    shape.add_argument("--d-model", type=int, help="D, model width")
    shape.add_argument("--d-ff", type=int, help="F, expert hidden width")
    shape.add_argument("--experts", type=int, help="E, routed experts")
    shape.add_argument("--top-k", type=int, help="K, experts per token")
    shape.add_argument("--shared-experts", type=int, default=None, help="shared experts")
    shape.add_argument(
        "--shrink", type=int, default=1, help="divide D and F by this (a preset on a laptop)"
    )
    p.add_argument("--tokens", type=_ints, default=[4096], help="T, comma-separated (4096)")
    p.add_argument("--impls", type=_list, default=list(IMPLS), help="comma-separated (all)")
    p.add_argument("--skews", type=_list, default=["balanced"], help="comma-separated (balanced)")
    p.add_argument("--device", default=None, help="cuda where available, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 on cuda, fp32 on cpu")
    p.add_argument("--repeats", type=_count(1), help="timed calls (profile default)")
    p.add_argument("--warmup", type=_count(0), help="untimed calls first")
    p.add_argument("--threads", type=_count(1), help="torch CPU threads (cpu: 1)")
    p.add_argument("--check", action="store_true", help="also compare with the fp64 oracle")
    p.add_argument("--flush-l2", action="store_true", help="cold L2 before each call (cuda)")
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA graph replays")
    p.add_argument("--json", metavar="PATH", help="also write the records as a run file")
    p.add_argument(
        "--kernels",
        type=int,
        default=0,
        metavar="N",
        help="also list the N kernels (ops on the CPU) that take most of a call (torch.profiler), "
        "and on a GPU the N functions that take most of its host time (cProfile)",
    )
    return p


def _config(args, p) -> MoEConfig:
    shape = (args.d_model, args.d_ff, args.experts, args.top_k)
    if args.preset:
        if any(v is not None for v in shape):
            p.error("give --preset or the shape options, not both")
        cfg = preset(args.preset)
        if args.shared_experts is not None:
            cfg = cfg.replace(num_shared_experts=args.shared_experts)
    else:
        if any(v is None for v in shape):
            p.error("give --preset or all of --d-model, --d-ff, --experts, --top-k")
        cfg = MoEConfig(
            d_model=args.d_model,
            d_ff=args.d_ff,
            num_experts=args.experts,
            top_k=args.top_k,
            num_shared_experts=args.shared_experts or 0,
        )
    if args.shrink < 1:
        p.error(f"--shrink must be >= 1, got {args.shrink}")
    return grid.shrink(cfg, args.shrink, cfg.dtype)


def _profile(args, p) -> grid.Profile:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type not in ("cpu", "cuda"):
        p.error(f"--device {device}: moebench measures on cpu or cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {device}: CUDA is not available here")
    base = grid.PROFILES["gpu" if torch.device(device).type == "cuda" else "cpu"]
    dtype = str(torch_dtype(args.dtype or base.dtype)).removeprefix("torch.")
    changes = {"device": device, "dtype": dtype, "name": "cli"}
    if args.threads is not None:
        changes["threads"] = args.threads
    return dataclasses.replace(base, **changes)


def _validate(args, p, cfg: MoEConfig, profile: grid.Profile) -> None:
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown or not args.impls:
        p.error(f"unknown impl {unknown}; known: {', '.join(IMPLS)}")
    if not args.skews:
        p.error("--skews is empty")
    for skew in args.skews:
        make_routing(1, cfg, skew=skew)  # a ValueError names a bad skew
    if (args.flush_l2 or args.cuda_graph) and torch.device(profile.device).type != "cuda":
        p.error("--flush-l2 and --cuda-graph need a CUDA device")
    if args.kernels < 0:
        p.error(f"--kernels must be >= 0, got {args.kernels}")
    if args.json and (Path(args.json).is_dir() or not _writable_folder(Path(args.json).parent)):
        p.error(f"--json {args.json}: cannot write a file there")


def _writable_folder(folder: Path) -> bool:
    """Whether a file can be made in `folder`, or in the folders write_run would create."""
    while not folder.exists():
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK)


def format_table(records: list[dict]) -> str:
    """Aligned text: one row per record; a skipped record shows its reason."""
    header = [title for _, title, _ in COLUMNS]
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([str(r["T"]), r["impl"], r["skew"], f"skipped: {r['reason']}"])
            continue
        row = []
        for key, _, fmt in COLUMNS:
            value = r[key]
            if key == "peak_bytes" and value is not None:
                value = value / 2**20
            row.append("-" if value is None else fmt.format(value))
        rows.append(row)
    full = [row for row in rows if len(row) == len(header)]
    widths = [max([len(h), *(len(row[i]) for row in full)]) for i, h in enumerate(header)]

    def line(values):
        return "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=False))

    lines = [line(header)]
    # A skipped record: its first three columns, then the reason across the rest.
    lines += [line(row) if row in full else f"{line(row[:3])}  {row[3]}" for row in rows]
    return "\n".join(lines)


def _print_breakdowns(points, records, args, profile) -> None:
    cuda = torch.device(profile.device).type == "cuda"
    what = "kernels' device time, then the host's" if cuda else "ops' self CPU time"
    print(f"\nWhere a call's time goes ({what}, torch.profiler over 10 calls):")
    by_label = {point.label: point for point in points}
    for r in records:
        if r["status"] != "ok":
            continue
        print(f"{r['label']} {r['skew']} {r['impl']}")
        kernels = sweep.tuned_kernels(r["layer_stats"])
        if kernels:
            print("  tuned: " + ", ".join(f"{k} {v}" for k, v in kernels.items()))
        point = by_label[r["label"]]
        try:
            rows = sweep.op_breakdown(point, r["impl"], r["skew"], profile=profile)
        except Exception as e:  # the table above stands; say why there is no breakdown
            print(f"  no breakdown: {type(e).__name__}: {e}")
            continue
        print(sweep.format_breakdown(rows, args.kernels))


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = _config(args, p)
        profile = _profile(args, p)
        _validate(args, p, cfg, profile)
        timer = make_timer(profile.device, flush_l2=args.flush_l2, cuda_graph=args.cuda_graph)
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    name = args.preset or "custom"
    points = [grid.Point("cli", f"{name}/T={T}", cfg, T) for T in args.tokens]
    records = sweep.run_points(
        points,
        args.impls,
        args.skews,
        profile=profile,
        repeats=args.repeats,
        warmup=args.warmup,
        check=args.check,
        progress=sweep.Progress(),
        timer=timer,
    )
    print(
        f"{name}: D={cfg.d_model} F={cfg.d_ff} E={cfg.num_experts} K={cfg.top_k} "
        f"Fs={cfg.d_ff_shared}, {profile.dtype} on {profile.device}, {timer.label}"
    )
    print(format_table(records))
    if args.kernels:
        _print_breakdowns(points, records, args, profile)
    if args.json:
        env = environment("cli", device=profile.device, timer=timer)
        print(f"wrote {sweep.write_run(args.json, env, records)}", file=sys.stderr)
    return 0
