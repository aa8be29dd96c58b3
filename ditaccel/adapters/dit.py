"""DiT (DiTTransformer2DModel): class-conditional, one list of ``BasicTransformerBlock`` (adaLN-zero).

No text stream: the class label enters through the adaLN embedding. DiTPipeline batches
[cond, null-class] into one call when ``guidance_scale > 1``.
"""

from __future__ import annotations

from ._layout import image_2d_layout
from .base import CFG_BATCHED, HIDDEN, SEPARATE, BlockIO, ModelAdapter, TokenLayout, group
from .registry import register_adapter

IMAGE_ONLY_BLOCK = BlockIO(outputs=(HIDDEN,))


def dit_token_layout(model, args, kwargs) -> TokenLayout:
    return image_2d_layout(model, args, kwargs, SEPARATE, patch=model.config.patch_size)


@register_adapter("dit", model_classes=("DiTTransformer2DModel",), description="DiT (class-conditional)")
def dit_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="dit",
        model=model,
        block_groups=[group(model, "transformer_blocks", IMAGE_ONLY_BLOCK)],
        cfg_style=CFG_BATCHED,
        token_layout_fn=dit_token_layout,
        joint_order=SEPARATE,
    )
