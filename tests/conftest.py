import os

import pytest
import torch

# The Triton layer runs on the CPU under the interpreter; this must be set before triton
# is imported, which moebench only does on first use of the `triton` implementation.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _first_config_on_the_gpu():
    """On a GPU, the triton layer's autotuners take the first config their pruning keeps
    rather than compiling and timing every candidate at every test shape (the first H100
    session ran out of time at 73 % of the GPU tests). test_fused's test_every_*_config_*
    run each config; under the interpreter there is one config and no timing anyway."""
    if not torch.cuda.is_available():
        yield
        return
    from moebench import fused

    tuners = [
        *fused._GATE_UP.values(), *fused._DOWN.values(), *fused._SWIGLU_BACKWARD.values(),
        *fused._EXPERT_GRAD.values(),
    ]  # fmt: skip
    timers = [tuner._do_bench for tuner in tuners]
    for tuner in tuners:  # equal times: the tuner keeps the first config it was offered
        tuner._do_bench = lambda kernel_call, quantiles: [1.0, 1.0, 1.0]
    yield
    for tuner, timer in zip(tuners, timers, strict=True):
        tuner._do_bench = timer
