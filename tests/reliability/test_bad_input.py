"""Bad input: every case is a DitAccelError whose message says what was expected, what came and how
to fix it, and the pipeline stays usable (a run afterwards is bit-identical to a never-enabled run).
Plus the transactional enable on real multi-method lists."""

from __future__ import annotations

import re

import pytest
import torch

import ditaccel
from ditaccel.adapters import adapter_for
from ditaccel.hooks.attach import count_our_hooks
from tests.reliability.common import flux_pipe, generate, pristine


@pytest.fixture(scope="module")
def pipe():
    return flux_pipe()


@pytest.fixture(scope="module")
def reference(pipe):
    return generate(pipe, steps=3)


def _wrong_router(tmp_path, pipe):
    from ditaccel.methods.harmonica_router import Router

    adapter = adapter_for(pipe.transformer)
    path = tmp_path / "wan_router.safetensors"
    Router(torch.zeros(6, 1), "wan", "WanTransformer3DModel", adapter.num_blocks + 3, [(0, adapter.num_blocks + 3)],
           0.1).save(path)
    return path


def _junk_router(tmp_path, pipe):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file")
    return path


def _parallel(pipe):
    pipe.transformer._parallel_config = object()  # what enable_parallelism() leaves (without a process group)


# (id, call(pipe, tmp_path), error type, pattern for what was expected/what came, pattern for the fix)
CASES = [
    ("preset_is_a_method_name", lambda p, t: ditaccel.enable_acceleration(p, "StepCache"),
     ditaccel.ConfigError, r"Unknown preset 'StepCache'.*Expected one of", r"ditaccel\.StepCacheConfig"),
    ("config_class_not_instance", lambda p, t: ditaccel.enable_acceleration(p, ditaccel.StepCacheConfig),
     ditaccel.ConfigError, r"instance, got the class StepCacheConfig", r"Call it: StepCacheConfig\(\)"),
    ("override_of_other_method", lambda p, t: ditaccel.enable_acceleration(p, ditaccel.RASConfig(), interval=2),
     ditaccel.ConfigError, r"Unknown override 'interval' for methods \['RAS'\]", r"Known options"),
    ("int_out_of_range", lambda p, t: ditaccel.TaylorSeerConfig(order=7),
     ditaccel.ConfigError, r"order must be <= 4, got 7", r"Use a value of at most 4"),
    ("bool_for_int", lambda p, t: ditaccel.StepCacheConfig(interval=True),
     ditaccel.ConfigError, r"interval must be an int, got bool True", r"must be an int"),
    ("fraction_zero", lambda p, t: ditaccel.RASConfig(active_fraction=0.0),
     ditaccel.ConfigError, r"active_fraction must be > 0.0, got 0.0", r"Use a value > 0.0"),
    ("infeasible_staleness", lambda p, t: ditaccel.RASConfig(active_fraction=0.1, max_stale_steps=2),
     ditaccel.ConfigError, r"not every token can be refreshed", r"Use max_stale_steps >= 9"),
    ("list_for_tuple", lambda p, t: ditaccel.RASConfig(reset_steps=[3]),
     ditaccel.ConfigError, r"reset_steps must be None .* or a tuple.*got list \[3\]", r"tuple of step indices"),
    ("nan_float", lambda p, t: ditaccel.CLEARConfig(radius=float("nan")),
     ditaccel.ConfigError, r"radius must be a number, got NaN", r"Pass a finite number"),
    ("unknown_choice", lambda p, t: ditaccel.SVG2Config(kmeans_init="foo"),
     ditaccel.ConfigError, r"kmeans_init must be one of \['random', 'kmeans\+\+'\], got str 'foo'", r"one of"),
    ("bad_tile", lambda p, t: ditaccel.RettentionConfig(tile=(0, 8)),
     ditaccel.ConfigError, r"tile must be None or a tuple of positive ints, got tuple \(0, 8\)", r"positive ints"),
    ("int_cache_dtype", lambda p, t: ditaccel.DeltaCacheConfig(cache_dtype=torch.int8),
     ditaccel.ConfigError, r"cache_dtype must be one of None, torch.float32.*got dtype torch.int8", r"Use None"),
    ("float64_cache_dtype", lambda p, t: ditaccel.TaylorSeerConfig(cache_dtype=torch.float64),
     ditaccel.ConfigError, r"cache_dtype must be one of .*got dtype torch.float64", r"Use None"),
    ("block_range_outside_model", lambda p, t: ditaccel.enable_acceleration(p, ditaccel.DeltaCacheConfig(front_blocks=(0, 99))),
     ditaccel.ConfigError, r"front_blocks \(0, 99\) is outside the model: it has 2 blocks", r"must satisfy 0 <= start"),
    ("probe_block_in_range", lambda p, t: ditaccel.enable_acceleration(
        p, ditaccel.DeltaCacheConfig(threshold=0.1, front_blocks=(0, 1), rear_blocks=(1, 2))),
     ditaccel.ConfigError, r"includes block 0, which the adaptive controller", r"Start the range at 1 or use threshold=0"),
    ("router_file_missing", lambda p, t: ditaccel.enable_acceleration(p, ditaccel.HarmoniCaConfig(router=str(t / "no.safetensors"))),
     ditaccel.ConfigError, r"router file not found", r"ditaccel train-router"),
    ("router_file_junk", lambda p, t: ditaccel.enable_acceleration(p, ditaccel.HarmoniCaConfig(router=str(_junk_router(t, p)))),
     ditaccel.ConfigError, r"junk", r"train-router|Train"),
    ("router_for_other_model", lambda p, t: ditaccel.enable_acceleration(p, ditaccel.HarmoniCaConfig(router=str(_wrong_router(t, p)))),
     ditaccel.ConfigError, r"wan", r"train-router|Train"),
    ("empty_router_path", lambda p, t: ditaccel.HarmoniCaConfig(),
     ditaccel.ConfigError, r"router must be the path of a router .safetensors file, got str ''", r"Train one"),
    ("forced_wrong_family", lambda p, t: ditaccel.enable_acceleration(p, family="wan"),
     ditaccel.UnsupportedModelError, r"family='wan' was forced, but FluxTransformer2DModel has none of the blocks",
     r"pass family='flux'"),
    ("unknown_family", lambda p, t: ditaccel.enable_acceleration(p, family="flux2"),
     ditaccel.UnsupportedModelError, r"Unknown model family 'flux2'. Registered families", r"drop family="),
    ("not_a_pipeline", lambda p, t: ditaccel.enable_acceleration(None),
     ditaccel.UnsupportedModelError, r"Expected a diffusers pipeline .* got NoneType None", r"Pass e.g. a FluxPipeline"),
    ("two_sparse_methods_one_layer", lambda p, t: ditaccel.enable_acceleration(p, [ditaccel.SVG2Config(), ditaccel.CLEARConfig()]),
     ditaccel.CompositionError, r"CLEAR and SVG2 both want to be the sparse attention", r"drop one of them"),
    ("ras_after_step_cache", lambda p, t: ditaccel.enable_acceleration(
        p, [ditaccel.StepCacheConfig(), ditaccel.SVG2Config(), ditaccel.RASConfig()]),
     ditaccel.CompositionError, r"RAS must be listed before", r"put RASConfig first"),
    ("ras_under_context_parallelism", lambda p, t: (_parallel(p), ditaccel.enable_acceleration(p, ditaccel.RASConfig())),
     ditaccel.CompositionError, r"RAS cannot run on a FluxTransformer2DModel with a parallel config",
     r"Disable context parallelism"),
    ("nan_guard_not_bool", lambda p, t: ditaccel.enable_acceleration(p, nan_guard="yes"),
     ditaccel.ConfigError, r"nan_guard must be True or False, got str 'yes'", r"True or False"),
    ("sync_ranks_bad", lambda p, t: ditaccel.enable_acceleration(p, sync_ranks="always"),
     ditaccel.ConfigError, r"sync_ranks must be 'auto', True or False, got str 'always'", r"Use 'auto'"),
]


