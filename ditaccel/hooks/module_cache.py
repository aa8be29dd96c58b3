"""Per-module output caching: hooks on attention / MLP submodules whose output a policy may
replace (reuse or forecast) instead of running the module.

The hook flattens what the module returns (a tensor, or a tuple/list of tensors and ``None``)
into a list of tensors; ``provide(index) -> list | None`` gives the replacement (None: run the
module), ``record(index, tensors)`` receives the outputs of modules that ran. The structure of
the output (tuple length, which places hold tensors) is remembered per module so the
replacement is returned in the module's own format.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from torch import nn

from .attach import attach_hook, detach_hook

_TENSOR = "tensor"


def flatten_output(output: Any) -> tuple[Any, list[torch.Tensor]] | None:
    """(structure, tensors) of a module output, or None when it is not tensors / tuples of tensors."""
    if isinstance(output, torch.Tensor):
        return _TENSOR, [output]
    if isinstance(output, (tuple, list)):
        mask = []
        tensors = []
        for item in output:
            if isinstance(item, torch.Tensor):
                mask.append(True)
                tensors.append(item)
            elif item is None:
                mask.append(False)
            else:
                return None
        return (type(output), tuple(mask)), tensors
    return None


def unflatten_output(structure: Any, tensors: list[torch.Tensor]) -> Any:
    if structure == _TENSOR:
        return tensors[0]
    kind, mask = structure
    it = iter(tensors)
    items = [next(it) if m else None for m in mask]
    return kind(items)


class ModuleCache:
    """Hooks ``modules = [(name, module), ...]``; index ``i`` names the i-th module to the policy."""

    def __init__(self, modules: list[tuple[str, nn.Module]], hook_name: str,
                 provide: Callable[[int], list[torch.Tensor] | None],
                 record: Callable[[int, list[torch.Tensor]], None]):
        self.modules = modules
        self.hook_name = hook_name
        self.provide = provide
        self.record = record
        self.structures: dict[int, Any] = {}

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.modules]

    def install(self) -> None:
        attached = []
        try:
            for i, (_, module) in enumerate(self.modules):
                attach_hook(module, _ModuleCacheHook(self, i), self.hook_name)
                attached.append(module)
        except BaseException:
            for module in attached:
                detach_hook(module, self.hook_name)
            raise

    def remove(self) -> None:
        for _, module in self.modules:
            detach_hook(module, self.hook_name)
        self.structures.clear()


class _ModuleCacheHook(ModelHook):
    def __init__(self, cache: ModuleCache, index: int):
        super().__init__()
        self.cache = cache
        self.index = index

    def new_forward(self, module, *args, **kwargs):
        cache = self.cache
        structure = cache.structures.get(self.index)
        if structure is not None:
            tensors = cache.provide(self.index)
            if tensors is not None:
                return unflatten_output(structure, tensors)
        output = self.fn_ref.original_forward(*args, **kwargs)
        flat = flatten_output(output)
        if flat is not None:
            cache.structures[self.index] = flat[0]
            cache.record(self.index, flat[1])
        return output
