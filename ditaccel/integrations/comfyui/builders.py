"""Building ditaccel's method objects against the ComfyUI engine.

Most methods are built exactly as on the diffusers path, ``apply_function_for(config)(engine,
config)``: they read the model only through the engine's adapter. Two need model facts the adapter
does not carry, and get them from here, still as ditaccel's own objects:

* **HarmoniCa**: the router file names the model it was trained for (family, transformer class,
  block count). ComfyUI's FLUX / Chroma / Wan are the same networks as diffusers' (same blocks in
  the same order, only the class names differ), so a router trained with ``ditaccel train-router``
  on the diffusers model is accepted for the ComfyUI class of that family; the router's block
  groups must still lie inside one of ComfyUI's block runs (FLUX: the double blocks, then the
  single blocks, which ComfyUI runs on the joint text+image sequence), which
  ``Router.check_model`` checks with a clear error. The router is built with
  ``HarmoniCa(engine, config, router=...)``, the constructor's own parameter for a loaded router.
* **RAS**: its token facts (where the token regions are, which block arguments are per token, how
  the output maps to image tokens) are ComfyUI's (:mod:`.ras`), passed with ``RAS(engine, config,
  facts=...)``; the selection, schedule, scores and the K/V cache are RAS's own objects.
"""

from __future__ import annotations

import dataclasses

from ...config import MethodConfig, apply_function_for
from ...errors import ConfigError
from .families import SCOPE_BLOCKS

# ComfyUI family -> (diffusers adapter family, diffusers transformer class) of the same network,
# with the blocks in the same execution order (ComfyUI double_blocks/single_blocks = diffusers
# transformer_blocks/single_transformer_blocks; Wan blocks = blocks).
DIFFUSERS_EQUIVALENT = {
    "flux": ("flux", "FluxTransformer2DModel"),
    "chroma": ("chroma", "ChromaTransformer2DModel"),
    "wan": ("wan", "WanTransformer3DModel"),
}


def comfy_router(router, adapter):
    """``router`` as a router of the ComfyUI model behind ``adapter``: unchanged when it was made for
    the ComfyUI class, renamed when it was made for the diffusers class of the same network."""
    comfy_class = type(adapter.model).__name__
    if (router.family, router.transformer_class) == (adapter.family, comfy_class):
        return router
    if DIFFUSERS_EQUIVALENT.get(adapter.family) == (router.family, router.transformer_class):
        return dataclasses.replace(router, family=adapter.family, transformer_class=comfy_class,
                                   training=dict(router.training, trained_on=router.transformer_class))
    return router  # check_model reports the mismatch


def build_harmonica(engine, config):
    from ...methods.harmonica import HarmoniCa
    from ...methods.harmonica_router import Router

    if engine.scope != SCOPE_BLOCKS:
        raise ConfigError(
            f"HarmoniCa routes single blocks, which needs ComfyUI's block patches (cache scope 'blocks'); the "
            f"{engine.adapter.family} model runs in {engine.scope} scope here"
            + (" because its ComfyUI model code has no block patches." if engine.spec.scope_request is None
               else ". Use cache scope 'auto' or 'blocks'."))
    router = comfy_router(Router.load(config.router), engine.adapter)
    try:
        return HarmoniCa(engine, config, router=router)
    except ConfigError as err:
        if "segment" not in str(err):
            raise
        spans = []
        offset = 0
        for seg in engine.adapter.segments():
            spans.append((offset, offset + len(seg)))
            offset += len(seg)
        raise type(err)(f"{err} In ComfyUI the {engine.adapter.family} model's block runs are {spans} (a group may "
                        "not cross from one run to the next); routers trained with `ditaccel train-router "
                        "--group-size N` where N divides every run's length fit.") from None


def build_method(engine, config: MethodConfig):
    """The method object of ``config`` for the ComfyUI engine."""
    name = config.method_name
    if name == "HarmoniCa":
        return build_harmonica(engine, config)
    if name == "RAS":
        from .ras import build_ras

        return build_ras(engine, config)
    return apply_function_for(config)(engine, config)
