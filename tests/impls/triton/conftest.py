import contextlib

import pytest

from moebench.impls.triton import configs


@pytest.fixture(params=["decode", "prefill"])
def path(request):
    """Run the test on one path, whatever its token count (DECODE_MAX_TOKENS moved)."""
    limit = 1 << 30 if request.param == "decode" else 0
    with configs.set_knobs(DECODE_MAX_TOKENS=limit):
        yield request.param


@pytest.fixture
def knobs():
    """knobs(**values): change the layer's knobs (configs.set_knobs) until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **values: stack.enter_context(configs.set_knobs(**values))


@pytest.fixture
def forced():
    """forced(kernel, configs, path=None, tma=None): have the kernel's tuners offer only
    these configs (configs.force_configs) until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda *args, **kwargs: stack.enter_context(configs.force_configs(*args, **kwargs))
