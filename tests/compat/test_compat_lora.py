"""LoRA (diffusers ``load_lora_weights``, peft backend) with acceleration, on tiny FLUX and SD3.

The LoRAs are made here: peft ``LoraConfig`` on a tiny transformer with random A and B, saved with
the pipeline class's ``save_lora_weights`` and loaded back with ``pipe.load_lora_weights``.

- fused and unfused LoRA, enabled after loading: the accelerated run is as close to the
  un-accelerated LoRA run as the accelerated run without LoRA is to its own reference;
- LoRA loaded / added / switched / rescaled / fused / unfused / unloaded *after* enable: each
  accelerated run is bit-identical to a fresh pipeline brought to the same LoRA state and enabled
  then (nothing stale survives), and the FLOP profile is redone (LoRA adds matmuls);
- a LoRA weight changed in the middle of a generation (step-end callback): the engine resets the
  caches, the next step is computed in full instead of reusing a residual of the old weights;
- remove() after all of it: bit-identical to the never-enabled pipeline.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")

import ditaccel  # noqa: E402
from compat_helpers import (  # noqa: E402
    TOLERANCE, RecorderConfig, approximated, caching_configs, clear_record, make_lora, method_name, recorded,
    rel_err, run, skipped, skipped_steps, token_and_attention_configs,
)
from helpers.tiny import tiny_pipeline  # noqa: E402

STEPS = 8
CASES = ("flux", "sd3")


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    out = {}
    for case in CASES:
        for seed in (0, 1):
            out[(case, seed)] = make_lora(case, tmp_path_factory.mktemp(f"lora_{case}_{seed}"), seed=seed)
    return out


def _with_lora(case, lora_dirs, fused: bool):
    pipe = tiny_pipeline(case)
    pipe.load_lora_weights(lora_dirs[(case, 0)], adapter_name="a")
    if fused:
        pipe.fuse_lora()
    return pipe


@pytest.fixture(scope="module")
def references(lora_dirs):
    """Per (case, config): the error without LoRA (the fidelity to match), and the accelerated
    output of a pipeline whose LoRA was fused and unloaded (weights baked in, no peft layers)."""
    cache = {}

    def get(case, cid, config):
        if (case, cid) not in cache:
            pipe = tiny_pipeline(case)
            ref = run(pipe, case, steps=STEPS)
            with ditaccel.enable_acceleration(pipe, config):
                err_plain = rel_err(run(pipe, case, steps=STEPS), ref)
            pipe.load_lora_weights(lora_dirs[(case, 0)], adapter_name="a")
            pipe.fuse_lora()
            pipe.unload_lora_weights()
            baked_ref = run(pipe, case, steps=STEPS)
            with ditaccel.enable_acceleration(pipe, config):
                baked = run(pipe, case, steps=STEPS)
            cache[(case, cid)] = (err_plain, ref, baked_ref, baked)
        return cache[(case, cid)]

    return get


CONFIGS = caching_configs() + token_and_attention_configs()


# every caching method on unfused LoRA; fused LoRA (plain Linear weights again) with the presets
CASES_FIDELITY = [(cid, config, False) for cid, config in CONFIGS] + [
    (cid, config, True) for cid, config in CONFIGS if cid.startswith("preset")]


@pytest.mark.parametrize("cid,config,fused", CASES_FIDELITY,
                         ids=[f"{c}-{'fused' if f else 'unfused'}" for c, _, f in CASES_FIDELITY])
@pytest.mark.parametrize("case", CASES)
def test_lora_same_fidelity_as_without(case, fused, cid, config, lora_dirs, references):
    err_plain, plain, baked_ref, baked = references(case, cid, config)
    pipe = _with_lora(case, lora_dirs, fused)
    ref = run(pipe, case, steps=STEPS)
    tol = TOLERANCE[method_name(config)]
    assert rel_err(ref, plain) > 3 * tol, "the LoRA should change the output by much more than the tolerance"

    handle = ditaccel.enable_acceleration(pipe, config)
    acc = run(pipe, case, steps=STEPS)
    stats = handle.stats()
    handle.remove()
    assert approximated(stats)
    assert torch.isfinite(acc).all()
    err = rel_err(acc, ref)
    assert err < tol, (err, err_plain)
    assert err_plain < tol
    # "The same fidelity as without": the peft layers do not interfere with caching. Accelerating
    # the LoRA pipeline gives what accelerating the same weights baked into plain Linear layers
    # gives, up to float rounding. (The error against the un-accelerated run is not compared with
    # the no-LoRA model's: a LoRA makes a different model whose features change faster between
    # steps; measured ratios err / err_plain are 1-7, see docs/compatibility.md.)
    assert rel_err(ref, baked_ref) < 1e-4
    assert rel_err(acc, baked) < 1e-4, rel_err(acc, baked)
    assert torch.equal(run(pipe, case, steps=STEPS), ref), "not bit-identical after remove()"


def _lora_states(case, dirs):
    """A sequence of LoRA operations applied to a pipeline, each a function pipe -> None, and the
    per-call extra arguments of the run that follows."""
    scale_kw = {"joint_attention_kwargs": {"scale": 0.25}}
    return [
        ("none", lambda p: None, {}),
        ("load a", lambda p: p.load_lora_weights(dirs[(case, 0)], adapter_name="a"), {}),
        ("load b, mix", lambda p: (p.load_lora_weights(dirs[(case, 1)], adapter_name="b"),
                                   p.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])), {}),
        ("switch to b", lambda p: p.set_adapters("b"), {}),
        ("rescale a", lambda p: p.set_adapters(["a"], adapter_weights=[2.0]), {}),
        ("call scale", lambda p: None, scale_kw),
        ("fuse", lambda p: p.fuse_lora(adapter_names=["a"]), {}),
        ("unfuse", lambda p: p.unfuse_lora(), {}),
        ("disable", lambda p: p.disable_lora(), {}),
        ("enable", lambda p: p.enable_lora(), {}),
        ("unload", lambda p: p.unload_lora_weights(), {}),
    ]


@pytest.mark.parametrize("case", CASES)
def test_lora_changes_after_enable_invalidate_everything(case, lora_dirs):
    config = ditaccel.StepCacheConfig(interval=2, warmup_steps=2, final_steps=1)
    tol = TOLERANCE["StepCache"]
    pipe = tiny_pipeline(case)  # accelerated once, LoRA changed underneath
    twin = tiny_pipeline(case)  # same operations, never accelerated while they happen
    never = run(twin, case, steps=STEPS)
    handle = ditaccel.enable_acceleration(pipe, config)
    previous_ref, flops_per_call = None, {}
    for name, op, extra in _lora_states(case, lora_dirs):
        op(pipe)
        op(twin)
        handle.reset_stats()
        acc = run(pipe, case, steps=STEPS, extra=extra)
        stats = handle.stats()
        ref = run(twin, case, steps=STEPS, extra=extra)
        with ditaccel.enable_acceleration(twin, config):
            fresh = run(twin, case, steps=STEPS, extra=extra)
        assert torch.equal(acc, fresh), f"{name}: differs from a pipeline enabled after the change"
        assert torch.isfinite(acc).all()
        assert rel_err(acc, ref) < tol, name
        assert skipped(stats) > 0, name
        # the engine saw exactly one weight change, at the first call after the operation
        assert stats["weight_changes"] == (0 if name == "none" else 1), name
        if previous_ref is not None and name != "unfuse":  # unfuse: same effective weights as before fusing
            assert rel_err(ref, previous_ref) > 2 * tol, f"{name}: the LoRA change should move the output"
        previous_ref = ref
        flops_per_call[name] = stats["flops_full"] / stats["transformer_calls"]
    # LoRA layers add matmuls: the FLOP profile was redone after the load and after the unload
    assert flops_per_call["load a"] > flops_per_call["none"]
    assert flops_per_call["unload"] == flops_per_call["none"]
    handle.remove()
    # bit-identical to the twin's un-accelerated run in the same (unloaded) state; not to `never`:
    # fuse + unfuse leave float rounding in the base weights, on both pipelines alike
    assert torch.equal(run(pipe, case, steps=STEPS), previous_ref)
    assert rel_err(previous_ref, never) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_lora_weight_change_mid_generation_resets_caches(case, lora_dirs):
    """A step-end callback rescales the LoRA after step 2. With the default schedule (warm-up 2,
    every 2nd step, last step computed) step 3 would reuse the residual of step 2, computed with
    the old scale; the engine sees the change and computes step 3 in full."""
    config = ditaccel.StepCacheConfig(interval=2, warmup_steps=2, final_steps=1)
    pipe = tiny_pipeline(case)
    pipe.load_lora_weights(lora_dirs[(case, 0)], adapter_name="a")

    def rescale(p, i, t, kw):
        if i == 2:
            p.set_adapters(["a"], adapter_weights=[0.2])
        return {}

    def generate():
        pipe.set_adapters(["a"], adapter_weights=[1.0])
        return run(pipe, case, steps=STEPS, extra={"callback_on_step_end": rescale})

    ref = generate()
    handle = ditaccel.enable_acceleration(pipe, [RecorderConfig(), config])
    clear_record()
    acc = generate()
    stats = handle.stats()
    log = recorded()
    handle.remove()
    assert stats["weight_changes"] == 1
    resets = [step for step, _b, _t, _d, reset in log if reset]
    assert resets == [0, 3]
    assert skipped_steps(log) == [5], "step 3 must be computed: its cached residual came from the old weights"
    assert torch.isfinite(acc).all() and rel_err(acc, ref) < TOLERANCE["StepCache"]
    assert torch.equal(generate(), ref)
