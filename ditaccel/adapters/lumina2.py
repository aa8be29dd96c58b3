"""Lumina-Image 2.0 (Lumina2Transformer2DModel).

The model runs three block lists: ``context_refiner`` (text tokens alone, no timestep
modulation), ``noise_refiner`` (image tokens alone), then the main ``layers`` on the joint
sequence [text, image] (text first, each row padded after its effective caption length). All
three return one tensor, but they carry *different* streams, so they cannot be one cached
segment (a residual output - input across them has no meaning: the shapes differ). The adapter
lists only ``layers`` (the bulk of the compute: 26 of 30 blocks in Lumina-Image 2.0); the two
refiners, cheap and run once per call, are left to run every step. Lumina2Pipeline calls the
transformer twice per step under CFG (cond, then uncond): sequential CFG.
"""

from __future__ import annotations

import dataclasses

import torch

from ._layout import image_2d_layout
from .base import CFG_SEQUENTIAL, HIDDEN, TEXT_FIRST, BlockIO, ModelAdapter, TokenLayout, group, model_arg
from .registry import register_adapter

JOINT_SEQUENCE_BLOCK = BlockIO(outputs=(HIDDEN,))  # hidden_states is the [text, image] sequence


def lumina2_token_layout(model, args, kwargs) -> TokenLayout:
    """The main layers see [the caption's effective tokens, image tokens] per row, padded at the
    end to the longest row (diffusers' Lumina2RotaryPosEmbed): the text count is the caption
    mask's sum, not the padded caption length. Rows with different caption lengths put the image
    at different offsets: no single layout (image_tokens=-1, sparse attention stays dense)."""
    layout = image_2d_layout(model, args, kwargs, TEXT_FIRST)
    mask = model_arg(model, "encoder_attention_mask", args, kwargs)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return layout
    lengths = mask.bool().sum(dim=1)
    if bool((lengths != lengths[0]).any()):
        return dataclasses.replace(layout, image_tokens=-1, grid=())
    return dataclasses.replace(layout, text_tokens=int(lengths[0]))


@register_adapter("lumina2", model_classes=("Lumina2Transformer2DModel",), description="Lumina-Image 2.0")
def lumina2_adapter(model) -> ModelAdapter:
    return ModelAdapter(
        family="lumina2",
        model=model,
        block_groups=[group(model, "layers", JOINT_SEQUENCE_BLOCK)],
        cfg_style=CFG_SEQUENTIAL,
        token_layout_fn=lumina2_token_layout,
        joint_order=TEXT_FIRST,
        notes="Only `layers` is grouped; context_refiner / noise_refiner (separate streams) always run.",
    )
