"""Stable Diffusion 3 / 3.5 (SD3Transformer2DModel): one list of MMDiT ``JointTransformerBlock``.

Every block takes (hidden_states, encoder_hidden_states) and returns (encoder, hidden). The last
block is built with ``context_pre_only=True``: it updates only the image stream and returns
``(None, hidden)``. Segment caching copes with that: the text residual of a segment that ends
there is ``None`` (not stored), and on a skipped step the text stream passes through unchanged,
which the model discards after the last block anyway. Joint attention (``JointAttnProcessor2_0``)
concatenates [image, text]. StableDiffusion3Pipeline batches [uncond, cond] into one call; its
skip-layer guidance (``skip_guidance_layers``) adds a third call per step with ``skip_layers``.
"""

from __future__ import annotations

from ._layout import image_2d_layout
from .base import CFG_BATCHED, ENCODER, HIDDEN, IMAGE_FIRST, BlockIO, ModelAdapter, TokenLayout, group
from .registry import register_adapter

JOINT_BLOCK = BlockIO(encoder_arg="encoder_hidden_states", outputs=(ENCODER, HIDDEN))


def sd3_token_layout(model, args, kwargs) -> TokenLayout:
    return image_2d_layout(model, args, kwargs, IMAGE_FIRST)


@register_adapter("sd3", model_classes=("SD3Transformer2DModel",), description="Stable Diffusion 3 / 3.5")
def sd3_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="sd3",
        model=model,
        block_groups=[group(model, "transformer_blocks", JOINT_BLOCK)],
        cfg_style=CFG_BATCHED,
        token_layout_fn=sd3_token_layout,
        joint_order=IMAGE_FIRST,
        notes="Last block is context_pre_only and returns (None, hidden).",
    )
