"""Qwen-Image (QwenImageTransformer2DModel): one list of dual-stream ``QwenImageTransformerBlock``.

Blocks take (hidden_states, encoder_hidden_states) and return (encoder, hidden); joint attention
sees [text, image]. ``hidden_states`` are packed 2x2 latent patches (B, N, C); the grid comes
from ``img_shapes`` (per sample, a list of (frames, h, w): the generated image first, then any
condition images of the edit pipelines, whose tokens are appended). QwenImagePipeline calls the
transformer twice per step for true CFG (negative prompt, ``true_cfg_scale > 1``): sequential.
"""

from __future__ import annotations

from ._layout import text_tokens
from .base import CFG_SEQUENTIAL, ENCODER, HIDDEN, TEXT_FIRST, BlockIO, ModelAdapter, TokenLayout, group, model_arg
from .registry import register_adapter

DUAL_STREAM_ENCODER_FIRST = BlockIO(encoder_arg="encoder_hidden_states", outputs=(ENCODER, HIDDEN))


def _first_shape(img_shapes):
    shape = img_shapes
    while isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    return tuple(int(v) for v in shape) if isinstance(shape, (list, tuple)) and len(shape) == 3 else None


def qwenimage_token_layout(model, args, kwargs) -> TokenLayout:
    hidden = model_arg(model, "hidden_states", args, kwargs)
    shape = _first_shape(model_arg(model, "img_shapes", args, kwargs))
    if shape is None:
        grid = (hidden.shape[1],)
    else:
        grid = shape[1:] if shape[0] == 1 else shape
    return TokenLayout(batch=hidden.shape[0], image_tokens=hidden.shape[1], text_tokens=text_tokens(model, args, kwargs),
                       grid=grid, joint_order=TEXT_FIRST)


@register_adapter("qwenimage", model_classes=("QwenImageTransformer2DModel",), description="Qwen-Image / Qwen-Image-Edit")
def qwenimage_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="qwenimage",
        model=model,
        block_groups=[group(model, "transformer_blocks", DUAL_STREAM_ENCODER_FIRST)],
        cfg_style=CFG_SEQUENTIAL,
        token_layout_fn=qwenimage_token_layout,
        joint_order=TEXT_FIRST,
    )
