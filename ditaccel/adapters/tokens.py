"""Per-family token facts, for methods that change the number of image tokens inside the model.

Region-adaptive sampling (RAS) sends only some image tokens through the transformer blocks. That
needs model facts the block adapters do not carry, kept here, keyed by family (model facts only,
no method logic):

* **regions**: runs of blocks whose hidden stream has one token per image token (or a joint
  sequence that contains them). Tokens are gathered at the entry of a region's first block and
  scattered back at the exit of its last block, so the model's own patch embedding, position
  embedding, final norm and unpatchify run unchanged on the full grid. For SD3 the learned
  ``pos_embed`` is added in the patch embedding, before the blocks, so gathering at the first
  block gathers the embedded tokens with their positions already added.
* **per-token block arguments**: tensors the model passes to every block with one entry per token
  (rotary embeddings, Lumina2's attention mask, Wan 2.2's per-token timestep modulation), with the
  sequence they index (image tokens, the region's hidden stream, or the joint attention sequence
  text+image of two-stream blocks) and whether they can carry a per-sample batch dimension.
* how the **output** maps to image tokens (packed tokens, or an unpatchified image/video), the
  **joint order** of text and image tokens in two-stream attention, the attention layers whose
  keys/values are the text only (**cross-attention**), and transformer arguments that add
  per-token residuals between blocks (**controlnet**), which only the full grid can take.

Index spaces used by ``PerTokenArg.space``:

``IMAGE``  the N image tokens, in the model's token order (row-major over (T,) H, W).
``HIDDEN`` the hidden stream of the region's blocks: equal to ``IMAGE`` for image-only streams;
           for Lumina2's joint ``layers`` it is [text (valid caption length), image, padding] per row.
``JOINT``  the attention sequence of two-stream blocks: [text, image] (FLUX) or [image, text] (SD3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .base import IMAGE_FIRST, SEPARATE, TEXT_FIRST, model_arg

IMAGE = "image"
HIDDEN = "hidden"
JOINT = "joint"

# hidden-stream layouts of a region
HIDDEN_IMAGE = "image"  # the hidden stream is the image tokens
HIDDEN_TEXT_IMAGE_PAD = "text_image_pad"  # per row: [text (valid length), image (N), padding]

OUT_TOKENS = "tokens"  # output (B, N, C): packed latent tokens (FLUX)
OUT_GRID = "grid"  # output (B, C, H, W) or (B, C, F, H, W): unpatchified latents


@dataclass(frozen=True)
class PerTokenArg:
    """A block argument with one entry per token along ``seq_dim`` (a tensor or a tuple of tensors)."""

    name: str
    space: str  # IMAGE, HIDDEN or JOINT
    seq_dim: int = 1
    batched: bool = True  # dim 0 is the batch (or 1, broadcast): per-sample gathers can be passed
    min_ndim: int = 0  # only a tensor with at least this many dims is per token (Wan 2.2 temb)


@dataclass(frozen=True)
class TokenRegion:
    """A run of blocks over which the image tokens may be reduced."""

    blocks: tuple[str, ...]  # ModuleList paths, in execution order, run back to back by the model
    hidden_arg: str = "hidden_states"
    hidden_layout: str = HIDDEN_IMAGE
    encoder_arg: str | None = None  # the text stream of two-stream blocks (its length is the text length)
    outputs: tuple[str, ...] = ("hidden",)  # what a block returns, as in BlockIO.outputs
    per_token: tuple[PerTokenArg, ...] = ()
    mask_arg: str | None = None  # HIDDEN_TEXT_IMAGE_PAD: (B, L) bool mask of the valid positions


@dataclass(frozen=True)
class TokenFacts:
    family: str
    regions: tuple[TokenRegion, ...]
    image_tokens: Callable[[nn.Module, tuple, dict], tuple[int, tuple[int, ...]]]  # (N, grid)
    output_layout: str
    patch: Callable[[nn.Module], tuple[int, int, int]] = lambda model: (1, 1, 1)  # (pt, ph, pw) for OUT_GRID
    joint_order: str = SEPARATE  # order of text and image in JOINT attention sequences
    cross_attention: tuple[str, ...] = ()  # names (last component) of attention modules with text-only K/V
    split_attention_arg: str | None = None  # attention kwarg that cannot carry a batch dim (see FLUX)
    dense_if_args: tuple[str, ...] = ()  # transformer arguments that need the full grid between blocks
    notes: str = ""


def _tuple3(value) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (1, value, value)
    value = tuple(int(v) for v in value)
    return value if len(value) == 3 else (1,) * (3 - len(value)) + value


def _grid_2d(model, args, kwargs):
    hidden = model_arg(model, "hidden_states", args, kwargs)
    p = int(model.config.patch_size)
    h, w = hidden.shape[-2] // p, hidden.shape[-1] // p
    return h * w, (h, w)


def _flux_tokens(model, args, kwargs):
    hidden = model_arg(model, "hidden_states", args, kwargs)
    img_ids = model_arg(model, "img_ids", args, kwargs)
    n = int(hidden.shape[1])
    if isinstance(img_ids, torch.Tensor):
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        if ids.shape[0] == n:
            return n, (int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1)
    return n, (n,)


def _wan_tokens(model, args, kwargs):
    hidden = model_arg(model, "hidden_states", args, kwargs)
    pt, ph, pw = _tuple3(model.config.patch_size)
    f, h, w = hidden.shape[-3] // pt, hidden.shape[-2] // ph, hidden.shape[-1] // pw
    return f * h * w, (f, h, w)


# FLUX: the rotary embedding is one (cos, sin) pair of (T + N, D) tensors over the joint sequence
# [text, image], shared by the batch; diffusers' apply_rotary_emb broadcasts it as
# cos[None, :, None, :], so it cannot take a per-sample (B, L, D) version. With different tokens
# per sample the attention modules are run once per sample (``split_attention_arg``).
_FLUX_ROPE = PerTokenArg("image_rotary_emb", JOINT, seq_dim=0, batched=False)
_TWO_STREAM_OUT = ("encoder", "hidden")

FLUX = TokenFacts(
    family="flux",
    regions=(TokenRegion(blocks=("transformer_blocks", "single_transformer_blocks"),
                         encoder_arg="encoder_hidden_states", outputs=_TWO_STREAM_OUT, per_token=(_FLUX_ROPE,)),),
    image_tokens=_flux_tokens,
    output_layout=OUT_TOKENS,
    joint_order=TEXT_FIRST,
    split_attention_arg="image_rotary_emb",
    dense_if_args=("controlnet_block_samples", "controlnet_single_block_samples"),
    notes="Packed latents: the model input is already one token per row, gathered at the first double block.",
)

SD3 = TokenFacts(
    family="sd3",
    regions=(TokenRegion(blocks=("transformer_blocks",), encoder_arg="encoder_hidden_states",
                         outputs=_TWO_STREAM_OUT),),
    image_tokens=_grid_2d,
    output_layout=OUT_GRID,
    patch=lambda model: (1, int(model.config.patch_size), int(model.config.patch_size)),
    joint_order=IMAGE_FIRST,
    # skip_layers (skip-layer guidance) may leave out the region's first or last block: run those calls in full
    dense_if_args=("block_controlnet_hidden_states", "skip_layers"),
    notes="Learned pos_embed is added by the patch embedding before the blocks. SD3.5 attn2 is image-only.",
)

LUMINA2 = TokenFacts(
    family="lumina2",
    regions=(
        # noise_refiner: image tokens alone, per-sample complex rotary embedding (B, N, D/2).
        TokenRegion(blocks=("noise_refiner",), per_token=(PerTokenArg("image_rotary_emb", IMAGE),)),
        # layers: joint [text, image, pad] rows; rotary embedding (B, L, D/2) and mask (B, L) over that.
        TokenRegion(blocks=("layers",), hidden_layout=HIDDEN_TEXT_IMAGE_PAD, mask_arg="attention_mask",
                    per_token=(PerTokenArg("image_rotary_emb", HIDDEN), PerTokenArg("attention_mask", HIDDEN))),
    ),
    image_tokens=_grid_2d,
    output_layout=OUT_GRID,
    patch=lambda model: (1, int(model.config.patch_size), int(model.config.patch_size)),
    joint_order=TEXT_FIRST,
)

WAN = TokenFacts(
    family="wan",
    regions=(TokenRegion(blocks=("blocks",), per_token=(
        # (cos, sin), each (1, N, 1, D): batch-broadcast, so per-sample gathers pass through.
        PerTokenArg("rotary_emb", IMAGE),
        # Wan 2.2 TI2V: per-token modulation (B, N, 6, C).
        PerTokenArg("temb", IMAGE, min_ndim=4),
    )),),
    image_tokens=_wan_tokens,
    output_layout=OUT_GRID,
    patch=lambda model: _tuple3(model.config.patch_size),
    cross_attention=("attn2",),
)

_FACTS: dict[str, TokenFacts] = {f.family: f for f in (FLUX, SD3, LUMINA2, WAN)}


def token_facts(family: str) -> TokenFacts | None:
    return _FACTS.get(family)


def token_families() -> list[str]:
    return sorted(_FACTS)


# ---------------------------------------------------------------------------------------------
# output <-> image tokens


def output_to_tokens(facts: TokenFacts, model: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """(B, N, X) view of a model output, one row per image token in the model's token order."""
    if facts.output_layout == OUT_TOKENS:
        return sample
    pt, ph, pw = facts.patch(model)
    if sample.ndim == 4:
        b, c, h, w = sample.shape
        x = sample.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)
    b, c, f, h, w = sample.shape
    x = sample.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def tokens_to_output(facts: TokenFacts, model: nn.Module, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of ``output_to_tokens`` for an output of ``shape``."""
    if facts.output_layout == OUT_TOKENS:
        return tokens
    pt, ph, pw = facts.patch(model)
    if len(shape) == 4:
        b, c, h, w = shape
        x = tokens.reshape(b, h // ph, w // pw, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(shape)
    b, c, f, h, w = shape
    x = tokens.reshape(b, f // pt, h // ph, w // pw, c, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(shape)
