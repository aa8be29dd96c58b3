"""Reference attention helpers: dense, explicit block mask, LSE merge."""

import math

import pytest
import torch
import torch.nn.functional as F

from ditaccel.attention.reference import (
    block_sparse_mask,
    dense_attention,
    masked_attention,
    merge_attention_by_lse,
)


def _qkv(L=24, Lk=None, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    Lk = L if Lk is None else Lk
    return (torch.randn(2, 3, L, D, generator=g, dtype=torch.float64),
            torch.randn(2, 3, Lk, D, generator=g, dtype=torch.float64),
            torch.randn(2, 3, Lk, D, generator=g, dtype=torch.float64))


def test_dense_matches_sdpa_and_logsumexp():
    q, k, v = _qkv()
    out, lse = dense_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), -1))
    out_s, _ = dense_attention(q, k, v, scale=0.5)
    torch.testing.assert_close(out_s, F.scaled_dot_product_attention(q, k, v, scale=0.5))


def test_block_mask_matches_loop():
    B, H, Lq, Lk = 1, 2, 10, 7
    q_off = torch.tensor([[[0, 3, 3, 10], [0, 5, 9, 10]]], dtype=torch.int32)
    k_off = torch.tensor([[[0, 2, 7], [0, 0, 7]]], dtype=torch.int32)
    kv_count = torch.tensor([[[1, 0, 2], [1, 1, 0]]], dtype=torch.int32)
    kv_index = torch.tensor([[[[1, -1], [0, 0], [1, 0]], [[1, -1], [0, -1], [1, 1]]]], dtype=torch.int32)
    mask = block_sparse_mask(B, H, Lq, Lk, kv_count, kv_index, q_off, k_off)
    expect = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for h in range(H):
        for i in range(3):
            for s in range(int(kv_count[0, h, i])):
                j = int(kv_index[0, h, i, s])
                expect[0, h, q_off[0, h, i]:q_off[0, h, i + 1], k_off[0, h, j]:k_off[0, h, j + 1]] = True
    assert torch.equal(mask, expect)


def test_fixed_tiling_mask_with_ragged_tail():
    kv_count = torch.tensor([[[1, 1]]], dtype=torch.int32)
    kv_index = torch.tensor([[[[1], [0]]]], dtype=torch.int32)
    mask = block_sparse_mask(1, 1, 6, 5, kv_count, kv_index, block_m=4, block_n=3)
    expect = torch.zeros(1, 1, 6, 5, dtype=torch.bool)
    expect[..., :4, 3:] = True
    expect[..., 4:, :3] = True
    assert torch.equal(mask, expect)


def test_merge_by_lse_recovers_dense():
    q, k, v = _qkv(L=16, Lk=20)
    split = torch.zeros(20, dtype=torch.bool)
    split[torch.randperm(20, generator=torch.Generator().manual_seed(1))[:9]] = True
    a = masked_attention(q, k, v, split)
    b = masked_attention(q, k, v, ~split)
    out, lse = merge_attention_by_lse(*a, *b)
    ref_out, ref_lse = dense_attention(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_merge_with_empty_parts():
    q, k, v = _qkv()
    full = dense_attention(q, k, v)
    empty = masked_attention(q, k, v, torch.zeros(24, dtype=torch.bool))
    assert torch.all(empty[0] == 0) and torch.all(torch.isneginf(empty[1]))
    out, lse = merge_attention_by_lse(*full, *empty)
    torch.testing.assert_close(out, full[0])
    out, lse = merge_attention_by_lse(*empty, *empty)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_merge_shape_errors():
    out = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="lse_a and lse_b must have shape"):
        merge_attention_by_lse(out, torch.zeros(1, 2, 4), out, torch.zeros(1, 2, 5))
    with pytest.raises(TypeError, match="lse_b must be a torch.Tensor"):
        merge_attention_by_lse(out, torch.zeros(1, 2, 4), out, None)
