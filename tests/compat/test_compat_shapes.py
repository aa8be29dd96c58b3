"""Shape and schedule changes between calls on one accelerated pipeline: resolution, aspect ratio,
frame count (Wan), batch size, CFG on/off and step count.

Each run of the sequence is compared with
- a never-enabled pipeline run of the same setting: close within the method's tolerance;
- a pipeline enabled just for that setting: bit-identical (nothing from an earlier shape or
  schedule is reused: residuals, forecasts, FLOP profiles, step counts);
and, for the step cache, the steps it reused are exactly those its schedule names for that
run's step count.
"""

from __future__ import annotations

import pytest
import torch

import ditaccel
from compat_helpers import (
    TOLERANCE, RecorderConfig, approximated, caching_configs, clear_record, method_name, recorded, rel_err, run,
    skipped_steps, token_and_attention_configs,
)
from ditaccel.config import resolve_configs
from ditaccel.methods.step_cache import is_compute_step
from helpers.tiny import tiny_pipeline

# (height, width, frames, batch, steps, cfg)
SEQUENCES = {
    "flux": [
        (16, 16, None, 1, 8, False),
        (32, 16, None, 1, 8, False),  # aspect ratio
        (32, 32, None, 1, 6, False),  # resolution and step count
        (32, 32, None, 2, 6, False),  # batch
        (32, 32, None, 1, 6, True),  # true CFG: two calls per step
        (16, 16, None, 1, 10, False),  # back to the first shape, more steps
    ],
    "wan": [
        (16, 16, 3, 1, 6, True),
        (16, 16, 5, 1, 6, True),  # frame count
        (16, 32, 5, 1, 8, True),  # aspect ratio and step count
        (16, 32, 5, 2, 8, False),  # batch, no CFG
        (16, 16, 3, 1, 6, True),  # back to the first setting
    ],
    "sd3": [
        (8, 8, None, 1, 6, True),  # batched CFG: 2 rows
        (16, 8, None, 1, 6, False),  # aspect, 1 row
        (16, 16, None, 3, 7, True),  # resolution, batch 3 (6 rows), step count
    ],
}
CONFIGS = caching_configs() + token_and_attention_configs()
MATRIX = [(case, cid, config) for case in SEQUENCES for cid, config in CONFIGS
          if case == "flux" or cid == "preset-balanced"]


def _kw(setting):
    h, w, frames, batch, steps, cfg = setting
    return dict(height=h, width=w, frames=frames, batch=batch, steps=steps, cfg=cfg)


@pytest.fixture(scope="module")
def references():
    """Never-enabled pipeline outputs per (case, setting)."""
    pipes, cache = {}, {}

    def get(case, setting):
        if case not in pipes:
            pipes[case] = tiny_pipeline(case)
        if (case, setting) not in cache:
            cache[(case, setting)] = run(pipes[case], case, **_kw(setting))
        return cache[(case, setting)]

    return get


@pytest.mark.parametrize("case,cid,config", MATRIX, ids=[f"{a}-{b}" for a, b, _ in MATRIX])
def test_shape_and_schedule_changes_between_calls(case, cid, config, references):
    tol = TOLERANCE[method_name(config)]
    pipe = tiny_pipeline(case)
    fresh_pipe = tiny_pipeline(case)
    handle = ditaccel.enable_acceleration(pipe, [RecorderConfig(), *resolve_configs(config, {})])
    for setting in SEQUENCES[case]:
        kw = _kw(setting)
        handle.reset_stats()
        clear_record()
        acc = run(pipe, case, **kw)
        log, stats = recorded(), handle.stats()
        with ditaccel.enable_acceleration(fresh_pipe, config):
            fresh = run(fresh_pipe, case, **kw)
        ref = references(case, setting)
        assert acc.shape == ref.shape, setting
        assert torch.isfinite(acc).all(), setting
        assert torch.equal(acc, fresh), f"{setting}: differs from a pipeline enabled for this setting only"
        assert rel_err(acc, ref) < tol, setting
        assert approximated(stats), setting
        steps = kw["steps"]
        assert stats["steps"] == steps and stats["generations"] == 1, setting
        assert {t for _, _, t, _, _ in log} == {steps}, setting
        if method_name(config) == "StepCache":
            c = handle.configs[-1]
            expected = [s for s in range(steps)
                        if not is_compute_step(s, steps, c.interval, c.warmup_steps, c.final_steps)]
            assert skipped_steps(log) == expected, setting
    handle.remove()
    first = SEQUENCES[case][0]
    assert torch.equal(run(pipe, case, **_kw(first)), references(case, first)), "not bit-identical after remove()"
