"""Model facts of ComfyUI's diffusion transformers: which family a MODEL is, where its blocks are,
and how ComfyUI's ``patches_replace["dit"]`` block patches see each block's token streams.

Nothing here imports ComfyUI: families are matched by the module and class names along the MRO
of ``model.model.diffusion_model`` (and named by ``model.model``'s model_base class in messages),
so this module also loads where ComfyUI is absent.

Per family, each block group is ``(patch kind, ModuleList attribute, streams)``: the patch kind is
ComfyUI's key (``("double_block", i)`` / ``("single_block", i)``), the streams say which entries of
the patch's ``args`` dict the block changes: ``("img", "txt")`` for two-stream blocks that return
both (FLUX double blocks, SD3 joint blocks, HunyuanVideo double blocks, QwenImage), ``("img",)``
for blocks that return only image tokens (FLUX single blocks on the joint sequence, Wan, LTXV).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from ...adapters.base import ENCODER, HIDDEN, BlockIO
from ...errors import UnsupportedModelError

# The key ComfyUI's DiT forwards read their block replacements from.
PATCH_NAME = "dit"

TEXT_FIRST = "text_first"

TWO_STREAM = ("img", "txt")
ONE_STREAM = ("img",)

# Scopes of the step caches: the blocks (through block replace patches), or the whole diffusion
# model call (through the DIFFUSION_MODEL wrapper), for models whose forward has no block patches.
SCOPE_BLOCKS = "blocks"
SCOPE_MODEL = "model"


@dataclass(frozen=True)
class ComfyBlockGroup:
    kind: str  # "double_block" / "single_block"
    attr: str  # ModuleList attribute of the diffusion model
    streams: tuple[str, ...]
    # Per-module units (TaylorSeer granularity "module"): children the block's forward calls as
    # modules (replaced through ComfyUI object patches), and whether the block's attention core is
    # a bare ``optimized_attention`` call (reached through the attention override). A group with
    # neither is forecast whole, like FLUX single blocks on the diffusers path.
    units: tuple[str, ...] = ()
    attention_core: bool = False

    @property
    def io(self) -> BlockIO:
        if self.streams == TWO_STREAM:
            return BlockIO(hidden_arg="img", encoder_arg="txt", outputs=(HIDDEN, ENCODER))
        return BlockIO(hidden_arg="img", encoder_arg=None, outputs=(HIDDEN,))


@dataclass(frozen=True)
class ComfyFamily:
    name: str
    classes: tuple[tuple[str, str], ...]  # (module, class name) of the diffusion model, matched along the MRO
    groups: tuple[ComfyBlockGroup, ...]  # empty: no block patches in this family's forward
    description: str = ""
    # Token layout for sparse attention: latent patch size over (H, W) or (T, H, W), and where the
    # text tokens sit in the joint sequence ("text_first"; "separate": text by cross-attention).
    # None: the layout is not described, sparse attention is refused for this family.
    patch: tuple[int, ...] | None = None
    joint_order: str = "separate"


DOUBLE = "double_block"
SINGLE = "single_block"

# FLUX-style double blocks (FLUX, Chroma, HunyuanVideo): MLPs are children, the attention core a bare
# call in the block's forward; single blocks (fused MLP) have no units and are forecast whole.
FLUX_STYLE_GROUPS = (ComfyBlockGroup(DOUBLE, "double_blocks", TWO_STREAM, ("img_mlp", "txt_mlp"), True),
                     ComfyBlockGroup(SINGLE, "single_blocks", ONE_STREAM))

FAMILIES: dict[str, ComfyFamily] = {
    f.name: f
    for f in (
        ComfyFamily("flux", (("comfy.ldm.flux.model", "Flux"),),
                    FLUX_STYLE_GROUPS,
                    "FLUX.1 / FLUX.2 / Kontext (comfy.ldm.flux)", patch=(2, 2), joint_order=TEXT_FIRST),
        ComfyFamily("chroma", (("comfy.ldm.chroma.model", "Chroma"),),
                    FLUX_STYLE_GROUPS,
                    "Chroma (comfy.ldm.chroma)", patch=(2, 2), joint_order=TEXT_FIRST),
        ComfyFamily("sd3", (("comfy.ldm.modules.diffusionmodules.mmdit", "MMDiT"),),
                    (ComfyBlockGroup(DOUBLE, "joint_blocks", TWO_STREAM),),
                    "Stable Diffusion 3 / 3.5 MMDiT"),
        ComfyFamily("wan", (("comfy.ldm.wan.model", "WanModel"),),
                    (ComfyBlockGroup(DOUBLE, "blocks", ONE_STREAM, ("self_attn", "cross_attn", "ffn")),),
                    "Wan 2.1 / 2.2 (t2v, i2v, VACE, camera, S2V, HuMo)", patch=(1, 2, 2)),
        ComfyFamily("hunyuan_video", (("comfy.ldm.hunyuan_video.model", "HunyuanVideo"),),
                    FLUX_STYLE_GROUPS,
                    "HunyuanVideo / HunyuanVideo 1.5 / HunyuanImage 2.1"),
        ComfyFamily("ltxv", (("comfy.ldm.lightricks.model", "LTXVModel"),),
                    (ComfyBlockGroup(DOUBLE, "transformer_blocks", ONE_STREAM, ("attn1", "attn2", "ff")),),
                    "LTX-Video"),
        ComfyFamily("qwen_image", (("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel"),),
                    (ComfyBlockGroup(DOUBLE, "transformer_blocks", TWO_STREAM),),
                    "Qwen-Image"),
        ComfyFamily("lumina2", (("comfy.ldm.lumina.model", "NextDiT"),),
                    (),
                    "Lumina Image 2.0 / NextDiT (no block patches in ComfyUI's forward: whole-model step cache)"),
    )
}


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def diffusion_model_of(model) -> object:
    """``model`` is a ComfyUI MODEL (ModelPatcher); its ``model.diffusion_model`` is the DiT."""
    base = getattr(model, "model", None)
    dm = getattr(base, "diffusion_model", None)
    if dm is None:
        raise UnsupportedModelError(
            f"Expected a ComfyUI MODEL (a ModelPatcher whose .model.diffusion_model is the network), got "
            f"{type(model).__name__}. Connect the MODEL output of a loader (Load Diffusion Model, Load Checkpoint)."
        )
    return dm


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def family_of(model) -> ComfyFamily:
    """The family of a ComfyUI MODEL, or a clear UnsupportedModelError."""
    dm = diffusion_model_of(model)
    for cls in type(dm).__mro__:
        for family in FAMILIES.values():
            if (cls.__module__, cls.__name__) in family.classes:
                return family
    base = type(getattr(model, "model", None)).__name__
    names = ", ".join(f"{f.name} ({f.description})" for f in FAMILIES.values())
    raise UnsupportedModelError(
        f"DiT Accelerate does not support this model: ComfyUI model type {base}, diffusion model "
        f"{_qualname(type(dm))}. Supported diffusion-transformer families: {names}. "
        "UNet models (SD1.5, SDXL) and other DiTs are not supported yet; remove the node for this model."
    )


def blocks_of(dm, group: ComfyBlockGroup) -> list:
    blocks = getattr(dm, group.attr, None)
    if blocks is None:
        raise UnsupportedModelError(
            f"{_qualname(type(dm))} has no {group.attr!r} block list; this ComfyUI version's model code differs "
            "from what ditaccel expects. Please report the ComfyUI version."
        )
    return list(blocks)


def _class_sources(dm) -> str | None:
    sources = []
    for cls in type(dm).__mro__:
        if cls.__module__.startswith("torch."):
            break
        try:
            sources.append(inspect.getsource(cls))
        except (OSError, TypeError):
            return None
    return "\n".join(sources)


def runs_diffusion_model_wrappers(dm) -> bool:
    """Whether the installed ComfyUI's forward of this diffusion model runs the DIFFUSION_MODEL
    wrappers (most DiTs; not SD3's MMDiT in ComfyUI 0.3.75). Unreadable source: assume it does."""
    text = _class_sources(dm)
    return text is None or "WrappersMP.DIFFUSION_MODEL" in text


def forward_reads_block_patches(dm, family: ComfyFamily) -> bool:
    """Whether the installed ComfyUI's forward of this model looks up ``patches_replace["dit"]`` for
    every block kind the family uses (read from the source, so a ComfyUI that lacks or adds block
    patches for a family is followed). Unreadable source: trust the family table."""
    if not family.groups:
        return False
    text = _class_sources(dm)
    if text is None:
        return True
    if "blocks_replace" not in text and "patches_replace" not in text:
        return False
    return all(f'"{g.kind}"' in text or f"'{g.kind}'" in text for g in family.groups)
