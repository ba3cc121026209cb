"""`moebench` (and `python -m moebench`): every command of the benchmark.

    moebench bench [--profile gpu|cpu|tiny] [--families ...]   # the main job, an answer
    moebench compare --preset qwen3-235b-a22b --tokens 64 --impls naive,sorted
    moebench compare --preset mixtral-8x7b --tokens 1,64 --quant none,int4,fp8-block
    moebench sweep [--profile gpu|cpu|tiny] [--families ...]   # a profile's run file
    moebench report [RUN.json ...] [--html]                    # tables, plots, web report
    moebench targets RUN.json [--kernels N]                    # the triton layer's targets
    moebench ep [--world-size 2,4] [--experts 8,64]            # expert parallel (or torchrun)
    moebench project RUN.json [--worlds 8,...,1024]            # its all-to-alls, projected
    moebench gate BASELINE CANDIDATE                           # gate two runs
    moebench regress [--baseline REV|RUN.json]                 # measure both sides, gate
    moebench check-impl MODULE:FUNCTION                        # the conformance kit
    moebench where [--profile NAME]                            # "<profile> <machine>"

`compare` is the default: `moebench --preset mixtral-8x7b` compares too. Exit codes, for
every command: 0 ok, 1 a verdict or a step failed (a regression; asv in `bench`), 2 bad
input or runs that cannot be compared (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import sys
from pathlib import Path

import torch

from . import registry
from .bench import grid, profiling, sweep
from .bench.environment import environment, machine_name
from .bench.gate import EXIT_INCOMPARABLE, EXIT_PASS, EXIT_REGRESSION, FDR, RULE, Incomparable, gate
from .bench.records import tuned_kernels
from .bench.roofline import quant_expert_bytes
from .bench.runs import BadRun, load_run, write_atomic, write_run
from .bench.timing import make_timer
from .config import PRESETS, MoEConfig, preset, torch_dtype
from .quant import QUANTS
from .routing import make_routing

EXIT_OK, EXIT_VERDICT, EXIT_BAD_INPUT = EXIT_PASS, EXIT_REGRESSION, EXIT_INCOMPARABLE

COLUMNS = (
    ("T", "T", "{}"),
    ("quant", "weights", "{}"),  # the dtype, or the quantized format
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
    ("quant_err", "quant err", "{:.1e}"),
)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage block: the message names the bad value and the valid ones.
        print(f"moebench: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _fail(message: str) -> int:
    print(f"moebench: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


# --- argument types, shared by every command ---------------------------------------------


def count(least: int):
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


positive_int = count(1)


def non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0 (float alone would take "nan" and "-1")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def comma_list(text: str) -> list[str]:
    """An argparse type: comma-separated words, blanks dropped."""
    return [v.strip() for v in text.split(",") if v.strip()]


def choices(known, what: str = "value"):
    """An argparse type: a non-empty comma-separated list of `known` words."""

    def parse(text: str) -> list[str]:
        values = comma_list(text)
        if not values:
            raise argparse.ArgumentTypeError(f"an empty list; known: {', '.join(known)}")
        bad = [v for v in values if v not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad}; known: {', '.join(known)}")
        return values

    return parse


def impl_list(text: str) -> list[str]:
    """An argparse type: registered impl names or module:function, comma-separated."""
    values = comma_list(text)
    if not values:
        raise argparse.ArgumentTypeError(f"an empty list; known: {', '.join(registry.names())}")
    for value in values:
        try:
            registry.get(value)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return values


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1."""
    try:
        values = [int(v) for v in comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _family_names() -> tuple[str, ...]:
    return (*grid.FAMILIES, *(f + grid.TRAIN for f in grid.FAMILIES), grid.QUANT, grid.EP)


# --- compare: one shape, a table ----------------------------------------------------------


def _compare_args(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--tokens", type=positive_ints, default=[4096], help="T, comma-separated")
    p.add_argument("--impls", type=impl_list, default=None, help="(all registered)")
    p.add_argument("--skews", type=comma_list, default=["balanced"], help="(balanced)")
    p.add_argument("--device", default=None, help="cuda where available, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 on cuda, fp32 on cpu")
    p.add_argument("--repeats", type=count(1), help="timed calls (profile default)")
    p.add_argument("--warmup", type=count(0), help="untimed calls first")
    p.add_argument("--threads", type=count(1), help="torch CPU threads (cpu: 1)")
    p.add_argument("--check", action="store_true", help="also compare with the fp64 oracle")
    p.add_argument(
        "--quant",
        type=comma_list,
        default=["none"],
        help=f"the experts' weights: none (the dtype's) or {', '.join(QUANTS)} (none)",
    )
    p.add_argument("--block", type=count(1), default=128, help="the formats' block size (128)")
    p.add_argument("--flush-l2", action="store_true", help="cold L2 before each call (cuda)")
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA graph replays")
    p.add_argument("--json", metavar="PATH", help="also write the records as a run file")
    p.add_argument(
        "--kernels",
        type=count(0),
        default=0,
        metavar="N",
        help="also list the N kernels (ops on the CPU) that take most of a call (torch.profiler), "
        "and on a GPU the N functions that take most of its host time (cProfile)",
    )


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


def _validate(args, p, cfg: MoEConfig, profile: grid.Profile) -> None:
    if not args.skews:
        p.error("--skews is empty")
    for skew in args.skews:
        make_routing(1, cfg, skew=skew)  # a ValueError names a bad skew
    for fmt in args.quant:  # a ValueError names a bad format or a block that does not divide
        if fmt != "none":
            quant_expert_bytes(cfg, fmt, args.block, torch_dtype(profile.dtype))
    if (args.flush_l2 or args.cuda_graph) and torch.device(profile.device).type != "cuda":
        p.error("--flush-l2 and --cuda-graph need a CUDA device")
    if args.json and (Path(args.json).is_dir() or not _writable_folder(Path(args.json).parent)):
        p.error(f"--json {args.json}: cannot write a file there")


def _writable_folder(folder: Path) -> bool:
    """Whether a file can be made in `folder`, or in the folders write_run would create."""
    while not folder.exists():
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK)


def format_table(records: list[dict]) -> str:
    """Aligned text: one row per record; a skipped record shows its reason. The quant err
    column only where a record has one (quantized weights, checked)."""
    quantized = any(r.get("quant_err") is not None for r in records)
    columns = [c for c in COLUMNS if quantized or c[0] != "quant_err"]
    header = [title for _, title, _ in columns]
    rows = []
    for r in records:
        weights = r["quant"] or r["dtype"]
        if r["status"] != "ok":
            rows.append([str(r["T"]), weights, r["impl"], r["skew"], f"skipped: {r['reason']}"])
            continue
        row = []
        for key, _, fmt in columns:
            value = weights if key == "quant" else r[key]
            if key == "peak_bytes" and value is not None:
                value = value / 2**20
            row.append("-" if value is None else fmt.format(value))
        rows.append(row)
    full = [row for row in rows if len(row) == len(header)]
    widths = [max([len(h), *(len(row[i]) for row in full)]) for i, h in enumerate(header)]

    def line(values):
        return "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=False))

    lines = [line(header)]
    # A skipped record: its first four columns, then the reason across the rest.
    lines += [line(row) if row in full else f"{line(row[:4])}  {row[4]}" for row in rows]
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
        kernels = tuned_kernels(r["layer_stats"])
        if kernels:
            print("  tuned: " + ", ".join(f"{k} {v}" for k, v in kernels.items()))
        point = by_label[r["label"]]
        try:
            rows = profiling.op_breakdown(point, r["impl"], r["skew"], profile=profile)
        except Exception as e:  # the table above stands; say why there is no breakdown
            print(f"  no breakdown: {type(e).__name__}: {e}")
            continue
        print(profiling.format_breakdown(rows, args.kernels))


def compare(args, p) -> int:
    try:
        cfg = _config(args, p)
        profile = grid.device_profile(args.device or _default_device(), args.dtype, args.threads)
        _validate(args, p, cfg, profile)
        timer = make_timer(profile.device, flush_l2=args.flush_l2, cuda_graph=args.cuda_graph)
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    name = args.preset or "custom"
    profile = dataclasses.replace(profile, quant_block=args.block)
    points = [
        grid.Point("cli", f"{name}/T={T}" + ("" if q == "none" else f"/{q}"), cfg, T,
                   quant=None if q == "none" else q)
        for T in args.tokens
        for q in args.quant
    ]  # fmt: skip
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
        print(f"wrote {write_run(args.json, env, records)}", file=sys.stderr)
    return EXIT_OK


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- sweep: a whole profile -----------------------------------------------------------------


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=grid.SWEEP_PROFILES, default=None)
    p.add_argument("--output", help="run file (default results/<profile>-<machine>/...)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--families", type=choices(_family_names(), "family"), default=None)
    p.add_argument(
        "--impls", type=impl_list, default=None, help="(all registered but the profile's leave_out)"
    )
    p.add_argument("--skews", type=choices(grid.SKEWS, "skew"), default=list(grid.SKEWS))
    p.add_argument("--no-check", action="store_true", help="skip the float64 check")
    p.add_argument("--flush-l2", action="store_true", help="cold L2 before each call")
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA graph replays")


