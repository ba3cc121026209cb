import os

import torch

# The Triton layer runs on the CPU under the interpreter; this must be set before triton
# is imported, which moebench only does on first use of the `triton` implementation.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
