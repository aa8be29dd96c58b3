"""Method configurations, presets and the registry from config type to apply function.

Modelled on torchao's ``quantize_(model, config)``: every method has a frozen, validated dataclass,
and ``register_method(ConfigType)`` maps that type to the function that installs it. No
isinstance chains: ``apply_function_for(config)`` looks the type up.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

from .errors import ConfigError, describe


@dataclass(frozen=True)
class MethodConfig:
    """Base class of every method config. Subclasses are frozen dataclasses that validate themselves."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        pass

    @property
    def method_name(self) -> str:
        return type(self).__name__.removesuffix("Config")

    def replace(self, **changes: Any) -> "MethodConfig":
        """A copy with some fields changed; unknown field names get a clear error."""
        check_known_fields(type(self), changes)
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------
# validation helpers (used by every config's validate())


def check_int(cls_name: str, name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{cls_name}.{name} must be an int, got {describe(value)}.")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{cls_name}.{name} must be >= {minimum}, got {value}. Use a value of at least {minimum}.")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{cls_name}.{name} must be <= {maximum}, got {value}. Use a value of at most {maximum}.")


def check_float(
    cls_name: str, name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
    min_inclusive: bool = True,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{cls_name}.{name} must be a number, got {describe(value)}.")
    span = f" in [{minimum}, {maximum}]" if minimum is not None and maximum is not None else ""
    if value != value:
        raise ConfigError(f"{cls_name}.{name} must be a number{span}, got NaN. Pass a finite number.")
    if minimum is not None:
        bad = value < minimum if min_inclusive else value <= minimum
        if bad:
            op = ">=" if min_inclusive else ">"
            raise ConfigError(f"{cls_name}.{name} must be {op} {minimum}, got {value}. Use a value {op} {minimum}.")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{cls_name}.{name} must be <= {maximum}, got {value}. Use a value of at most {maximum}.")


def check_choice(cls_name: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{cls_name}.{name} must be one of {list(choices)}, got {describe(value)}.")


def check_known_fields(cls: type, overrides: dict[str, Any]) -> None:
    known = {f.name for f in fields(cls)}
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{cls.__name__} has no option {key!r}.{hint} Known options: {sorted(known)}."
            )


# ---------------------------------------------------------------------------------------------
# registry: config type -> apply function

MethodApplyFn = Callable[..., Any]
_METHODS: dict[type, MethodApplyFn] = {}


def register_method(config_type: type) -> Callable[[MethodApplyFn], MethodApplyFn]:
    """Decorator: ``@register_method(MyConfig) def apply(engine, config): ...``."""
    if not (isinstance(config_type, type) and issubclass(config_type, MethodConfig)):
        raise TypeError(f"register_method expects a MethodConfig subclass, got {describe(config_type)}.")

    def decorator(fn: MethodApplyFn) -> MethodApplyFn:
        _METHODS[config_type] = fn
        return fn

    return decorator


def apply_function_for(config: MethodConfig) -> MethodApplyFn:
    fn = _METHODS.get(type(config))
    if fn is None:
        names = sorted(t.__name__ for t in _METHODS)
        raise ConfigError(
            f"{type(config).__name__} is not available in this version of ditaccel: no apply function is "
            f"registered for it. Methods available now: {names}. Use one of those, or register an "
            "implementation with ditaccel.register_method(YourConfig)."
        )
    return fn


def registered_methods() -> dict[str, type]:
    return {t.__name__: t for t in _METHODS}


# ---------------------------------------------------------------------------------------------
# presets: intent name -> list of method configs (filled by ditaccel.presets at import time)

_PRESETS: dict[str, Callable[[], list[MethodConfig]]] = {}


def register_preset(name: str, factory: Callable[[], list[MethodConfig]], description: str = "") -> None:
    factory.__doc__ = description or factory.__doc__
    _PRESETS[name] = factory


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset_description(name: str) -> str:
    return (_PRESETS[name].__doc__ or "").strip()


def resolve_configs(config: Any, overrides: dict[str, Any]) -> list[MethodConfig]:
    """Turn the ``config`` argument of enable_acceleration (+ overrides) into a list of method configs.

    ``config`` may be a preset name, one MethodConfig, or a list/tuple of them. Overrides apply to
    the single method config they all name fields of; they are rejected when ambiguous or unknown.
    """
    if isinstance(config, str):
        if config not in _PRESETS:
            close = difflib.get_close_matches(config, preset_names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"Unknown preset {config!r}.{hint} Expected one of {preset_names()}, "
                "or a method config such as ditaccel.StepCacheConfig(...)."
            )
        configs = list(_PRESETS[config]())
    elif isinstance(config, MethodConfig):
        configs = [config]
    elif isinstance(config, (list, tuple)):
        if not config:
            raise ConfigError("config is an empty list. Pass at least one method config or a preset name.")
        configs = []
        for i, item in enumerate(config):
            if not isinstance(item, MethodConfig):
                raise ConfigError(
                    f"config[{i}] must be a method config (e.g. ditaccel.StepCacheConfig()), got {describe(item)}."
                )
            configs.append(item)
    elif isinstance(config, type) and issubclass(config, MethodConfig):
        raise ConfigError(
            f"config must be a method config instance, got the class {config.__name__}. "
            f"Call it: {config.__name__}() (with options, e.g. {config.__name__}(...))."
        )
    else:
        raise ConfigError(
            f"config must be a preset name ({preset_names()}), a method config, or a list of method configs; "
            f"got {describe(config)}."
        )
    if overrides:
        configs = _apply_overrides(configs, overrides)
    return configs


def _apply_overrides(configs: list[MethodConfig], overrides: dict[str, Any]) -> list[MethodConfig]:
    out = list(configs)
    for key, value in overrides.items():
        owners = [i for i, c in enumerate(out) if key in {f.name for f in fields(c)}]
        if not owners:
            known = sorted({f.name for c in out for f in fields(c)})
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"Unknown override {key!r} for methods {[c.method_name for c in out]}.{hint} "
                f"Known options: {known}."
            )
        if len(owners) > 1:
            raise ConfigError(
                f"Override {key!r} is ambiguous: methods {[out[i].method_name for i in owners]} all have it. "
                "Pass explicit method configs instead of a preset with overrides."
            )
        i = owners[0]
        out[i] = out[i].replace(**{key: value})
    return out