def _sweep_options(args, p) -> dict:
    if args.output and Path(args.output).is_dir():
        p.error(f"--output {args.output} is a folder; give the run file's path")
    return {
        "families": args.families,
        "impls": args.impls,
        "skews": args.skews,
        "check": not args.no_check,
        "flush_l2": args.flush_l2,
        "cuda_graph": args.cuda_graph,
    }


def run_sweep(args, p) -> int:
    from .parallel import init_from_env

    init_from_env(grid.get_profile(args.profile).device)  # torchrun: a share of the grid each
    path = sweep.run_profile(
        args.profile,
        output=args.output,
        results_dir=args.results_dir,
        progress=sweep.Progress(),
        **_sweep_options(args, p),
    )
    print(path)
    return EXIT_OK


def _bench_args(p: argparse.ArgumentParser) -> None:
    _sweep_args(p)
    _asv_config_arg(p)
    p.add_argument("--asv-dir", help="asv's results and web report here, not the config's")
    p.add_argument("--no-asv", action="store_true", help="sweep and report only")


def run_bench(args, p) -> int:
    from .bench.job import main_job  # matplotlib and asv: for this command only

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("bench runs in one process; under torchrun, run `moebench sweep` (then report)")
    if not args.no_asv and not Path(args.asv_config).is_file():
        p.error(
            f"--asv-config {args.asv_config}: no such file (run from the checkout, or --no-asv)"
        )
    return main_job(
        args.profile,
        results_dir=args.results_dir,
        output=args.output,
        asv_config=None if args.no_asv else args.asv_config,
        asv_dir=args.asv_dir,
        sweep_options=_sweep_options(args, p),
    )


