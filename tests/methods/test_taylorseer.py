"""TaylorSeer: exact forecasts of polynomial features, bit-identity at interval 1, fallbacks, CFG, errors."""

import math
import warnings

import pytest
import torch
from caching_toys import ToyTransformer, drive, enable, max_err, method_of

import ditaccel
from ditaccel import TaylorSeerConfig
from ditaccel.methods.taylor_series import TaylorSeries
from helpers.tiny import CASES, call_kwargs, output_of, tiny_pipeline


def test_series_newton_exact_on_uneven_spacing():
    f = lambda s: 2.0 - 3.0 * s + 0.5 * s**2  # noqa: E731
    series = TaylorSeries(order=2)
    for s in (0, 1, 5):  # uneven distances 1 and 4
        series.update(s, [torch.tensor([f(s)], dtype=torch.float64)])
    for s in (6, 7, 9):
        assert series.forecast(s)[0].item() == pytest.approx(f(s), abs=1e-9)
    # the paper's Taylor form is only exact up to order 1: with a quadratic it misses
    assert abs(series.forecast(9, formula="taylor")[0].item() - f(9)) > 1e-3


@pytest.mark.parametrize("granularity", ["module", "block"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_forecast_exact_for_polynomial_features(granularity, order):
    model = ToyTransformer(n_blocks=3, degree=order).double()
    ref = drive(model, 16)
    cfg = TaylorSeerConfig(interval=4, order=order, warmup_steps=order + 1, final_steps=1, granularity=granularity)
    with enable(model, cfg) as h:
        out = drive(model, 16, handle=h)
        st = method_of(h).counters
    assert st["forecast"] > 0 and st["steps_cached"] > 0
    assert max_err(out, ref) < 1e-8


def test_forecast_of_too_low_order_is_not_exact():
    model = ToyTransformer(n_blocks=2, degree=2).double()
    ref = drive(model, 12)
    with enable(model, TaylorSeerConfig(interval=4, order=1, warmup_steps=2)) as h:
        out = drive(model, 12, handle=h)
    assert max_err(out, ref) > 1e-3


@pytest.mark.parametrize("granularity", ["module", "block"])
@pytest.mark.parametrize("cfg", [False, True])
def test_interval_one_is_bit_identical(granularity, cfg):
    pipe = tiny_pipeline("flux")
    ref = output_of("flux", pipe(**call_kwargs("flux", steps=6, cfg=cfg)))
    with ditaccel.enable_acceleration(pipe, TaylorSeerConfig(interval=1, granularity=granularity)):
        out = output_of("flux", pipe(**call_kwargs("flux", steps=6, cfg=cfg)))
    assert torch.equal(out, ref)


def test_flux_module_granularity_forecasts_attention_and_mlp_and_counts_flops():
    pipe = tiny_pipeline("flux")
    with ditaccel.enable_acceleration(pipe, TaylorSeerConfig(interval=3, warmup_steps=2)) as h:
        pipe(**call_kwargs("flux", steps=8))
        st = h.stats()
        m = method_of(h)
        names = [n for n, _ in m.module_entries]
        ff = dict(m.module_entries)[next(n for n in names if n.endswith(".ff"))]
        profile = next(iter(h._engine._profiles.values()))
        assert profile.of(ff) > 0  # MLP modules are profiled too
    assert any(n.endswith(".attn") for n in names) and any(n.endswith(".ff_context") for n in names)
    assert st["methods"]["TaylorSeer"]["forecast"] > 0
    assert 0.2 < st["flops_skipped_fraction"] < 1.0


def test_nonfinite_forecast_falls_back_with_one_warning():
    model = ToyTransformer(n_blocks=2, degree=1).double()
    for block in model.transformer_blocks:
        block.attn.nan_steps = {2}
        block.ff.nan_steps = {2}
    with enable(model, TaylorSeerConfig(interval=4, order=1, warmup_steps=3)) as h:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = drive(model, 10, handle=h)
        stats = h.stats()["methods"]["TaylorSeer"]
    ours = [w for w in caught if "ditaccel TaylorSeer" in str(w.message)]
    assert len(ours) == 1 and "not finite" in str(ours[0].message)
    assert stats["nonfinite_fallbacks"] >= 1
    assert not torch.isfinite(out[2][0]).all()  # the full step itself is NaN ...
    assert all(torch.isfinite(out[s][0]).all() for s in range(3, 10))  # ... no forecast after it is


def test_state_resets_between_generations():
    pipe = tiny_pipeline("flux")
    with ditaccel.enable_acceleration(pipe, TaylorSeerConfig(interval=3, order=2, warmup_steps=2)) as h:
        a = output_of("flux", pipe(**call_kwargs("flux", steps=9)))
        pipe(**call_kwargs("flux", steps=5, seed=3))
        b = output_of("flux", pipe(**call_kwargs("flux", steps=9)))
        assert h.stats()["generations"] == 3
    assert torch.equal(a, b)


@pytest.mark.parametrize("batched", [False, True])
def test_cfg_branches_have_separate_state(batched):
    """Two branches with different features: each is forecast exactly only if their series are separate."""
    model = ToyTransformer(n_blocks=2, degree=2).double()
    branches = ((1.0,), (-2.5,))
    ref = drive(model, 12, branches=branches, batched=batched)
    cfg = TaylorSeerConfig(interval=3, order=2, warmup_steps=3, uncond_follows_cond=False)
    with enable(model, cfg) as h:
        out = drive(model, 12, branches=branches, handle=h, batched=batched)
        assert method_of(h).counters["forecast"] > 0
    assert max_err(out, ref) < 1e-8


def test_sequential_cfg_through_flux_pipeline():
    pipe = tiny_pipeline("flux")
    ref = output_of("flux", pipe(**call_kwargs("flux", steps=8, cfg=True)))
    with ditaccel.enable_acceleration(pipe, TaylorSeerConfig(interval=2, warmup_steps=2)) as h:
        out = output_of("flux", pipe(**call_kwargs("flux", steps=8, cfg=True)))
        st = h.stats()
    assert st["transformer_calls"] == 16 and st["methods"]["TaylorSeer"]["steps_cached"] == 2 * 3  # steps 2, 4, 6 in both branches
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cache_dtype_halves_memory(dtype):
    model = ToyTransformer(n_blocks=2, degree=1).double()
    held = {}
    outs = {}
    for d in (None, dtype):
        with enable(model, TaylorSeerConfig(interval=3, order=1, warmup_steps=2, cache_dtype=d)) as h:
            outs[d] = drive(model, 8, handle=h)
            held[d] = h.stats()["bytes_held"]
    assert held[None] > 0 and held[dtype] * 4 == held[None]  # float64 toy -> 2-byte cache
    scale = max(float(t.abs().max()) for row in outs[None] for t in row)
    assert max_err(outs[dtype], outs[None]) < 1e-2 * scale  # 16-bit rounding of the factors only


def test_bad_configs_give_clear_errors():
    with pytest.raises(ditaccel.ConfigError, match="interval"):
        TaylorSeerConfig(interval=-1)
    with pytest.raises(ditaccel.ConfigError, match="order"):
        TaylorSeerConfig(order=5)
    with pytest.raises(ditaccel.ConfigError, match="granularity"):
        TaylorSeerConfig(granularity="layer")
    with pytest.raises(ditaccel.ConfigError, match="formula"):
        TaylorSeerConfig(formula="euler")
    with pytest.raises(ditaccel.ConfigError, match="threshold"):
        TaylorSeerConfig(threshold=-0.1)


@pytest.mark.parametrize("case", CASES)
def test_every_family_generates(case):
    pipe = tiny_pipeline(case)
    for cfg in (TaylorSeerConfig(interval=2, warmup_steps=1), TaylorSeerConfig(interval=2, warmup_steps=1, granularity="block"),
                TaylorSeerConfig(threshold=0.5, warmup_steps=1, order=1)):
        with ditaccel.enable_acceleration(pipe, cfg) as h:
            out = output_of(case, pipe(**call_kwargs(case, steps=5, cfg=True)))
            st = h.stats()
        assert torch.isfinite(out).all(), (case, cfg)
        if cfg.threshold == 0:
            assert st["methods"]["TaylorSeer"]["steps_cached"] > 0, (case, cfg)
            assert st["flops_skipped_fraction"] > 0 or math.isclose(st["flops_full"], 0.0), (case, cfg)
