"""What fills a record besides its timing: the layer's stats and the tuned-kernel labels."""

import torch

from moebench.bench import records


def test_tuned_kernels_are_labelled():
    config = {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3}
    down = {**config, "TMA": True, "PERSISTENT": True}
    stats = {"path": "prefill", "block_m": 64, "big_m": 0, "tile_slots": 9, "combine": "pairs",
             "config": {"gate_up": config, "down": down}}  # fmt: skip
    assert records.tuned_kernels(stats) == {
        "path": "prefill", "tiles": 64, "gate_up": "64x128 w4 s3",
        "down": "64x128 w4 s3 TMA persistent",
    }  # fmt: skip
    assert records.tuned_kernels({**stats, "big_m": 128})["tiles"] == "128 + 64"
    del stats["config"]  # the triton layer under autograd reports no configs
    for other in (stats, {"grouped_mm": True}, None):
        assert records.tuned_kernels(other) is None


def test_layer_stats_keep_what_json_can_hold():
    class Opaque:
        def __repr__(self):
            return "<opaque>"

    stats = {"mask": torch.ones(2), "config": {"a": (1, 2.5), "t": torch.zeros(1)}, "x": Opaque()}
    assert records.layer_stats(stats) == {"config": {"a": [1, 2.5]}, "x": "<opaque>"}
    assert records.layer_stats({}) is None
