"""Presets, named by intent. Each maps to a list of method configs."""

from __future__ import annotations

from .config import register_preset
from .methods.step_cache import StepCacheConfig


def _quality():
    return [StepCacheConfig(interval=2, warmup_steps=4, final_steps=2)]


def _balanced():
    return [StepCacheConfig(interval=2, warmup_steps=2, final_steps=1)]


def _fast():
    return [StepCacheConfig(interval=3, warmup_steps=2, final_steps=1)]


def _none():
    return [StepCacheConfig(interval=1)]


register_preset("quality", _quality, "Smallest fidelity loss: block-stack cache every 2nd step after 4 warm-up steps.")
register_preset("balanced", _balanced, "Default: block-stack cache every 2nd step after 2 warm-up steps.")
register_preset("fast", _fast, "Most speed: block-stack cache, 2 of every 3 steps reused.")
register_preset("off", _none, "Hooks attached, nothing skipped (measures hook overhead; output bit-identical).")
