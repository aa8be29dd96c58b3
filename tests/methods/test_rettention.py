"""Re-ttention: nearest-tile layout, LSE, statistical correction and residual, installed method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ditaccel
from ditaccel.attention.reference import masked_attention
from ditaccel.attention.sparse_method import attention_with_lse
from ditaccel.methods.rettention import local_layout, local_sparse_attention, rettention_attention
from helpers.tiny import CASES, run_plain_and_accelerated


def smooth_qkv(grid, B=1, H=2, D=16, seed=0, noise=0.0, base=None):
    """q/k/v that vary smoothly over the grid (attention is mostly local), optionally perturbed."""
    g = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    if base is None:
        coords = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in grid], indexing="ij"),
                             -1).reshape(N, len(grid))
        freq = torch.randn(len(grid), D, generator=g) * 0.3
        feats = torch.cat([torch.sin(coords @ freq), torch.cos(coords @ freq)], -1)[:, :D]
        base = [feats.expand(B, H, N, D) * 3 + 0.2 * torch.randn(B, H, N, D, generator=g) for _ in range(3)]
    return [b + noise * torch.randn(b.shape, generator=g) for b in base], base


def layout_mask(grid, keep, B, H):
    """Brute-force (N, N) mask of the nearest-tile layout, from its block lists."""
    lay = local_layout(grid, keep, B, H, "cpu")
    N = math.prod(grid)
    off = lay.offsets[0, 0].long()
    tile_of = torch.empty(N, dtype=torch.long)
    tile_of[lay.perm[0, 0]] = torch.repeat_interleave(torch.arange(len(off) - 1), off[1:] - off[:-1])
    blocks = torch.zeros(len(off) - 1, len(off) - 1, dtype=torch.bool)
    for t in range(len(off) - 1):
        blocks[t, lay.kv_index[0, 0, t, :lay.kv_count[0, 0, t]].long()] = True
    return blocks[tile_of[:, None], tile_of[None, :]], lay


@pytest.mark.parametrize("grid", [(16, 16), (13, 10), (3, 9, 11)])  # incl. grids not multiples of the tile
def test_sparse_part_and_lse_match_brute_force(grid):
    (q, k, v), _ = smooth_qkv(grid)
    mask, lay = layout_mask(grid, 0.1, 1, 2)
    out, lse = local_sparse_attention(q, k, v, lay, 0.25)
    ref_out, _ = masked_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1),
                               atol=1e-4, rtol=1e-5)
    assert mask.diagonal().all()  # every token keeps its own tile


@pytest.mark.parametrize("grid,T,B", [((16, 16), 5, 1), ((13, 10), 3, 2), ((3, 9, 11), 0, 1)])
def test_gathered_cpu_path_matches_brute_force_with_text(grid, T, B):
    """The CPU path (nearest tiles gathered in raster order, text keys in the same kernel call)
    equals brute-force masked attention over [image keys of the layout, all text keys]."""
    from ditaccel.attention.gathered import gathered_attention
    from ditaccel.methods.rettention import nearest_gather_plan

    (q, k, v), _ = smooth_qkv(grid, B=B)
    g = torch.Generator().manual_seed(9)
    kt, vt = torch.randn(B, 2, T, 16, generator=g), torch.randn(B, 2, T, 16, generator=g)
    mask, lay = layout_mask(grid, 0.1, B, 2)
    gp = nearest_gather_plan(grid, 0.1, None, T, q.dtype, q.device)
    out, lse = gathered_attention(q, k, v, gp, 0.25, kt if T else None, vt if T else None)
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], T, dtype=torch.bool)], 1)
    ref_out, ref_lse = masked_attention(q, torch.cat([k, kt], 2), torch.cat([v, vt], 2), full_mask, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-4, rtol=1e-5)
    assert gp.kept_pairs == lay.kept_pairs == int(mask.sum())


def test_cpu_paths_agree_on_refresh_and_corrected_steps(monkeypatch):
    import ditaccel.methods.rettention as rt

    grid, T = (13, 10), 4
    (q, k, v), base = smooth_qkv(grid)
    (q2, k2, v2), _ = smooth_qkv(grid, noise=0.3, base=base, seed=1)
    g = torch.Generator().manual_seed(2)
    kt, vt = torch.randn(1, 2, T, 16, generator=g), torch.randn(1, 2, T, 16, generator=g)
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(rt, "flash_available", lambda x: False)
        o1, d1, st = rettention_attention(q, k, v, grid, keep_fraction=0.1, refresh=True, k_txt=kt, v_txt=vt)
        o2, d2, _ = rettention_attention(q2, k2, v2, grid, keep_fraction=0.1, state=st, step=1, k_txt=kt, v_txt=vt)
        results.append((o1, o2, d2, st.ratio))
    for a, b in zip(*results):
        if isinstance(a, float):
            assert a == pytest.approx(b)
        else:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_keep_fraction_sets_the_density():
    grid = (64, 64)
    mask, lay = layout_mask(grid, 0.03, 1, 1)
    assert 0.025 <= float(mask.float().mean()) <= 0.04
    assert lay.kept_pairs == int(mask.sum())


@pytest.mark.parametrize("correction", ["lse", "ratio"])
def test_refresh_is_exact_and_correction_reproduces_full_on_refresh_inputs(correction):
    grid = (16, 12)
    (q, k, v), _ = smooth_qkv(grid)
    g = torch.Generator().manual_seed(3)
    kt, vt = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    full = F.scaled_dot_product_attention(q, torch.cat([k, kt], 2), torch.cat([v, vt], 2))
    out, density, state = rettention_attention(q, k, v, grid, keep_fraction=0.05, refresh=True, step=4,
                                               correction=correction, k_txt=kt, v_txt=vt)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    assert density == 1.0
    _, lse_full = attention_with_lse(q, torch.cat([k, kt], 2), torch.cat([v, vt], 2), 0.25)
    torch.testing.assert_close(state.lse_full, lse_full, atol=1e-4, rtol=1e-5)
    # same inputs on a corrected step: r·sparse + residual gives back the full output
    out2, density2, _ = rettention_attention(q, k, v, grid, keep_fraction=0.05, state=state, step=5,
                                             correction=correction, k_txt=kt, v_txt=vt)
    torch.testing.assert_close(out2, full, atol=1e-4, rtol=1e-4)
    assert density2 < 0.4  # one 8x8 tile of the 4 tiles (16 x 12 grid) + the text keys


def test_correction_beats_plain_sparse_on_drifted_inputs():
    grid = (32, 32)
    (q0, k0, v0), base = smooth_qkv(grid)
    _, _, state = rettention_attention(q0, k0, v0, grid, keep_fraction=0.03, refresh=True)
    (q, k, v), _ = smooth_qkv(grid, seed=1, noise=0.05, base=base)  # the next step: slightly changed
    full = F.scaled_dot_product_attention(q, k, v)

    def err(**kw):
        out, d, _ = rettention_attention(q, k, v, grid, keep_fraction=0.03, state=state, step=1, **kw)
        assert d <= 1 / 16  # one of the 16 tiles
        return float((out - full).norm() / full.norm())

    plain = err(correction="none", residual=False)
    rescaled = err(correction="lse", residual=False)
    corrected = err(correction="lse", residual=True)
    paper = err(correction="ratio", residual=True)
    # the paper's cached per-row ratio + residual is the consistent decomposition of the refresh
    # step (r_ref·sparse_ref + residual = full_ref), so small input drift gives a small error
    assert paper < 0.25 * plain, (plain, rescaled, corrected, paper)
    # today's sparse LSE over the stale full LSE helps only together with the residual
    assert corrected < plain and rescaled != plain, (plain, rescaled, corrected, paper)


def test_bad_inputs_give_clear_errors():
    (q, k, v), _ = smooth_qkv((8, 8))
    with pytest.raises(TypeError, match="dtype"):
        rettention_attention(q.long(), k.long(), v.long(), (8, 8))
    with pytest.raises(ValueError, match="head_dim"):
        rettention_attention(q, k[..., :8], v, (8, 8))
    with pytest.raises(ValueError, match="must all match"):
        rettention_attention(q, k, v, (8, 9))
    with pytest.raises(ditaccel.ConfigError, match="correction"):
        ditaccel.RettentionConfig(correction="magic")


# ---------------------------------------------------------------------------------------------
# installed


def _run(case, config, steps=4, size=None, cfg=False):
    return run_plain_and_accelerated(case, config, steps=steps, size=size, cfg=cfg)


ALWAYS_REFRESH = ditaccel.RettentionConfig(keep_fraction=0.05, refresh_interval=1, dense_steps_fraction=0.0)


@pytest.mark.parametrize("case,size", [("flux", (64, 64)), ("sd3", (32, 32)), ("wan", (32, 32))])
def test_refresh_every_step_equals_dense_on_models(case, size):
    ref, out, stats = _run(case, ALWAYS_REFRESH, size=size, cfg=case == "wan")
    s = stats["methods"]["Rettention"]
    assert s["refresh"] > 0 and s.get("corrected", 0) == 0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_corrected_steps_run_sparse_and_stay_close():
    config = ditaccel.RettentionConfig(keep_fraction=0.05, refresh_interval=2, dense_steps_fraction=0.25)
    ref, out, stats = _run("flux", config, steps=6, size=(128, 128))  # 32 x 32 tokens
    s = stats["methods"]["Rettention"]
    assert s["corrected"] > 0 and s["refresh"] > 0
    assert s["mean_density"] < 1.0 and stats["flops_skipped_fraction"] > 0
    assert torch.isfinite(out).all()
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.2, rel


@pytest.mark.parametrize("case", CASES)
def test_runs_on_every_family(case):
    ref, out, stats = _run(case, ALWAYS_REFRESH, steps=3)
    s = stats["methods"]["Rettention"]
    assert s.get("sparse", 0) + sum(v for key, v in s.items() if key.startswith("dense") and isinstance(v, int)) > 0
    assert torch.isfinite(out).all()
    if s.get("sparse"):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
