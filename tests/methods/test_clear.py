"""CLEAR: radius masks on the latent grid (exact and block modes), text tokens, installed method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ditaccel
from ditaccel.adapters.base import IMAGE_FIRST, TEXT_FIRST, TokenLayout
from ditaccel.attention.dispatch import AttentionSite
from ditaccel.attention.masks import brute_force_clear_mask, tile_block_mask, tile_plan, window_plan
from ditaccel.attention.reference import masked_attention
from ditaccel.methods.clear import CLEAR, clear_attention
from helpers.tiny import CASES, run_plain_and_accelerated


def qkv(L, B=1, H=2, D=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g, dtype=dtype) for _ in range(3)]


def test_brute_force_mask_by_hand():
    m = brute_force_clear_mask((5, 5), 1.0)
    assert int(m[0].sum()) == 3  # corner: itself, right, below
    assert int(m[12].sum()) == 5  # centre: itself + 4 neighbours
    m = brute_force_clear_mask((5, 5), 1.5)
    assert int(m[12].sum()) == 9 and int(m[0].sum()) == 4  # diagonals within sqrt(2)
    m = brute_force_clear_mask((3, 4, 4), (1.0, 1.0, 1.0), text_tokens=2, text_first=True)
    assert m.shape == (50, 50) and m[:2].all() and m[:, :2].all()  # text rows and columns all kept
    centre = 2 + 16 + 4 + 1  # frame 1, row 1, col 1
    assert int(m[centre, 2:].sum()) == 7


@pytest.mark.parametrize("grid,radii", [((13, 10), (3.0, 3.0)), ((20, 17), (4.5, 4.5)), ((3, 9, 11), (1.0, 2.5, 3.0)),
                                        ((7, 7), (0.5, 0.5)), ((6, 9), (30.0, 30.0))])
@pytest.mark.parametrize("mode", ["exact", "blocks"])
def test_image_attention_matches_brute_force(grid, radii, mode):
    N = math.prod(grid)
    q, k, v = qkv(N)
    out, lse, density = clear_attention(q, k, v, grid, radii, mode=mode, scale=0.3)
    mask = brute_force_clear_mask(grid, radii)
    if mode == "blocks":
        # every exact pair is covered; the block mode attends whole tiles (a superset)
        plan = window_plan(grid, radii)
        tiles = plan.tiles
        tile_of = torch.empty(N, dtype=torch.long)
        tile_of[tiles.perm] = torch.repeat_interleave(torch.arange(tiles.n_tiles), tiles.offsets[1:] - tiles.offsets[:-1])
        bm = tile_block_mask(plan)
        block_tokens = bm[tile_of[:, None], tile_of[None, :]]
        assert torch.all(block_tokens[mask])
        mask = block_tokens
    ref_out, ref_lse = masked_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    assert density == pytest.approx(float(mask.double().mean()))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("grid,radii,tile,B,T", [((13, 10), (3.0, 3.0), None, 2, 4), ((16, 16), (4.0, 4.0), (4, 8), 1, 3),
                                                 ((3, 9, 11), (1.0, 2.5, 3.0), None, 1, 0),
                                                 ((24, 24), (8.0, 8.0), (8, 8), 1, 5)])
def test_exact_with_text_both_cpu_paths_match_brute_force(grid, radii, tile, B, T, fused, monkeypatch):
    """The fused CPU kernel path (text keys in the gathered windows, border and interior tiles)
    and the matmul fallback give the brute-force masked attention over [image, text] keys."""
    import ditaccel.attention.cpu_flash as cf

    if not fused:
        monkeypatch.setattr(cf, "flash_available", lambda x: False)
    N = math.prod(grid)
    g = torch.Generator().manual_seed(3)
    q, k, v = [torch.randn(B, 3, N + T, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    out, lse, density = clear_attention(q[:, :, :N], k[:, :, :N], v[:, :, :N], grid, radii, tile=tile,
                                        k_txt=k[:, :, N:] if T else None, v_txt=v[:, :, N:] if T else None, scale=0.4)
    mask = brute_force_clear_mask(grid, radii, text_tokens=T, text_first=False)[:N]
    ref_out, ref_lse = masked_attention(q[:, :, :N], k, v, mask, 0.4)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-5)
    assert density == pytest.approx(float(mask.double().mean()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_fused_low_precision_close_to_fp64(dtype):
    grid, T = (20, 20), 6
    N = math.prod(grid)
    q, k, v = qkv(N + T, B=1, H=2, D=32, seed=5)
    ref, _ = masked_attention(q[:, :, T:], k, v, brute_force_clear_mask(grid, 5.0, text_tokens=T)[T:])
    out, lse, _ = clear_attention(*(x[:, :, T:].to(dtype) for x in (q, k, v)), grid, (5.0, 5.0),
                                  k_txt=k[:, :, :T].to(dtype), v_txt=v[:, :, :T].to(dtype))
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_block_mask_is_the_exact_tile_cover():
    grid, radii = (19, 23), (5.0, 5.0)
    plan = window_plan(grid, radii)
    tiles = plan.tiles
    N = math.prod(grid)
    tile_of = torch.empty(N, dtype=torch.long)
    tile_of[tiles.perm] = torch.repeat_interleave(torch.arange(tiles.n_tiles), tiles.offsets[1:] - tiles.offsets[:-1])
    need = torch.zeros(tiles.n_tiles, tiles.n_tiles, dtype=torch.bool)
    i, j = brute_force_clear_mask(grid, radii).nonzero(as_tuple=True)
    need[tile_of[i], tile_of[j]] = True
    assert torch.equal(tile_block_mask(plan), need)
    assert torch.equal(torch.sort(tile_plan(grid).perm).values, torch.arange(N))


class _Engine:
    class adapter:
        family = "test"

        @staticmethod
        def attention_modules():
            return [("attn", torch.nn.Identity())]

    current_call = None


@pytest.mark.parametrize("order", [TEXT_FIRST, IMAGE_FIRST])
def test_router_joint_sequence_matches_brute_force_with_text(order):
    """Through the method's router: joint [text, image] / [image, text] sequence, text dense."""
    grid, T = (9, 11), 5
    N = math.prod(grid)
    q, k, v = qkv(N + T, dtype=torch.float32)
    method = CLEAR(_Engine, ditaccel.CLEARConfig(radius=2.5))

    class Info:
        step, total_steps, branch = 0, 1, 0

    class Call:
        info, profiler, skipped_flops = Info, None, 0.0

    _Engine.current_call = Call
    method._layout = TokenLayout(batch=1, image_tokens=N, text_tokens=T, grid=grid, joint_order=order)
    site = AttentionSite("attn", torch.nn.Identity(), layer_index=0)
    out = method.attend(site, q, k, v, None, None)
    mask = brute_force_clear_mask(grid, 2.5, text_tokens=T, text_first=order == TEXT_FIRST)
    ref, _ = masked_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert method.counters["sparse"] == 1 and Call.skipped_flops > 0
    # cross-attention (different key length) stays dense
    assert method.attend(site, q, k[:, :, :7], v[:, :, :7], None, None) is None
    _Engine.current_call = None


