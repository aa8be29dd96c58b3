"""Test-wide setup.

Without a GPU, the Triton kernels run on the CPU through Triton's interpreter: TRITON_INTERPRET
must be set before any Triton kernel module is imported (there is no GPU in CI).  With CUDA
present the compiled kernels run instead, and tests/kernels/test_bsa_cuda.py checks them.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(1)
