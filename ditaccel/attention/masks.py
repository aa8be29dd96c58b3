"""Spatial masks on the latent token grid: tiles, CLEAR's radius windows, nearest-tile layouts.

Image tokens are in raster order over the grid ((H, W) or (T, H, W)). A *tile plan* cuts the
grid into tiles (8×8 by default, (1, 8, 8) for video) so a block of the block-sparse kernel is a
compact patch of the image rather than a strip of a row.

CLEAR (Liu et al., 2024): image token p attends to image token p' iff Σ_i ((p_i − p'_i) / r_i)² ≤ 1
(a circle of radius r on (H, W), an ellipsoid with per-axis radii on (T, H, W)). The exact path
gathers, for every query tile, the keys of the tile's window (the grid cells within radius of
some cell of the tile), and masks each (query, key) pair exactly — so border tiles and partially
covered windows are exact. The block path keeps every key tile that has at least one pair within
radius and attends it fully (a superset of the exact window; cheaper on GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


def default_tile(grid: tuple[int, ...]) -> tuple[int, ...]:
    if len(grid) == 1:
        return (64,)
    if len(grid) == 2:
        return (8, 8)
    return (1,) * (len(grid) - 2) + (8, 8)


def _mesh(sizes) -> torch.Tensor:
    axes = [torch.arange(int(s)) for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


def _flat(coords: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    idx = torch.zeros(coords.shape[:-1], dtype=torch.long)
    for i, g in enumerate(grid):
        idx = idx * g + coords[..., i]
    return idx


@dataclass(frozen=True)
class TilePlan:
    grid: tuple[int, ...]
    tile: tuple[int, ...]
    origins: torch.Tensor  # (n_tiles, ndim) first cell of each tile
    perm: torch.Tensor  # (N,) tile order: position i holds raster token perm[i]
    offsets: torch.Tensor  # (n_tiles + 1,) tile j at [offsets[j], offsets[j + 1]) of the tile order

    @property
    def n_tiles(self) -> int:
        return self.origins.shape[0]


@lru_cache(maxsize=64)
def tile_plan(grid: tuple[int, ...], tile: tuple[int, ...] | None = None) -> TilePlan:
    """Tiles of ``tile`` cells (clipped at the grid border), tiles and cells in raster order."""
    grid = tuple(int(g) for g in grid)
    tile = default_tile(grid) if tile is None else tuple(int(t) for t in tile)
    if len(tile) != len(grid):
        raise ValueError(f"tile {tile} must have one size per grid axis {grid}.")
    tile = tuple(min(t, g) for t, g in zip(tile, grid))
    counts = [math.ceil(g / t) for g, t in zip(grid, tile)]
    origins = _mesh(counts) * torch.tensor(tile)
    perm, offsets = [], [0]
    for o in origins.tolist():
        sizes = [min(t, g - a) for t, g, a in zip(tile, grid, o)]
        cells = _mesh(sizes) + torch.tensor(o)
        perm.append(_flat(cells, grid))
        offsets.append(offsets[-1] + cells.shape[0])
    return TilePlan(grid, tile, origins, torch.cat(perm), torch.tensor(offsets))


def _radii(radii, ndim: int) -> tuple[float, ...]:
    r = tuple(float(x) for x in (radii if isinstance(radii, (tuple, list)) else (radii,) * ndim))
    if len(r) != ndim or any(x <= 0 for x in r):
        raise ValueError(f"radii must be {ndim} positive numbers (one per grid axis), got {radii!r}.")
    return r


def within_radius(a: torch.Tensor, b: torch.Tensor, radii: tuple[float, ...]) -> torch.Tensor:
    """a (..., ndim), b (..., ndim) integer cells -> Σ ((a − b) / r)² ≤ 1."""
    r = torch.tensor(radii, dtype=torch.float64)
    return ((((a - b).double()) / r) ** 2).sum(-1) <= 1.0 + 1e-9


def brute_force_clear_mask(grid, radii, text_tokens: int = 0, text_first: bool = True) -> torch.Tensor:
    """The CLEAR keep-mask over the whole joint sequence (L, L), L = N + text_tokens, built pair by
    pair: image→image within radius, image→text always, text queries attend to everything."""
    grid = tuple(int(g) for g in grid)
    radii = _radii(radii, len(grid))
    n = math.prod(grid)
    cells = _mesh(grid)
    img = within_radius(cells[:, None, :], cells[None, :, :], radii)
    L = n + text_tokens
    mask = torch.ones(L, L, dtype=torch.bool)
    s = text_tokens if text_first else 0
    mask[s:s + n, s:s + n] = img
    return mask


@dataclass(frozen=True)
class WindowPlan:
    """Per query tile: its query tokens and its window of key tokens (raster indices)."""

    tiles: TilePlan
    radii: tuple[float, ...]
    q_index: torch.Tensor  # (n_tiles, Tq) raster index (0 where invalid)
    q_valid: torch.Tensor  # (n_tiles, Tq)
    k_index: torch.Tensor  # (n_tiles, W)
    k_valid: torch.Tensor  # (n_tiles, W)
    base: torch.Tensor  # (Tq, W) pair within radius (translation invariant)
    pairs: int  # number of kept (image query, image key) pairs

    def mask(self, tiles: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        return self.base & self.q_valid[tiles].unsqueeze(-1) & self.k_valid[tiles].unsqueeze(-2)


@lru_cache(maxsize=64)
def window_plan(grid: tuple[int, ...], radii, tile: tuple[int, ...] | None = None) -> WindowPlan:
    tiles = tile_plan(tuple(grid), tile)
    grid, tile = tiles.grid, tiles.tile
    r = _radii(radii, len(grid))
    # no key is farther than grid - 1 cells along an axis, so larger radii add nothing
    fl = [min(math.floor(x + 1e-9), g - 1) for x, g in zip(r, grid)]
    # key cells relative to the tile origin that are within radius of some cell of the tile box
    rel_k = _mesh([t + 2 * f for t, f in zip(tile, fl)]) - torch.tensor(fl)
    t_hi = torch.tensor(tile) - 1
    gap = torch.maximum(torch.maximum(-rel_k, rel_k - t_hi), torch.zeros_like(rel_k))
    rel_k = rel_k[within_radius(gap, torch.zeros_like(gap), r)]
    rel_q = _mesh(tile)
    base = within_radius(rel_q[:, None, :], rel_k[None, :, :], r)
    g = torch.tensor(grid)
    qpos = tiles.origins[:, None, :] + rel_q[None]
    kpos = tiles.origins[:, None, :] + rel_k[None]
    q_valid = ((qpos >= 0) & (qpos < g)).all(-1)
    k_valid = ((kpos >= 0) & (kpos < g)).all(-1)
    q_index = torch.where(q_valid, _flat(qpos.clamp(min=0).minimum(g - 1), grid), 0)
    k_index = torch.where(k_valid, _flat(kpos.clamp(min=0).minimum(g - 1), grid), 0)
    pairs = int((base & q_valid.unsqueeze(-1) & k_valid.unsqueeze(-2)).sum())
    return WindowPlan(tiles, r, q_index, q_valid, k_index, k_valid, base, pairs)


def window_attention(q, k, v, plan: WindowPlan, scale: float, max_elements: int = 1 << 20):
    """Exact CLEAR attention of image queries q (B, H, N, D) over image keys k/v (B, H, N, D).

    Returns (out like q, lse float32 (B, H, N)). Tiles are processed in chunks whose score tensor
    stays under ``max_elements`` floats per (batch, head).
    """
    B, H, N, D = q.shape
    dev = q.device
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    BH = B * H
    qf = q.reshape(BH, N, D).to(ct)
    kf = k.reshape(BH, N, D).to(ct)
    vf = v.reshape(BH, N, D).to(ct)
    out = torch.zeros(BH, N, D, dtype=ct, device=dev)
    lse = torch.full((BH, N), float("-inf"), dtype=torch.float32, device=dev)
    n_tiles, Tq = plan.q_index.shape
    W = plan.k_index.shape[1]
    chunk = max(1, max_elements // (BH * Tq * W))
    base = plan.base.to(dev)
    for t0 in range(0, n_tiles, chunk):
        sl = slice(t0, min(n_tiles, t0 + chunk))
        qi, qv = plan.q_index[sl].to(dev), plan.q_valid[sl].to(dev)
        ki, kv = plan.k_index[sl].to(dev), plan.k_valid[sl].to(dev)
        c = qi.shape[0]
        qg = qf[:, qi.reshape(-1)].reshape(BH * c, Tq, D)
        kg = kf[:, ki.reshape(-1)].reshape(BH * c, W, D)
        vg = vf[:, ki.reshape(-1)].reshape(BH * c, W, D)
        keep = base & kv.unsqueeze(1)  # (c, Tq, W); invalid query rows are dropped below
        bias = torch.zeros(keep.shape, dtype=ct, device=dev).masked_fill_(~keep, float("-inf"))
        bias = bias.unsqueeze(0).expand(BH, c, Tq, W).reshape(BH * c, Tq, W)
        s = torch.baddbmm(bias, qg, kg.transpose(1, 2), alpha=scale)
        m = s.amax(-1, keepdim=True).clamp(min=torch.finfo(ct).min)
        s.sub_(m).exp_()
        l_ = s.sum(-1, keepdim=True)
        o = torch.bmm(s, vg).div_(l_.clamp(min=torch.finfo(ct).tiny))
        rows = qi[qv]  # raster ids of the valid queries of these tiles
        o = o.reshape(BH, c, Tq, D)[:, qv]
        ls = (m + l_.log()).reshape(BH, c, Tq)[:, qv]
        out[:, rows] = o
        lse[:, rows] = ls.float()
    return out.reshape(B, H, N, D).to(q.dtype), lse.reshape(B, H, N)


@lru_cache(maxsize=32)
def fused_window_plan(grid: tuple[int, ...], radii, tile, text: int, dtype: torch.dtype, device: torch.device):
    """CLEAR's exact windows as a :class:`~ditaccel.attention.gathered.GatherPlan` (text keys appended)."""
    from .gathered import make_gather_plan

    plan = window_plan(tuple(grid), radii, tile)
    return make_gather_plan(math.prod(plan.tiles.grid), plan.q_index, plan.q_valid, plan.k_index, plan.k_valid, plan.base, text, dtype, device)


