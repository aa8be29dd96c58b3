"""TaylorSeer (Liu et al. 2025, arXiv:2503.06923): forecast features on the steps between full steps.

On full steps every cached unit runs and its output is added to a divided-difference series
(:class:`~ditaccel.methods.taylor_series.TaylorSeries`, order ``order``, the actual distances
between full steps); on the steps in between the unit does not run and its forecast
F(t+k) ≈ Σ_i Δ^i F / (i! N^i) · k^i (paper's Eq. 8; Newton form by default, exact on uneven
spacing) is used instead. Units:

* ``granularity="module"``: the attention and MLP submodules of each block
  (``adapter.compute_modules``), their outputs before the block's gate; tuple outputs (joint
  attention) forecast element-wise. Blocks without a separate MLP module (FLUX single blocks,
  whose MLP is fused with the attention output projection) are forecast whole, as below.
* ``granularity="block"``: the residual (output − input, per stream) of each run of blocks;
  the blocks are skipped and input + forecast residual is returned. Taylor forecasts are linear
  in the data, so forecasting a run's residual equals chaining per-block residual forecasts.

Schedules (fixed / probe / refresh-error) and CFG branch handling: :mod:`ditaccel.methods.adaptive`.
With ``threshold`` > 0 block 0 always runs as the probe and the error of its own forecast decides;
with ``refresh_tolerance`` > 0 nothing extra runs: at each full step the units' forecasts for that
step are compared with what was computed, and the error decides when the next full step comes.
"""

from __future__ import annotations

import torch

from ..config import register_method
from ..hooks.block_range import ProvidedResidualSegment
from ..hooks.method import STEP_CACHE, InstalledMethod
from ..hooks.module_cache import ModuleCache
from ..hooks.probe import BlockProbe
from .adaptive import CACHE, StepController
from .configs import TaylorSeerConfig
from .taylor_series import TaylorSeries

__all__ = ["TaylorSeerConfig", "TaylorSeer"]


def _is_attention(module) -> bool:
    return hasattr(module, "processor") and hasattr(module, "set_processor")


