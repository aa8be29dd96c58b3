"""Presets, named by intent. Each maps to a list of method configs.

All three are TaylorSeer (order 1) forecasting the residual of each run of blocks
(``granularity="block"``) on the refresh-error schedule (:mod:`ditaccel.methods.adaptive`): at
every full step the forecast of that step is compared with what was computed, and the next full
step comes when the forecast errors expected since the last one add up to ``refresh_tolerance``.
The tolerance, not an interval, is what the presets set, so one preset spends its full steps where
a model's features move, at any step count. Block granularity and the schedule were chosen on the
trained reference models (``bench/caching.py``, decoded output against full compute): at the same
number of full steps the refresh-error schedule scored 0.1-2.6 dB above fixed intervals, and block
granularity ran faster than per-module forecasting at equal PSNR on flux_tiny and scored 3 dB higher
on wan_tiny. Measured (full steps / PSNR; see docs/benchmarks.md for speed):

* quality  — tolerance 0.3: flux_tiny 28 steps 10 / 43.3 dB, 50 steps 13 / 45.8 dB; wan_tiny 10 / 40.7 dB;
* balanced — tolerance 0.7: 8 / 36.6 dB, 10 / 34.9 dB; wan_tiny 9 / 35.2 dB;
* fast     — tolerance 1.2: see docs/benchmarks.md.
"""

from __future__ import annotations

from .config import register_preset
from .methods.configs import TaylorSeerConfig
from .methods.step_cache import StepCacheConfig


def _taylorseer(tolerance: float) -> list:
    return [TaylorSeerConfig(granularity="block", order=1, refresh_tolerance=tolerance, interval=4, warmup_steps=3,
                             final_steps=1, max_consecutive_cached=10)]


def _none():
    return [StepCacheConfig(interval=1)]


register_preset("quality", lambda: _taylorseer(0.3),
                "Smallest fidelity loss: TaylorSeer (block residuals, order 1), refresh-error schedule, tolerance 0.3.")
register_preset("balanced", lambda: _taylorseer(0.7),
                "Default: TaylorSeer (block residuals, order 1), refresh-error schedule, tolerance 0.7.")
register_preset("fast", lambda: _taylorseer(1.2),
                "Most speed: TaylorSeer (block residuals, order 1), refresh-error schedule, tolerance 1.2.")
register_preset("off", _none, "Hooks attached, nothing skipped (measures hook overhead; output bit-identical).")
