"""Δ-Cache (Δ-DiT, Chen et al. 2024, arXiv:2406.01125): cache Δ = output − input of a block range.

Early steps shape the outline and late steps refine detail, so before the boundary step b the
*rear* blocks are cached and from b on the *front* blocks. On a cached step the active range's
blocks are not run: its first block returns input + Δ (per stream) and the others pass through.
The active range is recomputed every ``interval`` steps (fixed schedule) or when the adaptive
probe says so (``threshold`` > 0, see :mod:`ditaccel.methods.adaptive`). The inactive range always
runs. Ranges are sub-ranges of one segment (:func:`ditaccel.hooks.block_range.range_entries`).
"""

from __future__ import annotations

from ..config import register_method
from ..errors import ConfigError
from ..hooks.block_range import range_entries, segment_spans
from ..hooks.method import STEP_CACHE, InstalledMethod
from ..hooks.probe import BlockProbe
from ..hooks.segment_cache import SegmentCache
from .adaptive import CACHE, COMPUTE, StepController
from .configs import DeltaCacheConfig

__all__ = ["DeltaCacheConfig", "DeltaCache", "default_ranges"]


def default_ranges(adapter, adaptive: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """Front and rear halves of the largest segment (block 0 left out when it is the adaptive probe).

    A segment of a single usable block gives the same range for both stages.
    """
    spans = segment_spans(adapter.segments())
    if adaptive:
        spans = [(max(lo, 1), hi) for lo, hi in spans]
    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    if hi - lo < 1:
        raise ConfigError(
            "DeltaCache with threshold > 0 computes block 0 every step as its probe, and this model has no other "
            f"block to cache (segments {segment_spans(adapter.segments())}). Use threshold=0."
        )
    if hi - lo == 1:
        return (lo, hi), (lo, hi)
    mid = lo + (hi - lo) // 2
    return (lo, mid), (mid, hi)


class DeltaCache(InstalledMethod):
    def __init__(self, engine, config: DeltaCacheConfig):
        super().__init__(engine, config)
        adapter = engine.adapter
        segments = adapter.segments()
        adaptive = config.threshold > 0
        d_front, d_rear = (None, None)
        if config.front_blocks is None or config.rear_blocks is None:
            d_front, d_rear = default_ranges(adapter, adaptive)
        self.front_range = config.front_blocks or d_front
        self.rear_range = config.rear_blocks or d_rear
        for label, rng in (("front_blocks", self.front_range), ("rear_blocks", self.rear_range)):
            entries = range_entries(segments, rng[0], rng[1], what=f"DeltaCacheConfig.{label}")
            if adaptive and rng[0] == 0:
                raise ConfigError(
                    f"DeltaCacheConfig.{label}={rng} includes block 0, which the adaptive controller "
                    "(threshold > 0) computes every step as its probe. Start the range at 1 or use threshold=0."
                )
            del entries
        self.front = self._segment(segments, self.front_range, "front")
        self.rear = self._segment(segments, self.rear_range, "rear")
        self.active: SegmentCache = self.rear
        self.controller = StepController(
            self, interval=config.interval, warmup_steps=config.warmup_steps, final_steps=config.final_steps,
            threshold=config.threshold, max_consecutive_cached=config.max_consecutive_cached,
            uncond_follows_cond=config.uncond_follows_cond, probe_order=0, cache_dtype=config.cache_dtype,
        )
        self.probe = None
        if adaptive:
            name, block, io = adapter.blocks()[0]
            self.probe = BlockProbe(name, block, io, "delta_cache.probe", self.controller.on_probe)

    def _segment(self, segments, rng, label) -> SegmentCache:
        entries = range_entries(segments, rng[0], rng[1])
        seg = SegmentCache(entries, f"delta_cache.{label}", self._decide, lambda: False, self._count,
                           cache_dtype=self.config.cache_dtype)
        seg.want_residual = lambda seg=seg: seg is self.active and (self.config.interval > 1 or self.config.threshold > 0)
        return seg

    def boundary(self, total: int | None) -> int | None:
        if self.config.boundary_step is not None:
            return self.config.boundary_step
        return None if total is None else int(round(0.4 * total))

    # -- engine interface ------------------------------------------------------------------------
    def claims(self):
        seen = {}
        for seg in (self.front, self.rear):
            for name, block, _ in seg.entries:
                seen[id(block)] = (STEP_CACHE, block, name)
        if self.probe is not None:
            seen[id(self.probe.block)] = (STEP_CACHE, self.probe.block, self.probe.name)
        return list(seen.values())

    def parts(self):
        return [self.front, self.rear] + ([self.probe] if self.probe is not None else [])

    def reset(self) -> None:
        self.front.reset()
        self.rear.reset()
        self.controller.reset()

    def begin_call(self, call) -> None:
        info = call.info
        b = self.boundary(info.total_steps)
        self.active = self.rear if (b is None or info.step < b) else self.front
        for seg in (self.front, self.rear):
            seg.branch = info.branch
        self.controller.begin_call(info, ready=self.active.has_residual() and not getattr(call, "force_full", False))

    def end_call(self, call, output):
        self.controller.end_call()
        return output

    # -- segment callbacks -------------------------------------------------------------------------
    def _decide(self, seg: SegmentCache, h, e) -> bool:
        if seg is not self.active or self.controller.mode != CACHE:
            if seg is self.active and self.controller.mode != CACHE:
                self.controller.mode = COMPUTE  # a pending decision whose probe did not run
            return True
        if not seg.has_residual():
            self.controller.mode = COMPUTE
            return True
        if self.engine.sync.agree(not seg.residual_is_finite()):  # data-dependent: agreed across ranks
            self.counters["nonfinite_fallbacks"] += 1
            self.warn_once("nonfinite", "a cached residual was not finite; computed the blocks in full instead.")
            self.controller.mode = COMPUTE
            return True
        return False

    def _count(self, seg: SegmentCache, computed: bool) -> None:
        self.count_segment(seg, computed)

    def bytes_held(self) -> int:
        return self.front.bytes_held() + self.rear.bytes_held() + self.controller.bytes_held()

    def stats(self):
        out = super().stats()
        out.update(front_blocks=list(self.front_range), rear_blocks=list(self.rear_range))
        out.update(self.controller.probe_error_stats())
        return out


@register_method(DeltaCacheConfig)
def apply_delta_cache(engine, config: DeltaCacheConfig) -> DeltaCache:
    return DeltaCache(engine, config)
