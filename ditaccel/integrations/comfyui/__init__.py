"""ditaccel inside ComfyUI.

In ``ComfyUI/custom_nodes/ditaccel_nodes/__init__.py``::

    from ditaccel.integrations.comfyui import comfy_entrypoint  # noqa: F401

gives the "DiT Accelerate" node (MODEL -> MODEL), one advanced node per method, and the HarmoniCa
router loader. Everything is attached through ComfyUI's own mechanisms (OUTER_SAMPLE and
DIFFUSION_MODEL wrappers, ``patches_replace["dit"]`` block patches, object patches of block
children, ``optimized_attention_override``) on ``model.clone()``; the method algorithms are the
same objects as on the diffusers path. See docs/comfyui.md.

Importing this package does not import ComfyUI; ``comfy_entrypoint`` and the node classes do.
"""

from __future__ import annotations

from .families import FAMILIES, family_of, supported_families  # noqa: F401
from .vendored import find_comfyui, use_vendored_comfyui  # noqa: F401


def comfy_entrypoint():
    """ComfyUI V3 entry point: returns the ditaccel ``ComfyExtension``."""
    from .nodes import comfy_entrypoint as _entry

    return _entry()


def accelerate_model(model, configs, scope: str = "auto", verbose: bool = False):
    """A clone of a ComfyUI MODEL with ditaccel methods attached (the node's work, for scripts)."""
    from .runtime import accelerate_model as _accelerate

    return _accelerate(model, configs, scope=scope, verbose=verbose)


def last_stats(model):
    """Stats of the last sampling run with a MODEL returned by a ditaccel node (or None)."""
    from .runtime import last_stats as _last

    return _last(model)


__all__ = ["comfy_entrypoint", "accelerate_model", "last_stats", "family_of", "supported_families", "FAMILIES",
           "find_comfyui", "use_vendored_comfyui"]