# --- ep: the expert-parallel family ----------------------------------------------------------


def _ep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=grid.SWEEP_PROFILES, default=None)
    p.add_argument(
        "--world-size", type=positive_ints, help="ranks to spawn (the profile's; torchrun's)"
    )
    p.add_argument("--experts", type=positive_ints, help="E values (the profile's)")
    p.add_argument("--impls", type=impl_list, default=None, help="local experts' (the profile's)")
    p.add_argument("--skews", type=choices(grid.SKEWS, "skew"), default=list(grid.SKEWS))
    p.add_argument("--output", help="run file (default results/<profile>-<machine>/...)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--no-check", action="store_true", help="skip the float64 check")


def run_ep(args, p) -> int:
    """The ep family alone: spawns each world size's ranks, or runs as torchrun's ranks."""
    import torch.distributed as dist

    from .bench import ep
    from .parallel import init_from_env

    profile = grid.get_profile(args.profile)
    worlds = tuple(args.world_size or profile.ep_worlds)
    if init_from_env(profile.device):
        launched = dist.get_world_size()
        if args.world_size and worlds != (launched,):
            p.error(f"--world-size {args.world_size}: torchrun started {launched} ranks")
        worlds = (launched,)
    for world in worlds:
        reason = ep.launch_reason(profile, world)
        if reason and not dist.is_initialized():
            p.error(f"--world-size {world}: {reason.removeprefix('unsupported: ')}")
    experts = tuple(args.experts or profile.ep_experts)
    too_few = [(w, e) for w in worlds for e in experts if e < w]
    if too_few:
        p.error(f"E={too_few[0][1]} experts over {too_few[0][0]} ranks: at least one each")
    profile = dataclasses.replace(profile, ep_worlds=worlds, ep_experts=experts)
    first = not dist.is_initialized() or dist.get_rank() == 0
    path = sweep.run_profile(
        profile,
        output=args.output,
        results_dir=args.results_dir,
        families=[grid.EP],
        impls=args.impls,
        skews=args.skews,
        check=not args.no_check,
        progress=sweep.Progress() if first else None,
    )
    if first:
        _, frame = load_run(path)
        print(ep.markdown(frame.to_dict("records")))
        print(path)
    return EXIT_OK


