"""Attention masks the sparse methods can take: masks and biases on the text keys of joint attention.

Joint-attention DiTs with padded prompts pass SDPA a mask over [text, image] keys: HunyuanVideo and
Qwen-Image a boolean one that drops the padding text keys; Chroma (diffusers 0.42) the product of
its float {0, 1} token masks, which SDPA *adds* to the scores (+1 on the kept pairs). Whenever every
image query sees the image keys with one common additive value c (0 for a boolean mask), the mask
is, for the image queries, an additive bias on the text keys alone (its text values minus c: the
softmax does not change when a row is shifted by a constant). The sparse path then stays exact:

* ``text_keep``: the bias is 0 or -inf and the same for every batch element and head: the masked
  text keys are left out (no bias needed, the cheapest case);
* ``text_bias``: otherwise, (B | 1, H | 1, 1, T) float32 added to the image queries' text-key scores
  (-inf clamped to ``MASKED_BELOW``, which no softmax weight survives next to real scores);
* ``text_rows``: the mask rows of the text queries, which go to SDPA as they are.

:func:`read_text_key_mask` returns None (the call stays dense, the model's own SDPA with its mask)
for masks that put different values on the image keys of one row (masked image keys, a relative
position bias), image queries with different rows, integer masks, or shapes SDPA would not take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# additive values at or below this count as "masked" (diffusers uses -inf or finfo.min); text biases
# are clamped to it, so a fully masked text part stays finite (its weight is exp(-1e4) = 0)
MASKED_BELOW = -1e4


@dataclass
class TextKeyMask:
    """What a supported mask means for the image queries of one attention call."""

    text_keep: torch.Tensor | None  # indices of the kept text keys (in text order); None = all kept
    text_rows: torch.Tensor | None  # the mask for the text queries' dense SDPA (None: no text queries)
    text_bias: torch.Tensor | None = None  # (B | 1, H | 1, 1, T) float32 added to the text keys' scores


def _additive(mask: torch.Tensor) -> torch.Tensor | None:
    """The mask as SDPA applies it: float32 added to the scores (bool: 0 kept, -inf dropped)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    if not mask.is_floating_point():
        return None
    return mask.float().clamp(min=MASKED_BELOW)


def split_tokens(x: torch.Tensor, start: int, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image part, text part) of ``x`` along ``dim`` for image tokens [start, start + n); the text
    part is the tokens before and after them, in order (a view when they lie on one side)."""
    img = x.narrow(dim, start, n)
    before, after = x.narrow(dim, 0, start), x.narrow(dim, start + n, x.shape[dim] - start - n)
    txt = after if start == 0 else before if start + n == x.shape[dim] else torch.cat([before, after], dim=dim)
    return img, txt


def read_text_key_mask(mask, batch: int, heads: int, lq: int, lk: int, image_start: int,
                       image_tokens: int) -> TextKeyMask | None:
    """What ``mask`` means for the image queries of a self-attention call, or None when the sparse
    path cannot honour it exactly (see the module docstring)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() > 4 or lq != lk:
        return None
    add = _additive(mask)
    if add is None:
        return None
    add = add.reshape((1,) * (4 - add.dim()) + tuple(add.shape))
    if any(have not in (1, want) for have, want in zip(add.shape, (batch, heads, lq, lk))) or add.shape[3] != lk:
        return None
    s, n = image_start, image_tokens
    has_text_queries = lq > n
    if add.shape[2] == 1:
        keys = add[:, :, 0]
        text_rows = mask if has_text_queries else None
    else:
        img_rows = add.narrow(2, s, n)
        if not bool((img_rows == img_rows[:, :, :1]).all()):
            return None
        keys = img_rows[:, :, 0]
        shaped = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        text_rows = split_tokens(shaped, s, n, dim=2)[1] if has_text_queries else None
    img_keys, text_keys = split_tokens(keys, s, n, dim=2)
    level = img_keys[:, :, :1]  # the image keys' common value, per row
    if not bool((img_keys == level).all()) or not bool((level > MASKED_BELOW).all()):
        return None
    bias = (text_keys - level).clamp_(min=MASKED_BELOW)  # (B', H', T), relative to the image keys
    if text_keys.shape[2] == 0 or bool((bias == 0).all()):
        return TextKeyMask(text_keep=None, text_rows=text_rows)
    first = bias[:1, :1]
    if bool(((bias == 0) | (bias <= MASKED_BELOW)).all()) and bool((bias == first).all()):
        return TextKeyMask(text_keep=(first[0, 0] == 0).nonzero().squeeze(1), text_rows=text_rows)
    return TextKeyMask(text_keep=None, text_rows=text_rows, text_bias=bias.unsqueeze(2))
