"""The MoE layer's implementations, one module per name in `moebench.IMPLS`: `naive` (the
oracle), `padded`, `sorted` and the `triton` op folder. They share one signature and never
import one another; moebench.layer imports each on first use."""
