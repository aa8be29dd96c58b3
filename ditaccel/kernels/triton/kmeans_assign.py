"""Triton k-means assignment: nearest centroid per point without the (G, N, C) score tensor.

labels[g, n] = argmax_c (x[g, n] . c[g, c] - ||c[g, c]||^2 / 2), i.e. argmin_c ||x - c||^2, the
assignment step of the batched k-means in ditaccel/attention/kmeans.py (SVG2 clusters queries and
keys per head with it).  The torch path there materialises the fp32 (G, N, C) scores with one bmm
and reads them back for the argmax; at 32k tokens, 24 heads and 500 centroids that is ~1.6 GB of
memory traffic each way.  Here one program owns BLOCK_N points of one group: it loads their
(BLOCK_N, D) tile once, walks the group's centroids BLOCK_C at a time (score tile = one tl.dot
with fp32 accumulation, minus the half squared norms computed from the same centroid tile) and
keeps a running max and argmax per point, so only the int64 labels reach global memory.

Ties: within a centroid tile the smallest index with the tile's max wins, and a later tile only
replaces the running best when strictly greater, so exact ties go to the smallest index, as in
torch.argmax.  Points whose scores are all NaN get label 0 (torch.argmax would point at a NaN).

Precision: fp16/bf16 inputs go to tl.dot as they are (exact products, fp32 accumulation); the
half norms are computed in fp32.  fp32 inputs use TF32x3 (split-TF32, close to fp32 accuracy on
tensor cores), or plain TF32 when torch.backends.cuda.matmul.allow_tf32 is set, the same switch
under which the torch bmm path would use TF32.  Labels can therefore differ from the torch path
where two centroids' scores agree to about fp32 rounding; either choice is a nearest centroid up
to that rounding.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The Triton interpreter computes bf16 tl.dot wrongly; when interpreting we upcast dot inputs to fp32.
# Read once at import (the test conftest sets it before import); this is not a user-facing switch.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIM = 256

# tl.dot input precision modes (constexpr DOT_MODE)
_DOT_DEFAULT, _DOT_IEEE, _DOT_TF32X3, _DOT_TF32 = 0, 1, 2, 3


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _configs():
    if _INTERPRET:
        # Small tiles so tiny test shapes still span several point blocks and centroid blocks.
        return [triton.Config({"BLOCK_N": 16, "BLOCK_C": 16}, num_warps=1, num_stages=1)]
    cfgs = []
    for bn in (64, 128):
        for bc in (32, 64, 128):
            for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
                cfgs.append(triton.Config({"BLOCK_N": bn, "BLOCK_C": bc}, num_warps=warps, num_stages=stages))
    return cfgs


# Shared memory per block on sm_90 (227 KiB); configs the estimate below puts above it are not tried.
_SMEM_LIMIT = 227 * 1024


def _prune(configs, named_args, **kwargs):
    """Drop tiles that cannot pay off or cannot fit.

    Centroid tiles much wider than C waste work; the (BLOCK_N, D) point tile is held for the whole
    loop, so BLOCK_N * D_PAD is capped.  With TF32x3 (the fp32 default) Triton keeps the point tile
    and each centroid stage in shared memory as split hi/lo copies: ~4 * D * (2 * BLOCK_N +
    BLOCK_C * (stages + 1)) bytes (matches sm_90 compiles of this kernel); configs above the limit
    are skipped here instead of failing to compile in the autotuner (which would also drop them).
    """
    args = {**named_args, **kwargs}
    d_pad, c_bucket, mode = args["D_PAD"], args["C_BUCKET"], args["DOT_MODE"]
    out = []
    for c in configs:
        bn, bc = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_C"]
        if bc > max(32, c_bucket):
            continue
        if bn * d_pad > 128 * 128:
            continue
        if mode == _DOT_TF32X3 and 4 * d_pad * (2 * bn + bc * (c.num_stages + 1)) > _SMEM_LIMIT:
            continue
        out.append(c)
    return out or configs[:1]


@triton.autotune(configs=_configs(), key=["D_PAD", "C_BUCKET", "DOT_MODE", "UPCAST"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _kmeans_assign_kernel(
    X, Cent, Labels,
    sxg, sxn, scg, scc, slg,
    N, C, D, C_BUCKET,
    D_PAD: tl.constexpr, DOT_MODE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # X: (G, N, D), Cent: (G, C, D), both with unit stride along D; Labels: (G, N) int64.
    # C_BUCKET is only an autotune key (C rounded up to a power of two).
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_n < N
    d_ok = offs_d < D
    x = tl.load(X + g * sxg + offs_n.to(tl.int64)[:, None] * sxn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    c_base = Cent + g * scg
    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    label = tl.zeros([BLOCK_N], dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        ct = tl.load(c_base + offs_c[None, :] * scc + offs_d[:, None],
                     mask=c_ok[None, :] & d_ok[:, None], other=0.0)  # (D_PAD, BLOCK_C)
        ct32 = ct.to(tl.float32)
        half_c2 = 0.5 * tl.sum(ct32 * ct32, axis=0)  # (BLOCK_C,), fp32
        if UPCAST:
            ct = ct32
        if DOT_MODE == 1:
            s = tl.dot(x, ct, input_precision="ieee")
        elif DOT_MODE == 2:
            s = tl.dot(x, ct, input_precision="tf32x3")
        elif DOT_MODE == 3:
            s = tl.dot(x, ct, input_precision="tf32")
        else:
            s = tl.dot(x, ct)
        s = s - half_c2[None, :]
        s = tl.where(c_ok[None, :], s, float("-inf"))  # padded centroids never win
        tile_best = tl.max(s, axis=1)
        # smallest index attaining the tile max (exact ties -> smallest index, like torch.argmax)
        tile_arg = tl.min(tl.where(s == tile_best[:, None], offs_c[None, :], 2147483647), axis=1)
        take = tile_best > best  # strict: an earlier tile keeps exact ties
        label = tl.where(take, tile_arg, label)
        best = tl.where(take, tile_best, best)
    tl.store(Labels + g * slg + offs_n, label.to(tl.int64), mask=row_ok)


def assign_reference(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch nearest centroid (G, N) int64, computed like the kernel: fp16/bf16 inputs are
    upcast to fp32 (the kernel's accumulation precision), fp32/fp64 stay as they are."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(ct)
    c = centroids.to(ct)
    score = torch.bmm(x, c.transpose(1, 2)) - 0.5 * (c * c).sum(-1).unsqueeze(1)
    return score.argmax(-1)


def _describe(t) -> str:
    return f"{tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_inputs(x, centroids) -> tuple[int, int, int, int]:
    """Check x (G, N, D) and centroids (G, C, D) for the kernel.  Returns (G, N, C, D).

    Raises TypeError (not a tensor, unsupported or mismatched dtype) or ValueError (rank, shape,
    device) with what was expected, what came and how to fix it.
    """
    for name, t in (("x", x), ("centroids", centroids)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kmeans_assign: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3:
        raise ValueError(f"kmeans_assign: x must be 3-D (groups, points, dim), got shape {_describe(x)}; "
                         "fold batch and heads into the first dimension, e.g. x.reshape(B * H, N, D)")
    if centroids.dim() != 3:
        raise ValueError(f"kmeans_assign: centroids must be 3-D (groups, clusters, dim), got shape "
                         f"{_describe(centroids)}; for shared centroids use c.expand(G, C, D)")
    G, N, D = x.shape
    if centroids.shape[0] != G:
        raise ValueError(f"kmeans_assign: x and centroids must have the same number of groups, got x "
                         f"{_describe(x)} ({G} groups) and centroids {_describe(centroids)} "
                         f"({centroids.shape[0]} groups)")
    if centroids.shape[2] != D:
        raise ValueError(f"kmeans_assign: x and centroids must have the same dim, got x dim {D} and "
                         f"centroids dim {centroids.shape[2]}")
    C = centroids.shape[1]
    if C < 1:
        raise ValueError(f"kmeans_assign: need at least one centroid per group, got centroids {_describe(centroids)}")
    for name, t in (("x", x), ("centroids", centroids)):
        if t.dtype not in DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in DTYPES)
            raise TypeError(f"kmeans_assign: unsupported {name} dtype {t.dtype}; expected one of {names}. "
                            f"Cast with {name}.float(), or use ditaccel.attention.kmeans.assign, which "
                            "handles other dtypes in torch")
    if x.dtype != centroids.dtype:
        raise TypeError(f"kmeans_assign: x and centroids must have the same dtype, got x {x.dtype} and "
                        f"centroids {centroids.dtype}; cast with centroids.to(x.dtype)")
    if x.device != centroids.device:
        raise ValueError(f"kmeans_assign: x and centroids must be on the same device, got x on {x.device} "
                         f"and centroids on {centroids.device}; move them with centroids.to(x.device)")
    if not 1 <= D <= MAX_DIM:
        raise ValueError(f"kmeans_assign: dim must be in 1..{MAX_DIM}, got {D}; use the torch path "
                         "(ditaccel.attention.kmeans.assign on CPU, or assign_reference) for wider points")
    return G, N, C, D


def supports(x, centroids) -> bool:
    """Whether kmeans_assign accepts these inputs (CUDA, or CPU under the interpreter)."""
    try:
        check_inputs(x, centroids)
    except (TypeError, ValueError):
        return False
    return x.is_cuda or _INTERPRET


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid labels (G, N) int64 for points x (G, N, D) and centroids (G, C, D).

    x and centroids: same dtype (float32, float16 or bfloat16) and device, 1 <= D <= 256.  Any
    strides along groups/points work; a tensor whose last dim is not contiguous is copied first.
    """
    G, N, C, D = check_inputs(x, centroids)
    if not x.is_cuda and not _INTERPRET:
        raise ValueError(f"kmeans_assign: the Triton kernel needs CUDA tensors, got x on {x.device}; use "
                         "ditaccel.attention.kmeans.assign, which falls back to torch on CPU")
    labels = torch.empty((G, N), dtype=torch.int64, device=x.device)
    if G == 0 or N == 0:
        return labels
    if x.stride(2) != 1:
        x = x.contiguous()
    if centroids.stride(2) != 1:
        centroids = centroids.contiguous()
    if _INTERPRET:
        mode = _DOT_IEEE
    elif x.dtype == torch.float32:
        mode = _DOT_TF32 if torch.backends.cuda.matmul.allow_tf32 else _DOT_TF32X3
    else:
        mode = _DOT_DEFAULT

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), G)

    _kmeans_assign_kernel[grid](
        x, centroids, labels,
        x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1), labels.stride(0),
        N, C, D, _next_pow2(C),
        D_PAD=max(16, _next_pow2(D)), DOT_MODE=mode, UPCAST=_INTERPRET,
    )
    return labels
