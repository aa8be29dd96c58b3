"""Fused attention with log-sum-exp on CPU: torch's flash-attention CPU kernel.

``F.scaled_dot_product_attention`` on CPU runs a fused (flash) kernel but returns no LSE; the
same kernel is exposed as ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``, which
returns ``(out, logsumexp)``. The CPU sparse paths (CLEAR's windows, the block-sparse gather
path) gather each query tile's keys and run this kernel on the small dense problems, so scores,
softmax and the second matmul are never materialised and no separate softmax passes run.

The op is an aten operator, not a documented Python API: :func:`flash_attention_lse` returns
None when it is missing or refuses the inputs, and callers fall back to plain matmul + softmax.
Inputs are (batch, heads, L, D) tensors (any strides); ``bias`` is an additive float mask
broadcastable to (batch, heads, Lq, Lk) in the dtype of q (0 keep, -inf drop).
"""

from __future__ import annotations

import torch

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_broken: set = set()


def _op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def flash_available(x: torch.Tensor) -> bool:
    """Whether :func:`flash_attention_lse` can run on tensors like ``x``."""
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype in _DTYPES
            and x.dtype not in _broken and _op() is not None)


def flash_attention_lse(q, k, v, bias=None, scale: float | None = None):
    """(out like q, lse float32 (or float64 for float64 inputs) (B, H, Lq)), or None if unavailable.

    Rows whose keys are all masked come back as NaN; callers drop such rows.
    """
    if not flash_available(q):
        return None
    try:
        out, lse = _op()(q, k, v, attn_mask=bias, scale=scale)
    except (RuntimeError, TypeError, NotImplementedError):
        _broken.add(q.dtype)
        return None
    return out, lse