class TaylorSeer(InstalledMethod):
    def __init__(self, engine, config: TaylorSeerConfig):
        super().__init__(engine, config)
        adapter = engine.adapter
        self.adaptive = config.threshold > 0
        first = 1 if self.adaptive else 0  # block 0 is the probe
        self.module_entries: list[tuple[str, object]] = []
        self.module_owner: list[object] = []  # block of each module entry
        runs: list[list] = []  # runs of blocks forecast whole (contiguous within a segment)
        index = 0
        for seg_entries in adapter.segments():
            run: list = []
            for name, block, io in seg_entries:
                g = index
                index += 1
                if g < first:
                    if run:
                        runs.append(run)
                        run = []
                    continue
                modules = adapter.compute_modules(block) if config.granularity == "module" else []
                if modules and any(not _is_attention(m) for _, m in modules):
                    if run:
                        runs.append(run)
                        run = []
                    for mname, module in modules:
                        self.module_entries.append((f"{name}.{mname}", module))
                        self.module_owner.append(block)
                else:
                    run.append((name, block, io))
            if run:
                runs.append(run)
        self.modules = ModuleCache(self.module_entries, "taylorseer.module", self._provide_module, self._record_module)
        self.segments = [
            ProvidedResidualSegment(entries, f"taylorseer.blocks{i}", self._decide_segment, self._feeds_series,
                                    self._count_segment, self._provide_segment, self._record_segment)
            for i, entries in enumerate(runs)
        ]
        self._seg_index = {id(s): i for i, s in enumerate(self.segments)}
        self.controller = StepController(
            self, interval=config.interval, warmup_steps=config.warmup_steps, final_steps=config.final_steps,
            threshold=config.threshold, max_consecutive_cached=config.max_consecutive_cached,
            uncond_follows_cond=config.uncond_follows_cond, probe_order=config.order, cache_dtype=config.cache_dtype,
            refresh_tolerance=config.refresh_tolerance,
        )
        self.probe = None
        if self.adaptive:
            name, block, io = adapter.blocks()[0]
            self.probe = BlockProbe(name, block, io, "taylorseer.probe", self.controller.on_probe)
        self.series: dict[tuple, TaylorSeries] = {}
        self._fallback_now: set = set()
        self._branch = 0
        self._step = 0

    # -- engine interface ------------------------------------------------------------------------
    def claims(self):
        out = [(STEP_CACHE, m, n) for n, m in self.module_entries]
        out += [(STEP_CACHE, b, n) for seg in self.segments for n, b, _ in seg.entries]
        if self.probe is not None:
            out.append((STEP_CACHE, self.probe.block, self.probe.name))
        return out

    def parts(self):
        return [self.modules, *self.segments] + ([self.probe] if self.probe is not None else [])

    def remove(self) -> None:
        super().remove()
        self.series.clear()

    def reset(self) -> None:
        self.series.clear()
        for seg in self.segments:
            seg.reset()
        self.controller.reset()

    def begin_call(self, call) -> None:
        info = call.info
        self._branch = info.branch
        self._step = info.step
        self._fallback_now.clear()
        for seg in self.segments:
            seg.branch = info.branch
        self.controller.begin_call(info, ready=not getattr(call, "force_full", False))  # engine NaN re-run

    def end_call(self, call, output):
        self.controller.end_call()
        return output

    # -- shared ------------------------------------------------------------------------------------
    def _series(self, key) -> TaylorSeries:
        full = (self._branch, key)
        s = self.series.get(full)
        if s is None:
            s = self.series[full] = TaylorSeries(self.config.order, self.config.cache_dtype)
        return s

    def _update(self, key, values: list) -> None:
        """Add a full step's values to ``key``'s series; on the refresh-error schedule first report
        how far the series' forecast for this step was from them."""
        s = self._series(key)
        if self.controller.measuring and s.ready and len(s.nodes) > s.order:
            self.controller.observe(values, s.forecast(self._step, dtype=torch.float32, formula=self.config.formula))
        s.update(self._step, values)

    def _usable(self, key) -> bool:
        """On a cached step: may ``key`` be forecast? Counts and warns on non-finite fallbacks."""
        s = self.series.get((self._branch, key))
        # ``ready`` is False after a non-finite update, which is data-dependent: agreed across ranks.
        if not self.engine.sync.agree(not (s is not None and s.ready)):
            return True
        if s is not None and s.nonfinite:
            self.counters["nonfinite_fallbacks"] += 1
            self.warn_once("nonfinite", "a forecast source was not finite (NaN/Inf); computed it in full instead.")
        return False

    # -- module units ------------------------------------------------------------------------------
    def _provide_module(self, index: int):
        if self.controller.mode != CACHE:
            return None
        key = ("m", index)
        if not self._usable(key):
            self._fallback_now.add((self._branch, key))
            return None
        out = self.series[(self._branch, key)].forecast(self._step, formula=self.config.formula)
        self.counters["forecast"] += 1
        call = self.engine.current_call
        if call is not None:
            call.skipped_flops += self.engine.flops_of(self.module_entries[index][1])
        return out

    def _record_module(self, index: int, tensors) -> None:
        key = ("m", index)
        self.counters["computed"] += 1
        if self.controller.mode == CACHE and (self._branch, key) not in self._fallback_now:
            return
        self._fallback_now.discard((self._branch, key))
        if self._feeds_series():
            self._update(key, list(tensors))

    # -- block-run units ---------------------------------------------------------------------------
    def _decide_segment(self, seg, h, e) -> bool:
        if self.controller.mode != CACHE:
            return True
        key = ("s", self._seg_index[id(seg)])
        if not self._usable(key):
            self._fallback_now.add((self._branch, key))
            return True
        return False

    def _feeds_series(self) -> bool:
        """Do full steps feed the series? Not for a fixed interval of 1 (nothing is ever forecast)."""
        return self.config.interval > 1 or self.adaptive or self.config.refresh_tolerance > 0

    def _count_segment(self, seg, computed: bool) -> None:
        self.count_segment(seg, computed, "forecast")

    def _provide_segment(self, seg):
        key = ("s", self._seg_index[id(seg)])
        dh, de = self.series[(self._branch, key)].forecast(self._step, formula=self.config.formula)
        return dh, de

    def _record_segment(self, seg, dh, de) -> None:
        key = ("s", self._seg_index[id(seg)])
        if self.controller.mode == CACHE and (self._branch, key) not in self._fallback_now:
            return
        self._fallback_now.discard((self._branch, key))
        self._update(key, [dh, de])

    # -- stats -------------------------------------------------------------------------------------
    def bytes_held(self) -> int:
        return sum(s.bytes_held() for s in self.series.values()) + self.controller.bytes_held()

    def stats(self):
        out = super().stats()
        out.update(module_units=len(self.module_entries), block_runs=[len(s.entries) for s in self.segments])
        out.update(self.controller.probe_error_stats())
        return out


@register_method(TaylorSeerConfig)
def apply_taylorseer(engine, config: TaylorSeerConfig) -> TaylorSeer:
    return TaylorSeer(engine, config)