# --- gate and regress -------------------------------------------------------------------------


def fdr(text: str) -> float:
    """An argparse type: a false discovery rate, 0 < q < 1."""
    value = non_negative(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a rate between 0 and 1, got {text!r}")
    return value


def _rule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threshold",
        type=non_negative,
        help="least slowdown of an implementation or family that fails (default: 0.05 on "
        "the CPU gate, 0.02 on a GPU)",
    )
    p.add_argument(
        "--point-threshold",
        type=non_negative,
        help="least slowdown of one point alone that fails (default: 0.2 CPU, 0.05 GPU)",
    )
    p.add_argument(
        "--fdr",
        type=fdr,
        default=FDR,
        help=f"false discovery rate over all the gate's tests (default {FDR})",
    )
    p.add_argument("--allow-missing", action="store_true", help="gate the points ok on both sides")


def _gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("baseline", help="run file, or a directory of rounds of one code")
    p.add_argument("candidate", help="run file, or a directory of rounds of one code")
    _rule_args(p)


def run_gate(args, p) -> int:
    return gate(args.baseline, args.candidate, **{k: getattr(args, k) for k in RULE})


def _regress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--baseline", help="git revision, or run file or directory (default: merge base with main)"
    )
    p.add_argument("--rounds", type=positive_int, help="runs per side, taking turns")
    p.add_argument("--profile", choices=list(grid.PROFILES), help='"gate" (CPU) or "gpu"')
    p.add_argument("--families", type=choices(_family_names(), "family"), help="(the profile's)")
    p.add_argument("--impls", type=impl_list, help="(moebench's own)")
    p.add_argument("--output", help="keep the runs in this directory")
    p.add_argument(
        "--micro", action="store_true", help="gate the micro-benchmarks (tests/test_microbench.py)"
    )
    _rule_args(p)


def run_regress(args, p) -> int:
    from .bench.regress import regress  # git and subprocesses: loaded for this command only

    return regress(args)


# --- report and targets -----------------------------------------------------------------------


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", help="run files (default: newest in each folder)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--html", action="store_true", help="also asv's web report, readable offline")
    _asv_config_arg(p)


def _asv_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asv-config", default="asv.conf.json", help="(default: %(default)s)")


def run_report(args, p) -> int:
    from .bench.report import latest_runs, write_report  # matplotlib: for this command only

    if args.html and not Path(args.asv_config).is_file():
        return _fail(f"--asv-config {args.asv_config}: no such asv config")
    # With --html, the web report of asv's results stands on its own.
    runs = [Path(run) for run in args.runs]
    if not runs and Path(args.results_dir).is_dir():
        runs = latest_runs(args.results_dir)
    elif not runs and not args.html:
        return _fail(f"{args.results_dir}: no such folder")
    if not runs and not args.html:
        return _fail(f"no run files under {args.results_dir}/; run `nox -s bench`")
    folders: dict[Path, Path] = {}
    for run in runs:
        # A folder holds one summary: the second run's would overwrite the first's.
        first = folders.setdefault(run.resolve().parent, run)
        if first.resolve() != run.resolve():
            return _fail(
                f"{first.name} and {run.name} are both in {run.parent}/, which holds one "
                "summary: report one of them"
            )
    for run in runs:
        for path in write_report(run):
            print(path)
    if args.html:
        return _publish(args.asv_config)
    return EXIT_OK


