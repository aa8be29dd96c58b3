"""Routing the core attention of a model's attention layers to a ditaccel method.

Each attention module the adapter lists gets a hook (diffusers ModelHook) that runs the module's
own forward — its projections, norms, RoPE and its processor, untouched — while the scaled
dot-product attention inside is routed to the method. Routing is done with a TorchFunctionMode
that catches ``F.scaled_dot_product_attention`` (called directly by SDPA processors and by the
native backend of diffusers' ``dispatch_attention_fn``), so q/k/v arrive in (B, H, L, D) after
RoPE. A router returns the attention output, or None to run dense.

Hooking the module rather than replacing its processor keeps the processor's ``__call__``
signature, which diffusers inspects to filter attention kwargs, and works for every processor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch import nn
from torch.overrides import TorchFunctionMode

from ..hooks.attach import attach_hook, detach_hook


@dataclass
class AttentionSite:
    """Where an intercepted attention call happens."""

    name: str  # qualified module name, e.g. "transformer_blocks.3.attn"
    module: nn.Module
    layer_index: int  # position among the adapter's attention modules
    call_index: int = 0  # k-th SDPA call inside one forward of the module


class AttentionRouter(Protocol):
    def attend(self, site: AttentionSite, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor | None: ...


class _SDPAIntercept(TorchFunctionMode):
    def __init__(self, router: AttentionRouter, site: AttentionSite):
        super().__init__()
        self.router = router
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = self._route(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _route(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
        if dropout_p or is_causal or enable_gqa or query.dim() != 4:
            return None
        # torch pops this mode while __torch_function__ runs, so the router's own torch calls
        # are not intercepted.
        out = self.router.attend(self.site, query, key, value, attn_mask, scale)
        self.site.call_index += 1
        return out


class _AttentionHook(ModelHook):
    def __init__(self, router: AttentionRouter, site: AttentionSite):
        super().__init__()
        self.router = router
        self.site = site

    def new_forward(self, module, *args, **kwargs):
        if not getattr(self.router, "active", True):
            return self.fn_ref.original_forward(*args, **kwargs)
        self.site.call_index = 0
        with _SDPAIntercept(self.router, self.site):
            return self.fn_ref.original_forward(*args, **kwargs)


def install_attention_router(router: AttentionRouter, modules: list[tuple[str, nn.Module]], hook_name: str,
                             layer_indices: list[int] | None = None) -> list[nn.Module]:
    """Hook ``modules`` so their core attention goes to ``router``. Returns the hooked modules."""
    hooked = []
    try:
        for i, (name, module) in enumerate(modules):
            index = layer_indices[i] if layer_indices is not None else i
            attach_hook(module, _AttentionHook(router, AttentionSite(name, module, index)), hook_name)
            hooked.append(module)
    except BaseException:
        for module in hooked:
            detach_hook(module, hook_name)
        raise
    return hooked


def remove_attention_router(modules: list[nn.Module], hook_name: str) -> None:
    for module in modules:
        detach_hook(module, hook_name)
