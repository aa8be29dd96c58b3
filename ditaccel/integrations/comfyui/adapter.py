"""ditaccel's model-facts object (``ModelAdapter``) for a ComfyUI MODEL.

The method implementations read the model through an adapter: ``segments()`` for the step caches,
``compute_modules(block)`` for TaylorSeer's per-module units, ``attention_modules()`` and
``token_layout`` for the sparse attentions. :class:`ComfyAdapter` answers these from the family
table (:mod:`.families`) in terms ComfyUI's mechanisms can reach:

* a block is a ``patches_replace["dit"]`` entry ``(kind, index)``;
* a module unit is a child the block's forward calls as a module (reached by an object patch), or
  the block's bare attention core (an :class:`AttentionCore` marker, reached by the attention
  override);
* an "attention module" is a block (the attention calls inside it are numbered per block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ...adapters.base import CFG_BATCHED, HIDDEN, BlockGroup, BlockIO, ModelAdapter, TokenLayout
from ...errors import UnsupportedModelError
from .families import (SCOPE_BLOCKS, SCOPE_MODEL, ComfyFamily, blocks_of, diffusion_model_of, family_of,
                       forward_reads_block_patches)

MODULE_UNIT = "module"
ATTENTION_UNIT = "attention"


class AttentionCore(nn.Module):
    """Stands for the attention core of one block (``optimized_attention`` called by the block's
    forward, not by a child module). Never attached to the model; only a key for the method."""

    def __init__(self, kind: str, index: int):
        super().__init__()
        self.kind = kind
        self.index = index

    def __repr__(self) -> str:
        return f"AttentionCore({self.kind}, {self.index})"


@dataclass
class ComfyAdapter(ModelAdapter):
    comfy_family: ComfyFamily | None = None
    block_keys: dict = field(default_factory=dict)  # id(block) -> (patch kind, index)
    unit_keys: dict = field(default_factory=dict)  # id(unit module) -> unit key
    block_units: dict = field(default_factory=dict)  # id(block) -> [(name, unit module)]

    def compute_modules(self, block: nn.Module) -> list[tuple[str, nn.Module]]:
        return list(self.block_units.get(id(block), []))

    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        return [(name, block) for name, block, _ in self.blocks() if id(block) in self.block_keys]


def unit_key(kind: str, index: int, child: str | None) -> tuple:
    """Key of a module unit: a child module of block (kind, index), or (child None) its attention core."""
    return (MODULE_UNIT, kind, index, child) if child is not None else (ATTENTION_UNIT, kind, index)


def _token_layout(family: ComfyFamily):
    """``token_layout_fn`` of the family: image tokens from the latent's shape and the patch size,
    text tokens from ``context`` where text joins the image sequence."""

    def layout(model, args: tuple, kwargs: dict) -> TokenLayout:
        x = args[0]
        patch = family.patch
        spatial = tuple(x.shape[2:])
        if len(spatial) != len(patch):
            return TokenLayout(batch=int(x.shape[0]), image_tokens=-1, text_tokens=0, grid=())
        grid = tuple(math.ceil(s / p) for s, p in zip(spatial, patch))
        context = kwargs.get("context")
        text = int(context.shape[1]) if (family.joint_order != "separate" and isinstance(context, torch.Tensor)
                                         and context.dim() == 3) else 0
        return TokenLayout(batch=int(x.shape[0]), image_tokens=math.prod(grid), text_tokens=text, grid=grid,
                           joint_order=family.joint_order)

    return layout


def build_adapter(model, scope: str | None = None) -> tuple[ComfyAdapter, str, dict]:
    """(adapter, scope, {id(block): (patch kind, index)}) of a ComfyUI MODEL.

    ``scope`` None picks blocks where the forward reads block patches, else the whole model.
    """
    family = family_of(model)
    dm = diffusion_model_of(model)
    block_ok = forward_reads_block_patches(dm, family)
    if scope is None:
        scope = SCOPE_BLOCKS if block_ok else SCOPE_MODEL
    if scope == SCOPE_BLOCKS and not block_ok:
        raise UnsupportedModelError(
            f"The {family.name} model code of this ComfyUI does not read block replace patches, so blocks cannot "
            "be cached one by one; use cache scope 'model' (whole diffusion-model step cache) or 'auto'."
        )
    keys: dict[int, tuple[str, int]] = {}
    unit_keys: dict[int, tuple] = {}
    block_units: dict[int, list] = {}
    if scope == SCOPE_BLOCKS:
        groups = []
        for g in family.groups:
            blocks = blocks_of(dm, g)
            for i, b in enumerate(blocks):
                keys[id(b)] = (g.kind, i)
                units = []
                if g.attention_core:
                    core = AttentionCore(g.kind, i)
                    units.append(("attention", core))
                    unit_keys[id(core)] = unit_key(g.kind, i, None)
                for child in g.units:
                    module = getattr(b, child, None)
                    if isinstance(module, nn.Module):
                        units.append((child, module))
                        unit_keys[id(module)] = unit_key(g.kind, i, child)
                if units:
                    block_units[id(b)] = units
            groups.append(BlockGroup(g.attr, blocks, g.io))
    elif scope == SCOPE_MODEL:
        groups = [BlockGroup("diffusion_model", [dm], BlockIO(hidden_arg="x", encoder_arg=None, outputs=(HIDDEN,)))]
    else:
        raise UnsupportedModelError(f"Unknown cache scope {scope!r}; expected {SCOPE_BLOCKS!r} or {SCOPE_MODEL!r}.")
    adapter = ComfyAdapter(
        family=family.name, model=dm, block_groups=groups, cfg_style=CFG_BATCHED, hidden_arg="x",
        token_layout_fn=_token_layout(family) if family.patch is not None else None,
        joint_order=family.joint_order,
        notes=f"ComfyUI {type(getattr(model, 'model', None)).__name__}; scope {scope}",
        comfy_family=family, block_keys=keys, unit_keys=unit_keys, block_units=block_units,
    )
    return adapter, scope, keys
