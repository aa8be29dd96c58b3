"""Tile-gathered attention on CPU: per query tile, one row gather of its keys and one fused kernel call.

A :class:`GatherPlan` lists, per query tile, its query tokens and its key tokens (raster ids on
the image grid, text keys appended after the ``n_image`` image rows) and an optional keep-mask.
:func:`gathered_attention` lays q/k/v out as rows of (B·H·D) values — a view for the usual
(B, L, H, D)-contiguous projections with B = 1 — gathers each chunk of tiles with one
``index_select`` per tensor and runs torch's fused flash CPU kernel on (tiles, B·H, Tq, W) with
an additive mask, so scores and probabilities are never materialised, no permutation of the
whole sequence is needed and the text keys need no separate pass or LSE merge.

Tiles are split into groups that share one mask: tiles whose keys are all inside the grid share
the translation-invariant mask (or none), border tiles carry their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cpu_flash import flash_attention_lse, flash_available


@dataclass(frozen=True)
class GatherPlan:
    n_image: int
    tq: int
    groups: tuple  # of (tile ids, q_index (n, Tq), k_index (n, W), bias None | (1 or n, 1, Tq, W))
    all_q_valid: bool
    q_valid: torch.Tensor  # (n_tiles, Tq)
    kept_pairs: int  # kept (image query, image key) pairs


def make_gather_plan(N: int, q_index, q_valid, k_index, k_valid, base, text: int, dtype, device,
                     max_bias_bytes: int = 64 << 20) -> GatherPlan:
    """N image tokens; q_index/q_valid (n, Tq), k_index/k_valid (n, W) raster ids on the image
    grid (invalid slots are masked; every image token is a valid query of exactly one tile), base
    None or a (Tq, W) keep-mask shared by all tiles. ``text`` keys are appended to every tile
    (always kept). Border-tile masks are cached as additive float masks up to ``max_bias_bytes``,
    beyond that as bool masks turned into float per chunk."""
    n, Tq = q_index.shape
    keep_img = k_valid.unsqueeze(1).expand(n, Tq, -1)
    if base is not None:
        keep_img = keep_img & base
    kept_pairs = int((keep_img & q_valid.unsqueeze(-1)).sum())
    full_index = torch.cat([k_index, (N + torch.arange(text)).expand(n, text)], 1)
    keep = torch.cat([keep_img, torch.ones(n, Tq, text, dtype=torch.bool)], 2)
    interior = k_valid.all(1)
    groups = []
    for ids in (torch.nonzero(~interior).squeeze(1), torch.nonzero(interior).squeeze(1)):
        if ids.numel() == 0:
            continue
        if bool(interior[ids[0]]):
            kp = keep[ids[:1]]
            bias = None if bool(kp.all()) else torch.zeros(kp.shape, dtype=dtype).masked_fill_(~kp, float("-inf"))
        elif ids.numel() * keep.shape[1] * keep.shape[2] * torch.empty(0, dtype=dtype).element_size() <= max_bias_bytes:
            kp = keep[ids]
            bias = torch.zeros(kp.shape, dtype=dtype).masked_fill_(~kp, float("-inf"))
        else:  # too many border tiles to hold their masks (large video grids): build them per chunk
            bias = keep[ids]
        bias = None if bias is None else bias.unsqueeze(1).to(device)
        groups.append((ids.to(device), q_index[ids].to(device), full_index[ids].to(device), bias))
    return GatherPlan(N, Tq, tuple(groups), bool(q_valid.all()), q_valid.to(device), kept_pairs)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (L, B*H*D) (a view when x is laid out as (B, L, H, D) with B == 1)."""
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], -1)


def _rows_with_text(x: torch.Tensor, x_txt: torch.Tensor | None) -> torch.Tensor:
    if x_txt is None or x_txt.shape[2] == 0:
        return _rows(x)
    B, H, N, D = x.shape
    src = torch.empty(N + x_txt.shape[2], B, H, D, dtype=x.dtype, device=x.device)
    src[:N].copy_(x.permute(2, 0, 1, 3))
    src[N:].copy_(x_txt.permute(2, 0, 1, 3))
    return src.view(src.shape[0], -1)


def gathered_attention(q, k, v, plan: GatherPlan, scale: float, k_txt=None, v_txt=None,
                       max_elements: int = 1 << 23):
    """Attention of image queries q (B, H, N, D) over each tile's gathered image keys plus all
    text keys k_txt/v_txt (B, H, T, D). Returns (out (B, H, N, D), lse float32 (B, H, N)), or
    None when the fused CPU kernel cannot run (the caller falls back). ``max_elements`` caps the
    gathered K + V values per kernel call."""
    if not flash_available(q):
        return None
    B, H, N, D = q.shape
    BH = B * H
    Tq = plan.tq
    qs = _rows(q)
    ks, vs = _rows_with_text(k, k_txt), _rows_with_text(v, v_txt)
    out = torch.empty(N, BH * D, dtype=q.dtype, device=q.device)
    lse = torch.empty(N, BH, dtype=torch.float32, device=q.device)
    for ids, q_index, k_index, bias in plan.groups:
        W = k_index.shape[1]
        chunk = max(1, max_elements // (2 * W * BH * D))
        for c0 in range(0, ids.numel(), chunk):
            c1 = min(ids.numel(), c0 + chunk)
            c = c1 - c0
            ki = k_index[c0:c1].reshape(-1)
            qi = q_index[c0:c1].reshape(-1)
            kg = ks.index_select(0, ki).view(c, W, BH, D).transpose(1, 2)
            vg = vs.index_select(0, ki).view(c, W, BH, D).transpose(1, 2)
            qg = qs.index_select(0, qi).view(c, Tq, BH, D).transpose(1, 2)
            b = bias if bias is None or bias.shape[0] == 1 else bias[c0:c1]
            if b is not None and b.dtype == torch.bool:
                b = torch.zeros(b.shape, dtype=q.dtype, device=q.device).masked_fill_(~b, float("-inf"))
            res = flash_attention_lse(qg, kg, vg, b, scale)
            if res is None:
                return None
            o = res[0].transpose(1, 2).reshape(c * Tq, BH * D)
            ls = res[1].transpose(1, 2).reshape(c * Tq, BH).float()
            if not plan.all_q_valid:
                sel = torch.nonzero(plan.q_valid[ids[c0:c1]].reshape(-1)).squeeze(1)
                qi, o, ls = qi[sel], o[sel], ls[sel]
            out.index_copy_(0, qi, o)
            lse.index_copy_(0, qi, ls)
    return out.view(N, B, H, D).permute(1, 2, 0, 3), lse.view(N, B, H).permute(1, 2, 0)
