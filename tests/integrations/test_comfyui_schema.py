"""Node inputs generated from the config dataclasses, and the family table; no ComfyUI needed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ditaccel
from ditaccel.config import MethodConfig
from ditaccel.errors import ConfigError, UnsupportedModelError
from ditaccel.integrations.comfyui.families import FAMILIES, family_of
from ditaccel.integrations.comfyui.schema import (DTYPE, INT, INT_TUPLE, OPTIONAL_INT, config_from_inputs,
                                                  field_specs)


def all_configs():
    return [getattr(ditaccel, n) for n in ditaccel.__all__
            if isinstance(getattr(ditaccel, n), type) and issubclass(getattr(ditaccel, n), MethodConfig)
            and getattr(ditaccel, n) is not MethodConfig]


def test_step_cache_fields():
    specs = {s.name: s for s in field_specs(ditaccel.StepCacheConfig)}
    assert list(specs) == [f.name for f in dataclasses.fields(ditaccel.StepCacheConfig)]
    assert specs["interval"].kind == INT
    assert (specs["interval"].default, specs["interval"].minimum, specs["interval"].maximum) == (2, 1, 1000)
    assert specs["warmup_steps"].minimum == 0


@pytest.mark.parametrize("cls", all_configs(), ids=lambda c: c.__name__)
def test_every_config_has_widgets_and_round_trips(cls):
    specs = field_specs(cls)
    values = {s.name: s.default for s in specs}
    if cls.__name__ == "HarmoniCaConfig":
        values["router"] = "router.safetensors"
    config = config_from_inputs(cls, values)
    expected = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    if cls.__name__ == "HarmoniCaConfig":
        expected["router"] = "router.safetensors"
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    for s in specs:
        if s.minimum is not None and isinstance(s.default, (int, float)) and s.kind not in (OPTIONAL_INT,):
            assert s.default >= s.minimum or not s.min_inclusive


def test_sentinels_map_back_to_none_and_values():
    specs = {s.name: s for s in field_specs(ditaccel.DeltaCacheConfig)}
    assert specs["boundary_step"].kind == OPTIONAL_INT and specs["boundary_step"].default == -1
    assert specs["front_blocks"].kind == INT_TUPLE and specs["cache_dtype"].kind == DTYPE
    c = config_from_inputs(ditaccel.DeltaCacheConfig, {"boundary_step": 5, "front_blocks": "0, 4",
                                                       "cache_dtype": "bfloat16"})
    assert (c.boundary_step, c.front_blocks, c.cache_dtype) == (5, (0, 4), torch.bfloat16)
    c = config_from_inputs(ditaccel.DeltaCacheConfig, {"boundary_step": -1, "front_blocks": "", "cache_dtype": "auto"})
    assert (c.boundary_step, c.front_blocks, c.cache_dtype) == (None, None, None)
    with pytest.raises(ConfigError):
        config_from_inputs(ditaccel.DeltaCacheConfig, {"front_blocks": "a,b"})
    with pytest.raises(ConfigError):  # the config's own validation has the last word
        config_from_inputs(ditaccel.StepCacheConfig, {"interval": 0})


def test_family_table_and_unsupported_object():
    assert {"flux", "sd3", "wan", "hunyuan_video", "ltxv", "lumina2"} <= set(FAMILIES)
    with pytest.raises(UnsupportedModelError, match="ComfyUI MODEL"):
        family_of(torch.nn.Linear(2, 2))
