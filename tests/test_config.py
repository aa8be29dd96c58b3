"""Config dataclasses, presets and overrides."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ditaccel
from ditaccel.config import resolve_configs


def test_configs_are_frozen():
    cfg = ditaccel.StepCacheConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.interval = 5


def test_every_preset_resolves_to_method_configs():
    for name in ditaccel.preset_names():
        configs = resolve_configs(name, {})
        assert configs and all(isinstance(c, ditaccel.MethodConfig) for c in configs)


def test_exported_method_configs_validate():
    with pytest.raises(ditaccel.ConfigError, match="TaylorSeerConfig.order"):
        ditaccel.TaylorSeerConfig(order=9)
    with pytest.raises(ditaccel.ConfigError, match="DeltaCacheConfig.front_blocks"):
        ditaccel.DeltaCacheConfig(front_blocks=(3, 1))
    with pytest.raises(ditaccel.ConfigError, match="RASConfig.active_fraction"):
        ditaccel.RASConfig(active_fraction=0.0)
    with pytest.raises(ditaccel.ConfigError, match="SVG2Config.top_p"):
        ditaccel.SVG2Config(top_p=1.5)
    with pytest.raises(ditaccel.ConfigError, match="HarmoniCaConfig.router"):
        ditaccel.HarmoniCaConfig()


def test_replace_rejects_unknown_field_with_suggestion():
    with pytest.raises(ditaccel.ConfigError, match="Did you mean 'warmup_steps'"):
        ditaccel.StepCacheConfig().replace(warmup_step=3)


@settings(max_examples=200, deadline=None)
@given(interval=st.one_of(st.integers(-5, 2000), st.floats(allow_nan=True), st.text(max_size=3), st.none(),
                          st.booleans()))
def test_interval_is_validated_for_any_input(interval):
    valid = isinstance(interval, int) and not isinstance(interval, bool) and 1 <= interval <= 1000
    if valid:
        assert resolve_configs("balanced", {"interval": interval})[0].interval == interval
    else:
        with pytest.raises(ditaccel.ConfigError):
            resolve_configs("balanced", {"interval": interval})


@settings(max_examples=100, deadline=None)
@given(key=st.text(min_size=1, max_size=12))
def test_unknown_override_keys_are_rejected(key):
    known = {f.name for config in resolve_configs("balanced", {}) for f in dataclasses.fields(config)}
    if key in known:
        return
    with pytest.raises(ditaccel.ConfigError, match="Unknown override"):
        resolve_configs("balanced", {key: 1})
