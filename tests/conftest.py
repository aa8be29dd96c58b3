"""Test-wide setup.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so that the Triton
kernels run on the CPU through Triton's interpreter (there is no GPU in CI).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
