"""The record schema: one record per point x skew x impl, and everything that fills in a
record apart from the timing (the sweep's): its base fields, skips and failure reasons,
the layer's statistics, the triton layer's tuned-kernel labels and the imbalance.
"""

from __future__ import annotations

import torch

from .. import registry
from . import grid
from .roofline import useful_flops

# Every record has these keys; metrics are None where a point was skipped or a metric
# does not apply. quant: the experts' weight format (the quant family), else None; rel_err
# is against the oracle of the layer's own semantics (the quantized one for quant points),
# quant_err the quantized oracle's distance from the unquantized layer's (oracle.quant_err).
RECORD_FIELDS = (
    "family", "label", "impl", "skew", "T", "D", "F", "E", "K", "Fs", "dtype", "quant",
    "status", "reason",
    "time_ms", "p20_ms", "p80_ms", "cv", "repeats", "samples_ms", "host_ms", "graph_ms",
    "graph_reason", "peak_bytes", "peak_label",
    "flops", "min_bytes", "tokens_per_s", "tflops", "roofline_fraction",
    "max_over_mean", "touched_experts", "imbalance_overhead", "dropped_fraction", "rel_err",
    "quant_err", "layer_stats",
    # the ep family (bench/ep.py)
    "world", "dispatch_ms", "local_ms", "combine_ms", "comm_share", "straggler",
    "sent_bytes", "recv_bytes", "a2a_GBps", "ranks", "group_limit",
)  # fmt: skip


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def failure(e: Exception) -> str:
    """A skipped point's reason: out of memory (the GPU's, or a CPU allocation that failed),
    unavailable (a peer's package or kernel missing here), unsupported (the layer refused
    the point), or failed (anything else)."""
    if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):
        return f"out of memory: {first_line(e)}"
    if isinstance(e, registry.Unavailable):
        return f"unavailable: {first_line(e)}"
    if isinstance(e, (ValueError, NotImplementedError)):
        return f"unsupported: {first_line(e)}"
    return f"failed: {type(e).__name__}: {first_line(e)}"


def training(family: str) -> bool:
    return family.endswith(grid.TRAIN)


def base_record(point: grid.Point, impl: str, skew: str, dtype: torch.dtype) -> dict:
    cfg = point.cfg
    record = dict.fromkeys(RECORD_FIELDS)
    record.update(
        family=point.family,
        label=point.label,
        impl=impl,
        skew=skew,
        T=point.T,
        D=cfg.d_model,
        F=cfg.d_ff,
        E=cfg.num_experts,
        K=cfg.top_k,
        Fs=cfg.d_ff_shared,
        dtype=str(dtype).removeprefix("torch."),
        quant=point.quant,
        flops=useful_flops(cfg, point.T) * (3 if training(point.family) else 1),
        status="skipped",
    )
    return record


def samples(timing) -> list[float]:
    """A Timing's repeats for a record, to the ns: the gate tests these raw times."""
    return [round(ms, 6) for ms in timing.samples_ms]


def skip(record: dict, reason: str) -> dict:
    record.update(status="skipped", reason=reason)
    for key in ("time_ms", "p20_ms", "p80_ms", "cv", "repeats", "samples_ms", "host_ms",
                "graph_ms", "peak_bytes", "tokens_per_s"):  # fmt: skip
        record[key] = None
    record.update(tflops=None, roofline_fraction=None, dropped_fraction=None, rel_err=None,
                  quant_err=None)  # fmt: skip
    return record


def count_drops(record: dict, dropped: int) -> None:
    """The padded layer's dropped pairs: their fraction of S, and their FLOPs (6*D*F each,
    three times that with the backward) taken out of the useful ones."""
    record["dropped_fraction"] = dropped / (record["T"] * record["K"])
    passes = 3 if training(record["family"]) else 1
    record["flops"] -= 6 * dropped * record["D"] * record["F"] * passes


def layer_stats(stats: dict) -> dict | None:
    """What the layer reported of its call, without tensors (the padded layer's drop
    mask): the triton layer's path, tile heights, tile slots, combine and tuned configs,
    the sorted layer's grouped_mm, the padded layer's capacity and drops."""

    def plain(value):
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items() if not torch.is_tensor(v)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)

    return plain(stats) or None


def config_label(config: dict) -> str:
    """'128x64 w8 s3 TMA persistent': BLOCK_N x BLOCK_K, warps, stages, the options set."""
    label = (
        f"{config['BLOCK_N']}x{config['BLOCK_K']} w{config['num_warps']} s{config['num_stages']}"
    )
    if config.get("TMA"):
        label += " TMA"
    if config.get("PERSISTENT"):
        label += " persistent"
    if config.get("N_BLOCKS", 1) > 1:
        label += f" {config['N_BLOCKS']} col blocks"
    return label


def tuned_kernels(layer_stats) -> dict | None:
    """From a triton record's layer_stats: its path, tile heights (rows; 'big + small' with
    two) and the gate_up and down configs, as labels; None for other records."""
    config = layer_stats.get("config") if isinstance(layer_stats, dict) else None
    if not config:
        return None
    heights = layer_stats["block_m"]
    if layer_stats["big_m"]:
        heights = f"{layer_stats['big_m']} + {heights}"
    return {"path": layer_stats["path"], "tiles": heights,
            "gate_up": config_label(config["gate_up"]),
            "down": config_label(config["down"])}  # fmt: skip


def add_imbalance(records: list[dict]) -> None:
    balanced = {
        (r["family"], r["label"], r["impl"]): r["time_ms"]
        for r in records
        if r["skew"] == "balanced" and r["status"] == "ok"
    }
    for r in records:
        base = balanced.get((r["family"], r["label"], r["impl"]))
        if r["status"] == "ok" and base:
            r["imbalance_overhead"] = r["time_ms"] / base


def unsupported(
    impl: str, family: str, device: torch.device, dtype, quant: str | None = None
) -> str | None:
    """Why `impl` is not measured at this point (with weights in format `quant`; a skip's
    reason), else None."""
    spec = registry.get(impl)
    if spec.missing():
        return f"unavailable: {spec.missing()}"
    why = spec.timeable(device) or spec.refusal(device, dtype, quant)
    if not why and training(family) and not spec.differentiable:
        why = f"{impl} is not differentiable"
    return f"unsupported: {why}" if why else None
