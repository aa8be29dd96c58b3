"""Wan 2.1 / 2.2 (WanTransformer3DModel): one list ``blocks`` of ``WanTransformerBlock``.

Blocks take ``(hidden_states, encoder_hidden_states, temb, rotary_emb)``: self-attention over
the video tokens, cross-attention to the text (plus the CLIP image tokens for I2V), and return
the video stream. Latents are (B, C, F, H, W); the token grid is (F/pt, H/ph, W/pw) for
``patch_size=(pt, ph, pw)``. WanPipeline calls the transformer twice per step under CFG
(cond, then uncond): sequential CFG. Wan 2.2 A14B pipelines also hold ``transformer_2`` (the
low-noise expert); only ``pipe.transformer`` is accelerated.
"""

from __future__ import annotations

import torch

from ._layout import as_tuple, video_3d_layout
from .base import CFG_SEQUENTIAL, HIDDEN, SEPARATE, BlockIO, ModelAdapter, TokenLayout, group, model_arg
from .registry import register_adapter

CROSS_ATTENTION_BLOCK = BlockIO(outputs=(HIDDEN,))


def wan_token_layout(model, args, kwargs) -> TokenLayout:
    pt, ph, pw = as_tuple(model.config.patch_size, 3)
    image_ctx = model_arg(model, "encoder_hidden_states_image", args, kwargs)
    extra = int(image_ctx.shape[1]) if isinstance(image_ctx, torch.Tensor) and image_ctx.ndim == 3 else 0
    return video_3d_layout(model, args, kwargs, SEPARATE, pt, ph, pw, frames_dim=2, extra_text=extra)


@register_adapter("wan", model_classes=("WanTransformer3DModel",), description="Wan 2.1 / 2.2 video")
def wan_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="wan",
        model=model,
        block_groups=[group(model, "blocks", CROSS_ATTENTION_BLOCK)],
        cfg_style=CFG_SEQUENTIAL,
        token_layout_fn=wan_token_layout,
        joint_order=SEPARATE,
    )
