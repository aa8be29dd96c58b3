"""CLEAR: circular (or, for video, ellipsoidal) local attention on the latent grid (Liu et al., 2024).

Each image token attends to the image tokens within ``radius`` cells on the latent token grid
(per-axis radii ``(temporal_radius, radius, radius)`` on a (T, H, W) grid) plus every text token;
text queries stay dense. The paper distils the model into this pattern with a short fine-tune;
here it is applied training-free, which costs fidelity (see docs/sparse_attention.md for the
measured numbers): every long-range interaction the model learned is dropped.

``mode="exact"`` gathers each query tile's window and masks every pair exactly (border tiles and
partially covered key tiles included). ``mode="blocks"`` keeps every key tile with at least one
pair within radius and attends it fully with the block-sparse kernel (a superset of the window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..attention.block_sparse import build_block_index
from ..attention.masks import tile_block_mask, window_attention, window_attention_fused, window_plan
from ..attention.sparse_method import (
    SparseAttentionMethod, check_attention_inputs, permute_tokens, run_block_sparse, unpermute_tokens,
    with_text_keys,
)
from ..config import MethodConfig, check_choice, check_float, check_int, register_method
from ..errors import ConfigError, describe

MODES = ("exact", "blocks")


@dataclass(frozen=True)
class CLEARConfig(MethodConfig):
    """CLEAR: each image token attends to image tokens within ``radius`` on the latent grid, plus all text."""

    radius: float = 8.0
    temporal_radius: float | None = None  # video grids (T, H, W); None: same as radius
    mode: str = "exact"
    tile: tuple[int, ...] | None = None  # query/key tile in grid cells; None: 8x8 (1x8x8 for video)
    dense_steps_fraction: float = 0.0
    dense_layers: int = 0

    def validate(self) -> None:
        n = type(self).__name__
        check_float(n, "radius", self.radius, minimum=0.0, min_inclusive=False)
        if self.temporal_radius is not None:
            check_float(n, "temporal_radius", self.temporal_radius, minimum=0.0, min_inclusive=False)
        check_choice(n, "mode", self.mode, MODES)
        if self.tile is not None and (not isinstance(self.tile, tuple) or not self.tile or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in self.tile)):
            raise ConfigError(f"{n}.tile must be None or a tuple of positive ints, got {describe(self.tile)}.")
        check_float(n, "dense_steps_fraction", self.dense_steps_fraction, minimum=0.0, maximum=1.0)
        check_int(n, "dense_layers", self.dense_layers, minimum=0)

    def radii(self, ndim: int) -> tuple[float, ...]:
        if ndim == 2:
            return (float(self.radius),) * 2
        t = self.radius if self.temporal_radius is None else self.temporal_radius
        return (float(t),) * (ndim - 2) + (float(self.radius),) * 2


@dataclass(frozen=True)
class BlockLayout:
    """CLEAR's tile-level block-sparse layout for one grid/radius/tile on one device."""

    count: torch.Tensor  # (1, 1, n) int32
    index: torch.Tensor  # (1, 1, n, m) int32
    perm: torch.Tensor  # (N,) raster cell of each tile-ordered token
    offsets: torch.Tensor  # (n + 1,) int32 tile bounds
    kept: int  # image (query, key) pairs computed
    max_block: int


@lru_cache(maxsize=32)
def block_layout(grid: tuple[int, ...], radii: tuple[float, ...], tile: tuple[int, ...] | None,
                 device: str) -> BlockLayout:
    """Built once per (grid, radii, tile, device): the layout is static, and building it on the CPU
    every attention call cost more than the attention itself on a GPU."""
    plan = window_plan(grid, radii, tile)
    tiles = plan.tiles
    bm = tile_block_mask(plan)
    sizes = (tiles.offsets[1:] - tiles.offsets[:-1]).double()
    kept = int((bm.double() * sizes[:, None] * sizes[None, :]).sum())
    count, index = build_block_index(bm[None, None])
    return BlockLayout(count=count.to(device), index=index.to(device), perm=tiles.perm.to(device),
                       offsets=tiles.offsets.to(device=device, dtype=torch.int32), kept=kept,
                       max_block=math.prod(tiles.tile))


def clear_attention(q, k, v, grid: tuple[int, ...], radii, *, k_txt=None, v_txt=None, scale: float | None = None,
                    mode: str = "exact", tile: tuple[int, ...] | None = None, txt_bias=None):
    """CLEAR attention of image queries q (B, H, N, D) over image keys (raster order on ``grid``)
    plus the text keys k_txt/v_txt (with the additive ``txt_bias`` on their scores, if given).
    Returns (out, lse float32 (B, H, N), density over all keys)."""
    check_attention_inputs(q, k, v, "CLEAR")
    B, H, N, D = q.shape
    grid = tuple(int(g) for g in grid)
    if math.prod(grid) != N or k.shape[2] != N:
        raise ValueError(f"CLEAR: grid {grid} has {math.prod(grid)} cells but there are {N} image queries and "
                         f"{k.shape[2]} image keys; they must match.")
    if len(grid) < 2:
        raise ValueError(f"CLEAR needs a 2-D or 3-D token grid, got {grid}.")
    radii = tuple(float(r) for r in radii)
    scale = D ** -0.5 if scale is None else float(scale)
    plan = window_plan(grid, radii, tile)
    T = 0 if k_txt is None else k_txt.shape[2]
    if mode == "exact":
        kept = plan.pairs
        # CPU: fused kernel with the text keys inside the windows (no text bias there)
        fused = window_attention_fused(q, k, v, plan, scale, k_txt, v_txt) if txt_bias is None else None
        if fused is not None:
            density = (kept + N * T) / (N * (N + T))
            return fused[0], fused[1], density
        out, lse = window_attention(q, k, v, plan, scale)
    elif mode == "blocks":
        lay = block_layout(grid, radii, tile, str(q.device))
        kept = lay.kept
        count = lay.count.expand(B, H, -1)
        index = lay.index.expand(B, H, -1, -1)
        perm = lay.perm.expand(B, H, N)
        off = lay.offsets.expand(B, H, -1).contiguous()
        out_p, lse_p = run_block_sparse(permute_tokens(q, perm), permute_tokens(k, perm), permute_tokens(v, perm),
                                        count, index, off, off, scale=scale, max_q_block_size=lay.max_block)
        out = unpermute_tokens(out_p, perm)
        lse = unpermute_tokens(lse_p.unsqueeze(-1), perm).squeeze(-1)
    else:
        raise ValueError(f"CLEAR mode must be one of {MODES}, got {mode!r}.")
    out, lse = with_text_keys(out, lse, q, k_txt, v_txt, scale, txt_bias)
    density = (kept + N * T) / (N * (N + T))
    return out, lse, density


class CLEAR(SparseAttentionMethod):
    supports_text_bias = True

    def sparse_image_attention(self, call, q_img, k_img, v_img, k_txt, v_txt):
        grid = call.grid
        if len(grid) < 2:
            self.warn_once("grid", "the token grid of this model is unknown (no adapter layout), so CLEAR cannot "
                           "place tokens on the latent grid; attention stays dense.")
            return None
        c = self.config
        tile = c.tile if c.tile is not None and len(c.tile) == len(grid) else None
        out, _, density = clear_attention(q_img, k_img, v_img, grid, c.radii(len(grid)), k_txt=k_txt, v_txt=v_txt,
                                          scale=call.scale, mode=c.mode, tile=tile, txt_bias=call.text_bias)
        return out, density


@register_method(CLEARConfig)
def apply_clear(engine, config: CLEARConfig) -> CLEAR:
    return CLEAR(engine, config)
