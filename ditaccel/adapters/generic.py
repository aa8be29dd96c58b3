"""Fallback adapter for an unknown DiT: find block ModuleLists by the names diffusers uses."""

from __future__ import annotations

import inspect

from torch import nn

from .base import CFG_BATCHED, BlockGroup, BlockIO, ENCODER, HIDDEN, ModelAdapter

# Names under which diffusers transformers keep their main block lists, in execution order.
BLOCK_LIST_NAMES = ("transformer_blocks", "blocks", "layers", "single_transformer_blocks")


def _infer_io(block: nn.Module) -> BlockIO | None:
    params = inspect.signature(type(block).forward).parameters
    if "hidden_states" not in params:
        return None
    has_encoder = "encoder_hidden_states" in params
    # A block that receives the text stream and returns a tuple carries both streams; the order
    # (encoder, hidden) is the most common in diffusers. The generic adapter assumes it.
    annotation = str(inspect.signature(type(block).forward).return_annotation)
    returns_tuple = "tuple" in annotation.lower()
    if has_encoder and returns_tuple:
        return BlockIO(encoder_arg="encoder_hidden_states", outputs=(ENCODER, HIDDEN))
    return BlockIO(outputs=(HIDDEN,))


def generic_adapter(model: nn.Module) -> ModelAdapter:
    groups = []
    for name in BLOCK_LIST_NAMES:
        blocks = getattr(model, name, None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            continue
        io = _infer_io(blocks[0])
        if io is None:
            continue
        groups.append(BlockGroup(name=name, blocks=list(blocks), io=io))
    return ModelAdapter(
        family="generic",
        model=model,
        block_groups=groups,
        cfg_style=CFG_BATCHED,
        notes="Generic adapter: block lists found by name; token layout unknown.",
    )
