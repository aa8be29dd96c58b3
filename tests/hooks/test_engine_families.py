"""The engine on every supported family, through the real (tiny, random-weight) pipelines.

For each pipeline: the never-skip preset ("off") is bit-identical while enabled; the default
"balanced" preset really skips blocks and stays finite; enable -> generate -> remove leaves the
pipeline bit-identical to one never enabled; the step clock gives the right (step, branch,
total_steps) per transformer call for each CFG style, and follows changes of step count, batch
size and resolution between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import ditaccel
from ditaccel.config import register_method
from ditaccel.hooks.attach import count_our_hooks
from ditaccel.hooks.method import InstalledMethod
from helpers.tiny import CASES, FAMILY, call_kwargs, output_of, tiny_pipeline

# pipelines that run two transformer calls per step when cfg=True (cond, then uncond)
SEQUENTIAL_CFG = {"wan", "lumina2", "chroma", "flux", "qwenimage", "hunyuan_video"}
# pipelines that put [uncond, cond] in one batch when cfg=True
BATCHED_CFG = {"sd3", "pixart", "pixart_sigma", "dit", "sana", "cogvideox", "ltx"}
assert SEQUENTIAL_CFG | BATCHED_CFG == set(CASES)


def _run(pipe, case, **kw):
    with torch.no_grad():
        return output_of(case, pipe(**call_kwargs(case, **kw))).clone()


@pytest.fixture(scope="module")
def pipes():
    cache: dict = {}

    def get(case):
        if case not in cache:
            cache[case] = tiny_pipeline(case)
        return cache[case]

    return get


# ---------------------------------------------------------------------------------------------
# bit identity and caching


@pytest.mark.parametrize("case", CASES)
def test_off_balanced_remove(pipes, case):
    pipe = pipes(case)
    run = dict(steps=8, batch=1, cfg=True)
    baseline = _run(pipe, case, **run)

    handle = ditaccel.enable_acceleration(pipe, "off")
    assert handle.family == FAMILY[case]
    off = _run(pipe, case, **run)
    off_stats = handle.stats()
    handle.remove()
    assert torch.equal(off, baseline), "the never-skip preset changed the output"
    assert off_stats["methods"]["StepCache"]["cached"] == 0
    assert off_stats["methods"]["StepCache"]["computed"] > 0

    handle = ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig(interval=2, warmup_steps=2))
    cached = _run(pipe, case, **run)
    stats = handle.stats()
    handle.remove()
    steps = stats["methods"]["StepCache"]
    assert steps["cached"] > 0, stats
    assert steps["computed"] > 0
    assert stats["steps"] == 8 and stats["generations"] == 1
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, baseline), "blocks were reported cached but the output did not change"
    assert 0.0 < stats["flops_skipped_fraction"] < 1.0

    assert count_our_hooks(pipe.transformer) == 0
    assert getattr(pipe.transformer, "_diffusers_hook", None) is None
    after = _run(pipe, case, **run)
    assert torch.equal(after, baseline), "the pipeline differs after remove()"


def test_sd3_last_block_context_pre_only_is_cached_correctly(pipes):
    """SD3's last block is context_pre_only and returns (None, hidden). On a skipped step the image
    residual of the whole stack (block 0 input -> last block output, measured on the previous
    computed step) must be applied exactly, and the text stream, which the real last block drops,
    passes through unchanged (the model discards it after the last block)."""
    pipe = pipes("sd3")
    model = pipe.transformer
    first, last = model.transformer_blocks[0], model.transformer_blocks[-1]
    assert last.context_pre_only and not first.context_pre_only
    # warm-up 1, interval 2, no final steps: steps 0 and 1 computed, step 2 skipped
    handle = ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig(interval=2, warmup_steps=1, final_steps=0))
    ins, outs = [], []
    hooks = [
        first.register_forward_pre_hook(
            lambda m, a, k: ins.append((k["hidden_states"], k["encoder_hidden_states"])), with_kwargs=True),
        last.register_forward_hook(lambda m, a, k, out: outs.append(out), with_kwargs=True),
    ]
    try:
        final = _run(pipe, "sd3", steps=3, cfg=True)
    finally:
        for h in hooks:
            h.remove()
        stats = handle.stats()
        handle.remove()
    counters = stats["methods"]["StepCache"]
    assert (counters["computed"], counters["cached"]) == (4, 2)  # one segment of 2 blocks
    assert len(ins) == len(outs) == 3
    assert outs[0][0] is None and outs[1][0] is None  # computed steps: the real block's (None, hidden)
    residual = outs[1][1] - ins[1][0]
    assert torch.equal(outs[2][1], ins[2][0] + residual)
    assert outs[2][0] is ins[2][1]  # skipped: text stream passed through
    assert torch.isfinite(final).all()


# ---------------------------------------------------------------------------------------------
# step clock


@dataclass(frozen=True)
class _RecorderConfig(ditaccel.MethodConfig):
    """Test-only method: records the StepInfo and input batch of every transformer call."""


class _Recorder(InstalledMethod):
    log: list = []

    def install(self) -> None:
        pass

    def remove(self) -> None:
        pass

    def begin_call(self, call) -> None:
        layout = self.engine.adapter.token_layout(call.args, call.kwargs)
        _Recorder.log.append((call.info, layout))


register_method(_RecorderConfig)(lambda engine, config: _Recorder(engine, config))


def _record(pipe, case, **kw):
    _Recorder.log = []
    _run(pipe, case, **kw)
    return list(_Recorder.log)


def _expected(steps, branches):
    return [(s, b, steps) for s in range(steps) for b in range(branches)]


@pytest.mark.parametrize("case", CASES)
def test_step_clock_per_cfg_style(pipes, case):
    pipe = pipes(case)
    handle = ditaccel.enable_acceleration(pipe, [_RecorderConfig()], count_flops=False)
    try:
        log = _record(pipe, case, steps=3, cfg=True)
    finally:
        handle.remove()
    branches = 2 if case in SEQUENTIAL_CFG else 1
    assert [(i.step, i.branch, i.total_steps) for i, _ in log] == _expected(3, branches)
    assert [i.new_generation for i, _ in log] == [True] + [False] * (len(log) - 1)
    assert len({i.generation for i, _ in log}) == 1
    rows = 2 if case in BATCHED_CFG else 1
    assert all(layout.batch == rows for _, layout in log)


@pytest.mark.parametrize("case", ["sd3", "pixart", "wan", "flux"])
def test_step_clock_named_styles(pipes, case):
    """The three CFG styles of the brief, spelled out: batched (SD3, PixArt with guidance > 1: one
    call per step, 2 rows), sequential (Wan: branches 0 and 1 in each step), guidance-embedded
    FLUX (one call per step, one row, a `guidance` tensor)."""
    pipe = pipes(case)
    cfg = case != "flux"
    handle = ditaccel.enable_acceleration(pipe, [_RecorderConfig()], count_flops=False)
    guidance_seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: guidance_seen.append(k.get("guidance")), with_kwargs=True)
    try:
        log = _record(pipe, case, steps=4, cfg=cfg)
    finally:
        hook.remove()
        handle.remove()
    seq = [(i.step, i.branch, i.total_steps) for i, _ in log]
    if case == "wan":
        assert seq == [(0, 0, 4), (0, 1, 4), (1, 0, 4), (1, 1, 4), (2, 0, 4), (2, 1, 4), (3, 0, 4), (3, 1, 4)]
    else:
        assert seq == [(0, 0, 4), (1, 0, 4), (2, 0, 4), (3, 0, 4)]
    assert all(layout.batch == (2 if case in ("sd3", "pixart") else 1) for _, layout in log)
    if case == "flux":
        assert all(isinstance(g, torch.Tensor) for g in guidance_seen)


@pytest.mark.parametrize("case", ["sd3", "wan", "flux"])
def test_step_clock_follows_changes_between_calls(pipes, case):
    pipe = pipes(case)
    h, w, f = {"sd3": (8, 8, None), "wan": (16, 16, 3), "flux": (16, 16, None)}[case]
    cfg = case != "flux"
    branches = 2 if case == "wan" else 1
    runs = [
        dict(steps=3, batch=1),
        dict(steps=5, batch=1),  # other step count
        dict(steps=2, batch=2),  # other batch size
        dict(steps=3, batch=1, height=2 * h, width=h),  # other resolution
        dict(steps=3, batch=1, height=2 * h, width=h),  # same again
    ]
    handle = ditaccel.enable_acceleration(pipe, [_RecorderConfig()], count_flops=False)
    try:
        logs = [_record(pipe, case, cfg=cfg, frames=f, **r) for r in runs]
    finally:
        handle.remove()
    generations = []
    for r, log in zip(runs, logs):
        assert [(i.step, i.branch, i.total_steps) for i, _ in log] == _expected(r["steps"], branches)
        assert log[0][0].new_generation and log[0][0].reset
        assert not any(i.new_generation or i.reset for i, _ in log[1:])
        generations.append(log[0][0].generation)
        rows = r["batch"] * (2 if case == "sd3" else 1)
        assert all(layout.batch == rows for _, layout in log)
    assert generations == sorted(set(generations)) and len(generations) == len(runs)
    # the resolution change reached the token layout
    assert logs[3][0][1].image_tokens == 2 * logs[0][0][1].image_tokens


@pytest.mark.parametrize("case", ["sd3", "wan", "chroma"])
def test_balanced_cache_survives_changes_between_calls(pipes, case):
    """Residuals from a previous shape are never applied: each generation after a change of step
    count, batch or resolution is the same as a fresh enable on that generation."""
    pipe = pipes(case)
    h, w, f = {"sd3": (8, 8, None), "wan": (16, 16, 3), "chroma": (16, 16, None)}[case]
    runs = [dict(steps=6, batch=1), dict(steps=5, batch=2), dict(steps=6, batch=1, height=2 * h, width=w)]
    handle = ditaccel.enable_acceleration(pipe, "balanced", count_flops=False)
    try:
        chained = [_run(pipe, case, cfg=True, frames=f, **r) for r in runs]
    finally:
        handle.remove()
    for r, out in zip(runs, chained):
        with ditaccel.accelerated(pipe, "balanced", count_flops=False):
            fresh = _run(pipe, case, cfg=True, frames=f, **r)
        assert torch.isfinite(out).all()
        assert torch.equal(out, fresh)
