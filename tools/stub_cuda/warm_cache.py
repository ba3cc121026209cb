"""Compile here every Triton kernel that the GPU sweep's triton layer will, so that a GPU
machine starts the sweep with a warm cache (its device time is what the lent machines lack).

    TRITON_INTERPRET=0 TRITON_LIBCUDA_PATH=DIR LD_LIBRARY_PATH=DIR TRITON_CACHE_DIR=/tmp/tcache \\
        python tools/stub_cuda/warm_cache.py [--profile gpu] [--families ...] [--for-wheel WHL]

DIR holds the stub libcuda.so.1 built from libcuda.c beside this file. The triton layer's
forward runs at every point and skew of the profile's families as launch_check.py runs it
(sm_90, CPU tensors standing for GPU ones, launches that do nothing), its forward tuners
launching every candidate untimed: triton compiles the kernels, specializations included,
that the sweep's calls and tuning compile. A second call at each point launches straight.
Exits 1 if any point fails: it doubles as a dry run of the sweep's launches.

The cache names its files by absolute path: the GPU machine must use the same
TRITON_CACHE_DIR. Triton keys an entry on its own build (the hash of its sources and of
libtriton.so); --for-wheel keys the entries for another build of the same version, such
as the Python 3.12 wheel of the GPU machine's python3 (this machine has 3.11): the Python
sources are the same in every wheel of a version, and so is the code they compile.
"""

import argparse
import hashlib
import os
import sys
import zipfile

import torch
import triton
import triton.runtime.cache as triton_cache
from launch_check import LAUNCHES, use_stub

import moebench as mb
from moebench.bench import grid
from moebench.impls.triton import configs

TARGET_FAMILIES = "sonicmoe,models,scale-out,iso-params"  # the targets session's


def key_for_wheel(path):
    """triton_key() as the build in wheel `path` computes it (same version as this one)."""
    here = os.path.join(os.path.dirname(triton.__file__), "_C", "libtriton.so")
    with open(here, "rb") as f:
        mine = hashlib.sha256(f.read()).hexdigest()
    with zipfile.ZipFile(path) as whl:
        names = whl.namelist()
        version = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        if version != f"triton-{triton.__version__}.dist-info":
            raise SystemExit(f"{path} holds {version}; this is triton {triton.__version__}")
        theirs = hashlib.sha256(whl.read("triton/_C/libtriton.so")).hexdigest()
    key = triton_cache.triton_key()
    if key.count(mine) != 1:
        raise SystemExit("this triton's key does not hold its libtriton.so's hash once")
    return key.replace(mine, theirs)


def compiled(cache):
    """The kernels in a Triton cache (its other entries are launchers, built per machine)."""
    if not os.path.isdir(cache):
        return 0
    return sum(any(f.endswith(".cubin") for f in os.listdir(os.path.join(cache, d)))
               for d in os.listdir(cache))  # fmt: skip


def untimed(kernel_call, quantiles):
    """A tuner's benchmark: one launch (which compiles the candidate), no timing."""
    kernel_call()
    return [1.0] * len(quantiles) if quantiles else 1.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="gpu", choices=list(grid.PROFILES))
    parser.add_argument("--families", default=TARGET_FAMILIES)
    parser.add_argument("--for-wheel", metavar="WHL", help="key the cache for this triton wheel")
    args = parser.parse_args(argv)
    families = args.families.split(",")
    if unknown := sorted(set(families) - set(grid.FAMILIES)):
        parser.error(f"unknown families {unknown}; known: {', '.join(grid.FAMILIES)}")
    cache = os.environ.get("TRITON_CACHE_DIR")
    if not cache or configs.INTERPRET:
        parser.error("set TRITON_CACHE_DIR (the GPU machine's path) and TRITON_INTERPRET=0")
    if args.for_wheel:
        key = key_for_wheel(args.for_wheel)
        triton_cache.triton_key = lambda: key
    use_stub()
    with configs.tuning_bench(untimed):
        return warm(cache, grid.get_profile(args.profile), families)


def warm(cache, profile, families):
    """Run the triton layer at every point and skew of the families; 1 if any failed."""
    before = compiled(cache)
    dtype = getattr(torch, profile.dtype)
    failed = 0
    for family in families:
        for point in grid.points(family, profile):
            E, D, F = point.cfg.num_experts, point.cfg.d_model, point.cfg.d_ff
            # Never touched: the launches do nothing (the shared expert is torch's, left out).
            weights = mb.ExpertWeights(torch.empty(E, 2 * F, D, dtype=dtype),
                                       torch.empty(E, D, F, dtype=dtype))  # fmt: skip
            x = torch.zeros(point.T, D, dtype=dtype)
            for skew in grid.SKEWS:
                routing = mb.make_routing(point.T, point.cfg, skew)
                try:
                    for _ in range(2):
                        mb.moe_forward(x, routing, weights, impl="triton", check=False)
                except Exception as e:
                    failed += 1
                    print(f"FAILED {family} {point.label} {skew}: {type(e).__name__}: {e}")
                LAUNCHES.clear()
            print(f"{family} {point.label}: {compiled(cache) - before} compiled", flush=True)
    print(f"{compiled(cache)} kernels in {cache}, {compiled(cache) - before} new")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
