"""HarmoniCa training additions: straight-through estimator (hard forward decisions, as at inference),
forecasting student, fixed-schedule init, budget projection and the hard-schedule search."""

from __future__ import annotations

import math

import pytest
import torch

import ditaccel
from ditaccel.methods.harmonica_router import schedule_fraction
from ditaccel.methods.harmonica_train import (
    RouterTrainer,
    TrainSettings,
    parse_schedule,
    train_router,
)
from tests.methods.test_harmonica import STEPS, _router_for, _samples
from tests.helpers import tiny


@pytest.fixture(scope="module")
def pipe():
    p = tiny.tiny_pipeline("flux")
    p.set_progress_bar_config(disable=True)
    return p


SCHED = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0], [1, 1], [0, 0]], dtype=torch.bool)


def _trainer(pipe, **kw):
    st = TrainSettings(steps=STEPS, **{"target_speedup": None, "speed_weight": 0.0, "proxy_every": 0, **kw})
    return RouterTrainer(pipe, _samples(2), st)


def _inference(pipe, tmp_path, sched, forecast_order, sample):
    r = _router_for(pipe, torch.where(sched, 3.0, -6.0))
    path = str(tmp_path / "r.safetensors")
    r.save(path)
    cfg = ditaccel.HarmoniCaConfig(router=path, forecast=forecast_order > 0, forecast_order=max(forecast_order, 1))
    with ditaccel.accelerated(pipe, cfg):
        kw = dict(sample.kwargs, num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(sample.seed))
        with torch.no_grad():
            return pipe(**kw).images


