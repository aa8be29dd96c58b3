"""What an adapter knows about a model family: model facts only, no method logic.

An adapter says where the transformer blocks are and how each block takes and returns its token
streams (``BlockIO``), which modules are attention layers, how CFG is batched, and how to read the
token layout (image vs text tokens, latent token grid) of one transformer call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

# Stream names used throughout ditaccel.
HIDDEN = "hidden"
ENCODER = "encoder"

# CFG styles, as seen from the transformer.
CFG_BATCHED = "batched"  # cond and uncond rows in one call (SD3, PixArt, DiT, CogVideoX, LTX, Sana)
CFG_SEQUENTIAL = "sequential"  # one transformer call per branch in each step (Wan, true-CFG FLUX, QwenImage)
CFG_GUIDANCE_EMBED = "guidance"  # guidance distilled into an embedding, one call per step (FLUX-dev, HunyuanVideo)
CFG_STYLES = (CFG_BATCHED, CFG_SEQUENTIAL, CFG_GUIDANCE_EMBED)

# Order of text and image tokens in joint attention.
TEXT_FIRST = "text_first"
IMAGE_FIRST = "image_first"
SEPARATE = "separate"  # image self-attention, text enters by cross-attention only


@dataclass(frozen=True)
class BlockIO:
    """How one block class takes and returns its token streams.

    ``outputs`` lists what the block returns, in order: ``("hidden",)`` for a bare tensor,
    ``("encoder", "hidden")`` for FLUX-style tuples, ``("hidden", "encoder")`` for HunyuanVideo.
    """

    hidden_arg: str = "hidden_states"
    encoder_arg: str | None = None
    outputs: tuple[str, ...] = (HIDDEN,)

    @property
    def streams(self) -> tuple[str, ...]:
        return (HIDDEN, ENCODER) if self.encoder_arg else (HIDDEN,)


_POSITIONS: dict[type, dict[str, int]] = {}


def _arg_position(block: nn.Module, name: str) -> int | None:
    cls = type(block)
    table = _POSITIONS.get(cls)
    if table is None:
        params = list(inspect.signature(cls.forward).parameters)[1:]  # drop self
        table = {p: i for i, p in enumerate(params)}
        _POSITIONS[cls] = table
    return table.get(name)


def read_arg(block: nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    if name in kwargs:
        return kwargs[name]
    pos = _arg_position(block, name)
    if pos is not None and pos < len(args):
        return args[pos]
    return None


def read_streams(io: BlockIO, block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (hidden, encoder) streams a block is called with."""
    hidden = read_arg(block, io.hidden_arg, args, kwargs)
    encoder = read_arg(block, io.encoder_arg, args, kwargs) if io.encoder_arg else None
    return hidden, encoder


