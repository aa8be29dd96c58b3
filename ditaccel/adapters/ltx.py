"""LTX-Video (LTXVideoTransformer3DModel): one list of ``LTXVideoTransformerBlock``.

Blocks take the video stream and cross-attend to the text; they return the video stream.
``hidden_states`` are packed tokens (B, N, C); the token grid is given by the ``num_frames``,
``height`` and ``width`` arguments (already in tokens). LTXPipeline batches [uncond, cond].
"""

from __future__ import annotations

from ._layout import text_tokens
from .base import CFG_BATCHED, HIDDEN, SEPARATE, BlockIO, ModelAdapter, TokenLayout, group, model_arg
from .registry import register_adapter

CROSS_ATTENTION_BLOCK = BlockIO(outputs=(HIDDEN,))


def ltx_token_layout(model, args, kwargs) -> TokenLayout:
    hidden = model_arg(model, "hidden_states", args, kwargs)
    dims = [model_arg(model, name, args, kwargs) for name in ("num_frames", "height", "width")]
    if all(d is not None for d in dims):
        grid = tuple(int(d) for d in dims)
    else:
        grid = (hidden.shape[1],)
    return TokenLayout(batch=hidden.shape[0], image_tokens=hidden.shape[1], text_tokens=text_tokens(model, args, kwargs),
                       grid=grid, joint_order=SEPARATE)


@register_adapter("ltx", model_classes=("LTXVideoTransformer3DModel",), description="LTX-Video")
def ltx_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="ltx",
        model=model,
        block_groups=[group(model, "transformer_blocks", CROSS_ATTENTION_BLOCK)],
        cfg_style=CFG_BATCHED,
        token_layout_fn=ltx_token_layout,
        joint_order=SEPARATE,
    )
