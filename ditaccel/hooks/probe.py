"""A probe on one block: after the block ran, tell a callback its input and output hidden stream.

Adaptive step caches compute the first block of every step and compare its residual (output −
input) with a reference (the residual at the last full step, or its Taylor forecast) to decide
whether the rest of the step may be cached.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..adapters.base import BlockIO, read_streams, unpack_output
from .attach import attach_hook, detach_hook


class BlockProbe:
    def __init__(self, name: str, block: nn.Module, io: BlockIO, hook_name: str,
                 on_probe: Callable[[torch.Tensor, torch.Tensor], None]):
        self.name = name
        self.block = block
        self.io = io
        self.hook_name = hook_name
        self.on_probe = on_probe

    def install(self) -> None:
        attach_hook(self.block, _ProbeHook(self), self.hook_name)

    def remove(self) -> None:
        detach_hook(self.block, self.hook_name)


class _ProbeHook(ModelHook):
    def __init__(self, probe: BlockProbe):
        super().__init__()
        self.probe = probe

    def new_forward(self, module, *args, **kwargs):
        probe = self.probe
        h_in, _ = read_streams(probe.io, module, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        h_out, _ = unpack_output(probe.io, output)
        if isinstance(h_in, torch.Tensor) and isinstance(h_out, torch.Tensor) and h_in.shape == h_out.shape:
            probe.on_probe(h_in, h_out)
        return output