@pytest.mark.parametrize("name, call, error, what, fix", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_clear_and_leaves_pipeline_usable(pipe, reference, tmp_path, name, call, error, what, fix):
    try:
        with pytest.raises(error) as info:
            call(pipe, tmp_path)
    finally:
        pipe.transformer._parallel_config = None
    message = str(info.value)
    assert re.search(what, message), message
    assert re.search(fix, message), message
    assert isinstance(info.value, ditaccel.DitAccelError)
    assert pristine(pipe.transformer) and ditaccel.get_handle(pipe) is None
    assert torch.equal(generate(pipe, steps=3), reference)


def test_ras_refused_when_parallelism_enabled_after_it(pipe, reference):
    with ditaccel.accelerated(pipe, ditaccel.RASConfig()):
        pipe.transformer._parallel_config = object()
        try:
            for _ in range(2):  # refused on every call, not only the first
                with pytest.raises(ditaccel.CompositionError, match="parallel config"):
                    generate(pipe, steps=3)
        finally:
            pipe.transformer._parallel_config = None
    assert pristine(pipe.transformer)
    assert torch.equal(generate(pipe, steps=3), reference)


def test_refused_composition_fails_every_call_not_only_the_first(pipe, reference):
    # RAS + TaylorSeer (module caches inside RAS's blocks) is refused at the first call; before the
    # fix the second call then ran the refused combination.
    with ditaccel.accelerated(pipe, [ditaccel.RASConfig(), ditaccel.TaylorSeerConfig()]):
        for _ in range(2):
            with pytest.raises(ditaccel.CompositionError, match="full token grid"):
                generate(pipe, steps=3)
    assert pristine(pipe.transformer)
    assert torch.equal(generate(pipe, steps=3), reference)


def test_calls_after_remove(pipe, reference):
    handle = ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig())
    handle.remove()
    handle.remove()  # idempotent
    assert ditaccel.disable_acceleration(pipe) is False
    with pytest.raises(ditaccel.DitAccelError, match="removed AccelerationHandle.*Enable again"):
        handle.set_num_steps(4)
    assert handle.stats()["methods"] == {}  # totals stay readable
    assert torch.equal(generate(pipe, steps=3), reference)
    with pytest.raises(ditaccel.ConfigError, match="step count >= 1 or None, got int 0"):
        ditaccel.enable_acceleration(pipe.transformer).set_num_steps(0)
    ditaccel.disable_acceleration(pipe.transformer)
    assert pristine(pipe.transformer)


