"""Skipping a contiguous run of transformer blocks by re-using its cached residual.

On a computed call, the segment's input streams and its output streams give the residual
Δ = output − input (per stream: image tokens, and text tokens where the block carries them).
On a skipped call, the first block returns input + Δ in the segment's output format and the
other blocks pass their input through, so the model's own forward runs unchanged around them.
Residuals are kept per CFG branch. This is the plumbing shared by the step caches (plain step
cache, Δ-Cache, first-block-residual adaptive caches); the decisions come from a policy.

What the model's own loop adds between two blocks of the segment (FLUX/SD3 ControlNet residuals,
for example) is not part of the blocks' work: on computed calls it is measured (input of block
i+1 minus output of block i, free when the loop passes the tensor on unchanged) and left out of
the cached residual, so on skipped calls the loop adds the current step's value exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..adapters.base import BlockIO, pack_output, read_streams, unpack_output
from .attach import attach_hook, detach_hook

@dataclass
class _BranchState:
    dh: torch.Tensor | None = None
    de: torch.Tensor | None = None


def _residual(out: torch.Tensor | None, inp: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if out is None or inp is None or out.shape != inp.shape:
        return None
    return (out - inp).to(dtype)


class SegmentCache:
    """Residual cache of one run of blocks ``entries = [(name, block, io), ...]``.

    ``decide(segment, h_in, e_in) -> bool`` returns True to compute; ``want_residual()`` says
    whether the residual of a computed call may be used later (False lets a never-skip schedule
    avoid the subtraction). ``on_skip`` / ``on_compute`` are told how many blocks ran or not.
    """

    def __init__(
        self,
        entries: list[tuple[str, nn.Module, BlockIO]],
        hook_name: str,
        decide: Callable[["SegmentCache", torch.Tensor, torch.Tensor | None], bool],
        want_residual: Callable[[], bool],
        on_result: Callable[["SegmentCache", bool], None],
        cache_dtype: torch.dtype | None = None,
    ):
        self.entries = entries
        self.hook_name = hook_name
        self.decide = decide
        self.want_residual = want_residual
        self.on_result = on_result
        self.cache_dtype = cache_dtype
        self.states: dict[int, _BranchState] = {}
        self.branch = 0
        self.skipping = False
        self._h_in: torch.Tensor | None = None
        self._e_in: torch.Tensor | None = None
        self._keep = False
        self._prev_out: tuple | None = None
        self._glue: list = [None, None]

    @property
    def blocks(self) -> list[nn.Module]:
        return [b for _, b, _ in self.entries]

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.entries]

    def state(self) -> _BranchState:
        return self.states.setdefault(self.branch, _BranchState())

    def has_residual(self) -> bool:
        st = self.states.get(self.branch)
        return st is not None and st.dh is not None

    def residual_is_finite(self) -> bool:
        st = self.state()
        ok = bool(torch.isfinite(st.dh).all())
        if ok and st.de is not None:
            ok = bool(torch.isfinite(st.de).all())
        return ok

    def reset(self) -> None:
        self.states.clear()
        self.skipping = False
        self._h_in = self._e_in = None

    def bytes_held(self) -> int:
        total = 0
        for st in self.states.values():
            for t in (st.dh, st.de):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    # -- called by the block hooks -----------------------------------------------------------------
    def enter(self, h: torch.Tensor, e: torch.Tensor | None) -> None:
        self.skipping = not self.decide(self, h, e)
        self.on_result(self, not self.skipping)
        if not self.skipping:
            self._keep = self.want_residual()
            self._h_in, self._e_in = (h, e) if self._keep else (None, None)
            self._prev_out = None
            self._glue = [None, None]

    def track_between(self, io: BlockIO, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """On a computed call, add what the loop changed since the previous block's output."""
        if not self._keep or self._prev_out is None:
            return
        current = read_streams(io, module, args, kwargs)
        for i in (0, 1):
            now, before = current[i], self._prev_out[i]
            if now is None or before is None or now is before or now.shape != before.shape:
                continue
            delta = now - before
            self._glue[i] = delta if self._glue[i] is None else self._glue[i] + delta

    def track_output(self, io: BlockIO, output) -> None:
        if self._keep:
            self._prev_out = unpack_output(io, output)

    def skipped_output(self, io: BlockIO, h: torch.Tensor, e: torch.Tensor | None):
        st = self.state()
        h_out = h + st.dh.to(h.dtype)
        e_out = e + st.de.to(e.dtype) if (e is not None and st.de is not None) else e
        return pack_output(io, h_out, e_out)

    def exit(self, io: BlockIO, output) -> None:
        if not self._keep:
            return
        h_out, e_out = unpack_output(io, output)
        st = self.state()
        dtype = self.cache_dtype or h_out.dtype
        glue_h, glue_e = self._glue
        st.dh = _residual(h_out if glue_h is None else h_out - glue_h, self._h_in, dtype)
        st.de = _residual(e_out if (glue_e is None or e_out is None) else e_out - glue_e, self._e_in, dtype)
        self._h_in = self._e_in = None
        self._prev_out = None
        self._glue = [None, None]

    # -- install -------------------------------------------------------------------------------
    def install(self) -> None:
        last = len(self.entries) - 1
        attached = []
        try:
            for i, (_, block, io) in enumerate(self.entries):
                attach_hook(block, _SegmentBlockHook(self, io, is_first=(i == 0), is_last=(i == last)), self.hook_name)
                attached.append(block)
        except BaseException:
            for block in attached:
                detach_hook(block, self.hook_name)
            raise

    def remove(self) -> None:
        for _, block, _ in self.entries:
            detach_hook(block, self.hook_name)
        self.reset()


class _SegmentBlockHook(ModelHook):
    def __init__(self, segment: SegmentCache, io: BlockIO, is_first: bool, is_last: bool):
        super().__init__()
        self.segment = segment
        self.io = io
        self.is_first = is_first
        self.is_last = is_last

    def new_forward(self, module, *args, **kwargs):
        seg = self.segment
        if self.is_first:
            h, e = read_streams(self.io, module, args, kwargs)
            seg.enter(h, e)
            if seg.skipping:
                return seg.skipped_output(self.io, h, e)
        elif seg.skipping:
            h, e = read_streams(self.io, module, args, kwargs)
            return pack_output(self.io, h, e)
        else:
            seg.track_between(self.io, module, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_last:
            seg.exit(self.io, output)
        else:
            seg.track_output(self.io, output)
        return output
