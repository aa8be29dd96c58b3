"""HarmoniCa: router schedule, file round trip, mismatch errors, bit-identity, training, resume."""

from __future__ import annotations

import math

import pytest
import torch

import ditaccel
from ditaccel.adapters import adapter_for
from ditaccel.methods.harmonica_router import (
    Router,
    RouterMismatchError,
    calibrate_bias,
    group_layout,
    interpolate_logits,
)
from ditaccel.methods.harmonica_train import RouterTrainer, Sample, TrainSettings
from tests.helpers import tiny

STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    p = tiny.tiny_pipeline("flux")
    p.set_progress_bar_config(disable=True)
    return p


def _generate(pipe, steps=STEPS, seed=0):
    with torch.no_grad():
        return pipe(**tiny.call_kwargs("flux", steps=steps, seed=seed)).images


def _router_for(pipe, logits, threshold=0.1, **kw) -> Router:
    adapter = adapter_for(pipe.transformer)
    groups = group_layout(adapter.segments())
    return Router(torch.as_tensor(logits, dtype=torch.float32), adapter.family, type(pipe.transformer).__name__,
                  adapter.num_blocks, groups, threshold, **kw)


def _samples(n=2):
    base = {k: v for k, v in tiny.call_kwargs("flux", steps=STEPS).items()
            if k not in ("num_inference_steps", "generator", "output_type")}
    return [Sample(base, seed=100 + i, label=f"s{i}") for i in range(n)]


# ---------------------------------------------------------------------------------------------
# router / schedule / file


def test_group_layout_stays_inside_segments_and_default_size():
    segs = [[None] * 19, [None] * 38]
    groups = group_layout(segs)  # 57 blocks -> 4 per group
    assert all(hi - lo <= 4 for lo, hi in groups)
    assert 4 <= len(groups) <= 16
    assert not any(lo < 19 < hi for lo, hi in groups)
    assert groups[0] == (0, 4) and groups[-1][1] == 57
    assert group_layout([[None] * 6]) == [(i, i + 1) for i in range(6)]


def test_threshold_gives_expected_schedule():
    z = torch.tensor([[-9.0, -9.0], [0.0, -3.0], [-2.0, -2.2], [5.0, -5.0]])
    r = Router(z, "flux", "X", 2, [(0, 1), (1, 2)], threshold=0.1, group_flops=[3.0, 1.0])
    # sigmoid(-2.0)=0.119 > 0.1 computes, sigmoid(-2.2)=0.0998 reuses; step 0 always computes
    expected = torch.tensor([[True, True], [True, False], [True, False], [True, False]])
    assert torch.equal(r.schedule(), expected)
    assert r.fraction_computed() == pytest.approx((4 * 0.75 + 1 * 0.25) / 4)
    assert torch.equal(r.schedule(threshold=0.6), torch.tensor([[1, 1], [0, 0], [0, 0], [1, 0]], dtype=torch.bool))


def test_calibration_hits_fraction():
    torch.manual_seed(0)
    z = torch.randn(10, 4)
    w = torch.tensor([0.4, 0.3, 0.2, 0.1])
    r = Router(z, "flux", "X", 4, [(0, 1), (1, 2), (2, 3), (3, 4)], group_flops=w.tolist())
    for target in (0.3, 0.5, 0.8):
        b = calibrate_bias(z, w, 0.1, target)
        frac = r.fraction_computed() if b == 0 else Router(z + b, "flux", "X", 4, r.groups, group_flops=w.tolist()).fraction_computed()
        assert frac <= target + 1e-9
        assert frac > target - 0.1  # within one cell's weight / steps of the target


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(1)
    r = Router(torch.randn(7, 3), "flux", "FluxTransformer2DModel", 5, [(0, 2), (2, 4), (4, 5)], threshold=0.15,
               group_flops=[2.0, 2.0, 1.0], training={"lam": 0.3, "settings": {"steps": 7}})
    path = tmp_path / "r.safetensors"
    r.save(path)
    back = Router.load(path)
    assert torch.equal(back.logits, r.logits)
    assert back.groups == r.groups and back.threshold == r.threshold and back.group_flops == r.group_flops
    assert (back.family, back.transformer_class, back.num_blocks, back.steps) == ("flux", "FluxTransformer2DModel", 5, 7)
    assert back.training == r.training
    assert torch.equal(back.schedule(), r.schedule())


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ditaccel.ConfigError, match="not found"):
        Router.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a safetensors file")
    with pytest.raises(ditaccel.ConfigError, match="not a readable"):
        Router.load(junk)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ditaccel.ConfigError, match="not a ditaccel router"):
        Router.load(other)