def _publish(config) -> int:
    from .bench import asv

    if not Path(asv.read_config(config)["results_dir"]).is_dir():
        return _fail(f"{config}: no asv results yet; run `moebench bench` first")
    log = io.StringIO()  # asv's output, shown when it fails
    try:
        print(asv.publish(config, log))
    except Exception as e:
        sys.stderr.write(log.getvalue())
        return _fail(f"the web report: {e}")
    return EXIT_OK


def _targets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run file written by `moebench sweep`")
    p.add_argument(
        "--kernels",
        type=count(0),
        default=0,
        metavar="N",
        help="rerun each missed target's worst point and median miss; list the N largest "
        "kernels and host functions there",
    )


def breakdowns(env: dict, frame, top: int) -> str:
    """Where the triton layer's call goes at the points targets.reruns names: each rerun
    here on the run's profile (which needs its device) under torch.profiler (and, on a GPU,
    cProfile for the host's time), with the configs the run tuned there."""
    from .bench import targets

    reruns = targets.reruns(env, frame)
    if not reruns:
        return "No target missed: no point to rerun.\n"
    profile = env.get("profile")
    lines = [f"Where the triton layer's time goes at the worst point and the median miss of "
             f"each missed target (profile {profile}, torch.profiler over 10 calls):"]  # fmt: skip
    tri = frame[(frame["impl"] == "triton") & (frame["status"] == "ok")]
    for (family, label, skew), roles in reruns.items():
        said = "; ".join(f"{role} {'; '.join(names)}" for role, names in roles.items())
        lines.append(f"{family} {label} {skew}: {said}")
        record = tri[(tri["family"] == family) & (tri["label"] == label) & (tri["skew"] == skew)]
        kernels = tuned_kernels(record["layer_stats"].iloc[0]) if "layer_stats" in record else None
        if kernels:
            lines.append("  tuned in the run: " + ", ".join(f"{k} {v}" for k, v in kernels.items()))
        try:
            point = next((p for p in grid.points(family, profile) if p.label == label), None)
            if point is None:
                raise ValueError(f"profile {profile} has no point {family} {label} here")
            breakdown = profiling.op_breakdown(point, "triton", skew, profile=profile)
        except Exception as e:  # the table stands; say why this point has no breakdown
            lines.append(f"  no breakdown: {type(e).__name__}: {e}")
            continue
        lines.append(profiling.format_breakdown(breakdown, top))
    return "\n".join(lines) + "\n"


def run_targets(args, p) -> int:
    from .bench import targets

    env, frame = load_run(args.run)
    print(targets.markdown(env, frame))
    if args.kernels:
        print(breakdowns(env, frame, args.kernels))
    return EXIT_OK


# --- project: expert parallelism past this machine ----------------------------------------


def _project_args(p: argparse.ArgumentParser) -> None:
    from .bench import projection

    p.add_argument("run", help="a run file with the models family (and/or the ep family)")
    p.add_argument("--worlds", type=positive_ints, default=list(projection.WORLDS))
    p.add_argument("--gpus-per-node", type=positive_int, default=8)
    p.add_argument("--intra", choices=list(projection.LINKS), default=projection.DEFAULT_LINKS[0])
    p.add_argument("--inter", choices=list(projection.LINKS), default=projection.DEFAULT_LINKS[1])
    p.add_argument("--skew", choices=grid.SKEWS, default="zipf:1.2", help="beside balanced")
    p.add_argument("--tokens", type=positive_ints, help="decode,prefill T per GPU (the profile's)")
    p.add_argument("--impl", help="the one-GPU impl that stands for a rank (the fastest)")
    p.add_argument("--csv", help="also write every projected row here")
    p.add_argument("--links", action="store_true", help="print the link table and its sources")


