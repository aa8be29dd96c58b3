"""Node inputs generated from a method's config dataclass.

For every field of a ``MethodConfig`` subclass this finds the widget kind (from the type hint),
the default (from the dataclass), the range and choices (from ``dataclasses.field(metadata=...)``
when given, else read from the ``check_int`` / ``check_float`` / ``check_choice`` calls in the
class's ``validate``), and the tooltip (metadata ``"help"``, else the comment on the field's line,
else the class docstring's name for it). Nothing here imports ComfyUI; :mod:`.nodes` turns the
:class:`FieldSpec` list into ``comfy_api.latest.io`` inputs, and :func:`config_from_inputs` turns
widget values back into the config (the config's own validation has the last word).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any

import torch

from ...config import MethodConfig
from ...errors import ConfigError

INT, FLOAT, BOOL, STRING, CHOICE, OPTIONAL_INT, OPTIONAL_FLOAT, INT_TUPLE, DTYPE = (
    "int", "float", "bool", "string", "choice", "optional_int", "optional_float", "int_tuple", "dtype")

AUTO = "auto"
_DTYPES = {AUTO: None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INT_LIMIT = 2**31 - 1
DEFAULT_INT_MAX = 100_000
DEFAULT_FLOAT_MAX = 1_000_000.0


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str
    default: Any  # the widget's default (sentinels for None: -1, "", "auto")
    minimum: float | int | None = None
    maximum: float | int | None = None
    min_inclusive: bool = True
    choices: tuple = ()
    tooltip: str = ""


_MISSING = object()


def _value_of(node: ast.AST, namespace: dict) -> Any:
    """A literal, or a module-level / class-level constant named in ``validate`` (e.g. ``MODES``)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name):
        return namespace.get(node.id, _MISSING)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
        return namespace.get(node.attr, _MISSING)
    return _MISSING


def _validate_ranges(cls: type) -> dict[str, dict[str, Any]]:
    """{field: {"minimum", "maximum", "min_inclusive", "choices"}} read from ``cls.validate``."""
    out: dict[str, dict[str, Any]] = {}
    for klass in reversed(cls.__mro__):
        validate = klass.__dict__.get("validate")
        if validate is None:
            continue
        namespace = dict(getattr(validate, "__globals__", {}))
        namespace.update({k: v for k, v in vars(klass).items() if not k.startswith("__")})
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(validate)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            fname = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if fname not in ("check_int", "check_float", "check_choice") or len(node.args) < 2:
                continue
            try:
                field_name = ast.literal_eval(node.args[1])
            except ValueError:
                continue
            info = out.setdefault(field_name, {})
            positional = {"check_int": ("minimum", "maximum"), "check_float": ("minimum", "maximum", "min_inclusive"),
                          "check_choice": ("choices",)}[fname]
            values = list(zip(positional, node.args[3:])) + [(k.arg, k.value) for k in node.keywords]
            for key, value in values:
                resolved = _value_of(value, namespace)
                if resolved is not _MISSING:
                    info[key] = resolved
    return out


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comments`` on the field lines of the class body."""
    out: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return out
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
    return out


def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _kind_of(tp) -> str:
    base, optional = _unwrap_optional(tp)
    if base is bool:
        return BOOL
    if base is int:
        return OPTIONAL_INT if optional else INT
    if base is float:
        return OPTIONAL_FLOAT if optional else FLOAT
    if base is str:
        return STRING
    if base is torch.dtype:
        return DTYPE
    if typing.get_origin(base) is tuple and all(a in (int, Ellipsis) for a in typing.get_args(base)):
        return INT_TUPLE
    raise TypeError(f"no widget for a config field of type {tp!r}")


def field_specs(cls: type[MethodConfig]) -> list[FieldSpec]:
    """The inputs of ``cls``'s advanced node, one per dataclass field, in field order."""
    hints = typing.get_type_hints(cls)
    ranges = _validate_ranges(cls)
    comments = _field_comments(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = dict(f.metadata)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        kind = _kind_of(hints[f.name])
        r = ranges.get(f.name, {})
        minimum = meta.get("min", r.get("minimum"))
        maximum = meta.get("max", r.get("maximum"))
        min_inclusive = meta.get("min_inclusive", r.get("min_inclusive", True))
        choices = tuple(meta.get("choices", r.get("choices", ())))
        help_text = meta.get("help") or meta.get("tooltip") or comments.get(f.name, "")
        if kind == STRING and choices:
            kind = CHOICE
        if kind in (OPTIONAL_INT, OPTIONAL_FLOAT):
            widget_default = (-1 if kind == OPTIONAL_INT else -1.0) if default is None else default
            help_text = (help_text + "; " if help_text else "") + "-1 = automatic (None)"
        elif kind == INT_TUPLE:
            widget_default = "" if not default else ",".join(str(v) for v in default)
            help_text = (help_text + "; " if help_text else "") + "comma-separated ints, empty = " + (
                "automatic (None)" if default is None else "none")
        elif kind == DTYPE:
            widget_default = next(k for k, v in _DTYPES.items() if v == default)
            choices = tuple(_DTYPES)
            help_text = help_text or "dtype of the cached tensors; auto = the model's"
        else:
            widget_default = default
        if not help_text:
            help_text = f"{cls.__name__}.{f.name}"
        specs.append(FieldSpec(f.name, kind, widget_default, minimum, maximum, bool(min_inclusive), choices,
                               f"{help_text} (default {default!r})"))
    return specs


def _parse_int_tuple(name: str, text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated integers such as '0,8', got {text!r}.") from None


def config_from_inputs(cls: type[MethodConfig], values: dict[str, Any]) -> MethodConfig:
    """Build ``cls`` from node widget values (sentinels mapped back to None); validated by ``cls``."""
    kwargs = {}
    for spec in field_specs(cls):
        if spec.name not in values:
            continue
        v = values[spec.name]
        if spec.kind == OPTIONAL_INT:
            v = None if v is None or int(v) < 0 else int(v)
        elif spec.kind == INT:
            v = int(v)
        elif spec.kind == OPTIONAL_FLOAT:
            v = None if v is None or float(v) < 0 else float(v)
        elif spec.kind == FLOAT:
            v = float(v)
        elif spec.kind == BOOL:
            v = bool(v)
        elif spec.kind == INT_TUPLE:
            parsed = _parse_int_tuple(spec.name, v or "")
            field_default = next(f.default for f in dataclasses.fields(cls) if f.name == spec.name)
            v = (None if field_default is None else ()) if not parsed else parsed
        elif spec.kind == DTYPE:
            if v not in _DTYPES:
                raise ConfigError(f"{spec.name} must be one of {list(_DTYPES)}, got {v!r}.")
            v = _DTYPES[v]
        kwargs[spec.name] = v
    return cls(**kwargs)
