"""Attention masks the sparse methods can take: text-padding masks over joint [text, image] keys.

Joint-attention DiTs with padded prompts (HunyuanVideo, Qwen-Image with a padded batch, Chroma)
pass SDPA a mask that drops the padding text keys and keeps every image key. For the image
queries such a mask is the same as leaving the masked text keys out, so the sparse path runs on
the kept text keys only and stays exact; the text queries go to SDPA with their own mask rows.

:func:`read_text_key_mask` accepts a boolean (True = attend) or additive float mask (0 = attend,
<= -1e4 or -inf = masked) that broadcasts to (B, H, Lq, Lk) and

* keeps every image key, for every image query;
* gives all image queries one key mask (query dimension 1, or image rows all equal);
* keeps the same text keys for every batch element and head (batch 1, or equal prompt lengths).

Anything else (a bias with other values, masked image keys, per-batch text lengths) returns
None and the call stays dense, with the model's own SDPA and mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# additive masks: values at or below this count as "masked" (diffusers uses -inf or finfo.min)
MASKED_BELOW = -1e4


@dataclass
class TextKeyMask:
    """What a supported mask means for one attention call."""

    text_keep: torch.Tensor | None  # indices of the kept text keys (in text order); None = all kept
    text_rows: torch.Tensor | None  # the mask for the text queries' dense SDPA (None: no text queries)


def _keep_of(mask: torch.Tensor) -> torch.Tensor | None:
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return None
    if bool(((mask != 0) & (mask > MASKED_BELOW)).any()):
        return None  # a real bias (ALiBi, soft masks), not a keep/drop mask
    return mask == 0


def _split_tokens(x: torch.Tensor, start: int, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image part, text part) of ``x`` along ``dim`` for image tokens [start, start + n)."""
    img = x.narrow(dim, start, n)
    txt = torch.cat([x.narrow(dim, 0, start), x.narrow(dim, start + n, x.shape[dim] - start - n)], dim=dim)
    return img, txt


def read_text_key_mask(mask, batch: int, heads: int, lq: int, lk: int, image_start: int,
                       image_tokens: int) -> TextKeyMask | None:
    """The kept text keys of a self-attention call with ``mask``, or None when the mask is not a
    text-padding mask that the sparse path can honour exactly (see the module docstring)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() > 4 or lq != lk:
        return None
    keep = _keep_of(mask)
    if keep is None:
        return None
    keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
    if any(have not in (1, want) for have, want in zip(keep.shape, (batch, heads, lq, lk))) or keep.shape[3] != lk:
        return None
    s, n = image_start, image_tokens
    has_text_queries = lq > n
    if keep.shape[2] == 1:
        keys = keep[:, :, 0]
        text_rows = mask if has_text_queries else None
    else:
        img_rows, _ = _split_tokens(keep, s, n, dim=2)
        if not bool((img_rows == img_rows[:, :, :1]).all()):
            return None
        keys = img_rows[:, :, 0]
        text_rows = _split_tokens(mask.reshape(keep.shape), s, n, dim=2)[1] if has_text_queries else None
    img_keys, text_keys = _split_tokens(keys, s, n, dim=2)
    if not bool(img_keys.all()):
        return None
    if text_keys.shape[2] == 0 or bool(text_keys.all()):
        return TextKeyMask(text_keep=None, text_rows=text_rows)
    first = text_keys[:1, :1]
    if not bool((text_keys == first).all()):
        return None
    return TextKeyMask(text_keep=first[0, 0].nonzero().squeeze(1), text_rows=text_rows)
