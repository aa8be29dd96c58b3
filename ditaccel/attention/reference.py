"""Plain PyTorch reference attention: simple and obviously right, not fast.

All functions take (batch, heads, seq_len, head_dim) tensors and return ``(out, lse)`` where
``lse`` is the natural-log log-sum-exp of the scaled scores per query row, shape (B, H, Lq).
Math runs in float64 for float64 inputs, else float32; ``out`` comes back in the input dtype.
A query row that attends to nothing gets out = 0 and lse = -inf.
"""

from __future__ import annotations

import math

import torch

from ditaccel.kernels.checks import check_block_layout, check_qkv

_ALL_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_attention(q, k, v, mask=None, scale=None):
    """Attention with an optional boolean keep-mask broadcastable to (B, H, Lq, Lk)."""
    check_qkv(q, k, v, allowed_dtypes=_ALL_FLOAT, head_dims=None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ct = _compute_dtype(q.dtype)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # exp(s - lse) is 0 for masked entries; rows with lse = -inf would give nan, so zero them.
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = p.masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0)
    out = torch.matmul(p, v.to(ct))
    return out.to(q.dtype), lse


def dense_attention(q, k, v, scale=None):
    """Full softmax attention, returns (out, lse)."""
    return masked_attention(q, k, v, None, scale)


def _block_ids(offsets, n_blocks, L, block, B, H, device):
    """Per-token block id (B, H, L) from offsets, or from fixed tiling when offsets is None."""
    if offsets is None:
        ids = torch.arange(L, device=device) // block
        return ids.expand(B, H, L)
    pos = torch.arange(L, device=device, dtype=torch.int64).expand(B, H, L).contiguous()
    # token t belongs to block i with offsets[i] <= t < offsets[i+1]
    return torch.searchsorted(offsets.long().contiguous(), pos, right=True) - 1


def block_sparse_mask(B, H, Lq, Lk, kv_count, kv_index, q_offsets=None, k_offsets=None,
                      block_m=64, block_n=64, device=None):
    """Explicit boolean keep-mask (B, H, Lq, Lk) of a block-sparse layout."""
    nq, nk = kv_index.shape[2], None
    nk = (k_offsets.shape[-1] - 1) if k_offsets is not None else math.ceil(Lk / block_n)
    max_kept = kv_index.shape[3]
    used = torch.arange(max_kept, device=device) < kv_count.long().unsqueeze(-1)  # (B,H,nq,max_kept)
    block_mask = torch.zeros(B, H, nq, nk + 1, dtype=torch.bool, device=device)
    idx = torch.where(used, kv_index.long(), nk)  # unused slots go to a dummy column
    block_mask.scatter_(-1, idx, True)
    block_mask = block_mask[..., :nk]
    qb = _block_ids(q_offsets, nq, Lq, block_m, B, H, device)  # (B,H,Lq)
    kb = _block_ids(k_offsets, nk, Lk, block_n, B, H, device)  # (B,H,Lk)
    rows = torch.gather(block_mask, 2, qb.unsqueeze(-1).expand(B, H, Lq, nk))  # (B,H,Lq,nk)
    return torch.gather(rows, 3, kb.unsqueeze(2).expand(B, H, Lq, Lk))


def block_sparse_attention_reference(q, k, v, kv_count, kv_index, q_offsets=None, k_offsets=None,
                                     block_m=64, block_n=64, scale=None):
    """Block-sparse attention via an explicit (B, H, Lq, Lk) mask.  Returns (out, lse)."""
    B, H, Lq, Lk, _ = check_qkv(q, k, v, allowed_dtypes=_ALL_FLOAT, head_dims=None)
    check_block_layout(B, H, Lq, Lk, q.device, kv_count, kv_index, q_offsets, k_offsets, block_m, block_n,
                       check_values=True)
    mask = block_sparse_mask(B, H, Lq, Lk, kv_count, kv_index, q_offsets, k_offsets, block_m, block_n,
                             device=q.device)
    return masked_attention(q, k, v, mask, scale)


def merge_attention_by_lse(out_a, lse_a, out_b, lse_b):
    """Merge two partial attentions over disjoint key sets into the attention over their union.

    out_x: (B, H, L, D), lse_x: (B, H, L) natural-log.  out = w_a*out_a + w_b*out_b with
    w_x = exp(lse_x - lse), lse = logaddexp(lse_a, lse_b) (as in FlashAttention's split-KV combine).
    Returns (out in out_a.dtype, lse float32, or float64 if an input lse is float64).
    """
    for name, x in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a and out_b must have the same shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}")
    if lse_a.shape != lse_b.shape or tuple(lse_a.shape) != tuple(out_a.shape[:-1]):
        raise ValueError(f"lse_a and lse_b must have shape out.shape[:-1] = {tuple(out_a.shape[:-1])}, "
                         f"got {tuple(lse_a.shape)} and {tuple(lse_b.shape)}")
    ct = torch.float64 if torch.float64 in (lse_a.dtype, lse_b.dtype, out_a.dtype) else torch.float32
    la, lb = lse_a.to(ct), lse_b.to(ct)
    lse = torch.logaddexp(la, lb)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # both empty: weights 0, not nan
    wa = torch.exp(la - safe).unsqueeze(-1)
    wb = torch.exp(lb - safe).unsqueeze(-1)
    out = wa * out_a.to(ct) + wb * out_b.to(ct)
    return out.to(out_a.dtype), lse
