"""Dispatcher and build_block_index."""

import pytest
import torch

from ditaccel.attention.block_sparse import block_sparse_attention, build_block_index
from ditaccel.attention.block_sparse_torch import block_sparse_attention_torch


def test_build_block_index():
    mask = torch.tensor([[[[True, False, True], [False, False, False], [False, True, False]]]])
    count, index = build_block_index(mask)
    assert count.dtype == torch.int32 and index.dtype == torch.int32
    assert count.tolist() == [[[2, 0, 1]]]
    assert index.tolist() == [[[[0, 2], [-1, -1], [1, -1]]]]
    count, index = build_block_index(torch.zeros(1, 1, 2, 3, dtype=torch.bool))
    assert count.tolist() == [[[0, 0]]] and index.shape == (1, 1, 2, 1)


def test_build_block_index_errors():
    with pytest.raises(TypeError, match="bool tensor"):
        build_block_index(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="must be 4-D"):
        build_block_index(torch.zeros(2, 2, dtype=torch.bool))


def test_cpu_dispatch_uses_torch_path():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    count, index = build_block_index(torch.rand(1, 2, 3, 3, generator=g) < 0.5)
    out, lse = block_sparse_attention(q, k, v, count, index, block_m=16, block_n=16)
    ref_out, ref_lse = block_sparse_attention_torch(q, k, v, count, index, block_m=16, block_n=16)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
