"""CogVideoX 1.0 / 1.5 (CogVideoXTransformer3DModel): one list of ``CogVideoXBlock``.

Blocks take (hidden_states, encoder_hidden_states) and return (hidden, encoder); attention sees
[text, image]. Latents are (B, F, C, H, W) (frames before channels); the token grid is
(F/pt, H/p, W/p) with pt = ``patch_size_t`` (CogVideoX 1.5) or 1. CogVideoXPipeline batches
[uncond, cond] into one call.
"""

from __future__ import annotations

from ._layout import video_3d_layout
from .base import CFG_BATCHED, ENCODER, HIDDEN, TEXT_FIRST, BlockIO, ModelAdapter, TokenLayout, group
from .registry import register_adapter

DUAL_STREAM_HIDDEN_FIRST = BlockIO(encoder_arg="encoder_hidden_states", outputs=(HIDDEN, ENCODER))


def cogvideox_token_layout(model, args, kwargs) -> TokenLayout:
    p = int(model.config.patch_size)
    pt = int(model.config.patch_size_t or 1)
    return video_3d_layout(model, args, kwargs, TEXT_FIRST, pt, p, p, frames_dim=1)


@register_adapter("cogvideox", model_classes=("CogVideoXTransformer3DModel",), description="CogVideoX 1.0 / 1.5")
def cogvideox_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="cogvideox",
        model=model,
        block_groups=[group(model, "transformer_blocks", DUAL_STREAM_HIDDEN_FIRST)],
        cfg_style=CFG_BATCHED,
        token_layout_fn=cogvideox_token_layout,
        joint_order=TEXT_FIRST,
    )
