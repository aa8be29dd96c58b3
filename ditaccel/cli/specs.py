"""Parsing of ``--methods`` / ``--presets`` into runnable variants.

``--methods StepCache:interval=3,warmup_steps=1 TaylorSeer`` : method config name (with or
without the ``Config`` suffix, any case, ``_``/``-`` ignored), then ``:`` and comma-separated
``key=value`` options. Values are Python literals (``3``, ``0.1``, ``True``, ``None``, ``(0,4)``),
dtype names (``float16``, ``bfloat16``) or else plain strings.
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..config import MethodConfig, apply_function_for, check_known_fields, preset_description, preset_names, registered_methods
from ..errors import ConfigError
from .errors import UsageError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

EXAMPLE = "e.g. --methods StepCache:interval=3,warmup_steps=1"


@dataclass
class Variant:
    """One thing the bench runs: the full-compute baseline, a ditaccel preset/method list, or a peer."""

    label: str
    kind: str  # "baseline" | "preset" | "method" | "peer"
    configs: Any = None  # preset name or list of MethodConfig for ditaccel
    peer: Any = None  # a peers.Peer
    spec: str = ""


def _norm(name: str) -> str:
    n = name.lower().replace("_", "").replace("-", "")
    return n[:-6] if n.endswith("config") else n


def all_method_configs() -> dict[str, type]:
    """Every MethodConfig subclass known to ditaccel (registered or not), by class name."""
    from .. import methods  # noqa: F401,PLC0415  (imports every config)

    out: dict[str, type] = {}
    stack = list(MethodConfig.__subclasses__())
    while stack:
        cls = stack.pop()
        out[cls.__name__] = cls
        stack.extend(cls.__subclasses__())
    return out


def method_status() -> list[tuple[str, bool, str]]:
    """(method name, available, first doc line) for every known method config."""
    registered = registered_methods()
    rows = []
    for name, cls in sorted(all_method_configs().items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append((name.removesuffix("Config"), name in registered, doc))
    return rows


def parse_value(text: str) -> Any:
    if text.lower() in _DTYPES:
        return _DTYPES[text.lower()]
    if text.startswith("torch.") and text[6:].lower() in _DTYPES:
        return _DTYPES[text[6:].lower()]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_method(spec: str) -> Variant:
    name, _, opts = spec.partition(":")
    name = name.strip()
    known = all_method_configs()
    by_norm = {_norm(n): n for n in known}
    available = sorted(n.removesuffix("Config") for n in registered_methods())
    if not name or _norm(name) not in by_norm:
        close = difflib.get_close_matches(name, [n.removesuffix("Config") for n in known], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"--methods: unknown method {name!r} in {spec!r}.{hint} Expected one of the available "
                         f"methods {available} ({EXAMPLE}); `ditaccel info` lists them all.")
    cls = known[by_norm[_norm(name)]]
    overrides: dict[str, Any] = {}
    if opts.strip():
        field_names = sorted(f.name for f in fields(cls))
        for item in opts.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise UsageError(f"--methods: bad option {item!r} in {spec!r}: expected key=value "
                                 f"with key one of {field_names} ({EXAMPLE}).")
            overrides[key] = parse_value(value.strip())
    try:
        check_known_fields(cls, overrides)
        config = cls(**overrides)
        apply_function_for(config)
    except ConfigError as exc:
        raise UsageError(f"--methods {spec!r}: {exc}") from exc
    except TypeError as exc:
        raise UsageError(f"--methods {spec!r}: {exc}") from exc
    label = config.method_name + (":" + opts.strip() if opts.strip() else "")
    return Variant(label=label, kind="method", configs=[config], spec=spec)


def parse_methods(items: list[str] | None) -> list[Variant]:
    return [parse_method(s) for s in (items or [])]


def parse_presets(items: list[str] | None) -> list[Variant]:
    out = []
    names = preset_names()
    for item in items or []:
        for name in [p.strip() for p in item.split(",") if p.strip()]:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise UsageError(f"--presets: unknown preset {name!r}.{hint} Expected one of {names} "
                                 "(comma- or space-separated, e.g. --presets balanced fast).")
            out.append(Variant(label=f"preset:{name}", kind="preset", configs=name, spec=name))
    return out


def preset_rows() -> list[tuple[str, str]]:
    return [(n, preset_description(n)) for n in preset_names()]
