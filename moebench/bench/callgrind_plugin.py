"""A pytest plugin that counts the instructions of each micro-benchmark under callgrind.

Loaded by `moebench regress --micro` as `-p callgrind_plugin` (a copy on PYTHONPATH after
the measured tree, so that a baseline without it can load it too) in place of
pytest-benchmark (`-p no:benchmark`), in a pytest that valgrind runs with
`--tool=callgrind --collect-atstart=no`. Its `benchmark` fixture calls the function once
to warm up, then once more with callgrind collecting, and dumps the counts (one
callgrind.out.<n> file a benchmark, in order). At the end it writes the benchmarks' names,
in the same order, as a JSON list to $MOEBENCH_CALLGRIND_NAMES.
"""

import json
import os

import pytest
import torch

_names: list[str] = []


@pytest.fixture
def benchmark(request):
    def run(fn, *args, **kwargs):
        fn(*args, **kwargs)
        torch._C._valgrind_toggle()
        result = fn(*args, **kwargs)
        torch._C._valgrind_toggle_and_dump_stats()
        _names.append(request.node.name)
        return result

    return run


def pytest_sessionfinish(session):
    with open(os.environ["MOEBENCH_CALLGRIND_NAMES"], "w") as f:
        json.dump(_names, f)
