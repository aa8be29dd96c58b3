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


# -- refresh-error schedule (refresh_tolerance > 0): the forecast's own error at full steps ---------------


class _Sync:
    def mean_signal(self, value):
        return value

    def agree(self, flag):
        return flag


class _Method:
    def __init__(self):
        self.counters = __import__("collections").Counter()
        self.engine = type("E", (), {"sync": _Sync()})()


def _refresh_controller(tolerance, **kw):
    args = dict(interval=2, warmup_steps=2, final_steps=1, threshold=0.0, max_consecutive_cached=9,
                uncond_follows_cond=True, probe_order=1, refresh_tolerance=tolerance)
    args.update(kw)
    return StepController(_Method(), **args)


def _run_refresh(c, steps, error_at):
    """Drive ``c`` for ``steps`` steps; at every full step report a forecast error of ``error_at(step)``."""
    from ditaccel.hooks.step_clock import StepInfo

    got = []
    for s in range(steps):
        c.begin_call(StepInfo(1, s, steps, 0, s == 0, s == 0), ready=True)
        if c.measuring:
            e = error_at(s)
            c.observe([torch.ones(4)], [torch.full((4,), 1.0 - e)])
        got.append(c.end_call())
    return got


def test_refresh_schedule_charges_the_measured_error_rate_until_the_tolerance():
    # error 0.1 at every full step: rate 0.1 per step of distance (measured at distance 1 at step 1,
    # then at distance 3: 0.1/3). Cached steps are charged rate * distance, summed over the run.
    c = _refresh_controller(0.35)
    got = _run_refresh(c, 12, lambda s: 0.1)
    # steps 0, 1 warm-up (step 1 measures 0.1 at distance 1: rate 0.1); step 2 charged 0.1, step 3
    # 0.1 + 0.2 = 0.3, step 4 would be 0.6 > 0.35: computed, measuring 0.1 at distance 3 (rate 1/30);
    # then charges 1/30, 3/30, 6/30, 10/30 stay <= 0.35 and 15/30 does not: steps 5..8 cached, 9 computed;
    # the last step is always computed.
    assert got == ["compute", "compute", "cache", "cache", "compute", "cache", "cache", "cache", "cache",
                   "compute", "cache", "compute"]
    assert [d for _, d, _ in c.branch_state(0).refresh_errors] == [1, 3, 5, 2]
    assert c.probe_error_stats()["refresh_error_max"] == pytest.approx(0.1)


def test_refresh_schedule_tolerance_orders_work_and_cap_holds():
    def computed(tol, **kw):
        return _run_refresh(_refresh_controller(tol, **kw), 30, lambda s: 0.05 + 0.01 * s).count("compute")

    counts = [computed(t) for t in (0.05, 0.2, 0.8, 3.0)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    # zero error: only the cap and the final step make full steps
    got = _run_refresh(_refresh_controller(0.1, max_consecutive_cached=4), 14, lambda s: 0.0)
    assert got == ["compute"] * 2 + (["cache"] * 4 + ["compute"]) * 2 + ["cache"] * 1 + ["compute"]


def test_refresh_schedule_nonfinite_error_computes_until_a_finite_one():
    got = _run_refresh(_refresh_controller(10.0, max_consecutive_cached=3), 12,
                       lambda s: float("nan") if s == 5 else 0.01)
    # steps 2-4 cached (cap 3), step 5 full and its error NaN: step 6 full too, whose finite error
    # lets step 7 be cached again
    assert got[:8] == ["compute"] * 2 + ["cache"] * 3 + ["compute", "compute", "cache"]


def test_refresh_schedule_exact_forecast_caches_to_the_cap_and_matches():
    model = ToyTransformer(n_blocks=3, degree=1).double()  # linear features: order-1 forecast is exact
    ref = drive(model, 16)
    # the first measurement needs two full steps at order 1: steps 0, 1, then 7 (``interval`` until then)
    cfg = TaylorSeerConfig(refresh_tolerance=0.01, order=1, warmup_steps=2, final_steps=1, max_consecutive_cached=5,
                           interval=6, granularity="block")
    with enable(model, cfg) as h:
        out = drive(model, 16, handle=h)
        d = _decisions(h, 16)
        st = h.stats()["methods"]["TaylorSeer"]
    assert d == ["compute"] * 2 + (["cache"] * 5 + ["compute"]) * 2 + ["cache"] * 1 + ["compute"]
    assert max_err(out, ref) < 1e-8 and st["refresh_error_max"] < 1e-6  # forecast compared in fp32


@pytest.mark.parametrize("granularity", ["block", "module"])
def test_refresh_schedule_wrong_forecast_computes_more_and_resets_per_generation(granularity):
    model = ToyTransformer(n_blocks=3, degree=3).double()  # cubic features, order-1 forecast: errors
    ref = drive(model, 20)
    loose, tight = (TaylorSeerConfig(refresh_tolerance=t, order=1, warmup_steps=2, granularity=granularity,
                                     max_consecutive_cached=8) for t in (1.0, 0.01))
    with enable(model, loose) as h:
        first = drive(model, 20, handle=h)
        errors_first = list(method_of(h).controller.branch_state(0).refresh_errors)
        again = drive(model, 20, handle=h)  # a new generation starts from a clean state
        errors_again = list(method_of(h).controller.branch_state(0).refresh_errors)
        n_loose = _decisions(h, 20).count("compute")
    assert max_err(first, again) == 0.0 and errors_first == errors_again and errors_first
    with enable(model, tight) as h:
        tight_out = drive(model, 20, handle=h)
        n_tight = _decisions(h, 20).count("compute")
    assert n_tight > n_loose
    assert max_err(tight_out, ref) < max_err(first, ref)


def test_refresh_schedule_cfg_branches_measure_separately():
    model = ToyTransformer(n_blocks=3, degree=1).double()  # exact for the constant-cond branch
    noise = torch.Generator().manual_seed(0)
    noisy = lambda s: float(torch.rand(1, generator=noise)) + 0.5  # noqa: E731 - non-polynomial branch
    cfg = TaylorSeerConfig(refresh_tolerance=0.5, order=1, warmup_steps=2, uncond_follows_cond=False,
                           granularity="block")
    with enable(model, cfg) as h:
        drive(model, 16, branches=((1.0,), (noisy,)), handle=h)
        ctl = method_of(h).controller
        e0 = ctl.branch_state(0).refresh_errors
        e1 = ctl.branch_state(1).refresh_errors
    assert e0 and e1 and max(e for *_, e in e0) < 1e-6 < 0.01 < min(e for *_, e in e1)


def test_refresh_schedule_config_errors():
    from ditaccel.errors import ConfigError

    with pytest.raises(ConfigError, match="two adaptive schedules"):
        TaylorSeerConfig(threshold=0.1, refresh_tolerance=0.5)
    with pytest.raises(ConfigError, match="refresh_tolerance"):
        TaylorSeerConfig(refresh_tolerance=-1.0)