def run_project(args, p) -> int:
    from .bench import projection

    if args.links:
        print(projection.links_markdown())
        return EXIT_OK
    if args.tokens is not None and len(args.tokens) != 2:
        p.error(f"--tokens {args.tokens}: give two, decode and prefill T per GPU")
    env, frame = load_run(args.run)
    options = {"worlds": args.worlds, "gpus_per_node": args.gpus_per_node,
               "links": (args.intra, args.inter), "impl": args.impl}  # fmt: skip
    try:
        print(projection.summary(env, frame, skew=args.skew, tokens=args.tokens, **options))
        if args.csv:
            rows = projection.project(frame, env["ceilings"], **options)
            write_atomic(Path(args.csv), lambda f: rows.to_csv(f, index=False))
    except ValueError as e:
        p.error(str(e))
    return EXIT_OK


# --- check-impl: the conformance kit ------------------------------------------------------


def _check_impl_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("impl", help="module:function (or a registered impl name)")
    p.add_argument("--dtypes", type=comma_list, help="(what the impl declares)")
    p.add_argument("--device", help="(cuda where available, else cpu)")
    p.add_argument(
        "--differentiable",
        action=argparse.BooleanOptionalAction,
        help="check gradients (default: what the impl declares)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="list every case")


def run_check_impl(args, p) -> int:
    """Exit 0: the impl conforms; 1: a case failed (each named); 2: bad input."""
    from .testing import check_impl

    try:
        spec = registry.get(args.impl)
        dtypes = [torch_dtype(d) for d in args.dtypes] if args.dtypes else None
        report = check_impl(spec, dtypes=dtypes, device=args.device,
                            differentiable=args.differentiable, raise_on_failure=False)  # fmt: skip
    except (ValueError, TypeError, RuntimeError) as e:  # Unavailable is a RuntimeError too
        p.error(str(e))
    if args.verbose:
        print("\n".join(str(r) for r in report.results if r.error is None))
    print(report)
    return EXIT_VERDICT if report.failed else EXIT_OK


# --- what nox asks of the package ----------------------------------------------------------


def _where_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="(default: MOEBENCH_PROFILE, else gpu with CUDA, else cpu)")


def run_where(args, p) -> int:
    """Print "<profile> <machine>": the names of this machine's results folder."""
    profile = args.profile or grid.default_profile_name()
    if profile not in grid.PROFILES:
        p.error(f"unknown profile {profile!r}; known: {', '.join(grid.PROFILES)}")
    print(profile, machine_name())
    return EXIT_OK


COMMANDS = {
    "bench": (_bench_args, run_bench, "the main job: sweep, asv, report, and a summary"),
    "compare": (_compare_args, compare, "time implementations on one layer shape"),
    "sweep": (_sweep_args, run_sweep, "run a benchmark profile; write its run file"),
    "report": (_report_args, run_report, "tables and plots beside run files"),
    "targets": (_targets_args, run_targets, "the triton layer's targets in one run"),
    "ep": (_ep_args, run_ep, "the expert-parallel layer over W ranks (gloo or NCCL)"),
    "project": (_project_args, run_project, "expert parallelism's all-to-alls at 8-1024 GPUs"),
    "gate": (_gate_args, run_gate, "gate a candidate run against a baseline run"),
    "regress": (_regress_args, run_regress, "measure a baseline and this tree, then gate"),
    "check-impl": (_check_impl_args, run_check_impl, "run the conformance kit on an impl"),
    "where": (_where_args, run_where, 'print "<profile> <machine>"'),
}


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moebench", description=__doc__.split("\n\n")[0])
    commands = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (add_args, _, summary) in COMMANDS.items():
        command = commands.add_parser(name, help=summary, description=summary)
        add_args(command)
        command.set_defaults(parser=command)  # a command's own usage for its errors
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    if not argv:
        p.print_help(sys.stderr)
        return 2
    # Options first mean `compare`, the command's oldest form (`moebench --preset ...`).
    if argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv.insert(0, "compare")
    args = p.parse_args(argv)
    _, run, _ = COMMANDS[args.command]
    try:
        return run(args, args.parser)
    except (BadRun, Incomparable) as e:
        return _fail(str(e))
