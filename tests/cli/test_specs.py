"""Parsing of --methods / --presets values."""

import pytest
import torch

from ditaccel.cli.errors import UsageError
from ditaccel.cli.specs import parse_method, parse_presets, parse_value


def test_parse_values():
    assert parse_value("3") == 3
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("None") is None
    assert parse_value("(0,4)") == (0, 4)
    assert parse_value("bf16") is torch.bfloat16
    assert parse_value("module") == "module"


@pytest.mark.parametrize("spec", ["StepCache:interval=3", "stepcache:interval=3", "StepCacheConfig:interval=3",
                                  "step_cache:interval=3"])
def test_method_names_are_forgiving(spec):
    v = parse_method(spec)
    assert v.configs[0].interval == 3 and v.kind == "method"


def test_presets_comma_and_space():
    assert [v.configs for v in parse_presets(["quality,balanced", "fast"])] == ["quality", "balanced", "fast"]


def test_unknown_preset_suggests():
    with pytest.raises(UsageError, match="Did you mean 'balanced'"):
        parse_presets(["balance"])