def test_interpolation_keeps_endpoints():
    z = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    out = interpolate_logits(z, 5)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, 4.0], [4.0, 5.0]]))


# ---------------------------------------------------------------------------------------------
# inference


def test_compute_everything_is_bit_identical(pipe, tmp_path):
    full = _generate(pipe)
    r = _router_for(pipe, torch.full((STEPS, 2), 8.0))
    r.save(tmp_path / "all.safetensors")
    with ditaccel.accelerated(pipe, ditaccel.HarmoniCaConfig(router=str(tmp_path / "all.safetensors"))) as h:
        out = _generate(pipe)
        stats = h.stats()["methods"]["HarmoniCa"]
    assert torch.equal(out, full)
    assert stats["cached"] == 0 and stats["computed"] == 2 * STEPS


def test_reuse_all_groups_matches_step_cache(pipe, tmp_path):
    """Reusing every group on StepCache's skipped steps adds the same total residual as StepCache."""
    from ditaccel.methods.step_cache import is_compute_step

    sched = torch.tensor([is_compute_step(t, STEPS, 2, 2, 1) for t in range(STEPS)])
    logits = torch.where(sched, 8.0, -8.0).unsqueeze(1).repeat(1, 2)
    r = _router_for(pipe, logits)
    r.save(tmp_path / "sc.safetensors")
    with ditaccel.accelerated(pipe, ditaccel.StepCacheConfig(interval=2, warmup_steps=2, final_steps=1)):
        ref = _generate(pipe)
    with ditaccel.accelerated(pipe, ditaccel.HarmoniCaConfig(router=str(tmp_path / "sc.safetensors"))) as h:
        out = _generate(pipe)
        stats = h.stats()
    full = _generate(pipe)
    skipped_steps = int((~sched).sum())
    assert stats["methods"]["HarmoniCa"]["cached"] == 2 * skipped_steps
    assert stats["flops_skipped_fraction"] > 0
    assert not torch.equal(out, full)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_forecast_order0_equals_reuse_and_order1_differs(pipe, tmp_path):
    logits = torch.tensor([[8.0, 8.0], [8.0, 8.0], [8.0, -8.0], [8.0, -8.0], [-8.0, -8.0], [8.0, 8.0]])
    _router_for(pipe, logits).save(tmp_path / "f.safetensors")
    path = str(tmp_path / "f.safetensors")
    with ditaccel.accelerated(pipe, ditaccel.HarmoniCaConfig(router=path)):
        reuse = _generate(pipe)
    with ditaccel.accelerated(pipe, ditaccel.HarmoniCaConfig(router=path, forecast=True, forecast_order=0)) as h:
        f0 = _generate(pipe)
        assert h.stats()["methods"]["HarmoniCa"]["forecast"] > 0
    with ditaccel.accelerated(pipe, ditaccel.HarmoniCaConfig(router=path, forecast=True, forecast_order=1)):
        f1 = _generate(pipe)
    torch.testing.assert_close(f0, reuse, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(f1, reuse, rtol=1e-5, atol=1e-6)


def test_mismatched_router_is_a_clear_error(pipe, tmp_path):
    adapter = adapter_for(pipe.transformer)
    n = adapter.num_blocks
    wrong = Router(torch.zeros(STEPS, n + 1), "flux", type(pipe.transformer).__name__, n + 1,
                   [(i, i + 1) for i in range(n + 1)])
    wrong.save(tmp_path / "wrong.safetensors")
    with pytest.raises(RouterMismatchError, match="num_blocks"):
        ditaccel.enable_acceleration(pipe, ditaccel.HarmoniCaConfig(router=str(tmp_path / "wrong.safetensors")))
    assert ditaccel.get_handle(pipe) is None
    other = _router_for(pipe, torch.zeros(STEPS, 2))
    other.transformer_class = "SD3Transformer2DModel"
    other.save(tmp_path / "cls.safetensors")
    with pytest.raises(RouterMismatchError, match="transformer_class"):
        ditaccel.enable_acceleration(pipe, ditaccel.HarmoniCaConfig(router=str(tmp_path / "cls.safetensors")))
    # another step count: an error naming both counts, unless interpolation is asked for
    _router_for(pipe, torch.zeros(STEPS, 2)).save(tmp_path / "ok.safetensors")
    with ditaccel.accelerated(pipe, ditaccel.HarmoniCaConfig(router=str(tmp_path / "ok.safetensors"))):
        with pytest.raises(RouterMismatchError, match=f"trained for {STEPS} denoising steps.*has 4"):
            _generate(pipe, steps=4)
    with ditaccel.accelerated(pipe, ditaccel.HarmoniCaConfig(router=str(tmp_path / "ok.safetensors"),
                                                            interpolate_steps=True)):
        assert torch.isfinite(_generate(pipe, steps=4)).all()


# ---------------------------------------------------------------------------------------------
# training


def test_training_lowers_the_objective(pipe):
    samples = _samples(2)
    # quality only (λ = 0): the gradient through the soft gates must raise σ and cut the error
    st = TrainSettings(steps=STEPS, target_speedup=None, speed_weight=0.0, iterations=6, lr=0.3, proxy_every=3)
    tr = RouterTrainer(pipe, samples, st)
    before = tr.objective(samples)
    for _ in range(st.iterations):
        tr.step()
    after = tr.objective(samples)
    assert after["rel_err"] < 0.5 * before["rel_err"]
    assert float(torch.sigmoid(tr.logits[1:].detach()).mean()) > float(torch.sigmoid(torch.tensor(st.init_logit or -1.197)))
    # the proxy weights were refreshed: mean 1 over steps >= 1, not all equal
    assert tr.proxy[1:].mean().item() == pytest.approx(1.0)
    assert tr.proxy[1:].std().item() > 0
    # with a speed weight the total objective (quality + λ·fraction) goes down
    st2 = TrainSettings(steps=STEPS, target_speedup=None, speed_weight=0.5, iterations=5, lr=0.3, proxy_every=0)
    tr2 = RouterTrainer(pipe, samples, st2)
    b2 = tr2.objective(samples)
    for _ in range(st2.iterations):
        tr2.step()
    a2 = tr2.objective(samples)
    assert a2["total"] < b2["total"] - 1e-3


def test_target_speedup_and_router_file(pipe, tmp_path):
    st = TrainSettings(steps=STEPS, target_speedup=1.5, iterations=3, lr=0.3, proxy_every=2)
    tr = RouterTrainer(pipe, _samples(2), st)
    for _ in range(st.iterations):
        tr.step()
    router = tr.router()
    target = tr.target_fraction()
    assert 0 < target < 1
    assert router.fraction_computed() <= target + 1e-9
    assert router.training["flop_speedup"] >= 1.5 - 1e-6
    router.save(tmp_path / "r.safetensors")
    with ditaccel.accelerated(pipe, ditaccel.HarmoniCaConfig(router=str(tmp_path / "r.safetensors"))) as h:
        _generate(pipe)
        stats = h.stats()
    measured = 1.0 / (1.0 - stats["flops_skipped_fraction"])
    assert measured == pytest.approx(router.training["flop_speedup"], rel=0.02)


def test_resume_is_exact(pipe, tmp_path):
    samples = _samples(2)
    st = TrainSettings(steps=STEPS, target_speedup=1.5, iterations=4, lr=0.3, proxy_every=2)
    straight = RouterTrainer(pipe, samples, st)
    for _ in range(4):
        straight.step()
    first = RouterTrainer(pipe, samples, st)
    for _ in range(2):
        first.step()
    first.save_checkpoint(tmp_path / "ck.pt")
    resumed = RouterTrainer(pipe, samples, st)
    resumed.load_checkpoint(tmp_path / "ck.pt")
    for _ in range(2):
        resumed.step()
    assert torch.equal(resumed.logits, straight.logits)
    assert resumed.lam == straight.lam
    bad = RouterTrainer(pipe, samples, TrainSettings(steps=STEPS, target_speedup=2.0, iterations=4, proxy_every=2))
    with pytest.raises(ditaccel.ConfigError, match="other settings"):
        bad.load_checkpoint(tmp_path / "ck.pt")


def test_cli_rejects_unknown_model(capsys):
    from ditaccel.cli.main import main

    code = main(["train-router", "--model", "/no/such/folder", "--out", "x.safetensors", "--no-progress"])
    assert code == 2
    assert "neither a reference model" in capsys.readouterr().err


def test_speedup_math():
    from ditaccel.methods.harmonica_train import flop_speedup, fraction_for_speedup

    f = fraction_for_speedup(2.0, 90.0, 100.0)
    assert flop_speedup(f, 90.0, 100.0) == pytest.approx(2.0)
    assert math.isclose(flop_speedup(1.0, 90.0, 100.0), 1.0)
