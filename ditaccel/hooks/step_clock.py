"""The per-generation step clock.

Every method needs to know, for each transformer call, which denoising step it belongs to, how
many steps the generation has, and which CFG branch the call is (the k-th call in a step). The
clock is driven by whichever source is available, in this order:

1. explicit calls (``begin_generation`` / ``set_step``), used by the ComfyUI integration (which
   knows the sigmas) and by users driving a bare transformer;
2. the pipeline's scheduler, read (never patched) at each call: ``scheduler.timesteps`` is a new
   tensor after every ``set_timesteps`` (a new generation), ``scheduler.step_index`` counts steps
   and ``begin_index`` marks the shortened schedules of img2img/inpaint;
3. the ``timestep`` argument alone: a new value is a new step, a larger value a new generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepInfo:
    generation: int  # increases by one per generation (pipeline call)
    step: int  # 0-based denoising step within the generation
    total_steps: int | None  # None when nothing tells the clock (bare model without set_num_steps)
    branch: int  # k-th transformer call within this step: the CFG branch for sequential CFG
    new_generation: bool  # first call of a generation: method state must reset
    reset: bool  # state must reset (new generation, or the input shapes changed)

    @property
    def steps_left(self) -> int | None:
        return None if self.total_steps is None else self.total_steps - self.step - 1

    @property
    def is_last_steps(self) -> bool:
        return self.total_steps is not None and self.step >= self.total_steps - 1


def _timestep_value(timestep) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        return float(timestep.reshape(-1)[0].item())
    return float(timestep)


class StepClock:
    def __init__(self, scheduler_owner=None):
        # ``scheduler_owner`` is the pipeline; its ``scheduler`` attribute is read at every call so
        # a scheduler swapped after enable_acceleration is followed.
        self._owner = scheduler_owner
        self.generation = 0
        self._step = 0
        self._total: int | None = None
        self._calls_in_step = 0
        self._signature = None
        self._last_timestep: float | None = None
        self._timesteps_ref = None
        self._explicit = False
        self._explicit_pending = False
        self._explicit_step: int | None = None
        self._explicit_total: int | None = None

    # -- explicit driving ----------------------------------------------------------------------
    def begin_generation(self, total_steps: int | None = None) -> None:
        """Start a new generation now (ComfyUI sampler wrapper, or a user driving a bare model)."""
        self._explicit = True
        self._explicit_pending = True
        self._explicit_total = total_steps
        self._explicit_step = None
        self._last_timestep = None

    def set_step(self, step: int, total_steps: int | None = None) -> None:
        """Tell the clock the step of the next transformer calls (e.g. from the sampling sigmas)."""
        self._explicit = True
        self._explicit_step = step
        if total_steps is not None:
            self._explicit_total = total_steps

    def end_explicit(self) -> None:
        self._explicit = False
        self._explicit_step = None

    # -- per call ------------------------------------------------------------------------------
    def tick(self, timestep, signature) -> StepInfo:
        new_generation = False
        if self._explicit:
            if self._explicit_pending:
                self._explicit_pending = False
                new_generation = True
                self._start(self._explicit_total)
            step = self._explicit_step
            if step is None:
                step = self._step_from_timestep(timestep, allow_new_generation=False)
            self._advance_to(step)
        else:
            scheduler = getattr(self._owner, "scheduler", None) if self._owner is not None else None
            timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
            if isinstance(timesteps, torch.Tensor) and timesteps.numel() > 0:
                if timesteps is not self._timesteps_ref:
                    self._timesteps_ref = timesteps
                    begin = getattr(scheduler, "begin_index", None) or 0
                    self._start(len(timesteps) - begin)
                    new_generation = True
                    self._last_timestep = _timestep_value(timestep)
                    step = 0
                else:
                    step = self._scheduler_step(scheduler, timestep)
                self._advance_to(step)
            else:
                if self._step_from_timestep(timestep, allow_new_generation=True) is None:
                    new_generation = True
        reset = new_generation
        if signature != self._signature:
            self._signature = signature
            reset = True
        info = StepInfo(self.generation, self._step, self._total, self._calls_in_step, new_generation, reset)
        self._calls_in_step += 1
        return info

    # -- internals -----------------------------------------------------------------------------
    def _start(self, total: int | None) -> None:
        self.generation += 1
        self._step = 0
        self._calls_in_step = 0
        self._total = total

    def _advance_to(self, step: int) -> None:
        if step != self._step:
            self._step = step
            self._calls_in_step = 0

    def _scheduler_step(self, scheduler, timestep) -> int:
        index = getattr(scheduler, "step_index", None)
        if isinstance(index, int):
            begin = getattr(scheduler, "begin_index", None) or 0
            return max(0, index - begin)
        if index is None and hasattr(scheduler, "step_index"):
            return 0  # before the scheduler's first step()
        # Schedulers without a step counter: count changes of the timestep value.
        value = _timestep_value(timestep)
        if value != self._last_timestep:
            self._last_timestep = value
            return self._step + 1
        return self._step

    def _step_from_timestep(self, timestep, allow_new_generation: bool) -> int | None:
        """Bare-model mode. Returns the step, or None after starting a new generation."""
        value = _timestep_value(timestep)
        last = self._last_timestep
        self._last_timestep = value
        if last is None or (value is not None and value > last):
            if allow_new_generation:
                self._start(self._explicit_total)
                return None
            return self._step
        if value != last:
            self._advance_to(self._step + 1)
        return self._step

    def set_num_steps(self, total_steps: int | None) -> None:
        """For a bare model: the number of steps of every following generation."""
        self._explicit_total = total_steps
        self._total = total_steps
