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
