"""PixArt-alpha and PixArt-Sigma (PixArtTransformer2DModel): one list of ``BasicTransformerBlock``.

Blocks take the image stream (``hidden_states``) and read the text through cross-attention
(``encoder_hidden_states`` is an input only); they return the image stream as one tensor.
PixArtAlphaPipeline / PixArtSigmaPipeline batch [uncond, cond] into one call.
"""

from __future__ import annotations

from ._layout import image_2d_layout
from .base import CFG_BATCHED, HIDDEN, SEPARATE, BlockIO, ModelAdapter, TokenLayout, group
from .registry import register_adapter

CROSS_ATTENTION_BLOCK = BlockIO(outputs=(HIDDEN,))


def pixart_token_layout(model, args, kwargs) -> TokenLayout:
    return image_2d_layout(model, args, kwargs, SEPARATE)


@register_adapter("pixart", model_classes=("PixArtTransformer2DModel",), description="PixArt-alpha / PixArt-Sigma")
def pixart_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="pixart",
        model=model,
        block_groups=[group(model, "transformer_blocks", CROSS_ATTENTION_BLOCK)],
        cfg_style=CFG_BATCHED,
        token_layout_fn=pixart_token_layout,
        joint_order=SEPARATE,
    )
