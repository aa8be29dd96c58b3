"""ComfyUI's attention override (``transformer_options["optimized_attention_override"]``) for ditaccel.

ComfyUI 0.3.75 routes every ``optimized_attention`` call of its DiTs (``comfy.ldm.modules.attention.
wrap_attn``) to ``override(func, *args, **kwargs)`` when transformer_options holds one; ``func`` is
the attention function ComfyUI picked (pytorch SDPA, sage, flash, ...). Through it:

* TaylorSeer's attention-core units (FLUX-style double blocks, whose attention is a bare call in the
  block's forward) are forecast or recorded (:func:`.units.run_unit`);
* the sparse attentions (SVG2, Re-ttention, CLEAR) get q/k/v as (B, H, L, D) and return the
  attention output, or None for the dense path (``func`` itself).

The engine knows the block the call comes from (the block patches set it), so each call has a
stable site: (block, k-th attention call inside the block). An override another node had set is
kept and called for the dense path.
"""

from __future__ import annotations

from typing import Callable

import torch

OVERRIDE_KEY = "optimized_attention_override"

_POSITIONAL = ("q", "k", "v", "heads")


class AttentionArgs:
    """The arguments of one ``optimized_attention`` call, in ComfyUI's conventions."""

    def __init__(self, args: tuple, kwargs: dict):
        named = dict(zip(_POSITIONAL, args))
        for name in _POSITIONAL:
            if name in kwargs:
                named[name] = kwargs[name]
        self.q, self.k, self.v = named.get("q"), named.get("k"), named.get("v")
        self.heads = named.get("heads")
        self.mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
        self.skip_reshape = bool(kwargs.get("skip_reshape", False))
        self.skip_output_reshape = bool(kwargs.get("skip_output_reshape", False))

    @property
    def usable(self) -> bool:
        return all(isinstance(t, torch.Tensor) for t in (self.q, self.k, self.v)) and isinstance(self.heads, int)

    def to_bhld(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H*D) -> (B, H, L, D) as ComfyUI's attention functions do; as is with skip_reshape."""
        if self.skip_reshape:
            return x
        b, length, width = x.shape
        return x.reshape(b, length, self.heads, width // self.heads).transpose(1, 2)

    def from_bhld(self, out: torch.Tensor) -> torch.Tensor:
        if self.skip_output_reshape:
            return out
        b, h, length, d = out.shape
        return out.transpose(1, 2).reshape(b, length, h * d)


class AttentionOverride:
    """The callable put in transformer_options; ``previous`` is an override set before ours."""

    def __init__(self, current_run: Callable[[], object], previous=None):
        self.current_run = current_run
        self.previous = previous

    def __call__(self, func, *args, **kwargs):
        previous = self.previous

        def dense():
            return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)

        engine = self.current_run()
        if engine is None:
            return dense()
        return engine.run_attention(AttentionArgs(args, kwargs), dense)

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options
        return AttentionOverride(self.current_run, self.previous)

    def __repr__(self) -> str:
        return "ditaccel.AttentionOverride" + (f"(previous={self.previous!r})" if self.previous is not None else "")
