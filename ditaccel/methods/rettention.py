"""Re-ttention: very sparse attention corrected with softmax statistics from a refresh step
(Chen et al., 2025, "Re-ttention: Ultra Sparse Visual Generation via Attention Statistical Reshape").

Each image query tile keeps only its nearest key tiles on the latent grid (``keep_fraction`` of
the image keys, ~3%; the paper uses a local window) plus all text keys. A sparse softmax
normalises over fewer keys than the full one, so its output is too large by the factor
``1 / r`` with ``r = exp(LSE_sparse − LSE_full)``, the share of the full softmax mass that the kept
keys hold. Re-ttention rescales the sparse output by ``r`` and adds back the residual
``full − r·sparse`` from the last refresh step:

    refresh step (every ``refresh_interval`` steps, and the first sparse step):
        full attention (exact, with LSE);  cache r_ref = exp(LSE_sparse − LSE_full) per query
        row, LSE_full, and residual = full − r_ref·sparse, per layer / SDPA call / CFG branch.
    other steps:
        out = r · sparse + residual,  with
        r = r_ref + ratio_drift·(steps since refresh)   (correction="ratio", the paper's code:
            the cached per-row normaliser ratio, with its optional linear drift), or
        r = exp(LSE_sparse(now) − LSE_full(refresh))     (correction="lse": today's sparse mass
            over the cached full normaliser), or r = 1 (correction="none").

Text queries attend densely; cross-attention stays dense; the first ``dense_steps_fraction`` of
the steps are dense (the paper: the first 5 of 20–50 steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..attention.cpu_flash import flash_available
from ..attention.gathered import GatherPlan, gathered_attention, make_gather_plan
from ..attention.masks import nearest_tiles, tile_plan
from ..attention.reference import merge_attention_by_lse
from ..attention.sparse_method import (
    SparseAttentionMethod, attention_with_lse, check_attention_inputs, permute_tokens, run_block_sparse,
    unpermute_tokens, with_text_keys,
)
from ..config import MethodConfig, check_choice, check_float, check_int, register_method
from ..errors import ConfigError, describe

CORRECTIONS = ("ratio", "lse", "none")


@dataclass(frozen=True)
class RettentionConfig(MethodConfig):
    """Re-ttention: very sparse attention rescaled by the softmax-normaliser ratio, residual refreshed."""

    keep_fraction: float = 0.03
    refresh_interval: int = 5
    dense_steps_fraction: float = 0.2
    dense_layers: int = 0
    correction: str = "ratio"
    residual: bool = True
    ratio_drift: float = 0.0  # the paper's code adds 0.04 per sparse step to the cached ratio
    tile: tuple[int, ...] | None = None  # None: 8x8 tiles (1x8x8 for video, 64 tokens for 1-D)

    def validate(self) -> None:
        n = type(self).__name__
        check_float(n, "keep_fraction", self.keep_fraction, minimum=0.0, maximum=1.0, min_inclusive=False)
        check_int(n, "refresh_interval", self.refresh_interval, minimum=1)
        check_float(n, "dense_steps_fraction", self.dense_steps_fraction, minimum=0.0, maximum=1.0)
        check_int(n, "dense_layers", self.dense_layers, minimum=0)
        check_choice(n, "correction", self.correction, CORRECTIONS)
        if not isinstance(self.residual, bool):
            raise ConfigError(f"{n}.residual must be True or False, got {describe(self.residual)}.")
        check_float(n, "ratio_drift", self.ratio_drift, minimum=0.0, maximum=1.0)
        if self.tile is not None and (not isinstance(self.tile, tuple) or not self.tile or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in self.tile)):
            raise ConfigError(f"{n}.tile must be None or a tuple of positive ints, got {describe(self.tile)}.")


# ---------------------------------------------------------------------------------------------
# the algorithm, usable without a model


@dataclass
class LocalLayout:
    """Nearest-tile block layout of one grid, on one device, for (B, H)."""

    perm: torch.Tensor  # (B, H, N)
    offsets: torch.Tensor  # (B, H, n+1) int32
    kv_count: torch.Tensor  # (B, H, n) int32
    kv_index: torch.Tensor  # (B, H, n, count) int32
    c_count: torch.Tensor  # complement
    c_index: torch.Tensor
    max_block: int
    kept_pairs: int


def local_layout(grid: tuple[int, ...], keep_fraction: float, B: int, H: int, device,
                 tile: tuple[int, ...] | None = None) -> LocalLayout:
    return _local_layout(tuple(int(g) for g in grid), float(keep_fraction), B, H, str(torch.device(device)), tile)


def _kept_tile_count(tiles, keep_fraction: float) -> int:
    """As many nearest tiles as reach keep_fraction of the keys (at least the tile itself)."""
    sizes = tiles.offsets[1:] - tiles.offsets[:-1]
    return min(tiles.n_tiles, max(1, math.ceil(keep_fraction * math.prod(tiles.grid) / float(sizes.double().mean()))))


@lru_cache(maxsize=32)
def nearest_gather_plan(grid, keep_fraction: float, tile, text: int, dtype, device) -> GatherPlan:
    """The nearest-tile pattern as a :class:`GatherPlan` for the fused CPU path: per query tile,
    the cells of its kept key tiles (in raster ids, padded and masked where tiles are clipped at
    the grid border) plus ``text`` always-kept keys; no permutation of the sequence."""
    tiles = tile_plan(tuple(grid), tile)
    n, N = tiles.n_tiles, math.prod(tiles.grid)
    sizes = tiles.offsets[1:] - tiles.offsets[:-1]
    count = _kept_tile_count(tiles, keep_fraction)
    kept = nearest_tiles(tiles, n)[:, :count]
    Tq = int(sizes.max())
    pos = torch.arange(Tq)
    valid = pos < sizes.unsqueeze(1)
    cells = torch.where(valid, tiles.perm[(tiles.offsets[:-1].unsqueeze(1) + pos).clamp(max=N - 1)], 0)
    return make_gather_plan(N, cells, valid, cells[kept].reshape(n, count * Tq), valid[kept].reshape(n, count * Tq),
                            None, text, dtype, device)


@lru_cache(maxsize=32)
def _local_layout(grid, keep_fraction, B, H, device, tile) -> LocalLayout:
    tiles = tile_plan(tuple(grid), tile)
    n = tiles.n_tiles
    N = math.prod(tiles.grid)
    sizes = tiles.offsets[1:] - tiles.offsets[:-1]
    count = _kept_tile_count(tiles, keep_fraction)
    order = nearest_tiles(tiles, n)
    kept = order[:, :count]
    kept_pairs = int((sizes[:, None] * sizes[kept]).sum())
    comp = order[:, count:] if count < n else order[:, :0]

    def expand(x):
        return x.to(device=device, dtype=torch.int32).expand(B, H, *x.shape).contiguous()

    c_index = comp if comp.shape[1] > 0 else torch.zeros(n, 1, dtype=torch.long)
    return LocalLayout(
        perm=tiles.perm.to(device).expand(B, H, N), offsets=expand(tiles.offsets),
        kv_count=expand(torch.full((n,), count)), kv_index=expand(kept),
        c_count=expand(torch.full((n,), comp.shape[1])), c_index=expand(c_index),
        max_block=int(sizes.max()), kept_pairs=kept_pairs,
    )


def local_sparse_attention(q, k, v, lay: LocalLayout, scale: float, complement: bool = False):
    """Attention of image queries over the kept (or, with ``complement``, the other) key tiles."""
    perm = lay.perm
    count, index = (lay.c_count, lay.c_index) if complement else (lay.kv_count, lay.kv_index)
    out_p, lse_p = run_block_sparse(permute_tokens(q, perm), permute_tokens(k, perm), permute_tokens(v, perm),
                                    count, index, lay.offsets, lay.offsets, scale=scale,
                                    max_q_block_size=lay.max_block)
    return unpermute_tokens(out_p, perm), unpermute_tokens(lse_p.unsqueeze(-1), perm).squeeze(-1)


@dataclass
class RettentionState:
    step: int
    lse_full: torch.Tensor  # (B, H, N) float32
    ratio: torch.Tensor  # (B, H, N) float32, exp(LSE_sparse - LSE_full) at the refresh step
    residual: torch.Tensor | None  # (B, H, N, D)

    def nbytes(self) -> int:
        ts = [self.lse_full, self.ratio] + ([self.residual] if self.residual is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def rettention_attention(q, k, v, grid, *, keep_fraction: float = 0.03, state: RettentionState | None = None,
                         refresh: bool = False, step: int = 0, correction: str = "ratio", residual: bool = True,
                         ratio_drift: float = 0.0, k_txt=None, v_txt=None, scale: float | None = None,
                         tile: tuple[int, ...] | None = None, txt_bias=None):
    """Re-ttention for image queries q (B, H, N, D) over image keys on ``grid`` plus text keys.

    Returns (out, density over all keys, new state). ``refresh`` (or no ``state``) computes full
    attention and returns a fresh state; otherwise the sparse output is corrected with ``state``.
    ``txt_bias``: additive bias on the text keys' scores (see ``with_text_keys``).
    """
    check_attention_inputs(q, k, v, "Re-ttention")
    B, H, N, D = q.shape
    if k.shape[2] != N or math.prod(grid) != N:
        raise ValueError(f"Re-ttention: grid {tuple(grid)} ({math.prod(grid)} cells), {N} image queries and "
                         f"{k.shape[2]} image keys must all match.")
    scale = D ** -0.5 if scale is None else float(scale)
    T = 0 if k_txt is None else k_txt.shape[2]
    fused = None
    if flash_available(q) and txt_bias is None:  # CPU: gathered nearest tiles (text keys included), fused kernel
        gp = nearest_gather_plan(tuple(int(g) for g in grid), float(keep_fraction), tile, T, q.dtype, q.device)
        fused = gathered_attention(q, k, v, gp, scale, k_txt, v_txt)
    if fused is not None:
        (out_s, lse_s), lay, kept_pairs = fused, None, gp.kept_pairs
    else:
        lay = local_layout(tuple(grid), keep_fraction, B, H, q.device, tile)
        kept_pairs = lay.kept_pairs
        out_s, lse_s = local_sparse_attention(q, k, v, lay, scale)
        out_s, lse_s = with_text_keys(out_s, lse_s, q, k_txt, v_txt, scale, txt_bias)
    if refresh or state is None:
        if q.is_cuda and lay is not None:
            out_c, lse_c = local_sparse_attention(q, k, v, lay, scale, complement=True)
            out_f, lse_f = merge_attention_by_lse(out_s, lse_s, out_c, lse_c)
        else:
            k_all = k if k_txt is None else torch.cat([k, k_txt], 2)
            v_all = v if v_txt is None else torch.cat([v, v_txt], 2)
            bias = None if txt_bias is None else torch.cat(
                [txt_bias.new_zeros(*txt_bias.shape[:3], N), txt_bias], dim=-1)  # image keys: no bias
            out_f, lse_f = attention_with_lse(q, k_all, v_all, scale, bias=bias)
        ratio = torch.exp(lse_s.float() - lse_f.float()).clamp_(max=1.0)
        res = (out_f.float() - ratio.unsqueeze(-1) * out_s.float()).to(q.dtype) if residual else None
        return out_f, 1.0, RettentionState(step, lse_f.float(), ratio, res)
    if correction == "ratio":
        r = (state.ratio + ratio_drift * max(0, step - state.step)).clamp(max=1.0)
    elif correction == "lse":
        r = torch.exp(lse_s.float() - state.lse_full).clamp(max=1.0)
    else:
        r = torch.ones_like(lse_s, dtype=torch.float32)
    out = r.unsqueeze(-1) * out_s.float()
    if residual and state.residual is not None:
        out = out + state.residual.float()
    density = (kept_pairs + N * T) / (N * (N + T))
    return out.to(q.dtype), density, state


# ---------------------------------------------------------------------------------------------
# the installed method


class Rettention(SparseAttentionMethod):
    supports_text_bias = True

    def __init__(self, engine, config: RettentionConfig):
        super().__init__(engine, config)
        self._state: dict = {}

    def reset(self) -> None:
        self._state = {}

    def sparse_image_attention(self, call, q_img, k_img, v_img, k_txt, v_txt):
        c = self.config
        grid = call.grid
        state = self._state.get(call.key)
        if state is not None and state.lse_full.shape != q_img.shape[:3]:
            state = None
        refresh = state is None or call.step - state.step >= c.refresh_interval
        tile = c.tile if c.tile is not None and len(c.tile) == len(grid) else None
        out, density, state = rettention_attention(
            q_img, k_img, v_img, grid, keep_fraction=c.keep_fraction, state=state, refresh=refresh, step=call.step,
            correction=c.correction, residual=c.residual, ratio_drift=c.ratio_drift, k_txt=k_txt, v_txt=v_txt,
            scale=call.scale, tile=tile, txt_bias=call.text_bias,
        )
        self._state[call.key] = state
        self.counters["refresh" if refresh else "corrected"] += 1
        return out, density

    def bytes_held(self) -> int:
        return sum(s.nbytes() for s in self._state.values())


@register_method(RettentionConfig)
def apply_rettention(engine, config: RettentionConfig) -> Rettention:
    return Rettention(engine, config)