def unpack_output(io: BlockIO, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (hidden, encoder) streams a block returned."""
    if len(io.outputs) == 1:
        return output, None
    values = dict(zip(io.outputs, output))
    return values[HIDDEN], values.get(ENCODER)


def pack_output(io: BlockIO, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
    """Build what the block would return from (hidden, encoder)."""
    if len(io.outputs) == 1:
        return hidden
    return tuple(hidden if name == HIDDEN else encoder for name in io.outputs)


@dataclass
class BlockGroup:
    """One ModuleList of homogeneous blocks, e.g. FLUX's ``single_transformer_blocks``."""

    name: str
    blocks: list[nn.Module]
    io: BlockIO


@dataclass(frozen=True)
class TokenLayout:
    """Token facts of one transformer call (image tokens only count the latent patches)."""

    batch: int
    image_tokens: int
    text_tokens: int
    grid: tuple[int, ...]  # (H, W) or (T, H, W), in tokens
    joint_order: str = SEPARATE


@dataclass
class ModelAdapter:
    """Model facts for one transformer instance."""

    family: str
    model: nn.Module
    block_groups: list[BlockGroup]
    cfg_style: str
    token_layout_fn: Callable[[nn.Module, tuple, dict], TokenLayout] | None = None
    timestep_arg: str = "timestep"
    hidden_arg: str = "hidden_states"
    joint_order: str = SEPARATE
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # -- blocks ---------------------------------------------------------------------------------
    def blocks(self) -> list[tuple[str, nn.Module, BlockIO]]:
        """Every block in execution order as (qualified name, module, io)."""
        out = []
        for group in self.block_groups:
            for i, block in enumerate(group.blocks):
                out.append((f"{group.name}.{i}", block, group.io))
        return out

    @property
    def num_blocks(self) -> int:
        return sum(len(g.blocks) for g in self.block_groups)

    def segments(self) -> list[list[tuple[str, nn.Module, BlockIO]]]:
        """Maximal runs of consecutive blocks that carry the same streams.

        A cached range must start and end where the (hidden, encoder) state is the same kind of
        thing on both sides; consecutive groups with equal ``BlockIO.streams`` qualify.
        """
        segments: list[list[tuple[str, nn.Module, BlockIO]]] = []
        last_streams = None
        for group in self.block_groups:
            entries = [(f"{group.name}.{i}", b, group.io) for i, b in enumerate(group.blocks)]
            if not entries:
                continue
            if segments and group.io.streams == last_streams:
                segments[-1].extend(entries)
            else:
                segments.append(entries)
            last_streams = group.io.streams
        return segments

    # -- attention ------------------------------------------------------------------------------
    def attention_modules(self) -> list[tuple[str, nn.Module]]:
        """Attention layers inside the blocks (modules with an attention processor)."""
        found = []
        for block_name, block, _ in self.blocks():
            for name, module in block.named_modules():
                if hasattr(module, "processor") and hasattr(module, "set_processor"):
                    found.append((f"{block_name}.{name}" if name else block_name, module))
        return found

    def compute_modules(self, block: nn.Module) -> list[tuple[str, nn.Module]]:
        """The heavy submodules of a block whose outputs a per-module cache may reuse or forecast:
        attention layers and feed-forward networks (TaylorSeer caches their outputs before the gate).

        Families override this through ``extra["compute_module_names"]`` (names of direct children).
        """
        names = self.extra.get("compute_module_names")
        if names is not None:
            return [(n, getattr(block, n)) for n in names if getattr(block, n, None) is not None]
        found = []
        for name, child in block.named_children():
            cls = type(child).__name__
            is_attention = hasattr(child, "processor") and hasattr(child, "set_processor")
            is_mlp = "FeedForward" in cls or name in ("ff", "ff_context", "ffn", "mlp", "feed_forward")
            if is_attention or is_mlp:
                found.append((name, child))
        return found

    # -- tokens ---------------------------------------------------------------------------------
    def token_layout(self, args: tuple, kwargs: dict) -> TokenLayout:
        if self.token_layout_fn is None:
            hidden = kwargs.get(self.hidden_arg, args[0] if args else None)
            return TokenLayout(batch=hidden.shape[0], image_tokens=hidden.shape[1], text_tokens=0,
                               grid=(hidden.shape[1],), joint_order=self.joint_order)
        return self.token_layout_fn(self.model, args, kwargs)

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model_class": type(self.model).__name__,
            "block_groups": {g.name: len(g.blocks) for g in self.block_groups},
            "attention_layers": len(self.attention_modules()),
            "cfg_style": self.cfg_style,
            "joint_order": self.joint_order,
        }


def model_arg(model: nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    """Read a named argument of the transformer's forward from a call's args/kwargs."""
    return read_arg(model, name, args, kwargs)


def modulelist(model: nn.Module, path: str) -> list[nn.Module]:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return []
    return list(obj) if isinstance(obj, (nn.ModuleList, Sequence)) else []


def group(model: nn.Module, path: str, io: BlockIO) -> BlockGroup:
    return BlockGroup(name=path, blocks=modulelist(model, path), io=io)
