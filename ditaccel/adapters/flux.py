"""FLUX.1 (FluxTransformer2DModel): 19 double-stream blocks, then 38 single-stream blocks.

Both block kinds take (hidden_states, encoder_hidden_states) and return (encoder, hidden).
Joint attention sees [text, image]. FLUX-dev distils guidance into an embedding; FluxPipeline's
true CFG (negative prompt + true_cfg_scale) calls the transformer twice per step.
"""

from __future__ import annotations

from .base import (
    CFG_GUIDANCE_EMBED, ENCODER, HIDDEN, TEXT_FIRST, BlockIO, ModelAdapter, TokenLayout, group, model_arg,
)
from .registry import register_adapter

DUAL_STREAM_ENCODER_FIRST = BlockIO(encoder_arg="encoder_hidden_states", outputs=(ENCODER, HIDDEN))


def flux_token_layout(model, args, kwargs) -> TokenLayout:
    hidden = model_arg(model, "hidden_states", args, kwargs)
    encoder = model_arg(model, "encoder_hidden_states", args, kwargs)
    img_ids = model_arg(model, "img_ids", args, kwargs)
    if img_ids is not None:
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        grid = (int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1)
    else:
        grid = (hidden.shape[1],)
    return TokenLayout(batch=hidden.shape[0], image_tokens=hidden.shape[1],
                       text_tokens=0 if encoder is None else encoder.shape[1], grid=grid, joint_order=TEXT_FIRST)


@register_adapter("flux", model_classes=("FluxTransformer2DModel",), description="FLUX.1 dev/schnell/Kontext")
def flux_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="flux",
        model=model,
        block_groups=[
            group(model, "transformer_blocks", DUAL_STREAM_ENCODER_FIRST),
            group(model, "single_transformer_blocks", DUAL_STREAM_ENCODER_FIRST),
        ],
        cfg_style=CFG_GUIDANCE_EMBED,
        token_layout_fn=flux_token_layout,
        joint_order=TEXT_FIRST,
    )
