"""Per-module units (TaylorSeer ``granularity="module"``) in ComfyUI.

A block's child module (Wan's ``ffn``, FLUX's ``img_mlp``...) is replaced, through ComfyUI's object
patches (``ModelPatcher.add_object_patch``, applied while the patched MODEL is loaded and undone
when another clone of the model loads), by a :class:`UnitModule`. The stand-in shares the child's
submodules, parameters and buffers (the same dicts, so state-dict names, LoRA weight patches,
device moves and casts see exactly the original weights) and only changes what a call does: inside
a ditaccel sampling run it asks the method's :class:`~ditaccel.hooks.module_cache.ModuleCache`
whether to run the module or use a forecast, and reports the outputs of modules that ran -- the
same protocol as the diffusers path's module hook. Outside a run it calls the original module.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ...hooks.module_cache import ModuleCache, flatten_output, unflatten_output


def run_unit(cache: ModuleCache, index: int, compute: Callable[[], object]):
    """One call of unit ``index`` of ``cache``: the policy's replacement, or ``compute()`` recorded."""
    structure = cache.structures.get(index)
    if structure is not None:
        tensors = cache.provide(index)
        if tensors is not None:
            return unflatten_output(structure, tensors)
    output = compute()
    flat = flatten_output(output)
    if flat is not None:
        cache.structures[index] = flat[0]
        cache.record(index, flat[1])
    return output


class UnitModule(nn.Module):
    """Object-patch stand-in for a block's child module; ``key`` names the unit (see adapter.unit_key)."""

    def __init__(self, original: nn.Module, key: tuple, current_run: Callable[[], object]):
        super().__init__()
        object.__setattr__(self, "_unit_original", original)  # not a child: names stay the original's
        object.__setattr__(self, "_unit_current_run", current_run)
        self._modules = original._modules
        self._parameters = original._parameters
        self._buffers = original._buffers
        self.unit_key = key

    @property
    def original(self) -> nn.Module:
        return self._unit_original

    def forward(self, *args, **kwargs):
        original = self._unit_original
        engine = self._unit_current_run()
        if engine is None:
            return original(*args, **kwargs)
        return engine.run_unit(self.unit_key, lambda: original(*args, **kwargs))

    def __deepcopy__(self, memo):  # object patches are shared between clones, never copied
        return self

    def extra_repr(self) -> str:
        return f"ditaccel unit {self.unit_key} of {type(self._unit_original).__name__}"
