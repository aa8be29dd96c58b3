"""Per-step compute/cache decisions shared by Δ-Cache and TaylorSeer.

Fixed schedule (``threshold == 0``): warm-up steps computed, then a full step whenever
``interval`` steps have passed since the last one (the distance is counted from the last full
step of the branch, so a stage change or a fallback re-anchors the schedule), last
``final_steps`` computed.

Refresh-error schedule (``refresh_tolerance > 0``; no probe, no extra compute): at every full
step the method also forecasts what it has just computed, from the full steps before, and reports
the relative L1 error e = Σ|F − F̂| / Σ|F| over its units (:meth:`StepController.observe`): the
error its forecast made k steps after the previous full step, at the far end of the run of cached
steps just ended. On the reference models e grows about linearly with k (flux_tiny, 50 steps,
forecast order 1: e ≈ 0.07 at k = 1, 0.17 at 2, 0.25 at 4 early on; 0.08–0.15 at k = 6–8 in the
middle steps, 0.29 at k = 8 at the end), so the error rate ρ = e / k is kept and each later step j
after the full step is charged ρ·j, the error its forecast is expected to have. The charges add up
over the run (the forecast errors of consecutive cached steps all enter the sampler's state), and
the step is computed when the sum would exceed the tolerance, or after ``max_consecutive_cached``
cached steps. This is TeaCache's / MagCache's accumulate-until-threshold rule with the signal
replaced by the forecast's measured error, which costs nothing (TeaCache fits a polynomial on a
modulated-input distance per model; MagCache calibrates magnitude ratios per model). Until the first
measurement (the second full step at full forecast order) ``interval`` is used.

Probe schedule (``threshold > 0``): after warm-up, the first block of every step is computed
as a probe. Its residual r = output − input is compared with the reference the cache would use:
for a reuse cache (Δ-Cache, order 0) the residual at the last full step, as FBCache/DBCache do;
for TaylorSeer the Taylor forecast of r from the full steps, i.e. the forecast's own error on a
block that was actually computed. The relative L1 distance mean|r − r̂| / mean|r| at or below
``threshold`` caches the rest of the step; above it, or after ``max_consecutive_cached`` cached
steps in a row, or in the last ``final_steps`` steps, the step is computed in full.

CFG: every branch (k-th transformer call of a step) has its own state; with
``uncond_follows_cond`` the branches after the first copy the first branch's decision of the
same step (for batched CFG both halves are in one call and share one decision anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .taylor_series import TaylorSeries

COMPUTE = "compute"
CACHE = "cache"
PENDING = "pending"  # decided by the probe block of this call


def relative_l1(actual: torch.Tensor, reference: torch.Tensor) -> float:
    a = actual.float()
    num = (a - reference.float()).abs().mean()
    den = a.abs().mean().clamp_min(1e-12)
    return float((num / den).item())


@dataclass
class _BranchState:
    last_full: int | None = None
    consecutive: int = 0
    probe: TaylorSeries | None = None
    errors: list[float] = field(default_factory=list)
    # refresh-error schedule
    refresh_num: torch.Tensor | float = 0.0  # Σ|F − F̂| over the units of this full step
    refresh_den: torch.Tensor | float = 0.0  # Σ|F|
    refresh_errors: list[tuple[int, int, float]] = field(default_factory=list)  # (step, distance, error)
    rate: float | None = None  # measured forecast error per step of distance
    charged: float = 0.0  # expected forecast errors summed over the cached steps since the last full step
    charge_now: float = 0.0  # the sum if this call is cached


class StepController:
    def __init__(self, method, *, interval: int, warmup_steps: int, final_steps: int, threshold: float,
                 max_consecutive_cached: int, uncond_follows_cond: bool, probe_order: int,
                 cache_dtype: torch.dtype | None = None, refresh_tolerance: float = 0.0):
        self.method = method
        self.interval = interval
        self.warmup_steps = warmup_steps
        self.final_steps = final_steps
        self.threshold = threshold
        self.max_consecutive = max_consecutive_cached
        self.follow = uncond_follows_cond
        self.probe_order = probe_order
        self.cache_dtype = cache_dtype
        self.refresh_tolerance = refresh_tolerance
        self.branches: dict[int, _BranchState] = {}
        self.leader: dict[int, str] = {}  # step -> decision of branch 0
        self.mode = COMPUTE
        self.info = None

    @property
    def adaptive(self) -> bool:
        return self.threshold > 0

    @property
    def refresh_adaptive(self) -> bool:
        return self.refresh_tolerance > 0

    def reset(self) -> None:
        self.branches.clear()
        self.leader.clear()
        self.mode = COMPUTE

    def branch_state(self, branch: int) -> _BranchState:
        st = self.branches.get(branch)
        if st is None:
            st = self.branches[branch] = _BranchState(probe=TaylorSeries(self.probe_order, self.cache_dtype))
        return st

    # -- per call ------------------------------------------------------------------------------
    def begin_call(self, info, ready: bool) -> str:
        """Decide what this call does; ``ready`` says whether the method has cached state to use."""
        self.info = info
        self.mode = self._initial(info, self.branch_state(info.branch), ready)
        return self.mode

    def _initial(self, info, st: _BranchState, ready: bool) -> str:
        step = info.step
        st.charge_now = st.charged
        if not ready or st.last_full is None or step < self.warmup_steps or step <= st.last_full:
            return COMPUTE
        if info.total_steps is not None and step >= info.total_steps - self.final_steps:
            return COMPUTE
        if self.follow and info.branch > 0:
            decided = self.leader.get(step)
            if decided is not None:
                return decided
        if self.refresh_adaptive and st.rate is not None:
            distance = step - st.last_full
            st.charge_now = st.charged + st.rate * distance
            if distance > self.max_consecutive or st.charge_now > self.refresh_tolerance:
                return COMPUTE
            return CACHE
        if not self.adaptive:
            return CACHE if step - st.last_full < self.interval else COMPUTE
        # ``probe.ready`` turns False after a non-finite update (data-dependent): agreed across ranks.
        if st.consecutive >= self.max_consecutive or self.method.engine.sync.agree(not st.probe.ready):
            return COMPUTE
        return PENDING

    def on_probe(self, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        """The probe block ran: resolve a pending decision, and keep its residual at full steps."""
        if not self.adaptive or self.info is None:
            return
        st = self.branch_state(self.info.branch)
        if self.mode == CACHE:
            return
        residual = h_out - h_in
        if self.mode == PENDING:
            forecast = st.probe.forecast(self.info.step, dtype=torch.float32)[0]
            err = relative_l1(residual, forecast)
            if not math.isfinite(err):
                err = math.inf
            st.errors.append(err)
            # Under context parallelism each rank sees its own shard of the probe residual: the step
            # is computed on every rank if the error exceeds the threshold on any of them.
            self.mode = COMPUTE if self.method.engine.sync.agree(not err <= self.threshold) else CACHE
        if self.mode == COMPUTE:
            st.probe.update(self.info.step, [residual])

    @property
    def measuring(self) -> bool:
        """Should the method report its forecast error on this call (a full step, refresh schedule)?"""
        return self.refresh_adaptive and self.info is not None and self.mode == COMPUTE

    def observe(self, actual: list, forecast: list) -> None:
        """A unit computed at this full step (``actual``) and its forecast from the full steps before."""
        st = self.branch_state(self.info.branch)
        for a, f in zip(actual, forecast):
            if a is None or f is None:
                continue
            a = a.float()
            st.refresh_num = st.refresh_num + (a - f.float()).abs().sum()
            st.refresh_den = st.refresh_den + a.abs().sum()

    def _measure(self, st: _BranchState, step: int) -> None:
        """End of a full step: turn the reported forecast error into the error rate."""
        num, den = st.refresh_num, st.refresh_den
        st.refresh_num = st.refresh_den = 0.0
        if st.last_full is None or not isinstance(num, torch.Tensor) or step <= st.last_full:
            return
        # data-dependent: under context parallelism the ranks agree on the mean of their errors
        err = self.method.engine.sync.mean_signal(float((num / den.clamp_min(1e-12)).item()))
        distance = step - st.last_full
        st.refresh_errors.append((step, distance, err))
        st.rate = err / distance if math.isfinite(err) else math.inf  # inf: compute until a finite one

    def end_call(self) -> str:
        info = self.info
        if info is None:
            return self.mode
        if self.mode == PENDING:  # the probe did not run: nothing was cached
            self.mode = COMPUTE
        st = self.branch_state(info.branch)
        if self.mode == COMPUTE:
            if self.refresh_adaptive:
                self._measure(st, info.step)
                st.charged = 0.0
            st.last_full = info.step
            st.consecutive = 0
            self.method.counters["steps_computed"] += 1
        else:
            st.consecutive += 1
            st.charged = st.charge_now
            self.method.counters["steps_cached"] += 1
        if info.branch == 0:
            self.leader[info.step] = self.mode
        self.info = None
        return self.mode

    def bytes_held(self) -> int:
        return sum(st.probe.bytes_held() for st in self.branches.values() if st.probe is not None)

    def probe_error_stats(self) -> dict[str, float]:
        out = {}
        errs = [e for st in self.branches.values() for e in st.errors if math.isfinite(e)]
        if errs:
            out.update(probe_error_mean=sum(errs) / len(errs), probe_error_max=max(errs))
        refresh = [e for st in self.branches.values() for _, _, e in st.refresh_errors if math.isfinite(e)]
        if refresh:
            out.update(refresh_error_mean=sum(refresh) / len(refresh), refresh_error_max=max(refresh))
        return out
