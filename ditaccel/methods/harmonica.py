"""HarmoniCa (Huang et al., ICML 2025, arXiv:2410.01723): a learned step x block-group cache router.

A router (:mod:`ditaccel.methods.harmonica_router`) holds one logit per (denoising step, block
group); ``sigmoid(logit) > threshold`` computes the group at that step, otherwise the group is
skipped and its residual from the last step it was computed (per stream, per CFG branch) is added
back, through :class:`~ditaccel.hooks.segment_cache.SegmentCache`. Step 0 always computes, and a
group with nothing cached yet computes. With ``forecast=True`` a skipped group gets the Taylor
forecast of its residual over the steps where it was computed (TaylorSeer's divided-difference
series, :class:`~ditaccel.methods.taylor_series.TaylorSeries`, order ``forecast_order``) through
:class:`~ditaccel.hooks.block_range.ProvidedResidualSegment` instead of the plain reuse. Routers trained
with ``train-router --forecast-order k`` are trained for ``forecast=True, forecast_order=k`` (a warning
says so when they are used without forecasting).

Routers are trained with ``ditaccel train-router`` (:mod:`ditaccel.methods.harmonica_train`):
Step-Wise Denoising Training on the trajectory the cached model produces, with the
Image-Error Proxy-Guided Objective. See docs/harmonica.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MethodConfig, check_float, check_int, register_method
from ..errors import ConfigError, describe
from ..hooks.block_range import ProvidedResidualSegment, range_entries
from ..hooks.method import STEP_CACHE, InstalledMethod
from ..hooks.segment_cache import SegmentCache
from .harmonica_router import Router
from .taylor_series import TaylorSeries

__all__ = ["HarmoniCaConfig", "HarmoniCa", "apply_harmonica"]


@dataclass(frozen=True)
class HarmoniCaConfig(MethodConfig):
    """A learned step x block-group cache router (HarmoniCa), loaded from a ``.safetensors`` file.

    ``threshold``: a group computes at a step when ``sigmoid(logit) > threshold`` (the paper's
    0.1; ``train-router`` calibrates the router's speedup for the threshold it was trained with,
    also 0.1 by default, and stores it in the file). ``forecast``: on routed (skipped) steps forecast the group's residual with a
    TaylorSeer series of order ``forecast_order`` instead of re-using the last one.
    ``interpolate_steps``: allow a step count other than the router's (logits linearly interpolated
    over normalised time); otherwise another step count is an error.
    """

    router: str = ""
    threshold: float = 0.1
    forecast: bool = False
    forecast_order: int = 1
    interpolate_steps: bool = False

    def validate(self) -> None:
        n = type(self).__name__
        if not isinstance(self.router, str) or not self.router:
            raise ConfigError(f"{n}.router must be the path of a router .safetensors file, got {describe(self.router)}. "
                              "Train one with `ditaccel train-router`.")
        check_float(n, "threshold", self.threshold, minimum=0.0, maximum=1.0)
        for name in ("forecast", "interpolate_steps"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{n}.{name} must be True or False, got {describe(getattr(self, name))}.")
        check_int(n, "forecast_order", self.forecast_order, minimum=0, maximum=4)


class HarmoniCa(InstalledMethod):
    def __init__(self, engine, config: HarmoniCaConfig, router: Router | None = None):
        super().__init__(engine, config)
        adapter = engine.adapter
        self.router = router if router is not None else Router.load(config.router)
        self.router.check_model(adapter, repr(config.router))
        self.threshold = float(config.threshold)
        trained = (self.router.training or {}).get("settings") or {}
        trained_order = int(trained.get("forecast_order") or 0) if trained.get("ste") else 0
        if trained_order > 0 and not config.forecast:
            self.warn_once("trained_for_forecast",
                           f"router {config.router!r} was trained with forecasting on skipped groups (order "
                           f"{trained_order}); use HarmoniCaConfig(forecast=True, forecast_order={trained_order}) "
                           "for the quality it was trained for (plain reuse here).")
        segments = adapter.segments()
        self.groups = []
        for i, (lo, hi) in enumerate(self.router.groups):
            entries = range_entries(segments, lo, hi, what=f"HarmoniCa router group {i}")
            if config.forecast:
                seg = ProvidedResidualSegment(entries, f"harmonica.g{i}", self._decide, self._want_residual,
                                              self._count, self._provide, self._record)
            else:
                seg = SegmentCache(entries, f"harmonica.g{i}", self._decide, self._want_residual, self._count)
            self.groups.append(seg)
        self._index = {id(s): i for i, s in enumerate(self.groups)}
        self._schedules: dict[int, torch.Tensor] = {}
        self._row: torch.Tensor | None = None
        self._any_reuse = False
        self._step = 0
        self._branch = 0
        self.series: dict[tuple[int, int], TaylorSeries] = {}

    # -- schedule ------------------------------------------------------------------------------
    def schedule_for(self, total_steps: int | None) -> torch.Tensor:
        steps = self.router.steps if total_steps is None else int(total_steps)
        sched = self._schedules.get(steps)
        if sched is None:
            if total_steps is None:
                self.warn_once("steps", f"the step count of this generation is unknown; using the router's "
                                        f"{self.router.steps} steps.")
            router = self.router.for_steps(steps, interpolate=self.config.interpolate_steps)
            sched = self._schedules[steps] = router.schedule(self.threshold)
        return sched

    # -- engine interface ------------------------------------------------------------------------
    def claims(self):
        return [(STEP_CACHE, block, name) for seg in self.groups for name, block, _ in seg.entries]

    def parts(self):
        return self.groups

    def remove(self) -> None:
        super().remove()
        self.series.clear()

    def reset(self) -> None:
        for seg in self.groups:
            seg.reset()
        self.series.clear()

    def begin_call(self, call) -> None:
        info = call.info
        sched = self.schedule_for(info.total_steps)
        self._any_reuse = not bool(sched.all())
        step = min(info.step, sched.shape[0] - 1)
        if call.force_full:
            self._row = None  # the NaN/Inf guard's full re-run: every group computes and refreshes its cache
        elif info.step >= sched.shape[0]:
            self.warn_once("past_end", f"step {info.step} is past the router's {sched.shape[0]} steps; computed in full.")
            self._row = None
        else:
            self._row = sched[step]
        self._step = info.step
        self._branch = info.branch
        for seg in self.groups:
            seg.branch = info.branch

    # -- segment callbacks -------------------------------------------------------------------------
    def _decide(self, seg, h, e) -> bool:
        row = self._row
        if row is None or bool(row[self._index[id(seg)]]):
            return True
        if self.config.forecast:
            s = self.series.get((self._branch, self._index[id(seg)]))
            if self.engine.sync.agree(s is None or not s.ready):  # ready is data-dependent (non-finite)
                if s is not None and s.nonfinite:
                    self._nonfinite()
                return True
            return False
        if not seg.has_residual():
            return True
        if self.engine.sync.agree(not seg.residual_is_finite()):
            self._nonfinite()
            return True
        return False

    def _nonfinite(self) -> None:
        self.counters["nonfinite_fallbacks"] += 1
        self.warn_once("nonfinite", "a cached residual was not finite; computed the group in full instead.")

    def _want_residual(self) -> bool:
        return self._any_reuse

    def _count(self, seg, computed: bool) -> None:
        self.count_segment(seg, computed, "forecast" if self.config.forecast else "cached")

    def _provide(self, seg):
        s = self.series[(self._branch, self._index[id(seg)])]
        dh, de = s.forecast(self._step)
        return dh, de

    def _record(self, seg, dh, de) -> None:
        key = (self._branch, self._index[id(seg)])
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = TaylorSeries(self.config.forecast_order)
        s.update(self._step, [dh, de])

    # -- stats -------------------------------------------------------------------------------------
    def bytes_held(self) -> int:
        return sum(seg.bytes_held() for seg in self.groups) + sum(s.bytes_held() for s in self.series.values())

    def stats(self):
        out = super().stats()
        out.update(groups=[list(g) for g in self.router.groups], router_steps=self.router.steps,
                   threshold=float(self.threshold))
        return out


@register_method(HarmoniCaConfig)
def apply_harmonica(engine, config: HarmoniCaConfig) -> HarmoniCa:
    return HarmoniCa(engine, config)
