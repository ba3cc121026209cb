"""The triton layer's direct launches (launch._run) against triton's own, on a stub libcuda.

Run by tests/test_launch.py in a process of its own (TRITON_INTERPRET=0, the stub on the
library path): triton compiles for sm_90 and its real launchers run, doing nothing on the
stub; CPU tensors stand for GPU ones. For each case, every launch of a call made through
triton's JITFunction.run must reach the launcher with the same arguments as the same
launch made straight (launch._run, once the kernel is compiled), and a call after the
first two must make no JITFunction.run at all. Prints one line per case.
"""

import dataclasses
import sys

import torch
import triton.runtime.autotuner as autotuner
import triton.runtime.jit as jit
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime import driver

import moebench as mb
import moebench.impls.triton as triton_layer
from moebench import registry
from moebench.impls.triton import launch

LAUNCHES = []  # (grid, stream, function, packed metadata, arguments) of each launch
RUNS = []  # JITFunction.run calls


def normal(arg):
    """A launcher argument as compared: tensors by what the kernel sees of them."""
    if isinstance(arg, torch.Tensor):
        return "tensor", arg.dtype, tuple(arg.shape), arg.stride(), arg.data_ptr() % 16
    if type(arg).__name__ == "TensorDescriptor":
        return "descriptor", tuple(arg.shape), tuple(arg.strides), tuple(arg.block_shape)
    return arg


class Hopper(CudaDriver):
    """triton's CUDA driver on the stub: device 0, stream 0, sm_90; launches recorded."""

    def __init__(self):
        super().__init__()
        self.get_current_device = lambda: 0
        self.get_current_stream = lambda device=None: 0
        self.set_current_device = lambda device: None
        self.get_device_capability = lambda device=None: (9, 0)

        class Recording(self.launcher_cls):
            # metadata and hooks (positions 6-8) are not compared: run passes its hook
            # chains (empty) and their metadata, the direct launch None.
            def __call__(self, gx, gy, gz, stream, function, packed, metadata, enter, exit_,
                         *args):  # fmt: skip
                LAUNCHES.append(((gx, gy, gz), stream, function, packed, list(map(normal, args))))
                return super().__call__(gx, gy, gz, stream, function, packed, metadata, enter,
                                        exit_, *args)  # fmt: skip

        self.launcher_cls = Recording

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def pick_last(self, *args, **kwargs):
    """Autotuner.run with no timing and no launch: the last config left after pruning (the
    TMA ones, where offered)."""
    self.nargs = dict(zip(self.arg_names, args, strict=False))  # positional ones only
    configs = self.prune_configs(kwargs) if self.early_config_prune else self.configs
    self.best_config = configs[-1]
    self.nargs = None


class NeverCompiled(dict):
    def get(self, key, default=None):
        return default

    def __setitem__(self, key, value):
        pass


def check(name, T, D, F, E, K, skew):
    cfg = mb.MoEConfig(name=name, d_model=D, d_ff=F, num_experts=E, top_k=K)
    w = mb.ExpertWeights(torch.empty(E, 2 * F, D, dtype=torch.bfloat16),
                         torch.empty(E, D, F, dtype=torch.bfloat16))  # fmt: skip
    routing = mb.make_routing(T, cfg, skew)
    x = torch.zeros(T, D, dtype=torch.bfloat16)
    stats = {}
    call = lambda: mb.moe_forward(x, routing, w, impl="triton", check=False, stats=stats)

    def recorded():
        LAUNCHES.clear()
        RUNS.clear()
        call()
        return list(LAUNCHES), len(RUNS)

    call()  # tunes (pick_last)
    compiled, launch._COMPILED = launch._COMPILED, NeverCompiled()
    through_run, runs = recorded()
    launch._COMPILED = compiled
    call()
    direct, direct_runs = recorded()
    assert runs == len(through_run) > 0, (runs, len(through_run))
    assert direct_runs == 0, f"{direct_runs} launches still went through JITFunction.run"
    assert len(direct) == len(through_run), (len(direct), len(through_run))
    for i, (a, b) in enumerate(zip(through_run, direct, strict=True)):
        assert a == b, f"launch {i}:\n  run:    {a}\n  direct: {b}"
    tiles = f"tiles {stats['block_m']}" + (f" + {stats['big_m']}" if stats["big_m"] else "")
    descriptors = sum(a[0] == "descriptor" for *_, args in direct for a in args if type(a) is tuple)
    persistent = sorted(k for k, c in stats["config"].items() if c.get("PERSISTENT"))
    print(f"{name}: {len(direct)} launches, the same arguments ({stats['path']}, {tiles}, "
          f"{descriptors} TMA descriptors, persistent: {' '.join(persistent) or '-'})")  # fmt: skip


def use_stub():
    """Launch the triton layer on the stub: triton's CUDA driver, sm_90 with an H100's SMs,
    CPU tensors standing for GPU ones."""
    driver.set_active(Hopper())
    triton_layer.check_runnable = lambda x_TD: None
    triton = registry.get("triton")  # it takes CPU tensors here: they stand for GPU ones
    registry._REGISTRY["triton"] = dataclasses.replace(triton, devices=("cuda", "cpu"))
    launch._RESIDENT[torch.device("cpu")] = (132 * launch._BLOCKS_PER_SM, 132)


def main():
    use_stub()
    autotuner.Autotuner.run = pick_last
    run = jit.JITFunction.run

    def counted(self, *args, **kwargs):
        RUNS.append(self)
        return run(self, *args, **kwargs)

    jit.JITFunction.run = counted
    check("decode-1", T=1, D=128, F=64, E=16, K=4, skew="random")
    check("decode-8", T=8, D=128, F=64, E=16, K=4, skew="random")
    # BLOCK_M 64 with 128-row tiles beside: TMA descriptors and the persistent configs
    # (pick_last; F wide enough for their blocks) in the tuned section
    check("prefill", T=256, D=128, F=128, E=8, K=2, skew="hot:0.5")


if __name__ == "__main__":
    sys.exit(main())