def test_enable_on_pipeline_whose_transformer_was_swapped(pipe, reference):
    other = flux_pipe()
    original = pipe.transformer
    old = ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig())
    pipe.transformer = other.transformer
    try:
        # the swapped-in transformer is not accelerated until enabled: a plain run
        assert torch.equal(generate(pipe, steps=3), generate(other, steps=3))
        new = ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig())
        assert not old.active and pristine(original), "the old transformer must be released"
        assert new.active and count_our_hooks(pipe.transformer) > 0
        generate(pipe)
        assert new.stats()["methods"]["StepCache"]["cached"] > 0
        new.remove()
        assert pristine(pipe.transformer)
    finally:
        pipe.transformer = original
    assert torch.equal(generate(pipe, steps=3), reference)


# ---------------------------------------------------------------------------------------------
# transactional enable on real multi-method lists


@pytest.mark.parametrize("configs, error", [
    # RAS.install fails after StepCache and SVG2 have attached their hooks
    (lambda t: [ditaccel.StepCacheConfig(), ditaccel.SVG2Config(), ditaccel.RASConfig()], ditaccel.CompositionError),
    # the HarmoniCa router is loaded after StepCache's method object was built
    (lambda t: [ditaccel.SVG2Config(), ditaccel.HarmoniCaConfig(router=str(t / "missing.safetensors"))],
     ditaccel.ConfigError),
])
def test_failure_in_a_later_method_removes_every_hook(pipe, reference, tmp_path, configs, error):
    with pytest.raises(error):
        ditaccel.enable_acceleration(pipe, configs(tmp_path))
    assert count_our_hooks(pipe.transformer) == 0
    assert pristine(pipe.transformer) and ditaccel.get_handle(pipe) is None
    assert torch.equal(generate(pipe, steps=3), reference)


def test_failure_inside_install_of_a_later_method_after_others_attached(pipe, reference, monkeypatch):
    """A method whose own install fails half-way (its first layers hooked) after two methods attached."""
    from ditaccel.attention import sparse_method

    attached = []
    original = sparse_method.install_attention_router

    def failing(router, modules, hook_name, *a, **k):
        hooked = original(router, modules[:1], hook_name, *a, **k)  # one layer hooked, then failure
        attached.append(hooked)
        for m in hooked:  # what a correct install does on failure: undo its own part
            from ditaccel.hooks.attach import detach_hook

            detach_hook(m, hook_name)
        raise RuntimeError("attention layer refused on purpose")

    monkeypatch.setattr(sparse_method, "install_attention_router", failing)
    with pytest.raises(RuntimeError, match="on purpose"):
        ditaccel.enable_acceleration(pipe, [ditaccel.RASConfig(), ditaccel.StepCacheConfig(), ditaccel.CLEARConfig()])
    assert attached, "the sparse method's install was reached"
    assert count_our_hooks(pipe.transformer) == 0 and pristine(pipe.transformer)
    assert torch.equal(generate(pipe, steps=3), reference)
