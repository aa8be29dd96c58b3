"""Up-front input checks shared by the block-sparse attention backends.

Every check raises ``TypeError`` (wrong kind/dtype) or ``ValueError`` (wrong shape/value) with a
message that says what was expected, what came, and how to fix it.  Only cheap metadata checks
run for CUDA tensors; value checks (offset monotonicity, index range) need a device sync and run
only when ``check_values`` is set (the CPU paths do).
"""

from __future__ import annotations

import math

import torch

_LAYOUT_HINT = (
    "q, k, v must be (batch, heads, seq_len, head_dim); if yours are (batch, seq_len, heads, "
    "head_dim), pass x.transpose(1, 2)"
)


def _require_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_qkv(q, k, v, *, allowed_dtypes: tuple[torch.dtype, ...], head_dims: tuple[int, ...] | None):
    """Check q (B,H,Lq,D), k/v (B,H,Lk,D): same batch/heads/dtype/device.  Returns (B,H,Lq,Lk,D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _require_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got {x.dim()}-D tensor of shape {tuple(x.shape)}; "
                             f"{_LAYOUT_HINT}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H:
        raise ValueError(f"q and k must share (batch, heads), got q {tuple(q.shape)} and k {tuple(k.shape)}; "
                         "for grouped-query attention repeat k/v heads first (k.repeat_interleave(g, dim=1))")
    if k.shape[3] != D:
        raise ValueError(f"q and k must have the same head_dim, got q head_dim {D} and k head_dim {k.shape[3]}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
                        "cast them with .to(q.dtype)")
    if q.dtype not in allowed_dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
        raise TypeError(f"unsupported dtype {q.dtype} for this backend; expected one of {names}. "
                        "Cast with q.to(torch.bfloat16) (GPU) or q.float() (CPU)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on the same device, got q on {q.device}, k on {k.device}, "
                         f"v on {v.device}; move them with .to(q.device)")
    if head_dims is not None and D not in head_dims:
        raise ValueError(f"unsupported head_dim {D}; this kernel supports head_dim in {list(head_dims)}. "
                         "Pad the head dimension to the next supported size (and pass scale=1/sqrt(original))"
                         " or use the torch path")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}; all dimensions must be > 0")
    return B, H, Lq, k.shape[2], D


def _check_index_tensor(name: str, x, shape: tuple[int, ...], device, hint: str) -> None:
    _require_tensor(name, x)
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {x.dtype}; convert with {name}.to(torch.int32)")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} {hint}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {x.device}; move it with {name}.to(q.device)")


def check_block_layout(B, H, Lq, Lk, device, kv_count, kv_index, q_offsets, k_offsets, block_m, block_n,
                       *, check_values: bool) -> tuple[int, int]:
    """Check the block index/offsets tensors.  Returns (num_q_blocks, num_k_blocks)."""
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    _require_tensor("kv_count", kv_count)
    _require_tensor("kv_index", kv_index)
    if kv_count.dim() != 3:
        raise ValueError(f"kv_count must be 3-D (batch, heads, num_q_blocks), got shape {tuple(kv_count.shape)}")
    if kv_index.dim() != 4:
        raise ValueError("kv_index must be 4-D (batch, heads, num_q_blocks, max_kept), "
                         f"got shape {tuple(kv_index.shape)}")
    if q_offsets is None:
        nq = math.ceil(Lq / block_m)
    else:
        _require_tensor("q_offsets", q_offsets)
        nq = q_offsets.shape[-1] - 1 if q_offsets.dim() == 3 else -1
        _check_index_tensor("q_offsets", q_offsets, (B, H, max(nq, 0) + 1), device,
                            "(batch, heads, num_q_blocks + 1)")
    if k_offsets is None:
        nk = math.ceil(Lk / block_n)
    else:
        _require_tensor("k_offsets", k_offsets)
        nk = k_offsets.shape[-1] - 1 if k_offsets.dim() == 3 else -1
        _check_index_tensor("k_offsets", k_offsets, (B, H, max(nk, 0) + 1), device,
                            "(batch, heads, num_k_blocks + 1)")
    how = "from q_offsets" if q_offsets is not None else f"= ceil(Lq={Lq} / block_m={block_m})"
    _check_index_tensor("kv_count", kv_count, (B, H, nq), device, f"(batch, heads, num_q_blocks) with num_q_blocks {how}")
    max_kept = kv_index.shape[3]
    _check_index_tensor("kv_index", kv_index, (B, H, nq, max_kept), device,
                        f"(batch, heads, num_q_blocks, max_kept) with num_q_blocks {how}")
    if check_values:
        _check_values(Lq, Lk, nk, kv_count, kv_index, q_offsets, k_offsets)
    return nq, nk


def _check_values(Lq, Lk, nk, kv_count, kv_index, q_offsets, k_offsets) -> None:
    for name, off, L in (("q_offsets", q_offsets, Lq), ("k_offsets", k_offsets, Lk)):
        if off is None:
            continue
        if bool((off[..., 0] != 0).any()) or bool((off[..., -1] != L).any()):
            raise ValueError(f"{name} must start at 0 and end at the sequence length {L} for every (batch, head); "
                             f"got first values {off[..., 0].unique().tolist()[:4]} and last values "
                             f"{off[..., -1].unique().tolist()[:4]}")
        if bool((off[..., 1:] < off[..., :-1]).any()):
            raise ValueError(f"{name} must be non-decreasing (block i spans [off[i], off[i+1]))")
    max_kept = kv_index.shape[3]
    if bool((kv_count < 0).any()) or bool((kv_count > min(max_kept, nk)).any()):
        raise ValueError(f"kv_count values must be in [0, min(max_kept={max_kept}, num_k_blocks={nk})], "
                         f"got range [{int(kv_count.min())}, {int(kv_count.max())}]")
    slot = torch.arange(max_kept, device=kv_index.device)
    used = slot < kv_count.unsqueeze(-1).long()
    bad = used & ((kv_index < 0) | (kv_index >= nk))
    if bool(bad.any()):
        raise ValueError(f"kv_index entries below kv_count must be key-block ids in [0, {nk}), "
                         f"found {int(bad.sum())} out of range (e.g. {int(kv_index[bad][0])})")
