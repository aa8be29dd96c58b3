"""Plain step cache: reuse the residual of the whole block stack on a fixed schedule.

After ``warmup_steps`` computed steps, the block stack is computed every ``interval`` steps and
its residual (output − input, per stream) is added back on the steps in between; the last
``final_steps`` steps are always computed. ``interval=1`` never skips and is bit-identical to
the plain model. The first method through the whole engine; the stronger caches (Δ-Cache,
TaylorSeer, adaptive) build on the same segment plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, check_int, register_method
from ..hooks.method import STEP_CACHE, InstalledMethod
from ..hooks.segment_cache import SegmentCache


@dataclass(frozen=True)
class StepCacheConfig(MethodConfig):
    """Reuse the block-stack residual every ``interval`` steps after ``warmup_steps``."""

    interval: int = 2
    warmup_steps: int = 2
    final_steps: int = 1

    def validate(self) -> None:
        name = type(self).__name__
        check_int(name, "interval", self.interval, minimum=1, maximum=1000)
        check_int(name, "warmup_steps", self.warmup_steps, minimum=0)
        check_int(name, "final_steps", self.final_steps, minimum=0)


def is_compute_step(step: int, total: int | None, interval: int, warmup: int, final: int) -> bool:
    """The fixed schedule: warm-up, then one computed step every ``interval``, then the tail."""
    if step < warmup or interval == 1:
        return True
    if total is not None and step >= total - final:
        return True
    return (step - warmup) % interval == 0


class StepCache(InstalledMethod):
    def __init__(self, engine, config: StepCacheConfig):
        super().__init__(engine, config)
        self.segments = [
            SegmentCache(entries, f"step_cache.{i}", self._decide, self._want_residual, self._count)
            for i, entries in enumerate(engine.adapter.segments())
        ]
        self._compute_now = True

    def claims(self):
        return [(STEP_CACHE, block, name) for seg in self.segments for name, block, _ in seg.entries]

    def parts(self):
        return self.segments

    def reset(self) -> None:
        for seg in self.segments:
            seg.reset()

    def begin_call(self, call) -> None:
        info = call.info
        c = self.config
        self._compute_now = call.force_full or is_compute_step(info.step, info.total_steps, c.interval,
                                                               c.warmup_steps, c.final_steps)
        for seg in self.segments:
            seg.branch = info.branch

    def _decide(self, seg: SegmentCache, h, e) -> bool:
        if self._compute_now or not seg.has_residual():
            return True
        if self.engine.sync.agree(not seg.residual_is_finite()):  # data-dependent: agreed across ranks
            self.counters["nonfinite_fallbacks"] += 1
            self.warn_once("nonfinite", "a cached residual was not finite; computed the step in full instead.")
            return True
        return False

    def _want_residual(self) -> bool:
        return self.config.interval > 1

    def _count(self, seg: SegmentCache, computed: bool) -> None:
        self.count_segment(seg, computed)

    def bytes_held(self) -> int:
        return sum(seg.bytes_held() for seg in self.segments)


@register_method(StepCacheConfig)
def apply_step_cache(engine, config: StepCacheConfig) -> StepCache:
    return StepCache(engine, config)
