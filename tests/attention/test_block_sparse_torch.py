"""PyTorch gather path of block-sparse attention against the fp64 explicit-mask reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from ditaccel.attention.block_sparse import build_block_index
from ditaccel.attention.block_sparse_torch import block_sparse_attention_torch
from ditaccel.attention.reference import block_sparse_attention_reference, dense_attention
from ditaccel.kernels.layouts import random_block_mask, random_offsets

@pytest.fixture(autouse=True, params=["fused", "matmul"])
def cpu_path(request, monkeypatch):
    """Every test runs on both CPU paths: torch's fused flash kernel per group, and matmul + softmax."""
    import ditaccel.attention.block_sparse_torch as bst

    if request.param == "matmul":
        monkeypatch.setattr(bst, "flash_available", lambda x: False)
    return request.param


ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def _qkv(B, H, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Lq, D, generator=g).to(dtype), torch.randn(B, H, Lk, D, generator=g).to(dtype),
            torch.randn(B, H, Lk, D, generator=g).to(dtype))


def _check(out, lse, ref_out, ref_lse, q, k, v):
    dense_ref, _ = dense_attention(q.double(), k.double(), v.double())
    dense_err = (F.scaled_dot_product_attention(q, k, v).double() - dense_ref).abs().max().item()
    tol = 2 * dense_err + ATOL[q.dtype]
    err = (out.double() - ref_out).abs().max().item()
    assert out.dtype == q.dtype and err <= tol, f"out error {err:.3g} > {tol:.3g}"
    empty = torch.isinf(ref_lse)
    assert lse.dtype == torch.float32 and torch.equal(torch.isinf(lse), empty)
    assert torch.all(out[empty] == 0)
    assert (lse.double() - ref_lse)[~empty].abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_elements", [1 << 19, 600])  # 600: many small groups
def test_fixed_blocks(dtype, max_elements):
    B, H, L, D, block = 2, 3, 100, 32, 16
    q, k, v = _qkv(B, H, L, L, D, dtype)
    n = math.ceil(L / block)
    mask = random_block_mask(B, H, n, n, 0.3, torch.Generator().manual_seed(1), keep_diagonal=False)
    mask[1, 2, 3] = False  # an empty query block
    kv_count, kv_index = build_block_index(mask)
    out, lse = block_sparse_attention_torch(q, k, v, kv_count, kv_index, block_m=block, block_n=block,
                                            max_elements=max_elements)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), kv_count, kv_index,
                                           block_m=block, block_n=block)
    _check(out, lse, *ref, q, k, v)
    assert torch.isinf(lse[1, 2, 3 * block:4 * block]).all()


def test_cross_attention_and_uneven_blocks():
    q, k, v = _qkv(1, 2, 45, 130, 16, torch.float32, seed=2)
    mask = random_block_mask(1, 2, 3, 5, 0.5, torch.Generator().manual_seed(3))
    kv_count, kv_index = build_block_index(mask)
    out, lse = block_sparse_attention_torch(q, k, v, kv_count, kv_index, block_m=16, block_n=32)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), kv_count, kv_index,
                                           block_m=16, block_n=32)
    _check(out, lse, *ref, q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variable_offsets(dtype):
    B, H, Lq, Lk = 2, 2, 90, 70
    g = torch.Generator().manual_seed(4)
    q, k, v = _qkv(B, H, Lq, Lk, 16, dtype, seed=5)
    q_off, k_off = random_offsets(B, H, Lq, 6, g), random_offsets(B, H, Lk, 5, g)
    kv_count, kv_index = build_block_index(random_block_mask(B, H, 6, 5, 0.4, g))
    out, lse = block_sparse_attention_torch(q, k, v, kv_count, kv_index, q_offsets=q_off, k_offsets=k_off,
                                            max_elements=2000)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), kv_count, kv_index,
                                           q_offsets=q_off, k_offsets=k_off)
    _check(out, lse, *ref, q, k, v)


def test_full_density_equals_dense_and_lse():
    q, k, v = _qkv(1, 2, 70, 70, 16, torch.float32, seed=6)
    kv_count, kv_index = build_block_index(torch.ones(1, 2, 3, 3, dtype=torch.bool))
    out, lse = block_sparse_attention_torch(q, k, v, kv_count, kv_index, block_m=32, block_n=32)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-6, rtol=1e-5)
    scores = q.double() @ k.double().transpose(-1, -2) / 4.0
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=1e-5, rtol=0)


def test_all_empty_gives_zeros_and_neg_inf():
    q, k, v = _qkv(1, 1, 20, 20, 8, torch.float32)
    kv_count = torch.zeros(1, 1, 2, dtype=torch.int32)
    kv_index = torch.full((1, 1, 2, 1), -1, dtype=torch.int32)
    out, lse = block_sparse_attention_torch(q, k, v, kv_count, kv_index, block_m=16, block_n=16)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_bad_inputs():
    q, k, v = _qkv(1, 2, 32, 32, 16, torch.float32)
    kv_count, kv_index = build_block_index(torch.ones(1, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"kv_count must have shape \(1, 2, 4\)"):
        block_sparse_attention_torch(q, k, v, kv_count, kv_index, block_m=8, block_n=16)
    with pytest.raises(ValueError, match="kv_count values must be in"):
        block_sparse_attention_torch(q, k, v, kv_count + 5, kv_index, block_m=16, block_n=16)
    with pytest.raises(TypeError, match="kv_index must be int32"):
        block_sparse_attention_torch(q, k, v, kv_count, kv_index.long(), block_m=16, block_n=16)
    with pytest.raises(ValueError, match="must be 4-D.*transpose"):
        block_sparse_attention_torch(q[0], k, v, kv_count, kv_index)
    with pytest.raises(ValueError, match="block_m must be a positive int"):
        block_sparse_attention_torch(q, k, v, kv_count, kv_index, block_m=0)


def test_permutations_equal_permuting_the_inputs():
    """q_perm/k_perm read through the permutation: same as permuting q/k/v and un-permuting out/lse."""
    B, H, Lq, Lk = 2, 2, 90, 70
    g = torch.Generator().manual_seed(7)
    q, k, v = _qkv(B, H, Lq, Lk, 16, torch.float32, seed=8)
    q_off, k_off = random_offsets(B, H, Lq, 6, g), random_offsets(B, H, Lk, 5, g)
    kv_count, kv_index = build_block_index(random_block_mask(B, H, 6, 5, 0.5, g))
    qp = torch.rand(B, H, Lq, generator=g).argsort(-1)
    kp = torch.rand(B, H, Lk, generator=g).argsort(-1)

    def perm(x, p):
        return torch.gather(x, 2, p.unsqueeze(-1).expand(*p.shape, x.shape[-1]))

    out_p, lse_p = block_sparse_attention_torch(perm(q, qp), perm(k, kp), perm(v, kp), kv_count, kv_index,
                                                q_offsets=q_off, k_offsets=k_off, max_elements=3000)
    out, lse = block_sparse_attention_torch(q, k, v, kv_count, kv_index, q_offsets=q_off, k_offsets=k_off,
                                            max_elements=3000, q_perm=qp, k_perm=kp)
    torch.testing.assert_close(perm(out, qp), out_p, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.gather(lse, 2, qp), lse_p, atol=1e-6, rtol=1e-6)
