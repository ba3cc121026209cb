"""asv suites: every implementation over the sweep families, each point and skew.

Thin by design: `setup_cache` returns the records of one sweep run (moebench.bench.sweep
measures, with weights generated once per point); the track_ methods look their point up.
All suites share that one setup_cache (asv keys the cache by the function, and every
class inherits the same one), so the grid is measured once per `asv run`, in one fresh
process. A point the sweep skipped (out of memory, a capacity buffer too large, Triton
without CUDA) raises NotImplementedError in setup: asv shows it as skipped, with the
reason in its output.

The parameters depend on the profile, read from MOEBENCH_PROFILE when asv imports this
module (default: gpu where CUDA is available, else cpu); `nox -s bench` sets it and keeps
each profile's results under its own asv machine name, <profile>-<machine>. Importing
this module imports torch but never initializes CUDA.
"""

import pathlib

from moebench import registry
from moebench.bench import asv, grid
from moebench.bench.environment import HARNESS_VERSION

PROFILE = grid.get_profile()
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def _params(family, impls=None, skews=grid.SKEWS):
    # Every impl the profile's sweep measures: moebench's own, its peers and installed
    # plug-ins; those the run could not measure show as skipped.
    impls = impls or grid.default_impls(PROFILE)
    return [[pt.label for pt in grid.points(family, PROFILE)], list(impls), list(skews)]


class _Sweep:
    param_names = ("point", "impl", "skew")
    # What the numbers mean is fixed by the harness, not by this file's source: results
    # stay on one curve across commits until the harness version changes.
    version = HARNESS_VERSION
    family = ""
    metrics = ()

    def setup_cache(self):
        return asv.asv_records(PROFILE, RESULTS)

    setup_cache.timeout = PROFILE.timeout_s

    def setup(self, records, point, impl, skew):
        self.record = asv.asv_lookup(records, self.family, point, impl, skew, self.metrics)


class _Time(_Sweep):
    metrics = ("time_ms", "peak_bytes")

    def track_time_ms(self, records, point, impl, skew):
        return self.record["time_ms"]

    track_time_ms.unit = "ms"

    def track_peak_bytes(self, records, point, impl, skew):
        return self.record["peak_bytes"]

    track_peak_bytes.unit = "bytes"


class _Imbalance(_Sweep):
    metrics = ("imbalance_overhead",)

    def track_imbalance_overhead(self, records, point, impl, skew):
        return self.record["imbalance_overhead"]

    track_imbalance_overhead.unit = "x balanced time"


class _Replay(_Sweep):
    metrics = ("graph_ms",)

    def track_replay_time_ms(self, records, point, impl, skew):
        return self.record["graph_ms"]

    track_replay_time_ms.unit = "ms"


class _Dropped(_Sweep):
    metrics = ("dropped_fraction",)

    def track_dropped_fraction(self, records, point, impl, skew):
        return self.record["dropped_fraction"]

    track_dropped_fraction.unit = "fraction of pairs"


class _BytesRead(_Sweep):
    metrics = ("min_bytes", "time_ms")

    def track_bytes_read(self, records, point, impl, skew):
        return self.record["min_bytes"]

    track_bytes_read.unit = "bytes"

    def track_read_GBps(self, records, point, impl, skew):
        return self.record["min_bytes"] / self.record["time_ms"] / 1e6

    track_read_GBps.unit = "GB/s (bytes read / time)"


UNBALANCED = [s for s in grid.SKEWS if s != "balanced"]
# The impls that take quantized weights (the peers take none).
QUANT_IMPLS = [i for i in grid.default_impls(PROFILE) if registry.get(i).quant]


class ScaleOut(_Time):
    family = "scale-out"
    params = _params(family)


class ScaleOutImbalance(_Imbalance):
    family = "scale-out"
    params = _params(family, skews=UNBALANCED)


class ScaleOutDropped(_Dropped):
    family = "scale-out"
    params = _params(family, impls=["padded"])


class IsoParams(_Time):
    family = "iso-params"
    params = _params(family)


class IsoParamsImbalance(_Imbalance):
    family = "iso-params"
    params = _params(family, skews=UNBALANCED)


class IsoParamsDropped(_Dropped):
    family = "iso-params"
    params = _params(family, impls=["padded"])


class Models(_Time):
    family = "models"
    params = _params(family)


class ModelsImbalance(_Imbalance):
    family = "models"
    params = _params(family, skews=UNBALANCED)


class ModelsDropped(_Dropped):
    family = "models"
    params = _params(family, impls=["padded"])


class SonicMoE(_Time):
    family = "sonicmoe"
    params = _params(family)


class SonicMoEImbalance(_Imbalance):
    family = "sonicmoe"
    params = _params(family, skews=UNBALANCED)


# Quantized experts (point "deepseek-v3/T=64/int4"): time and peak memory, and the bytes
# read (min_bytes: the touched experts' values and scales) with their rate.
class Quant(_Time):
    family = grid.QUANT
    params = _params(family, impls=QUANT_IMPLS)


class QuantBytesRead(_BytesRead):
    family = grid.QUANT
    params = _params(family, impls=QUANT_IMPLS)


# Forward + backward suites, for the families the profile times that way (all on gpu,
# models on cpu): ScaleOutTrain, IsoParamsTrain, ModelsTrain, SonicMoETrain.
_CLASS_NAMES = {"scale-out": "ScaleOut", "iso-params": "IsoParams", "models": "Models",
                "sonicmoe": "SonicMoE"}  # fmt: skip
for _family in PROFILE.train_families:
    _name = _CLASS_NAMES[_family.removesuffix(grid.TRAIN)] + "Train"
    globals()[_name] = type(_name, (_Time,), {"family": _family, "params": _params(_family)})

# CUDA graph replays of the fast points of the profile's graph_impls (gpu: triton): the
# kernels' time without the host's launches. ScaleOutReplay, IsoParamsReplay, ModelsReplay.
if PROFILE.graph_impls:
    for _family in ("scale-out", "iso-params", "models"):
        _name = _CLASS_NAMES[_family] + "Replay"
        _params_replay = _params(_family, impls=PROFILE.graph_impls)
        globals()[_name] = type(_name, (_Replay,), {"family": _family, "params": _params_replay})

# The expert-parallel layer over W ranks (point "W=4/E=64"): the step (the slowest rank),
# the communication share of the straggler's time, and its compute over the mean rank's.
if PROFILE.ep_worlds:

    class ExpertParallel(_Sweep):
        family = grid.EP
        params = _params(grid.EP, impls=PROFILE.ep_impls)
        metrics = ("time_ms", "comm_share", "straggler")

        def track_step_ms(self, records, point, impl, skew):
            return self.record["time_ms"]

        track_step_ms.unit = "ms"

        def track_comm_share(self, records, point, impl, skew):
            return self.record["comm_share"]

        track_comm_share.unit = "fraction of the step"

        def track_straggler(self, records, point, impl, skew):
            return self.record["straggler"]

        track_straggler.unit = "slowest rank's experts / mean rank's"
