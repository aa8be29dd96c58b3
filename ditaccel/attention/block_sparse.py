"""Block-sparse attention entry point: Triton kernel on CUDA, PyTorch gather path elsewhere.

Layout contract (shared by both backends and the reference):
  q: (B, H, Lq, D), k/v: (B, H, Lk, D), already permuted so each block is contiguous.
  kv_count: int32 (B, H, nq), kv_index: int32 (B, H, nq, max_kept); for query block i the kept key
  blocks are kv_index[..., i, :kv_count[..., i]] (distinct ids; later entries are ignored).
  Blocks are fixed tiles of block_m / block_n tokens, or variable clusters given by int32
  q_offsets (B, H, nq + 1) / k_offsets (B, H, nk + 1), block j spanning [off[j], off[j + 1]).
Returns (out like q, lse float32 (B, H, Lq) in natural log; -inf for rows that keep nothing).
"""

from __future__ import annotations

import torch

from ditaccel.attention.block_sparse_torch import block_sparse_attention_torch


def _triton_fn():
    try:
        from ditaccel.kernels.triton.block_sparse_attention import block_sparse_attention_triton
    except ImportError:
        return None
    return block_sparse_attention_triton


def block_sparse_attention(q, k, v, kv_count, kv_index, q_offsets=None, k_offsets=None,
                           block_m: int = 64, block_n: int = 64, scale: float | None = None,
                           max_q_block_size: int | None = None):
    """Block-sparse attention forward; see the module docstring for the layout."""
    if isinstance(q, torch.Tensor) and q.is_cuda:
        fn = _triton_fn()
        if fn is not None:
            return fn(q, k, v, kv_count, kv_index, q_offsets, k_offsets, block_m, block_n, scale,
                      max_q_block_size=max_q_block_size)
    return block_sparse_attention_torch(q, k, v, kv_count, kv_index, q_offsets, k_offsets, block_m, block_n, scale)


def build_block_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean keep-mask (B, H, nq, nk) -> (kv_count int32 (B, H, nq), kv_index int32 (B, H, nq, max_kept)).

    Kept key-block ids come in ascending order; padding slots hold -1.  max_kept is the largest
    count (at least 1, so the tensor is never empty).
    """
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask must be a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be a bool tensor, got {block_mask.dtype}; pass e.g. scores > threshold")
    if block_mask.dim() != 4:
        raise ValueError("block_mask must be 4-D (batch, heads, num_q_blocks, num_k_blocks), "
                         f"got shape {tuple(block_mask.shape)}")
    counts = block_mask.sum(-1, dtype=torch.int32)
    max_kept = max(1, int(counts.max())) if counts.numel() else 1
    # Stable sort puts kept blocks (key 0) first, in ascending block order.
    order = torch.sort((~block_mask).to(torch.uint8), dim=-1, stable=True).indices[..., :max_kept]
    slot = torch.arange(order.shape[-1], device=block_mask.device)
    index = torch.where(slot < counts.unsqueeze(-1), order, -1).to(torch.int32)
    if index.shape[-1] < max_kept:  # nk == 0
        index = torch.full((*counts.shape, max_kept), -1, dtype=torch.int32, device=block_mask.device)
    return counts, index.contiguous()
