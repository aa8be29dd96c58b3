"""Attaching and detaching our hooks through diffusers' HookRegistry (no second hook system).

Detaching the last hook of a module also removes the registry and the instance-level ``forward``
the registry left behind, so a module that was enabled and disabled is exactly as it was.
"""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

HOOK_PREFIX = "ditaccel."


def attach_hook(module: nn.Module, hook: ModelHook, name: str) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, HOOK_PREFIX + name)


def detach_hook(module: nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(HOOK_PREFIX + name, recurse=False)
    _drop_empty_registry(module)


def _drop_empty_registry(module: nn.Module) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.hooks:
        return
    forward = module.__dict__.get("forward")
    if forward is not None and getattr(forward, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]
    del module._diffusers_hook


def our_hook_names(module: nn.Module) -> list[str]:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return []
    return [n for n in registry.hooks if n.startswith(HOOK_PREFIX)]


def count_our_hooks(root: nn.Module) -> int:
    return sum(len(our_hook_names(m)) for m in root.modules())


# ---------------------------------------------------------------------------------------------
# the transformer's top-level hook under accelerate (``pipe.enable_model_cpu_offload()``)
#
# accelerate's ``add_hook_to_module`` keeps the forward it wrapped in ``module._old_forward`` and
# calls it through that attribute. ``pipe.maybe_free_model_hooks()`` (the end of every pipeline
# call) removes its hook (``module.forward = module._old_forward``) and adds it again. A hook of
# ours registered *on top of* accelerate's would be dropped by that at the end of the first
# generation, so ours always goes *under* accelerate's: we wrap ``_old_forward`` and accelerate
# keeps wrapping us, whichever of the two was enabled first. Removal takes ours out of the same
# place and leaves accelerate's hook as it is.


def _accelerate_wraps(module: nn.Module) -> bool:
    return "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__


def attach_top_hook(module: nn.Module, hook: ModelHook, name: str) -> None:
    if not _accelerate_wraps(module):
        attach_hook(module, hook, name)
        return
    accelerate_forward = module.__dict__.get("forward")
    module.forward = module._old_forward
    try:
        attach_hook(module, hook, name)
    finally:
        module._old_forward = module.forward
        if accelerate_forward is not None:
            module.forward = accelerate_forward


def detach_top_hook(module: nn.Module, name: str) -> None:
    if not _accelerate_wraps(module):
        detach_hook(module, name)
        return
    accelerate_forward = module.__dict__.get("forward")
    module.forward = module._old_forward
    try:
        detach_hook(module, name)
    finally:
        module._old_forward = module.forward
        if accelerate_forward is not None:
            module.forward = accelerate_forward
