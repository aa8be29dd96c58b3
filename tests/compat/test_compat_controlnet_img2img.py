"""ControlNet (FLUX, SD3) and img2img / inpaint (FLUX, SD3) with acceleration, on tiny models.

ControlNet: the transformer's loop adds the ControlNet residuals between blocks; the segment
cache measures those additions and leaves them out of the cached residual, so on a skipped step
the current step's control is added exactly once. Checked: the accelerated control output is
close to the un-accelerated one, and the control's effect (output with control minus output with
``controlnet_conditioning_scale=0``) survives acceleration: the accelerated pair differs by as
much as the un-accelerated pair. (Folding the control into the cached residual instead puts the
plain step cache 4-11% off on these models; the bounds here are 2%.)

img2img / inpaint (strength < 1): the pipeline runs the last ``strength * steps`` timesteps and
sets ``scheduler.begin_index``; the step clock counts from there, so ``total_steps`` is the
shortened count, the warm-up covers the first steps actually run and the final steps the last.
"""

from __future__ import annotations

import pytest
import torch

import ditaccel
from compat_helpers import (
    TOLERANCE, RecorderConfig, caching_configs, clear_record, control_image, flux_controlnet_pipeline,
    method_name, recorded, rel_err, run, sd3_controlnet_pipeline, skipped, skipped_steps, variant_extra,
    variant_pipeline,
)

STEPS = 8
CONFIGS = caching_configs()
CONTROL = {"flux": (flux_controlnet_pipeline, 16), "sd3": (sd3_controlnet_pipeline, 8)}


@pytest.fixture(scope="module")
def control_setup():
    cache = {}

    def get(case):
        if case not in cache:
            build, size = CONTROL[case]
            pipe = build()
            image = control_image(size)

            def generate(scale):
                return run(pipe, case, steps=STEPS, extra={"control_image": image, "controlnet_conditioning_scale": scale})

            cache[case] = (pipe, generate, generate(1.0), generate(0.0))
        return cache[case]

    return get


@pytest.mark.parametrize("cid,config", CONFIGS, ids=[c for c, _ in CONFIGS])
@pytest.mark.parametrize("case", ["flux", "sd3"])
def test_controlnet_signal_survives_acceleration(case, cid, config, control_setup):
    pipe, generate, ref_on, ref_off = control_setup(case)
    tol = TOLERANCE[method_name(config)]
    effect = ref_on - ref_off
    assert rel_err(ref_on, ref_off) > 10 * tol, "the tiny ControlNet should move the output a lot"

    handle = ditaccel.enable_acceleration(pipe, config)
    on, off = generate(1.0), generate(0.0)
    stats = handle.stats()
    handle.remove()
    assert skipped(stats) > 0 and stats["generations"] == 2
    assert torch.isfinite(on).all() and torch.isfinite(off).all()
    assert rel_err(on, ref_on) < tol
    assert rel_err(off, ref_off) < tol
    # the control's effect is kept: same direction and size as without acceleration
    assert rel_err(on - off, effect) < 2 * tol
    assert abs((on - off).norm() / effect.norm() - 1) < 2 * tol
    assert torch.equal(generate(1.0), ref_on), "not bit-identical after remove()"


@pytest.mark.parametrize("case", ["flux", "sd3"])
def test_controlnet_never_skip_is_bit_identical(case, control_setup):
    pipe, generate, ref_on, _ = control_setup(case)
    with ditaccel.enable_acceleration(pipe, "off"):
        assert torch.equal(generate(1.0), ref_on)


# ---------------------------------------------------------------------------------------------
# img2img / inpaint


@pytest.fixture(scope="module")
def variants():
    cache = {}

    def get(case, kind):
        if (case, kind) not in cache:
            cache[(case, kind)] = variant_pipeline(case, kind)
        return cache[(case, kind)]

    return get


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("case", ["flux", "sd3"])
def test_shortened_schedule_clock_and_fidelity(case, kind, variants):
    pipe = variants(case, kind)
    steps, strength = 10, 0.7  # the pipeline runs the last 7 of 10 timesteps, begin_index = 3
    extra = variant_extra(case, kind, strength)
    ref = run(pipe, case, steps=steps, extra=extra)
    # warm-up 2 (steps 0, 1), then every 2nd step, last 2 steps (5, 6) computed: only step 3 reused.
    # Counting the full 10 steps instead would reuse step 5 too; counting from step_index without
    # begin_index would start at step 3 and skip the warm-up.
    config = ditaccel.StepCacheConfig(interval=2, warmup_steps=2, final_steps=2)
    handle = ditaccel.enable_acceleration(pipe, [RecorderConfig(), config])
    clear_record()
    acc = run(pipe, case, steps=steps, extra=extra)
    log = recorded()
    stats = handle.stats()
    handle.remove()
    assert pipe.scheduler.begin_index == 3
    assert [(s, b, t) for s, b, t, _, _ in log] == [(i, 0, 7) for i in range(7)]
    assert skipped_steps(log) == [3]
    assert stats["steps"] == 7 and stats["generations"] == 1
    assert torch.isfinite(acc).all()
    assert rel_err(acc, ref) < TOLERANCE["StepCache"]
    assert not torch.equal(acc, ref)
    assert torch.equal(run(pipe, case, steps=steps, extra=extra), ref), "not bit-identical after remove()"


@pytest.mark.parametrize("cid,config", CONFIGS, ids=[c for c, _ in CONFIGS])
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_shortened_schedule_every_method(kind, cid, config, variants):
    case = "flux"
    pipe = variants(case, kind)
    extra = variant_extra(case, kind, 0.8)  # 8 of 10 steps
    ref = run(pipe, case, steps=10, extra=extra)
    with ditaccel.enable_acceleration(pipe, config) as handle:
        acc = run(pipe, case, steps=10, extra=extra)
        stats = handle.stats()
    assert stats["steps"] == 8 and skipped(stats) > 0
    assert torch.isfinite(acc).all()
    assert rel_err(acc, ref) < TOLERANCE[method_name(config)]
    assert torch.equal(run(pipe, case, steps=10, extra=extra), ref)
