"""Triton block-sparse attention under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).

Shapes stay tiny; the interpreter config uses TILE_M=32, TILE_N=16, so blocks of 32/64 tokens and
clusters > 32 exercise chunked query blocks and multi-tile key blocks.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from ditaccel.attention.block_sparse import build_block_index
from helpers.attention_checks import ATOL, check_against_reference
from ditaccel.attention.reference import block_sparse_attention_reference
from ditaccel.kernels.layouts import random_block_mask, random_offsets
from ditaccel.kernels.triton.block_sparse_attention import block_sparse_attention_triton

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter tests on CPU tensors; with CUDA, test_bsa_cuda.py covers the kernel")

def _qkv(B, H, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, H, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, H, Lk, D, generator=g).to(dtype)
    return q, k, v


def _check(out, lse, ref_out, ref_lse, q, k, v):
    check_against_reference(out, lse, ref_out, ref_lse, q, k, v, ATOL,
                            lse_atol=1e-4 + (1e-2 if q.dtype != torch.float32 else 0))


@pytest.mark.parametrize(
    "dtype,D,L,block",
    [(torch.float32, 16, 80, 32), (torch.bfloat16, 64, 64, 32), (torch.float16, 64, 72, 16)],
)
def test_fixed_blocks_match_fp64_reference(dtype, D, L, block):
    B, H = 1, 2
    q, k, v = _qkv(B, H, L, L, D, dtype)
    n = math.ceil(L / block)
    mask = random_block_mask(B, H, n, n, 0.4, torch.Generator().manual_seed(1), keep_diagonal=False)
    mask[0, 1, 0] = False  # one query block with no keys
    mask[0, 0, 1] = True
    kv_count, kv_index = build_block_index(mask)
    out, lse = block_sparse_attention_triton(q, k, v, kv_count, kv_index, block_m=block, block_n=block)
    ref_out, ref_lse = block_sparse_attention_reference(q.double(), k.double(), v.double(), kv_count, kv_index,
                                                        block_m=block, block_n=block)
    _check(out, lse, ref_out, ref_lse, q, k, v)
    assert torch.isinf(lse[0, 1, :block]).all()


def test_cross_attention_different_lengths_and_block_sizes():
    q, k, v = _qkv(1, 2, 50, 70, 16, torch.float32, seed=3)
    nq, nk = math.ceil(50 / 16), math.ceil(70 / 64)
    mask = random_block_mask(1, 2, nq, nk, 0.5, torch.Generator().manual_seed(2))
    kv_count, kv_index = build_block_index(mask)
    out, lse = block_sparse_attention_triton(q, k, v, kv_count, kv_index, block_m=16, block_n=64)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), kv_count, kv_index,
                                           block_m=16, block_n=64)
    _check(out, lse, *ref, q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variable_offsets(dtype):
    B, H, Lq, Lk, D = 1, 2, 77, 61, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = _qkv(B, H, Lq, Lk, D, dtype, seed=4)
    q_off = random_offsets(B, H, Lq, 4, g)  # random sizes, some clusters may be empty
    q_off[0, 0] = torch.tensor([0, 0, 45, 50, Lq], dtype=torch.int32)  # one empty, one > TILE_M
    k_off = random_offsets(B, H, Lk, 5, g)
    mask = random_block_mask(B, H, 4, 5, 0.5, g)
    kv_count, kv_index = build_block_index(mask)
    out, lse = block_sparse_attention_triton(q, k, v, kv_count, kv_index, q_offsets=q_off, k_offsets=k_off)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), kv_count, kv_index,
                                           q_offsets=q_off, k_offsets=k_off)
    _check(out, lse, *ref, q, k, v)
    # Passing the largest cluster size up front (no device sync) gives the same result.
    out2, lse2 = block_sparse_attention_triton(q, k, v, kv_count, kv_index, q_offsets=q_off, k_offsets=k_off,
                                               max_q_block_size=Lq)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


def test_full_density_equals_dense_and_lse_is_logsumexp():
    q, k, v = _qkv(1, 2, 80, 80, 16, torch.float32, seed=6)
    mask = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    kv_count, kv_index = build_block_index(mask)
    out, lse = block_sparse_attention_triton(q, k, v, kv_count, kv_index, block_m=32, block_n=32)
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, dense, atol=2e-6, rtol=1e-5)
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(16)
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=1e-5, rtol=0)


def test_strided_inputs_and_custom_scale():
    # (B, L, H, D) storage viewed as (B, H, L, D): non-contiguous q/k/v must work.
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g).transpose(1, 2) for _ in range(3))
    kv_count, kv_index = build_block_index(random_block_mask(1, 2, 2, 2, 0.5, g))
    out, lse = block_sparse_attention_triton(q, k, v, kv_count, kv_index, block_m=32, block_n=32, scale=0.3)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), kv_count, kv_index,
                                           block_m=32, block_n=32, scale=0.3)
    _check(out, lse, *ref, q, k, v)


def _layout(L=32, block=32):
    n = math.ceil(L / block)
    return build_block_index(torch.ones(1, 2, n, n, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(D=48), ValueError, "head_dim 48"),
        (dict(dtype=torch.float64), TypeError, "unsupported dtype"),
        (dict(k_dtype=torch.float16), TypeError, "same dtype"),
        (dict(k_len_d=8), ValueError, "same head_dim"),
        (dict(three_d=True), ValueError, "must be 4-D"),
        (dict(count_dtype=torch.int64), TypeError, "kv_count must be int32"),
        (dict(count_shape=(1, 2, 3)), ValueError, "kv_count must have shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, exc, match):
    D = kwargs.get("D", 16)
    q, k, v = _qkv(1, 2, 32, 32, D, kwargs.get("dtype", torch.float32))
    if "k_dtype" in kwargs:
        k = k.to(kwargs["k_dtype"])
    if "k_len_d" in kwargs:
        k = torch.randn(1, 2, 32, kwargs["k_len_d"])
        v = k.clone()
    if kwargs.get("three_d"):
        q = q[0]
    kv_count, kv_index = _layout()
    if "count_dtype" in kwargs:
        kv_count = kv_count.to(kwargs["count_dtype"])
    if "count_shape" in kwargs:
        kv_count = torch.ones(kwargs["count_shape"], dtype=torch.int32)
    with pytest.raises(exc, match=match):
        block_sparse_attention_triton(q, k, v, kv_count, kv_index, block_m=32, block_n=32)


def test_bad_index_values_raise_on_cpu():
    q, k, v = _qkv(1, 2, 32, 32, 16, torch.float32)
    kv_count, kv_index = _layout()
    kv_index[0, 0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"kv_index entries .* in \[0, 1\)"):
        block_sparse_attention_triton(q, k, v, kv_count, kv_index, block_m=32, block_n=32)
    bad_off = torch.tensor([[[0, 40], [0, 32]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="q_offsets must start at 0 and end"):
        block_sparse_attention_triton(q, k, v, *_layout(), q_offsets=bad_off)
