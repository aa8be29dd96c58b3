"""HunyuanVideo (HunyuanVideoTransformer3DModel): dual-stream ``transformer_blocks``, then
single-stream ``single_transformer_blocks``.

Both block kinds take (hidden_states, encoder_hidden_states) and return **(hidden, encoder)**
(the opposite order to FLUX); the single blocks concatenate the streams internally and split
them again, so both lists carry the same two streams and form one segment. Joint attention sees
[image, text]. The text token refiner (``context_embedder``) runs once per call on the text
alone and is not grouped. HunyuanVideo is guidance-distilled (``guidance`` embedding, one call
per step); a negative prompt with ``true_cfg_scale > 1`` adds a second (uncond) call per step.
"""

from __future__ import annotations

from ._layout import video_3d_layout
from .base import CFG_GUIDANCE_EMBED, ENCODER, HIDDEN, IMAGE_FIRST, BlockIO, ModelAdapter, TokenLayout, group
from .registry import register_adapter

DUAL_STREAM_HIDDEN_FIRST = BlockIO(encoder_arg="encoder_hidden_states", outputs=(HIDDEN, ENCODER))


def hunyuan_video_token_layout(model, args, kwargs) -> TokenLayout:
    p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
    return video_3d_layout(model, args, kwargs, IMAGE_FIRST, pt, p, p, frames_dim=2)


@register_adapter("hunyuan_video", model_classes=("HunyuanVideoTransformer3DModel",), description="HunyuanVideo")
def hunyuan_video_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="hunyuan_video",
        model=model,
        block_groups=[
            group(model, "transformer_blocks", DUAL_STREAM_HIDDEN_FIRST),
            group(model, "single_transformer_blocks", DUAL_STREAM_HIDDEN_FIRST),
        ],
        cfg_style=CFG_GUIDANCE_EMBED,
        token_layout_fn=hunyuan_video_token_layout,
        joint_order=IMAGE_FIRST,
    )