def test_bad_inputs_give_clear_errors():
    q, k, v = qkv(20)
    with pytest.raises(TypeError, match="dtype"):
        clear_attention(q.int(), k.int(), v.int(), (4, 5), (1.0, 1.0))
    with pytest.raises(ValueError, match="head_dim"):
        clear_attention(q, k, v[..., :4], (4, 5), (1.0, 1.0))
    with pytest.raises(ValueError, match="cells"):
        clear_attention(q, k, v, (4, 6), (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        clear_attention(q, k, v, (4, 5), (0.0, 1.0))
    with pytest.raises(ditaccel.ConfigError, match="radius"):
        ditaccel.CLEARConfig(radius=-1)


# ---------------------------------------------------------------------------------------------
# installed


def _run(case, config, steps=3, size=None, cfg=False):
    return run_plain_and_accelerated(case, config, steps=steps, size=size, cfg=cfg)


@pytest.mark.parametrize("case,size", [("flux", (64, 64)), ("sd3", (32, 32)), ("wan", (32, 32))])
def test_models_radius_covering_the_grid_equals_dense_and_small_radius_is_sparse(case, size):
    ref, out, stats = _run(case, ditaccel.CLEARConfig(radius=100.0), size=size, cfg=case == "wan")
    assert stats["methods"]["CLEAR"]["sparse"] > 0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    ref, out, stats = _run(case, ditaccel.CLEARConfig(radius=2.0, temporal_radius=1.0), size=size)
    s = stats["methods"]["CLEAR"]
    assert s["sparse"] > 0 and s["mean_density"] < 0.6 and stats["flops_skipped_fraction"] > 0
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_runs_on_every_family(case):
    ref, out, stats = _run(case, ditaccel.CLEARConfig(radius=100.0, mode="blocks"))
    s = stats["methods"]["CLEAR"]
    assert s.get("sparse", 0) + sum(v for key, v in s.items() if key.startswith("dense") and isinstance(v, int)) > 0
    assert torch.isfinite(out).all()
    if s.get("sparse"):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_fused_border_masks_built_per_chunk_match(monkeypatch):
    """Large grids keep border-tile masks as bool and build them per chunk: same result."""
    from ditaccel.attention import gathered
    from ditaccel.attention.masks import fused_window_plan

    grid, T = (21, 19), 3
    N = math.prod(grid)
    q, k, v = qkv(N + T, seed=11)
    args = (q[:, :, :N], k[:, :, :N], v[:, :, :N], grid, (3.5, 3.5))
    kw = dict(k_txt=k[:, :, N:], v_txt=v[:, :, N:], scale=0.3)
    ref = clear_attention(*args, **kw)
    fused_window_plan.cache_clear()
    real = gathered.make_gather_plan
    monkeypatch.setattr(gathered, "make_gather_plan", lambda *a, **k_: real(*a, **k_, max_bias_bytes=0))
    plan = fused_window_plan(grid, (3.5, 3.5), None, T, q.dtype, q.device)
    assert any(b is not None and b.dtype == torch.bool for *_, b in plan.groups)
    out = clear_attention(*args, **kw)
    fused_window_plan.cache_clear()
    torch.testing.assert_close(out[0], ref[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out[1], ref[1], atol=1e-6, rtol=1e-6)
