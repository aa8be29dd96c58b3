"""Presets, named by intent. Each maps to a list of method configs.

Tuned on the trained reference model ``flux_tiny`` (FLUX architecture, 28 and 50 Euler steps,
PSNR of the decoded images against full compute; ``bench/caching.py``): TaylorSeer forecasting
the attention/MLP outputs with order 1 gave the most speed per dB of the methods measured
(plain step cache, Δ-Cache, TaylorSeer module/block, fixed/adaptive). Measured there:

* quality  — interval 3: 42.4 dB at 28 steps, 2.3x fewer transformer FLOPs;
* balanced — interval 4: 37.5 dB (28 steps) / 41.4 dB (50 steps), 2.7x / 3.3x fewer FLOPs;
* fast     — interval 6: 33.5 dB (28 steps) / 31.3 dB (50 steps), 3.4x / 4.4x fewer FLOPs.
"""

from __future__ import annotations

from .config import register_preset
from .methods.configs import TaylorSeerConfig
from .methods.step_cache import StepCacheConfig


def _quality():
    return [TaylorSeerConfig(interval=3, order=1, warmup_steps=3, final_steps=1, granularity="module")]


def _balanced():
    return [TaylorSeerConfig(interval=4, order=1, warmup_steps=3, final_steps=1, granularity="module")]


def _fast():
    return [TaylorSeerConfig(interval=6, order=1, warmup_steps=3, final_steps=1, granularity="module")]


def _none():
    return [StepCacheConfig(interval=1)]


register_preset("quality", _quality, "Smallest fidelity loss: TaylorSeer (attention/MLP outputs, order 1), full step every 3rd.")
register_preset("balanced", _balanced, "Default: TaylorSeer (attention/MLP outputs, order 1), full step every 4th.")
register_preset("fast", _fast, "Most speed: TaylorSeer (attention/MLP outputs, order 1), full step every 6th.")
register_preset("off", _none, "Hooks attached, nothing skipped (measures hook overhead; output bit-identical).")
