"""Which pieces of plumbing a ditaccel method is made of, so the ComfyUI engine can run each piece
through a ComfyUI mechanism instead of installing it as a module hook.

On the diffusers path a method's ``install()`` attaches its parts as hooks. Here the parts are read
from the method object (its attributes, and lists of them) and driven by the ComfyUI engine:

* :class:`~ditaccel.hooks.segment_cache.SegmentCache` (step cache, Δ-Cache, TaylorSeer block runs;
  ``ProvidedResidualSegment`` included) -> ``patches_replace["dit"]`` block patches, or the
  DIFFUSION_MODEL wrapper in model scope;
* :class:`~ditaccel.hooks.module_cache.ModuleCache` (TaylorSeer module units) -> object patches of
  the blocks' children and the attention override for attention cores;
* :class:`~ditaccel.hooks.probe.BlockProbe` (adaptive schedules) -> the block patch of its block;
* a :class:`~ditaccel.attention.sparse_method.SparseAttentionMethod` itself -> the attention
  override (``optimized_attention_override`` in transformer_options);
* a token selection with ComfyUI drivers (RAS built as :class:`.ras.ComfyRAS`: its token selector
  and K/V router) -> the block patches of its regions and the attention override.

A method with any other part is refused with an error that says so, before anything is attached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...attention.sparse_method import SparseAttentionMethod
from ...errors import ConfigError
from ...hooks.method import SPARSE_ATTENTION, STEP_CACHE, TOKEN_SELECTION
from ...hooks.module_cache import ModuleCache
from ...hooks.probe import BlockProbe
from ...hooks.segment_cache import SegmentCache

# Methods whose parts all have a ComfyUI counterpart. Others are refused by name before they are
# built (their constructors may expect diffusers model facts that a ComfyUI model does not have).
COMFY_READY_METHODS = ("StepCache", "TaylorSeer", "DeltaCache", "HarmoniCa", "SVG2", "Rettention", "CLEAR", "RAS")


@dataclass
class MethodParts:
    segments: list[SegmentCache] = field(default_factory=list)
    module_caches: list[ModuleCache] = field(default_factory=list)
    probes: list[BlockProbe] = field(default_factory=list)
    sparse: SparseAttentionMethod | None = None
    # a token selection the ComfyUI engine can drive (RAS built by .ras.ComfyRAS): its selector and
    # K/V router run from the block patches and the attention override
    token_selection: object | None = None


def _values(method):
    for value in vars(method).values():
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


def _is_part(obj) -> bool:
    return callable(getattr(obj, "install", None)) and callable(getattr(obj, "remove", None))


def _not_available(method, why: str) -> ConfigError:
    return ConfigError(
        f"{method.name} is not available in ComfyUI yet: {why}. In ComfyUI use the step caches (DiT Accelerate "
        "presets, or the StepCache, TaylorSeer, DeltaCache and HarmoniCa nodes), RAS, and the sparse attentions "
        "(SVG2, Rettention, CLEAR nodes)."
    )


def check_ready(config) -> None:
    """ConfigError, before anything is built, for a method that has no ComfyUI plumbing yet."""
    if config.method_name not in COMFY_READY_METHODS:
        why = "no ComfyUI plumbing"
        raise ConfigError(
            f"{config.method_name} is not available in ComfyUI yet: {why}. In ComfyUI use "
            f"{', '.join(COMFY_READY_METHODS)} (DiT Accelerate presets are TaylorSeer)."
        )


def method_parts(method) -> MethodParts:
    """The parts of ``method`` the ComfyUI engine can drive; ConfigError for anything else."""
    kinds = {kind for kind, _, _ in method.claims()}
    if kinds == {TOKEN_SELECTION} and callable(getattr(method, "run_block", None)) \
            and callable(getattr(method, "attend", None)):
        return MethodParts(token_selection=method)
    allowed = {STEP_CACHE, SPARSE_ATTENTION}
    if kinds - allowed:
        raise _not_available(method, f"it needs {', '.join(sorted(kinds - allowed))} plumbing that only the "
                                     "diffusers path has (module hooks on attention processors)")
    parts = MethodParts()
    seen: set[int] = set()
    for value in _values(method):
        if id(value) in seen or value is method.engine:
            continue
        seen.add(id(value))
        if isinstance(value, SegmentCache):
            parts.segments.append(value)
        elif isinstance(value, ModuleCache):
            parts.module_caches.append(value)
        elif isinstance(value, BlockProbe):
            parts.probes.append(value)
        elif _is_part(value):
            raise _not_available(method, f"its {type(value).__name__} is installed as a module hook, which has no "
                                         "ComfyUI counterpart here")
    if isinstance(method, SparseAttentionMethod):
        parts.sparse = method
    elif SPARSE_ATTENTION in kinds:
        raise _not_available(method, "its attention routing is not a SparseAttentionMethod")
    return parts
