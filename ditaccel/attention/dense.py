"""Dense attention backend choice: flash-attn, then xformers, then torch SDPA.

Inputs are (B, H, L, D) like ``F.scaled_dot_product_attention``. A backend is used only when it is
installed and supports the device, dtype, head dim and the absence of a mask; otherwise SDPA.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=None)
def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_backends() -> dict[str, bool]:
    return {
        "flash_attn": _has("flash_attn"),
        "xformers": _has("xformers"),
        "sdpa": True,
        "triton": _has("triton"),
        "cuda": torch.cuda.is_available(),
    }


def _flash_ok(q: torch.Tensor, mask) -> bool:
    return (mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 and _has("flash_attn"))


def _xformers_ok(q: torch.Tensor, mask) -> bool:
    return mask is None and q.is_cuda and _has("xformers")


def dense_attention(q, k, v, attn_mask=None, scale=None, backend: str = "auto") -> torch.Tensor:
    """Full attention with the fastest installed backend that supports the inputs."""
    if backend in ("auto", "flash_attn") and _flash_ok(q, attn_mask):
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    if backend in ("auto", "xformers") and _xformers_ok(q, attn_mask):
        import xformers.ops as xops

        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
