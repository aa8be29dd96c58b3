"""Chroma (ChromaTransformer2DModel): FLUX-like, with a pruned modulation (approximator).

The dual-stream ``transformer_blocks`` take (hidden_states, encoder_hidden_states) and return
(encoder, hidden). Unlike FLUX, the model then concatenates [text, image] itself and the
``single_transformer_blocks`` take that one joint sequence and return one tensor: a different
stream, so the two lists are two segments (each cached on its own). Joint attention is text
first. Chroma is not guidance-distilled: ChromaPipeline calls the transformer twice per step
under CFG (cond, then uncond): sequential CFG.
"""

from __future__ import annotations

from .base import CFG_SEQUENTIAL, ENCODER, HIDDEN, TEXT_FIRST, BlockIO, ModelAdapter, TokenLayout, group
from .flux import flux_token_layout
from .registry import register_adapter

DUAL_STREAM_ENCODER_FIRST = BlockIO(encoder_arg="encoder_hidden_states", outputs=(ENCODER, HIDDEN))
JOINT_SEQUENCE_BLOCK = BlockIO(outputs=(HIDDEN,))  # hidden_states is the [text, image] sequence


def chroma_token_layout(model, args, kwargs) -> TokenLayout:
    return flux_token_layout(model, args, kwargs)


@register_adapter("chroma", model_classes=("ChromaTransformer2DModel",), description="Chroma")
def chroma_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="chroma",
        model=model,
        block_groups=[
            group(model, "transformer_blocks", DUAL_STREAM_ENCODER_FIRST),
            group(model, "single_transformer_blocks", JOINT_SEQUENCE_BLOCK),
        ],
        cfg_style=CFG_SEQUENTIAL,
        token_layout_fn=chroma_token_layout,
        joint_order=TEXT_FIRST,
    )
