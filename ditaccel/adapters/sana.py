"""Sana (SanaTransformer2DModel): one list of ``SanaTransformerBlock`` (linear self-attention,
cross-attention to the text, Mix-FFN). Blocks return the image stream as one tensor.
SanaPipeline batches [uncond, cond] into one call (Sana-Sprint uses a guidance embedding instead).
"""

from __future__ import annotations

from ._layout import image_2d_layout
from .base import CFG_BATCHED, HIDDEN, SEPARATE, BlockIO, ModelAdapter, TokenLayout, group
from .registry import register_adapter

CROSS_ATTENTION_BLOCK = BlockIO(outputs=(HIDDEN,))


def sana_token_layout(model, args, kwargs) -> TokenLayout:
    return image_2d_layout(model, args, kwargs, SEPARATE)


@register_adapter("sana", model_classes=("SanaTransformer2DModel",), description="Sana / Sana-Sprint")
def sana_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="sana",
        model=model,
        block_groups=[group(model, "transformer_blocks", CROSS_ATTENTION_BLOCK)],
        cfg_style=CFG_BATCHED,
        token_layout_fn=sana_token_layout,
        joint_order=SEPARATE,
    )