def window_attention_fused(q, k, v, plan: WindowPlan, scale: float, k_txt=None, v_txt=None,
                           max_elements: int = 1 << 23):
    """Exact CLEAR attention (image keys in the windows plus all text keys) with the fused CPU
    flash kernel (see :mod:`ditaccel.attention.gathered`). Returns (out, lse float32 (B, H, N)),
    already merged with the text keys, or None when the fused kernel is unavailable."""
    from .cpu_flash import flash_available
    from .gathered import gathered_attention

    if not flash_available(q):
        return None
    T = 0 if k_txt is None else k_txt.shape[2]
    gp = fused_window_plan(plan.tiles.grid, plan.radii, plan.tiles.tile, T, q.dtype, q.device)
    return gathered_attention(q, k, v, gp, scale, k_txt, v_txt, max_elements)


def tile_block_mask(plan: WindowPlan) -> torch.Tensor:
    """(n_tiles, n_tiles) bool: key tile kept for a query tile iff some pair is within radius."""
    tiles = plan.tiles
    n = tiles.n_tiles
    N = math.prod(tiles.grid)
    tile_of = torch.empty(N, dtype=torch.long)
    sizes = tiles.offsets[1:] - tiles.offsets[:-1]
    tile_of[tiles.perm] = torch.repeat_interleave(torch.arange(n), sizes)
    hit = plan.mask().any(1)  # (n, W): key cell reached by some query of the tile
    key_tile = tile_of[plan.k_index]  # (n, W)
    out = torch.zeros(n, n + 1, dtype=torch.bool)  # last column collects the misses
    out.scatter_(1, torch.where(hit, key_tile, n), True)
    return out[:, :n]


def nearest_tiles(tiles: TilePlan, count: int) -> torch.Tensor:
    """(n_tiles, count) ids of the ``count`` key tiles whose centres are nearest each tile's centre
    (the tile itself first), in tile-size units so tiles of all axes weigh the same."""
    sizes_nd = torch.tensor(tiles.tile, dtype=torch.float64)
    centres = tiles.origins.double() / sizes_nd
    d = ((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    d = d + torch.eye(d.shape[0], dtype=d.dtype) * -1.0  # self first
    return torch.argsort(d, dim=1, stable=True)[:, :count]
