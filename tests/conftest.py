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
    rather than compiling and timing every candidate at every test shape (the GPU tests
    would not fit a session otherwise). tests/impls/triton's test_every_*_config_* run each
    config; under the interpreter there is one config and no timing anyway."""
    if not torch.cuda.is_available():
        yield
        return
    from moebench.impls.triton import configs

    # Equal times: each tuner keeps the first config it was offered.
    with configs.tuning_bench(lambda kernel_call, quantiles: [1.0, 1.0, 1.0]):
        yield
