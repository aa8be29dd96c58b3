"""Presets, named by intent. Each maps to a list of method configs.

All three are TaylorSeer (order 1) forecasting the residual of each run of blocks
(``granularity="block"``) on the refresh-error schedule (:mod:`ditaccel.methods.adaptive`): at
every full step the forecast of that step is compared with what was computed, and the next full
step comes when the forecast errors expected since the last one add up to ``refresh_tolerance``.
The tolerance, not an interval, is what the presets set, so one preset spends its full steps where
a model's features move, at any step count. Block granularity and the schedule were chosen on the
trained reference models (``bench/caching.py``, decoded output against full compute): at the same
number of full steps the refresh-error schedule scored up to 3 dB above fixed intervals (ahead in 13
of 14 comparisons), and block granularity ran faster than per-module forecasting on flux_tiny and
scored 3 dB higher on wan_tiny. Two warm-up steps suffice
for ``balanced`` and ``fast``: until its first measurement the schedule forecasts from steps 0 and 1
every ``interval`` (4) steps, and errors this early are mostly corrected by the later steps (same
work, 1.3-5 dB higher than with 3 warm-up steps). Measured (full steps / PSNR; see docs/benchmarks.md
for speed):

* quality  — tolerance 0.3, 3 warm-up steps: flux_tiny 28 steps 10 / 43.3 dB, 50 steps 13 / 45.8 dB;
  wan_tiny 10 / 40.7 dB;
* balanced — tolerance 0.6, 2 warm-up steps: 8 / 40.4 dB, 10 / 37.2 dB; wan_tiny 8 / 35.8 dB;
* fast     — tolerance 2.0, 2 warm-up steps: 6 / 31.0 dB, 8 / 35.6 dB; wan_tiny 6 / 30.9 dB (tolerance
  1.5 computed 7 / 35.1 dB, 8 / 36.3 dB, 7 / 32.0 dB; larger ones kept 6 / 8 / 6 steps at lower PSNR:
  ``bench/refresh_sweep.py``).

Speed against diffusers' and cache-dit's caches: docs/benchmarks.md.
"""

from __future__ import annotations

from .config import register_preset
from .methods.configs import TaylorSeerConfig
from .methods.step_cache import StepCacheConfig


def _taylorseer(tolerance: float, warmup_steps: int) -> list:
    return [TaylorSeerConfig(granularity="block", order=1, refresh_tolerance=tolerance, interval=4,
                             warmup_steps=warmup_steps, final_steps=1, max_consecutive_cached=10)]


def _none():
    return [StepCacheConfig(interval=1)]


register_preset("quality", lambda: _taylorseer(0.3, warmup_steps=3),
                "Smallest fidelity loss: TaylorSeer (block residuals, order 1), refresh-error schedule, tolerance 0.3.")
register_preset("balanced", lambda: _taylorseer(0.6, warmup_steps=2),
                "Default: TaylorSeer (block residuals, order 1), refresh-error schedule, tolerance 0.6.")
register_preset("fast", lambda: _taylorseer(2.0, warmup_steps=2),
                "Most speed: TaylorSeer (block residuals, order 1), refresh-error schedule, tolerance 2.0.")
register_preset("off", _none, "Hooks attached, nothing skipped (measures hook overhead; output bit-identical).")
