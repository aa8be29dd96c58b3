"""Attention over the whole image while only some tokens are computed: cached keys/values.

``CachedKVRouter`` is an attention router (see ``dispatch.py``) for the attention layers inside
the token regions of a ``TokenSelector``. On a call that computes every token (``recording``) it
keeps each layer's keys and values (after RoPE and norms, per CFG branch, (B, H, L, D)). On a
sparse call, the fresh keys/values of the kept positions (text, padding, active image tokens) are
written into that cache, and the kept queries attend to the whole cached sequence: inactive image
tokens contribute the keys/values of the last call that computed them. Keys keep their original
sequence order, so any attention mask is widened to the full sequence with inactive image tokens
allowed. Cross-attention (keys that are not the query tokens, e.g. Wan's ``attn2`` over the text)
runs unchanged.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..hooks.token_select import TokenSelector
from .dense import dense_attention


def widen_mask(mask: torch.Tensor, index: torch.Tensor, full_length: int) -> torch.Tensor | None:
    """A mask over kept key positions ``index`` (B, L_kept) -> the same mask over all ``full_length`` keys."""
    if mask.ndim < 3 or mask.shape[-1] != index.shape[1]:
        return None
    b = index.shape[0]
    if mask.shape[0] not in (1, b):
        return None
    m = mask.expand(b, *mask.shape[1:]) if mask.shape[0] != b else mask
    fill = True if m.dtype == torch.bool else 0.0
    full = torch.full((*m.shape[:-1], full_length), fill, dtype=m.dtype, device=m.device)
    idx = index.to(m.device).view(b, *([1] * (m.ndim - 2)), index.shape[1]).expand(m.shape)
    return full.scatter_(-1, idx, m)


class CachedKVRouter:
    def __init__(self, selector: TokenSelector, cross_attention: tuple[str, ...] = (),
                 cache_dtype: torch.dtype | None = None):
        self.selector = selector
        self.cross = set(cross_attention)
        self.cache_dtype = cache_dtype
        self.caches: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.active = False  # read by the dispatch hooks: False = no interception at all
        self.counters: Counter = Counter()

    def reset(self) -> None:
        self.caches.clear()

    def bytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.caches.values() for t in pair)

    def has_cache(self, branch: int) -> bool:
        return any(key[0] == branch for key in self.caches)

    def attend(self, site, q, k, v, attn_mask, scale):
        sel = self.selector
        region = sel.current
        if region is None or site.name.rsplit(".", 1)[-1] in self.cross or k.shape[2] != q.shape[2]:
            return None
        key = (sel.branch, site.layer_index, site.call_index)
        if region.recording:
            dtype = self.cache_dtype or k.dtype
            self.caches[key] = (k.detach().to(dtype, copy=True).contiguous(),
                                v.detach().to(dtype, copy=True).contiguous())
            return None
        if not region.sparse:
            return None
        match = region.attention_index(q.shape[2])
        if match is None:
            self.counters["unmatched_attention"] += 1
            return None
        index, full_length = match
        cached = self.caches.get(key)
        b_all = region.batch
        if (cached is None or cached[0].shape[0] != b_all or cached[0].shape[2] != full_length
                or cached[0].shape[1] != k.shape[1] or cached[0].shape[3] != k.shape[3]):
            self.counters["missing_kv_cache"] += 1
            return None
        ck, cv = cached
        if sel.sample is not None:
            b = sel.sample
            index, ck, cv = index[b:b + 1], ck[b:b + 1], cv[b:b + 1]
        index = index.to(ck.device)
        k, v = k.to(ck.dtype), v.to(cv.dtype)
        for i in range(index.shape[0]):  # index_copy_ per sample: cheaper than advanced-index writes
            ck[i].index_copy_(1, index[i], k[i])
            cv[i].index_copy_(1, index[i], v[i])
        mask = None
        if attn_mask is not None:
            mask = widen_mask(attn_mask, index, full_length)
            if mask is None:
                self.counters["unmatched_mask"] += 1
                return None
        self.counters["joined_attention"] += 1
        return dense_attention(q, ck.to(q.dtype), cv.to(q.dtype), mask, scale)
