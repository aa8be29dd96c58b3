"""Adaptive schedules: the probe decides, caps on consecutive cached steps, the last steps computed,
CFG branches following the conditional branch's decision."""

import pytest
import torch
from caching_toys import ToyTransformer, drive, enable, max_err, method_of

import ditaccel
from ditaccel import DeltaCacheConfig, TaylorSeerConfig
from ditaccel.methods.adaptive import StepController


def _decisions(handle, steps):
    leader = method_of(handle).controller.leader
    return [leader[s] for s in range(steps)]


def test_taylor_probe_caches_when_its_forecast_is_exact_and_respects_caps():
    model = ToyTransformer(n_blocks=3, degree=1).double()  # linear features: order-1 forecast has no error
    ref = drive(model, 16)
    cfg = TaylorSeerConfig(threshold=1e-6, order=1, warmup_steps=2, final_steps=2, max_consecutive_cached=3)
    with enable(model, cfg) as h:
        out = drive(model, 16, handle=h)
        d = _decisions(h, 16)
    assert d[:2] == ["compute"] * 2 and d[-2:] == ["compute"] * 2
    assert d[2:14] == (["cache"] * 3 + ["compute"]) * 3  # capped at 3 cached steps in a row
    assert max_err(out, ref) < 1e-8


def test_taylor_probe_computes_when_its_forecast_is_wrong():
    model = ToyTransformer(n_blocks=3, degree=3).double()  # cubic features, order-1 forecast
    with enable(model, TaylorSeerConfig(threshold=1e-4, order=1, warmup_steps=2)) as h:
        drive(model, 12, handle=h)
        d = _decisions(h, 12)
        errors = method_of(h).stats()
    assert d == ["compute"] * 12
    assert errors["probe_error_max"] > 1e-4


def test_delta_probe_compares_with_last_full_residual():
    constant = ToyTransformer(n_blocks=3, degree=0).double()
    with enable(constant, DeltaCacheConfig(threshold=0.01, warmup_steps=1, final_steps=1, max_consecutive_cached=4,
                                         boundary_step=20)) as h:
        drive(constant, 10, handle=h)
        d = _decisions(h, 10)
    assert d == ["compute"] + ["cache"] * 4 + ["compute"] + ["cache"] * 3 + ["compute"]
    changing = ToyTransformer(n_blocks=3, degree=1).double()
    with enable(changing, DeltaCacheConfig(threshold=0.01, warmup_steps=1)) as h:
        drive(changing, 10, handle=h)
        assert _decisions(h, 10) == ["compute"] * 10


@pytest.mark.parametrize("follow", [True, False])
def test_uncond_follows_cond(follow):
    model = ToyTransformer(n_blocks=3, degree=1).double()
    noise = torch.Generator().manual_seed(0)
    noisy = lambda s: float(torch.rand(1, generator=noise)) + 0.5  # noqa: E731 - non-polynomial branch
    cfg = TaylorSeerConfig(threshold=1e-6, order=1, warmup_steps=2, max_consecutive_cached=100,
                           uncond_follows_cond=follow)
    with enable(model, cfg) as h:
        drive(model, 10, branches=((1.0,), (noisy,)), handle=h)
        ctl = method_of(h).controller
        cached = method_of(h).counters["steps_cached"]
    cond_cached = sum(1 for v in ctl.leader.values() if v == "cache")
    assert cond_cached == 7  # steps 2..8
    assert cached == (2 * cond_cached if follow else cond_cached)


def test_adaptive_on_pipeline_batched_cfg():
    from helpers.tiny import call_kwargs, output_of, tiny_pipeline

    pipe = tiny_pipeline("sd3")  # batched CFG: both halves in one call share one decision
    ref = output_of("sd3", pipe(**call_kwargs("sd3", steps=8, cfg=True)))
    with ditaccel.enable_acceleration(pipe, TaylorSeerConfig(threshold=10.0, warmup_steps=2, order=1)) as h:
        out = output_of("sd3", pipe(**call_kwargs("sd3", steps=8, cfg=True)))
        st = h.stats()["methods"]["TaylorSeer"]
    assert st["steps_cached"] == 5 and torch.isfinite(out).all() and not torch.equal(out, ref)


def test_controller_unit_schedule_fixed():
    class M:
        counters = __import__("collections").Counter()

    from ditaccel.hooks.step_clock import StepInfo

    c = StepController(M(), interval=3, warmup_steps=2, final_steps=1, threshold=0.0, max_consecutive_cached=9,
                       uncond_follows_cond=True, probe_order=0)
    got = []
    for s in range(10):
        c.begin_call(StepInfo(1, s, 10, 0, s == 0, s == 0), ready=True)
        got.append(c.end_call())
    assert got == ["compute", "compute", "cache", "cache", "compute", "cache", "cache", "compute", "cache", "compute"]
