"""Configs of the methods whose implementations live in their own modules.

Each is a frozen, validated dataclass; ``register_method`` in the method's module maps it to its
apply function. A config whose method is not registered yet fails at ``enable_acceleration`` with
an error that says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MethodConfig, check_choice, check_float, check_int
from ..errors import ConfigError, describe

_CACHE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)


def _check_block_range(name: str, field: str, value) -> None:
    if value is None:
        return
    if (not isinstance(value, tuple) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{name}.{field} must be a (start, stop) tuple of block indices, got {describe(value)}.")
    if not 0 <= value[0] < value[1]:
        raise ConfigError(f"{name}.{field} must satisfy 0 <= start < stop, got {value}.")


def _check_bool(name: str, field: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}.{field} must be True or False, got {describe(value)}.")


def _check_dtype(name: str, value) -> None:
    if value not in _CACHE_DTYPES:
        raise ConfigError(f"{name}.cache_dtype must be one of None, torch.float32, torch.float16, torch.bfloat16; "
                          f"got {describe(value)}. Use None to keep caches in the model's dtype.")


@dataclass(frozen=True)
class DeltaCacheConfig(MethodConfig):
    """Δ-DiT: cache Δ = output − input of a block range; rear blocks before ``boundary_step``, front after.

    Block ranges are ``(start, stop)`` indices over all blocks in execution order and must lie inside
    one segment (``adapter.segments()``); by default the largest segment is split into a front and a
    rear half. ``boundary_step`` defaults to 40% of the steps (rear range only when the step count is
    unknown). ``threshold`` > 0 turns on the adaptive controller: block 0 is computed every step as a
    probe and the relative L1 change of its residual since the last full step decides whether the
    active range is recomputed (``interval`` is then unused; ``max_consecutive_cached`` caps runs).
    """

    interval: int = 2
    boundary_step: int | None = None  # default: 40% of the steps
    front_blocks: tuple[int, int] | None = None  # default from the adapter
    rear_blocks: tuple[int, int] | None = None
    warmup_steps: int = 2
    final_steps: int = 1
    threshold: float = 0.0
    max_consecutive_cached: int = 4
    uncond_follows_cond: bool = True
    cache_dtype: torch.dtype | None = None

    def validate(self) -> None:
        n = type(self).__name__
        check_int(n, "interval", self.interval, minimum=1, maximum=1000)
        if self.boundary_step is not None:
            check_int(n, "boundary_step", self.boundary_step, minimum=0)
        _check_block_range(n, "front_blocks", self.front_blocks)
        _check_block_range(n, "rear_blocks", self.rear_blocks)
        check_int(n, "warmup_steps", self.warmup_steps, minimum=0)
        check_int(n, "final_steps", self.final_steps, minimum=0)
        check_float(n, "threshold", self.threshold, minimum=0.0)
        check_int(n, "max_consecutive_cached", self.max_consecutive_cached, minimum=1)
        _check_bool(n, "uncond_follows_cond", self.uncond_follows_cond)
        _check_dtype(n, self.cache_dtype)


@dataclass(frozen=True)
class TaylorSeerConfig(MethodConfig):
    """TaylorSeer: full compute every ``interval`` steps, Taylor forecast of module outputs in between.

    ``order`` is the highest finite difference kept (0 = plain reuse). ``granularity="module"``
    forecasts the attention and MLP outputs of each block (``adapter.compute_modules``; the block's
    norms, gates and residual adds still run); blocks without a separate MLP module (FLUX single
    blocks) are forecast whole, as in the paper's FLUX code. ``"block"`` forecasts the residual
    (output − input streams) of each run of blocks and skips the blocks entirely. ``formula``:
    ``"newton"`` (interpolating polynomial over the actual full steps, exact for polynomials of
    degree ≤ order) or ``"taylor"`` (the paper's Σ d_i·k^i form). Adaptive schedules:
    ``refresh_tolerance`` > 0 — at each full step the forecast of that step is compared with what was
    computed (relative L1 over all units, no extra compute), giving the forecast's error per step of
    distance; each later step is charged the error its forecast is expected to have, and the next full
    step comes when the charges add up to the tolerance or after ``max_consecutive_cached`` cached
    steps (``interval`` until the first measurement); ``threshold`` > 0 — block 0 is computed every
    step and the error of its own Taylor forecast decides that step. At most one of the two.
    """

    interval: int = 4
    order: int = 1
    warmup_steps: int = 3
    final_steps: int = 1
    granularity: str = "module"  # "module" (attention/MLP outputs before the gate) or "block"
    threshold: float = 0.0  # > 0: probe-block controller on the forecast error
    refresh_tolerance: float = 0.0  # > 0: adaptive; full step when expected forecast errors add up to this
    max_consecutive_cached: int = 6
    formula: str = "newton"
    uncond_follows_cond: bool = True
    cache_dtype: torch.dtype | None = None

    def validate(self) -> None:
        n = type(self).__name__
        check_int(n, "interval", self.interval, minimum=1, maximum=1000)
        check_int(n, "order", self.order, minimum=0, maximum=4)
        check_int(n, "warmup_steps", self.warmup_steps, minimum=0)
        check_int(n, "final_steps", self.final_steps, minimum=0)
        check_choice(n, "granularity", self.granularity, ("module", "block"))
        check_float(n, "threshold", self.threshold, minimum=0.0)
        check_float(n, "refresh_tolerance", self.refresh_tolerance, minimum=0.0)
        if self.threshold > 0 and self.refresh_tolerance > 0:
            raise ConfigError(f"{n}: threshold={self.threshold} (probe schedule) and refresh_tolerance="
                              f"{self.refresh_tolerance} (refresh-error schedule) are two adaptive schedules; "
                              f"set one of them and leave the other at 0.")
        check_int(n, "max_consecutive_cached", self.max_consecutive_cached, minimum=1)
        check_choice(n, "formula", self.formula, ("newton", "taylor"))
        _check_bool(n, "uncond_follows_cond", self.uncond_follows_cond)
        _check_dtype(n, self.cache_dtype)


# HarmoniCaConfig, SVG2Config, RettentionConfig and CLEARConfig live in their method modules (harmonica.py,
# svg2.py, rettention.py, clear.py) and are re-exported from ditaccel.methods.
