"""FLOP profile of one transformer call, counted from the ops that actually ran.

torch's FlopCounterMode counts matmuls and the CUDA attention kernels; the CPU flash-attention op
that SDPA uses on CPU has no formula there, so one is supplied (4·B·H·Lq·Lk·d for the forward:
QK^T and PV, two FLOPs per multiply-add). The profile is taken once per input signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, lq, d = query_shape
    lk = key_shape[-2]
    dv = value_shape[-1]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def _custom_mapping() -> dict:
    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _sdpa_cpu_flops
    return mapping


@dataclass
class FlopProfile:
    total: int
    per_module: dict[int, int] = field(default_factory=dict)  # id(module) -> FLOPs in one call

    def of(self, module: nn.Module) -> int:
        return self.per_module.get(id(module), 0)


class FlopProfiler:
    """Counts the FLOPs of one call, in total and for each of ``modules``.

    Per-module counts come from the running global count read before and after each module runs
    (temporary torch forward hooks), so they work whatever the module names and nesting are.
    """

    def __init__(self, modules: list[nn.Module]):
        self._modules = modules
        self._mode: FlopCounterMode | None = None
        self._handles = []
        self._starts: dict[int, int] = {}
        self._per_module: dict[int, int] = {}

    def _global(self) -> int:
        return int(sum(self._mode.flop_counts["Global"].values()))

    def _pre(self, module, args):
        self._starts[id(module)] = self._global()

    def _post(self, module, args, output):
        start = self._starts.pop(id(module), None)
        if start is not None:
            self._per_module[id(module)] = self._per_module.get(id(module), 0) + self._global() - start

    def __enter__(self):
        self._mode = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
        for module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def profile(self) -> FlopProfile:
        return FlopProfile(total=self._global(), per_module=dict(self._per_module))
