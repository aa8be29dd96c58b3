"""Registry of model-family adapters, and detection of a pipeline's or model's family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import UnsupportedModelError, describe
from .base import ModelAdapter


@dataclass(frozen=True)
class AdapterEntry:
    family: str
    model_classes: tuple[str, ...]
    build: Callable[[nn.Module], ModelAdapter]
    description: str = ""


_ADAPTERS: dict[str, AdapterEntry] = {}


def register_adapter(family: str, model_classes: tuple[str, ...], description: str = ""):
    """Decorator registering ``build(model) -> ModelAdapter`` for transformer classes named ``model_classes``.

    Classes are matched by name along the model's MRO, so subclasses of a supported class are
    found too and optional model classes need not be importable.
    """

    def decorator(build: Callable[[nn.Module], ModelAdapter]):
        _ADAPTERS[family] = AdapterEntry(family, tuple(model_classes), build, description)
        return build

    return decorator


def registered_families() -> dict[str, AdapterEntry]:
    return dict(_ADAPTERS)


def _entry_for(model: nn.Module) -> AdapterEntry | None:
    for cls in type(model).__mro__:
        for entry in _ADAPTERS.values():
            if cls.__name__ in entry.model_classes:
                return entry
    return None


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile(model)`` wrapper (``OptimizedModule``).

    Our hooks go on the original module: the wrapper's compiled forward calls the original
    module's ``__call__``, so dynamo traces through them. Hooking the wrapper itself gave the
    generic adapter (the family is read from the class) and crashed dynamo's tracing.
    """
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return model


def find_transformer(pipe_or_model) -> tuple[nn.Module, object | None]:
    """Return (transformer module, pipeline or None) for a pipeline or a bare model."""
    if isinstance(pipe_or_model, nn.Module):
        return _unwrap_compiled(pipe_or_model), None
    components = getattr(pipe_or_model, "components", None)
    transformer = getattr(pipe_or_model, "transformer", None)
    if isinstance(transformer, nn.Module):
        return _unwrap_compiled(transformer), pipe_or_model
    if isinstance(components, dict) and isinstance(components.get("unet"), nn.Module):
        raise UnsupportedModelError(
            f"{type(pipe_or_model).__name__} is a UNet pipeline; ditaccel accelerates diffusion transformers "
            "(pipelines with a `transformer` component such as FluxPipeline, StableDiffusion3Pipeline, WanPipeline). "
            "Use a DiT pipeline, or pass a transformer module directly."
        )
    raise UnsupportedModelError(
        f"Expected a diffusers pipeline with a `transformer` component or a torch.nn.Module, got "
        f"{describe(pipe_or_model)}. Pass e.g. a FluxPipeline, or pipe.transformer."
    )


def adapter_for(model: nn.Module, family: str | None = None) -> ModelAdapter:
    """Build the adapter for ``model``; the generic adapter when no family matches."""
    if family is not None:
        if family not in _ADAPTERS:
            raise UnsupportedModelError(
                f"Unknown model family {family!r}. Registered families: {sorted(_ADAPTERS)}. "
                "Pass one of them, or drop family= to detect the family from the transformer class."
            )
        adapter = _ADAPTERS[family].build(model)
    else:
        entry = _entry_for(model)
        if entry is not None:
            adapter = entry.build(model)
        else:
            from .generic import generic_adapter

            adapter = generic_adapter(model)
    if adapter.num_blocks == 0 and family is not None:
        detected = _entry_for(model)
        hint = (f"family {detected.family!r} is detected for it: drop family= or pass family={detected.family!r}"
                if detected is not None and hasattr(detected, "family") else "drop family= to detect it")
        raise UnsupportedModelError(
            f"family={family!r} was forced, but {type(model).__name__} has none of the blocks of a {family} model "
            f"(expected its block lists; found none). The family must match the transformer: {hint}."
        )
    if adapter.num_blocks == 0:
        raise UnsupportedModelError(
            f"Found no transformer blocks in {type(model).__name__}. Supported families: {sorted(_ADAPTERS)}. "
            "For another model, register an adapter with ditaccel.adapters.register_adapter(family, "
            "model_classes=(...)) that lists its block ModuleLists (see docs/adapters.md)."
        )
    return adapter
