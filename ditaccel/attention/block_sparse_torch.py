"""Block-sparse attention in plain PyTorch, for CPU (or CUDA without Triton).

For each query block we gather only the key/value tokens of its kept key blocks.  Query blocks
(over all batches and heads) are sorted by how many key tokens they keep and processed in groups,
each padded to its own longest row, so one batched matmul + masked softmax + batched matmul does
the work of many blocks with little padding.  Group size is capped so the score tensor stays
under ``max_elements`` floats: small groups that stay in cache were ~3x faster on one CPU core than
large ones (which also pay page faults on fresh allocations).  Cost is ~density x dense, plus the gather.
"""

from __future__ import annotations

import math

import torch

from ditaccel.attention.cpu_flash import flash_attention_lse, flash_available
from ditaccel.kernels.checks import check_block_layout, check_qkv

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _offsets(offsets, n, L, block, B, H, device):
    if offsets is not None:
        return offsets.long().reshape(B * H, n + 1)
    return (torch.arange(n + 1, device=device) * block).clamp_(max=L).expand(B * H, n + 1)


def block_sparse_attention_torch(q, k, v, kv_count, kv_index, q_offsets=None, k_offsets=None,
                                 block_m: int = 64, block_n: int = 64, scale: float | None = None,
                                 max_elements: int = 1 << 19, q_perm=None, k_perm=None):
    """Same contract as the Triton kernel; returns (out like q, lse float32 (B, H, Lq)).

    Math runs in float32 (float64 for float64 inputs).  Rows that keep no key get out = 0, lse = -inf.

    ``q_perm`` / ``k_perm`` (B, H, L) int64, optional: q (k, v) are in their original order and
    the blocks are over the permuted order (position i of the permuted order is token perm[i]);
    the gather reads through the permutation and out/lse come back in the original order. The
    result equals permuting the inputs first and un-permuting out/lse, without those full copies.
    """
    B, H, Lq, Lk, D = check_qkv(q, k, v, allowed_dtypes=DTYPES, head_dims=None)
    nq, nk = check_block_layout(B, H, Lq, Lk, q.device, kv_count, kv_index, q_offsets, k_offsets,
                                block_m, block_n, check_values=not q.is_cuda)
    dev = q.device
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    BH, W = B * H, kv_index.shape[3]

    qo = _offsets(q_offsets, nq, Lq, block_m, B, H, dev)  # (BH, nq+1)
    ko = _offsets(k_offsets, nk, Lk, block_n, B, H, dev)  # (BH, nk+1)
    # One row per (batch*head, query block).
    bh = torch.arange(BH, device=dev).repeat_interleave(nq)  # (R,)
    q_start = qo[:, :-1].reshape(-1)
    q_len = (qo[:, 1:] - qo[:, :-1]).reshape(-1)
    used = torch.arange(W, device=dev) < kv_count.reshape(-1, 1).long()  # (R, W)
    kb = torch.where(used, kv_index.reshape(-1, W).long(), 0)
    ko_flat = ko.reshape(-1)
    k_first = (bh * (nk + 1)).unsqueeze(1) + kb
    k_start = ko_flat[k_first]  # (R, W)
    k_len = (ko_flat[k_first + 1] - k_start) * used
    tokens = k_len.sum(1)  # kept key tokens per row

    q_map = k_map = None
    if q_perm is not None:
        q_map = (q_perm.reshape(BH, Lq).long() + (torch.arange(BH, device=dev) * Lq).unsqueeze(1)).reshape(-1)
    if k_perm is not None:
        k_map = (k_perm.reshape(BH, Lk).long() + (torch.arange(BH, device=dev) * Lk).unsqueeze(1)).reshape(-1)
    q_flat = q.reshape(BH * Lq, D).to(ct)
    k_flat = k.reshape(BH * Lk, D).to(ct)
    v_flat = v.reshape(BH * Lk, D).to(ct)
    out = torch.zeros(BH * Lq, D, dtype=ct, device=dev)
    lse = torch.full((BH * Lq,), float("-inf"), dtype=torch.float32, device=dev)

    live = torch.nonzero((tokens > 0) & (q_len > 0)).squeeze(1)
    if live.numel() == 0:
        return out.reshape(B, H, Lq, D).to(q.dtype), lse.reshape(B, H, Lq)
    live = live[torch.argsort(tokens[live], stable=True)]
    tok_sorted = tokens[live].tolist()
    max_q = int(q_len[live].max())
    i, R = 0, live.numel()
    if flash_available(q_flat):
        max_elements *= 4  # the fused kernel never materialises scores: the cap only bounds gathered K/V
    budget = max(1, max_elements // max_q)
    while i < R:
        # Rows are sorted by token count, so padding each group to its last row wastes little.
        # Largest g with g * tokens[i + g - 1] <= budget (the cost is increasing in g).
        lo, hi = 1, R - i
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if mid * tok_sorted[i + mid - 1] <= budget else (lo, mid - 1)
        g = lo
        rows = live[i:i + g]
        i += g
        _attend_group(rows, bh, q_start, q_len, k_start, k_len, tokens, q_flat, k_flat, v_flat,
                      out, lse, Lq, Lk, scale, q_map, k_map)
    return out.reshape(B, H, Lq, D).to(q.dtype), lse.reshape(B, H, Lq)


def _attend_group(rows, bh, q_start, q_len, k_start, k_len, tokens, q_flat, k_flat, v_flat,
                  out, lse, Lq, Lk, scale, q_map=None, k_map=None):
    dev = rows.device
    T, M = int(tokens[rows].max()), int(q_len[rows].max())
    # Key token ids (g, T): position p of a row falls in the slot whose [excl, cum) range holds it.
    lens = k_len[rows]
    cum = lens.cumsum(1)
    pos = torch.arange(T, device=dev).expand(rows.numel(), T).contiguous()
    slot = torch.searchsorted(cum, pos, right=True).clamp_(max=lens.shape[1] - 1)
    kvalid = pos < tokens[rows].unsqueeze(1)
    tok = torch.gather(k_start[rows], 1, slot) + pos - torch.gather(cum - lens, 1, slot)
    kidx = torch.where(kvalid, tok, 0) + (bh[rows] * Lk).unsqueeze(1)
    qpos = torch.arange(M, device=dev)
    qvalid = qpos < q_len[rows].unsqueeze(1)  # (g, M)
    qidx = torch.where(qvalid, q_start[rows].unsqueeze(1) + qpos, 0) + (bh[rows] * Lq).unsqueeze(1)
    if k_map is not None:
        kidx = k_map[kidx]
    if q_map is not None:
        qidx = q_map[qidx]

    kg = k_flat.index_select(0, kidx.reshape(-1)).view(rows.numel(), T, -1)
    vg = v_flat.index_select(0, kidx.reshape(-1)).view(rows.numel(), T, -1)
    qg = q_flat.index_select(0, qidx.reshape(-1)).view(rows.numel(), M, -1)
    sel = qidx[qvalid] if not bool(qvalid.all()) else None
    if flash_available(qg):
        # Fused CPU flash kernel: scores and probabilities never materialised. Padding keys are
        # masked by an additive bias (none when every row of the group keeps the same tokens).
        bias = None
        if not bool(kvalid.all()):
            bias = torch.zeros(kvalid.shape, dtype=qg.dtype, device=dev).masked_fill_(~kvalid, float("-inf"))
            bias = bias[:, None, None, :]
        res = flash_attention_lse(qg.unsqueeze(1), kg.unsqueeze(1), vg.unsqueeze(1), bias, scale)
        if res is not None:
            o, ls = res[0].squeeze(1), res[1].squeeze(1).float()
            if sel is None:
                out.index_copy_(0, qidx.reshape(-1), o.reshape(-1, o.shape[-1]))
                lse.index_copy_(0, qidx.reshape(-1), ls.reshape(-1))
            else:
                out.index_copy_(0, sel, o[qvalid])
                lse.index_copy_(0, sel, ls[qvalid])
            return
    # Scale and the padding mask ride along in one baddbmm: s = bias + scale * q @ k^T, bias in {0, -inf}.
    bias = torch.zeros(kvalid.shape, dtype=qg.dtype, device=dev).masked_fill_(~kvalid, float("-inf"))
    s = torch.baddbmm(bias.unsqueeze(1), qg, kg.transpose(1, 2), alpha=scale)  # (g, M, T)
    m = s.amax(-1, keepdim=True)  # finite: every live row keeps >= 1 token
    s.sub_(m).exp_()
    l = s.sum(-1, keepdim=True)
    o = torch.bmm(s, vg).div_(l)
    sel = qidx[qvalid]
    out.index_copy_(0, sel, o[qvalid])
    lse.index_copy_(0, sel, (m + l.log()).squeeze(-1)[qvalid].float())
