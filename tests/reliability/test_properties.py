"""Property-based tests (hypothesis): every method config accepts its valid ranges and rejects
anything else with ConfigError (never another exception type); ``ditaccel bench`` rejects bad
option values with exit code 2 and a one-line message, never a traceback (parse only: the run is
stopped before any model is loaded)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ditaccel
from ditaccel.cli.specs import all_method_configs
from ditaccel.errors import ConfigError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.tuples(st.integers(-5, 50), st.integers(-5, 50)), st.lists(st.integers(0, 5), max_size=3),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64]),
    st.just(object()),
)

CONFIG_CLASSES = sorted((c for c in all_method_configs().values() if dataclasses.is_dataclass(c)
                         and c.__module__.startswith("ditaccel.")), key=lambda c: c.__name__)


def _defaults(cls):
    if cls is ditaccel.HarmoniCaConfig:
        return {"router": "router.safetensors"}  # the only required field
    return {}


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_any_value_for_any_field_is_accepted_or_a_config_error(cls, data):
    names = [f.name for f in dataclasses.fields(cls)]
    name = data.draw(st.sampled_from(names), label="field")
    value = data.draw(ANY, label="value")
    kwargs = {**_defaults(cls), name: value}
    try:
        config = cls(**kwargs)
    except ConfigError as exc:
        assert name in str(exc) or cls.__name__ in str(exc)
        return
    assert getattr(config, name) is value or getattr(config, name) == value


# valid values per (config, field): all of them must be accepted
VALID = {
    ditaccel.StepCacheConfig: dict(interval=st.integers(1, 1000), warmup_steps=st.integers(0, 10**4),
                                   final_steps=st.integers(0, 10**4)),
    ditaccel.TaylorSeerConfig: dict(interval=st.integers(1, 100), order=st.integers(0, 4), warmup_steps=st.integers(0, 50),
                                    final_steps=st.integers(0, 50), granularity=st.sampled_from(["module", "block"]),
                                    threshold=st.floats(0, 10), max_consecutive_cached=st.integers(1, 50),
                                    formula=st.sampled_from(["newton", "taylor"]), uncond_follows_cond=st.booleans(),
                                    cache_dtype=st.sampled_from([None, torch.float32, torch.float16, torch.bfloat16])),
    ditaccel.DeltaCacheConfig: dict(interval=st.integers(1, 100), boundary_step=st.one_of(st.none(), st.integers(0, 100)),
                                    front_blocks=st.one_of(st.none(), st.integers(0, 50).flatmap(
                                        lambda a: st.tuples(st.just(a), st.integers(a + 1, a + 50)))),
                                    threshold=st.floats(0, 10), max_consecutive_cached=st.integers(1, 50)),
    ditaccel.RASConfig: dict(active_fraction=st.floats(0.2, 1.0), warmup_steps=st.integers(0, 50),
                             reset_steps=st.one_of(st.none(), st.lists(st.integers(0, 100), max_size=4).map(tuple)),
                             final_steps=st.integers(0, 10), starvation_weight=st.floats(0, 10),
                             max_stale_steps=st.integers(4, 1000)),
    ditaccel.SVG2Config: dict(q_clusters=st.integers(1, 1000), k_clusters=st.integers(1, 1000),
                              top_p=st.floats(0.001, 1.0), min_density=st.floats(0, 1), kmeans_iters=st.integers(1, 50),
                              kmeans_init=st.sampled_from(["random", "kmeans++"]),
                              dense_steps_fraction=st.floats(0, 1), block_size=st.integers(1, 512)),
    ditaccel.RettentionConfig: dict(keep_fraction=st.floats(0.001, 1.0), refresh_interval=st.integers(1, 100),
                                    correction=st.sampled_from(["ratio", "lse", "none"]), residual=st.booleans(),
                                    ratio_drift=st.floats(0, 1),
                                    tile=st.one_of(st.none(), st.lists(st.integers(1, 64), min_size=1, max_size=3).map(tuple))),
    ditaccel.CLEARConfig: dict(radius=st.floats(0.01, 1000), temporal_radius=st.one_of(st.none(), st.floats(0.01, 100)),
                               mode=st.sampled_from(["exact", "blocks"]), dense_layers=st.integers(0, 100)),
    ditaccel.HarmoniCaConfig: dict(threshold=st.floats(0, 1), forecast=st.booleans(), forecast_order=st.integers(0, 4),
                                   interpolate_steps=st.booleans()),
}


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_valid_ranges_are_accepted(cls, data):
    fields = VALID[cls]
    chosen = data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True), label="fields")
    kwargs = {**_defaults(cls), **{k: data.draw(fields[k], label=k) for k in chosen}}
    config = cls(**kwargs)
    for k in chosen:
        assert getattr(config, k) == kwargs[k] or (isinstance(kwargs[k], float) and math.isnan(kwargs[k]))


# invalid values per field: all of them must be ConfigError
INVALID = {
    ditaccel.StepCacheConfig: dict(interval=st.one_of(st.integers(-10**6, 0), st.integers(1001, 10**6), st.floats(),
                                                      st.booleans(), st.text())),
    ditaccel.TaylorSeerConfig: dict(order=st.one_of(st.integers(5, 100), st.integers(-100, -1)),
                                    granularity=st.text().filter(lambda s: s not in ("module", "block")),
                                    threshold=st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")))),
    ditaccel.RASConfig: dict(active_fraction=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001),
                                                       st.just(float("nan")))),
    ditaccel.SVG2Config: dict(top_p=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001)),
                              q_clusters=st.integers(-100, 0)),
    ditaccel.CLEARConfig: dict(radius=st.one_of(st.floats(max_value=0.0), st.just(float("nan"))),
                               mode=st.text().filter(lambda s: s not in ("exact", "blocks"))),
    ditaccel.RettentionConfig: dict(keep_fraction=st.floats(min_value=1.0001), refresh_interval=st.integers(-10, 0)),
    ditaccel.HarmoniCaConfig: dict(threshold=st.one_of(st.floats(min_value=1.0001), st.floats(max_value=-1e-9)),
                                   forecast_order=st.integers(5, 50)),
}


@pytest.mark.parametrize("cls", list(INVALID), ids=lambda c: c.__name__)
@SETTINGS
@given(data=st.data())
def test_invalid_values_are_config_errors(cls, data):
    fields = INVALID[cls]
    name = data.draw(st.sampled_from(sorted(fields)), label="field")
    value = data.draw(fields[name], label="value")
    with pytest.raises(ConfigError, match=name):
        cls(**{**_defaults(cls), name: value})


# ---------------------------------------------------------------------------------------------
# ditaccel bench options (parse only)


class _Stop(Exception):
    pass


@pytest.fixture(autouse=True)
def _no_bench_runs(monkeypatch):
    from ditaccel.cli import models

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(models, "load_bench_model", stop)


def _bench(args: list[str]) -> tuple[int | str, str]:
    from ditaccel.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["bench", *args])
        except SystemExit as exc:
            code = exc.code
        except _Stop:
            code = "valid"
    return code, err.getvalue()


INT_OPTIONS = {"--steps": 1, "--seed": 0, "--repeats": 1, "--batch": 1, "--tokens": 16, "--threads": 1}
TOKEN = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)


@SETTINGS
@given(option=st.sampled_from(sorted(INT_OPTIONS)), value=st.one_of(TOKEN, st.integers(-1000, 100000).map(str)))
def test_bench_integer_options(option, value):
    code, err = _bench([option, value])
    assert "Traceback" not in err
    minimum = INT_OPTIONS[option]
    try:
        number = int(value)
    except ValueError:
        number = None
    valid = number is not None and number >= minimum and value.strip() == value.strip()
    if option == "--tokens" and valid:
        valid = round(number ** 0.5) ** 2 == number
    if valid:
        assert code == "valid", err
    else:
        assert code == 2, (option, value, code, err)
        assert "error" in err and (option in err or "expected" in err), err


@SETTINGS
@given(spec=st.one_of(
    TOKEN,
    st.tuples(st.sampled_from(["StepCache", "TaylorSeer", "RAS", "SVG2", "CLEAR", "stepcache", "Nope"]),
              st.lists(st.tuples(st.sampled_from(["interval", "order", "active_fraction", "radius", "bogus", ""]),
                                 st.one_of(TOKEN, st.integers(-5, 5).map(str), st.floats(-2, 2).map(str))),
                       max_size=3)).map(lambda t: t[0] + (":" + ",".join(f"{k}={v}" for k, v in t[1]) if t[1] else "")),
))
@example(spec="-:")  # starts like an option: argparse's own error (CI drew it once; it printed the usage block)
def test_bench_method_specs(spec):
    code, err = _bench(["--methods", spec])
    assert "Traceback" not in err
    assert code in (2, "valid"), (spec, code, err)
    if code == 2:
        assert "error" in err and err.count("\n") <= 3, err


@SETTINGS
@given(presets=st.lists(st.one_of(st.sampled_from(["balanced", "fast", "quality", "off"]), TOKEN), min_size=1,
                        max_size=3), device=st.one_of(st.none(), st.sampled_from(["cpu", "cuda", "cuda:0", "tpu", ""])))
def test_bench_presets_and_device(presets, device):
    args = ["--presets", *presets] + (["--device", device] if device is not None else [])
    code, err = _bench(args)
    assert "Traceback" not in err
    names = [p.strip() for item in presets for p in item.split(",") if p.strip()]
    good_presets = all(n in ("balanced", "fast", "quality", "off") for n in names)
    good_device = device in (None, "cpu") or (device.startswith("cuda") and torch.cuda.is_available())
    if good_presets and good_device and not any(p.startswith("-") for p in presets):
        assert code == "valid", (args, err)
    elif not good_presets or not good_device:
        assert code == 2, (args, code, err)