@pytest.mark.parametrize("order", [0, 1])
def test_ste_forward_is_the_hard_schedule_of_inference(pipe, tmp_path, order):
    """The STE student's rollout (SDT trajectory) is the cached generation of inference itself, and the
    logits still get a gradient through the soft gate."""
    tr = _trainer(pipe, ste=True, forecast_order=order)
    with torch.no_grad():
        tr.logits.copy_(tr.logits_for_schedule(SCHED))
    sample = tr.samples[0]
    tr._backward = True
    student = tr._run("train", sample)
    ref = _inference(pipe, tmp_path, SCHED, order, sample)
    full = tr._generate(sample)
    torch.testing.assert_close(student, ref.float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(student, full, rtol=1e-4, atol=1e-5)
    assert tr.logits.grad is not None and tr.logits.grad[1:].abs().sum() > 0
    # the soft student (no STE) mixes σ·F + (1 − σ)·C instead: not the inference output
    soft = _trainer(pipe)
    with torch.no_grad():
        soft.logits.copy_(soft.logits_for_schedule(SCHED))
    assert not torch.allclose(soft._run("train", sample), ref.float(), rtol=1e-4, atol=1e-5)


def test_forecast_needs_ste():
    with pytest.raises(ditaccel.ConfigError, match="straight-through"):
        TrainSettings(steps=STEPS, forecast_order=1).validate()


def test_parse_schedule_matches_fixed_schedules():
    got = parse_schedule("interval=3,warmup=3,final=0", 20).nonzero().flatten().tolist()
    assert got == [0, 1, 2, 5, 8, 11, 14, 17]
    got = parse_schedule("interval=3,warmup=2,final=1", 20).nonzero().flatten().tolist()
    assert got == [0, 1, 4, 7, 10, 13, 16, 19]
    assert parse_schedule("steps=0,2,5", 6).tolist() == [True, False, True, False, False, True]
    for bad in ("interval=0", "steps=9", "every=2", "interval=2,steps=1"):
        with pytest.raises(ditaccel.ConfigError):
            parse_schedule(bad, 6)


def test_taylorseer_fixed_schedule_equals_its_router(pipe, tmp_path):
    """A router initialised from 'interval=2,warmup=2,final=1' with block forecasting is TaylorSeer
    (granularity='block') with that schedule."""
    sched = parse_schedule("interval=2,warmup=2,final=1", STEPS).unsqueeze(1).repeat(1, 2)
    tr = _trainer(pipe, ste=True, forecast_order=1, init_schedule="interval=2,warmup=2,final=1")
    tr.initialise()
    assert torch.equal(tr.hard_schedule(), sched)
    sample = tr.samples[0]
    ours = _inference(pipe, tmp_path, sched, 1, sample)
    with ditaccel.accelerated(pipe, ditaccel.TaylorSeerConfig(interval=2, warmup_steps=2, final_steps=1, order=1,
                                                              granularity="block")):
        kw = dict(sample.kwargs, num_inference_steps=STEPS, output_type="latent",
                  generator=torch.Generator().manual_seed(sample.seed))
        with torch.no_grad():
            ts = pipe(**kw).images
    torch.testing.assert_close(ours, ts, rtol=1e-5, atol=1e-6)


def test_projection_keeps_the_target_and_search_lowers_the_objective(pipe):
    """From the best fixed schedule ('auto' init) with a target speedup: every iteration's hard schedule
    stays within the target (projection), and the search can only lower the image-error objective."""
    st = TrainSettings(steps=STEPS, target_speedup=1.6, iterations=3, lr=0.3, proxy_every=0, ste=True,
                       forecast_order=1, init_schedule="auto", project=True, search_evals=40, search_samples=2)
    router, tr = train_router(pipe, _samples(2), st, progress=False)
    target = tr.target_fraction()
    assert all(h["hard_fraction"] <= target + 1e-9 for h in tr.history)
    init, search = router.training["init"], router.training["search"]
    assert init["init_schedule"].startswith("interval=")
    assert search["search_error"] <= search["search_start_error"] <= init["init_error"] + 1e-12
    assert search["search_error"] < init["init_error"]  # the tiny model has room to improve
    assert router.fraction_computed() <= target + 1e-9
    assert tr.schedule_error(router.schedule()) == pytest.approx(search["search_error"])
    assert router.training["settings"]["forecast_order"] == 1


def test_fixed_init_without_search_keeps_the_schedule(pipe):
    tr = _trainer(pipe, ste=True, forecast_order=1, init_schedule="steps=0,1,3", iterations=0)
    tr.initialise()
    router = tr.router()
    assert router.schedule()[:, 0].tolist() == [True, True, False, True, False, False]
    thr = math.log(0.1 / 0.9)
    torch.testing.assert_close((router.logits - thr).abs(), torch.ones_like(router.logits))
    assert schedule_fraction(router.schedule(), router.weights()) == pytest.approx(0.5)


def test_batched_generation_matches_single(pipe):
    tr = _trainer(pipe)
    samples = tr.samples
    assert tr._batched(samples) is not None
    many = tr._generate_many(samples)
    for smp, x in zip(samples, many):
        torch.testing.assert_close(x, tr._generate(smp), rtol=1e-4, atol=1e-5)


def test_cli_recipes_fill_unset_options_only():
    import argparse

    from ditaccel.cli.train_router import add_parser, resolve_recipe

    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers())
    base = ["train-router", "--model", "m", "--out", "o"]
    a = ap.parse_args(base)
    assert resolve_recipe(a) == "search"
    assert (a.ste, a.forecast_order, a.init_schedule, a.project, a.search_evals, a.iterations, a.samples) == (
        True, 1, "auto", True, 200, 0, 12)
    a = ap.parse_args(base + ["--speed-weight", "0.1"])
    assert resolve_recipe(a) == "soft"
    assert (a.ste, a.forecast_order, a.init_schedule, a.search_evals, a.iterations) == (False, 0, None, 0, 40)
    a = ap.parse_args(base + ["--search-evals", "7", "--init-schedule", "none", "--no-project"])
    resolve_recipe(a)
    assert (a.search_evals, a.init_schedule, a.project, a.ste) == (7, None, False, True)


def test_cli_checks_the_new_options(capsys):
    from ditaccel.cli.main import main

    code = main(["train-router", "--model", "flux_tiny", "--no-ste", "--forecast-order", "1", "--out", "x.safetensors",
                 "--no-progress"])
    assert code == 2
    assert "straight-through" in capsys.readouterr().err
    code = main(["train-router", "--model", "flux_tiny", "--recipe", "search", "--speed-weight", "0.1", "--out",
                 "x.safetensors", "--no-progress"])
    assert code == 2
    assert "needs a target speedup" in capsys.readouterr().err
    code = main(["train-router", "--model", "flux_tiny", "--init-schedule", "every=3", "--out", "x.safetensors",
                 "--no-progress"])
    assert code == 2
    assert "init schedule" in capsys.readouterr().err


def test_router_trained_for_forecast_warns_without_it(pipe, tmp_path):
    r = _router_for(pipe, torch.where(SCHED, 3.0, -6.0),
                    training={"settings": {"ste": True, "forecast_order": 1}})
    r.save(tmp_path / "f.safetensors")
    with pytest.warns(RuntimeWarning, match="forecast=True"):
        ditaccel.enable_acceleration(pipe, ditaccel.HarmoniCaConfig(router=str(tmp_path / "f.safetensors")))
    ditaccel.disable_acceleration(pipe)
