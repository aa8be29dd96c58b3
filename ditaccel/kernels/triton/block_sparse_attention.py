"""Triton block-sparse flash-attention forward.

One program handles one TILE_M-row chunk of one query block of one (batch, head).  It walks the
kept key blocks listed in ``kv_index[b, h, qblock, :kv_count[b, h, qblock]]`` and runs the
FlashAttention-2 online softmax over them (Dao, 2023), in base 2 with 1/sqrt(d)*log2(e) folded
into the score scale.  Blocks are either a fixed tiling (block_m / block_n tokens) or variable
clusters given by offsets (block i spans [off[i], off[i+1])), as produced by SVG2-style k-means
permutation (Yang et al., 2025): the caller has already permuted q/k/v so clusters are contiguous.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ditaccel.kernels.checks import check_block_layout, check_qkv

# The Triton interpreter computes bf16 tl.dot wrongly; when interpreting we upcast dot inputs to fp32.
# Read once at import (the test conftest sets it before import); this is not a user-facing switch.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _configs():
    if _INTERPRET:
        # Small tiles so the tests exercise chunked query blocks and multi-tile key blocks.
        return [triton.Config({"TILE_M": 32, "TILE_N": 16}, num_warps=1, num_stages=1)]
    cfgs = []
    for tn in (16, 32, 64, 128):
        for tm in (16, 64, 128):
            for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3), (8, 4)):
                cfgs.append(triton.Config({"TILE_M": tm, "TILE_N": tn}, num_warps=warps, num_stages=stages))
    return cfgs


def _prune(configs, named_args, **kwargs):
    """Keep tiles that fit the logical block sizes.

    A fixed power-of-two key block is walked in TILE_N sub-tiles (TILE_N <= block, a flat loop the
    compiler pipelines); other key blocks use TILE_N 64/128 in a nested loop.  Configs that do not
    fit in shared memory are dropped by the autotuner itself (OutOfResources).
    """
    args = {**named_args, **kwargs}
    q_block, k_block, d = args["TUNE_Q"], args["K_BLOCK"], args["HEAD_DIM"]
    max_tm = max(16, min(128, _next_pow2(q_block)))
    out = []
    for c in configs:
        tm, tn = c.kwargs["TILE_M"], c.kwargs["TILE_N"]
        if tm > max_tm or (max_tm >= 64 and tm < 64):
            continue
        if k_block in (16, 32, 64, 128):
            if tn > k_block or (k_block >= 64 and tn < 64):
                continue
        elif tn not in (64, 128):
            continue
        if c.num_warps == 8 and tm < 128:
            continue  # 8 warps only pay off on 128-row tiles
        if k_block == 0 and c.num_stages > 2:
            continue  # variable key clusters use a nested loop that Triton does not pipeline
        out.append(c)
    return out or configs[:1]


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_base, v_base, n0, k_end, skn, skd, svn, svd, qk_scale,
                 HEAD_DIM: tl.constexpr, TILE_N: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr):
    # (Dropping the bounds masks/-inf handling for tiles known to be full stopped Triton 3.9 from
    # software-pipelining this loop for sm_90 -- checked with tests/kernels/test_triton_aot_compile.py.)
    offs_n = n0 + tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < k_end
    kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=col_ok[None, :], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=col_ok[:, None], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE_DOT:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    s = tl.where(col_ok[None, :], s, float("-inf"))
    # The scale is folded into the row max and into one FMA before exp2 (qk_scale > 0, so
    # max(s) * c = max(s * c)), as in the Triton fused-attention tutorial.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # A row that has seen no valid column yet has m_new = -inf; subtract 0 so exp2 gives 0, not nan.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.autotune(configs=_configs(), key=["HEAD_DIM", "TUNE_Q", "K_BLOCK", "VAR_Q", "VAR_K"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bsa_fwd_kernel(
    Q, K, V, Out, Lse, KvCount, KvIndex, QOff, KOff,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    H, Lq, Lk, NQ, NK, MAX_KEPT, Q_BLOCK, qk_scale, TUNE_Q,
    HEAD_DIM: tl.constexpr, K_BLOCK: tl.constexpr, VAR_Q: tl.constexpr, VAR_K: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
):
    # K_BLOCK: fixed key-block size (0 when VAR_K); Q_BLOCK: fixed query-block size, or the
    # largest query cluster when VAR_Q.  TUNE_Q is only an autotune key (bucketed Q_BLOCK).
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    chunks = tl.cdiv(Q_BLOCK, TILE_M)
    qblk = pid // chunks
    if VAR_Q:
        q_start = tl.load(QOff + bh * (NQ + 1) + qblk)
        q_end = tl.load(QOff + bh * (NQ + 1) + qblk + 1)
    else:
        q_start = qblk * Q_BLOCK
        q_end = tl.minimum(q_start + Q_BLOCK, Lq)
    m0 = q_start + (pid % chunks) * TILE_M
    if m0 < q_end:
        offs_m = m0 + tl.arange(0, TILE_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < q_end
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([TILE_M], dtype=tl.float32)
        acc = tl.zeros([TILE_M, HEAD_DIM], dtype=tl.float32)
        count = tl.load(KvCount + bh * NQ + qblk)
        idx_base = KvIndex + (bh * NQ + qblk) * MAX_KEPT
        if (not VAR_K) and (K_BLOCK % TILE_N == 0):
            # Fixed key blocks walked as K_BLOCK // TILE_N sub-tiles each: one flat loop that the
            # compiler can software-pipeline.
            SUB: tl.constexpr = K_BLOCK // TILE_N
            for it in range(0, count * SUB):
                kb = tl.load(idx_base + it // SUB)
                kb = tl.where((kb >= 0) & (kb < NK), kb, NK)  # bad ids become an empty block
                n0 = kb * K_BLOCK + (it % SUB) * TILE_N
                acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, n0, tl.minimum(n0 + TILE_N, Lk),
                                             skn, skd, svn, svd, qk_scale, HEAD_DIM, TILE_N, IEEE_DOT, UPCAST)
        else:
            for slot in range(0, count):
                kb = tl.load(idx_base + slot)
                kb_ok = (kb >= 0) & (kb < NK)
                if VAR_K:
                    k_start = tl.load(KOff + bh * (NK + 1) + kb, mask=kb_ok, other=0)
                    k_end = tl.load(KOff + bh * (NK + 1) + kb + 1, mask=kb_ok, other=0)
                else:
                    k_start = kb * K_BLOCK
                    k_end = tl.where(kb_ok, tl.minimum(k_start + K_BLOCK, Lk), k_start)
                for n0 in range(k_start, k_end, TILE_N):
                    acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, n0, k_end,
                                                 skn, skd, svn, svd, qk_scale, HEAD_DIM, TILE_N, IEEE_DOT, UPCAST)
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(Lse + bh * Lq + offs_m, lse, mask=row_ok)


def block_sparse_attention_triton(q, k, v, kv_count, kv_index, q_offsets=None, k_offsets=None,
                                  block_m: int = 64, block_n: int = 64, scale: float | None = None,
                                  max_q_block_size: int | None = None):
    """Block-sparse attention forward.  Returns (out like q, lse float32 (B, H, Lq), natural log).

    q: (B, H, Lq, D), k/v: (B, H, Lk, D), D a power of two in 16..128, fp16/bf16 (fp32 allowed).
    kv_count: int32 (B, H, nq); kv_index: int32 (B, H, nq, max_kept), entries past kv_count ignored,
    kept ids must be distinct.  q_offsets / k_offsets: optional int32 (B, H, n+1) cluster bounds; else
    fixed tiling with block_m / block_n.  max_q_block_size: largest query cluster, if known (saves a
    device sync when q_offsets is given).  Rows that keep no key get out = 0, lse = -inf.
    """
    B, H, Lq, Lk, D = check_qkv(q, k, v, allowed_dtypes=DTYPES, head_dims=HEAD_DIMS)
    if not q.is_cuda and not _INTERPRET:
        raise ValueError(f"the Triton block-sparse kernel needs CUDA tensors, got q on {q.device}; "
                         "use ditaccel.attention.block_sparse.block_sparse_attention, which falls back "
                         "to the PyTorch path on CPU")
    nq, nk = check_block_layout(B, H, Lq, Lk, q.device, kv_count, kv_index, q_offsets, k_offsets,
                                block_m, block_n, check_values=not q.is_cuda)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    var_q, var_k = q_offsets is not None, k_offsets is not None
    if var_q:
        if max_q_block_size is None:
            max_q_block_size = int((q_offsets[..., 1:] - q_offsets[..., :-1]).max())
        q_block = max(1, int(max_q_block_size))
    else:
        q_block = block_m
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    kv_count = kv_count.contiguous()
    kv_index = kv_index.contiguous()
    q_off = q_offsets.contiguous() if var_q else kv_count  # dummy pointer when unused
    k_off = k_offsets.contiguous() if var_k else kv_count

    def grid(meta):
        return (nq * triton.cdiv(q_block, meta["TILE_M"]), B * H)

    _bsa_fwd_kernel[grid](
        q, k, v, out, lse, kv_count, kv_index, q_off, k_off,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Lq, Lk, nq, nk, kv_index.shape[3], q_block, scale * _LOG2E, min(256, _next_pow2(q_block)),
        HEAD_DIM=D, K_BLOCK=0 if var_k else block_n, VAR_Q=var_q, VAR_K=var_k,
        IEEE_DOT=(q.dtype == torch.float32) or _INTERPRET, UPCAST=_INTERPRET,
    )
    return out, lse
