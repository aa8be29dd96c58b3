"""Training a HarmoniCa router: Step-Wise Denoising Training + Image-Error Proxy-Guided Objective.

The pipeline itself drives the denoising loop (its scheduler, CFG and latent preparation), so any
pipeline ditaccel has an adapter for can be trained on. A hook on the transformer replaces each
transformer call ``x_t -> v_t`` with:

* **teacher**: the full model at the same ``x_t`` (no grad);
* **student**: the model with soft gating of every block group g,
  ``C_t[g] = σ(r[t, g])·F_t[g] + (1 − σ(r[t, g]))·C_{t−1}[g]``, where ``F_t[g]`` is the residual
  (output − input, per stream) the group computes now from its (gated) input and ``C_{t−1}[g]`` the
  gated residual of the previous step, detached; the group returns ``input + C_t[g]``. Step 0 has
  no cache and is computed in full (its residuals start the cache). The model's weights are frozen;
  only the router logits ``r`` (steps x groups) get gradients;
* the loss of the step, ``w_t · ‖student − teacher‖² / ‖teacher‖²`` (means over elements), is
  back-propagated at once (one step's graph alive at a time), and the **student's** output (detached)
  is returned to the pipeline: the trajectory is the one the cached model itself produces
  (Step-Wise Denoising Training).

After a rollout the speed term ``λ · (FLOP-weighted fraction of group work computed, soft)`` is
added and the logits take one Adam step. With a target speedup, λ is adjusted after every
iteration (multiplicatively, on the gap between the *hard* fraction computed at the inference
threshold and the target), and at the end a global shift of the logits puts the hard schedule on
the largest fraction computed that meets the target speedup (calibration).

**Image-error proxy (IEPO weights w_t)**, refreshed every ``proxy_every`` iterations on one
training sample: a full-compute reference generation is recorded (transformer outputs and group
residuals of every step); then for each step t ≥ 1 a generation replays the recorded outputs
before t, runs the *current* router's soft gating at step t only (cache = the full residuals of
step t−1) and computes in full after t. ``w_t`` is the mean squared difference of its final
latents from the reference's: the error in the final image that the router's caching at step t
alone causes. The weights are normalised to mean 1 over steps ≥ 1 and floored at
``proxy_floor`` (a step whose current router barely caches would otherwise get weight ~0 and be
pushed to cache blindly). Cost: Σ_t (T − t) ≈ T²/2 transformer calls per refresh.

Additions (docs/harmonica.md, "Training"): ``ste`` (straight-through estimator: the student's forward
is inference's hard schedule, the soft gate's gradient backward), ``forecast_order`` (skipped groups
get the TaylorSeer forecast of their residual, as ``HarmoniCaConfig(forecast=True)``), ``project``
(after every step one global logit shift keeps the hard schedule on the target), ``init_schedule``
(start from a fixed step schedule, or ``"auto"``: the best one within the target, scored on the search
samples) and ``search_evals`` (a greedy search over hard schedules within the target, scored by the
decoded-image error of HarmoniCa inference against full compute, from the better of the trained and
the init schedule).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers.hooks import ModelHook

from ..adapters.base import BlockIO, pack_output, read_arg, read_streams, unpack_output
from ..errors import ConfigError
from ..hooks.attach import attach_hook, detach_hook
from ..hooks.flops import FlopProfiler
from ..hooks.step_clock import StepClock
from .harmonica_router import Router, calibrate_bias, group_layout, model_facts, schedule_fraction
from .taylor_series import TaylorSeries

_MAX_LOG_LAMBDA_STEP = math.log(1.5)
_MAX_LOGIT = 6.0

__all__ = ["TrainSettings", "Sample", "RouterTrainer", "train_router", "flop_speedup"]


def _pipeline_output(out) -> torch.Tensor:
    """The images (image pipelines) or frames (video pipelines) of a pipeline output, as float."""
    x = getattr(out, "images", None)
    if x is None:
        x = getattr(out, "frames", None)
    if x is None:
        x = out[0]
    return torch.as_tensor(x).float()


@dataclass
class TrainSettings:
    steps: int = 20  # denoising steps of the generations the router is for
    target_speedup: float | None = 2.0  # FLOP speedup of the transformer; None: fixed speed_weight
    speed_weight: float = 0.05  # λ (initial value when target_speedup is set)
    iterations: int = 40  # Adam steps on the logits
    batch: int = 1  # training samples (pipeline calls) per iteration
    lr: float = 0.2
    threshold: float = 0.1  # inference threshold on sigmoid(logits)
    init_logit: float | None = None  # None: logit(threshold) + 1 (σ ≈ 0.23 for threshold 0.1)
    group_size: int | None = None  # blocks per group (None: ~4-16 groups)
    proxy_every: int = 10  # K: refresh the image-error proxy every K iterations (0: never, uniform weights)
    proxy_floor: float = 0.05
    lambda_gain: float = 1.0  # controller gain of λ (target speedup); λ changes at most x1.5 per iteration
    calibrate: bool = True  # shift logits so the hard schedule meets the target speedup
    seed: int = 0
    # straight-through estimator: the student's forward takes the hard decision σ > threshold (exactly
    # what inference does); the gradient is the soft gate's, d/dσ of  P + σ·(F − P)
    ste: bool = False
    # what a routed (skipped) group gives in the student: 0 = its last residual (reuse, as
    # HarmoniCaConfig(forecast=False)); k >= 1 = TaylorSeer forecast of order k over the steps where the
    # group was computed (as HarmoniCaConfig(forecast=True, forecast_order=k)); needs ste
    forecast_order: int = 0
    # initial hard schedule: None (all cells at init_logit), "auto" (the best fixed TaylorSeer-style
    # step schedule within the target, measured on the search samples) or a spec, see parse_schedule
    init_schedule: str | None = None
    init_margin: float = 1.0  # initial logits logit(threshold) ± margin on the init schedule's cells
    # with a target speedup: after every Adam step shift the logits so the hard schedule meets the target
    # (instead of the λ controller); the gradient then only decides which cells compute
    project: bool = False
    # hard-schedule search after the gradient iterations: budget-neutral moves of computed cells,
    # kept when the final-latent error of the cached generation (vs full compute) goes down
    search_evals: int = 0  # candidate schedules to evaluate (0: no search)
    search_samples: int = 4  # training samples (evenly strided over them) the search and "auto" init measure on
    search_decode: bool = True  # score decoded images (output_type="pt"), not latents

    def validate(self) -> None:
        if self.steps < 2:
            raise ConfigError(f"train-router needs at least 2 steps, got {self.steps}.")
        if self.target_speedup is not None and not self.target_speedup >= 1.0:
            raise ConfigError(f"target speedup must be >= 1, got {self.target_speedup}.")
        if self.speed_weight < 0:
            raise ConfigError(f"speed weight λ must be >= 0, got {self.speed_weight}.")
        if self.iterations < 0 or self.batch < 1:
            raise ConfigError(f"iterations must be >= 0 and batch >= 1, got {self.iterations} and {self.batch}.")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}.")
        if not 0 <= self.forecast_order <= 4:
            raise ConfigError(f"forecast order must be in [0, 4], got {self.forecast_order}.")
        if self.forecast_order > 0 and not self.ste:
            raise ConfigError("a forecasting student (forecast_order > 0) needs the straight-through estimator (ste).")
        if self.search_evals < 0 or self.search_samples < 1:
            raise ConfigError(f"search evals must be >= 0 and search samples >= 1, got {self.search_evals} and "
                              f"{self.search_samples}.")
        if self.init_schedule is not None and self.init_schedule != "auto":
            parse_schedule(self.init_schedule, self.steps)


@dataclass
class Sample:
    """One training generation: pipeline keyword arguments (conditioning, size) and a seed."""

    kwargs: dict[str, Any]
    seed: int
    label: str = ""


def flop_speedup(fraction: float, block_flops: float, total_flops: float) -> float:
    """Transformer FLOP speedup when ``fraction`` of the block work is computed."""
    if total_flops <= 0:
        return 1.0
    computed = total_flops - (1.0 - fraction) * block_flops
    return total_flops / max(computed, 1e-12)


def fraction_for_speedup(speedup: float, block_flops: float, total_flops: float) -> float:
    """Fraction of block work to compute for a transformer FLOP speedup (may be < 0: unreachable)."""
    if block_flops <= 0:
        return 1.0
    return 1.0 - total_flops * (1.0 - 1.0 / speedup) / block_flops


def parse_schedule(spec: str, steps: int) -> torch.Tensor:
    """Bool (steps,) step schedule (True = compute) from a spec:

    * ``"interval=3,warmup=3,final=0"``: the fixed schedule of StepCache / TaylorSeer / Δ-Cache
      (the first ``warmup`` steps, the last ``final`` steps, and every step ``interval`` after the
      last computed one);
    * ``"steps=0,1,2,4,7"``: these steps.

    Step 0 always computes."""
    fields: dict[str, str] = {}
    for part in str(spec).replace(" ", "").split(";" if "steps=" in str(spec) else ","):
        if not part:
            continue
        if "=" not in part:
            raise ConfigError(f"init schedule {spec!r}: expected key=value fields, got {part!r}.")
        k, v = part.split("=", 1)
        fields[k] = v
    out = torch.zeros(steps, dtype=torch.bool)
    if "steps" in fields:
        if set(fields) != {"steps"}:
            raise ConfigError(f"init schedule {spec!r}: 'steps=' cannot be combined with other fields.")
        try:
            idx = [int(v) for v in fields["steps"].split(",") if v]
        except ValueError as exc:
            raise ConfigError(f"init schedule {spec!r}: steps must be integers.") from exc
        if any(not 0 <= i < steps for i in idx):
            raise ConfigError(f"init schedule {spec!r}: steps must be in [0, {steps}).")
        out[idx] = True
    else:
        unknown = set(fields) - {"interval", "warmup", "final"}
        if unknown or "interval" not in fields:
            raise ConfigError(f"init schedule {spec!r}: use 'interval=N,warmup=W,final=F' or 'steps=0,1,4,...'.")
        try:
            interval = int(fields["interval"])
            warmup = int(fields.get("warmup", 2))
            final = int(fields.get("final", 1))
        except ValueError as exc:
            raise ConfigError(f"init schedule {spec!r}: interval, warmup and final must be integers.") from exc
        if interval < 1 or warmup < 0 or final < 0:
            raise ConfigError(f"init schedule {spec!r}: need interval >= 1, warmup >= 0, final >= 0.")
        last = None
        for t in range(steps):
            if last is None or t < warmup or t >= steps - final or t - last >= interval:
                out[t] = True
                last = t
    out[0] = True
    return out


def fixed_schedule_candidates(steps: int) -> list[str]:
    """Specs of the fixed step schedules ``init_schedule="auto"`` chooses from."""
    return [f"interval={i},warmup={w},final={f}" for i in range(2, 8) for w in (1, 2, 3, 4) for f in (0, 1)]


# ---------------------------------------------------------------------------------------------
# output helpers


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the output tensor of the transformer in a {type(output).__name__}")


def _with_first(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    cls = type(output)
    try:
        return cls(sample=tensor)
    except TypeError:
        output.sample = tensor
        return output


def _detach_output(output: Any) -> Any:
    return _with_first(output, _first_tensor(output).detach())


def _clone_output(output: Any) -> Any:
    return _with_first(output, _first_tensor(output).detach().clone())


# ---------------------------------------------------------------------------------------------
# soft gating of block groups


class GroupGates:
    """Hooks on the first and last block of every group; in ``gate`` mode each group's output is
    ``input + σ·F + (1 − σ)·C_prev`` and the gated residual becomes the cache of the next step."""

    OFF, GATE = "off", "gate"

    def __init__(self, adapter, groups: list[tuple[int, int]], forecast_order: int = 0):
        self.blocks = adapter.blocks()
        self.groups = groups
        self.mode = self.OFF
        self.gates: torch.Tensor | None = None  # (G,) values in [0, 1]; None: compute (gate 1)
        # (G,) bool: straight-through mode, the forward takes these hard decisions (True = compute) and the
        # gradient flows through ``gates``; None: soft gating
        self.hard: torch.Tensor | None = None
        self.forecast_order = forecast_order
        self.step = 0
        self.branch = 0
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.series: dict[tuple[int, int], TaylorSeries] = {}
        self._inputs: dict[int, tuple] = {}
        self._hooked: list[tuple[torch.nn.Module, str]] = []

    def install(self) -> None:
        for g, (lo, hi) in enumerate(self.groups):
            for idx in sorted({lo, hi - 1}):
                _, block, io = self.blocks[idx]
                name = f"harmonica.train.g{g}.{idx}"
                attach_hook(block, _GateHook(self, g, io, is_first=(idx == lo), is_last=(idx == hi - 1)), name)
                self._hooked.append((block, name))

    def remove(self) -> None:
        for block, name in reversed(self._hooked):
            detach_hook(block, name)
        self._hooked = []
        self.cache.clear()
        self.series.clear()
        self._inputs.clear()

    def clear(self) -> None:
        self.cache.clear()
        self.series.clear()

    def _routed(self, key, dh: torch.Tensor, de: torch.Tensor | None):
        """What a skipped group gives at this step: the forecast (forecast_order > 0) or the last residual."""
        if self.forecast_order > 0:
            series = self.series.get(key)
            if series is None or not series.ready:
                return None
            ph, pe = series.forecast(self.step)
            return ph.to(dh.dtype), (pe.to(de.dtype) if (pe is not None and de is not None) else None)
        return self.cache.get(key)

    def group_end(self, g: int, io: BlockIO, output):
        h_in, e_in = self._inputs.pop(g)
        h_out, e_out = unpack_output(io, output)
        dh = h_out - h_in
        de = (e_out - e_in) if (e_out is not None and e_in is not None and e_out.shape == e_in.shape) else None
        key = (self.branch, g)
        if self.hard is not None:
            return self._group_end_ste(g, key, io, output, h_in, e_in, e_out, dh, de)
        prev = self.cache.get(key)
        gate = None if self.gates is None else self.gates[g]
        if gate is not None and prev is not None and prev[0].shape == dh.shape:
            gate = gate.to(dh.dtype)
            dh = gate * dh + (1 - gate) * prev[0]
            if de is not None and prev[1] is not None and prev[1].shape == de.shape:
                de = gate * de + (1 - gate) * prev[1]
            output = pack_output(io, h_in + dh, (e_in + de) if de is not None else e_out)
        self.cache[key] = (dh.detach(), de.detach() if de is not None else None)
        if gate is None and self.forecast_order > 0:  # full compute: the forecast series gets this step
            self._record(key, dh, de)
        return output

    def _record(self, key, dh: torch.Tensor, de: torch.Tensor | None) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = TaylorSeries(self.forecast_order)
        series.update(self.step, [dh.detach(), de.detach() if de is not None else None])

    def _group_end_ste(self, g, key, io, output, h_in, e_in, e_out, dh, de):
        """Straight-through: the forward is exactly inference's hard decision (compute: the group's own
        output; skip: input + routed residual P), plus ``(σ − sg(σ))·(F − P)``, which is 0 in value and
        carries the soft gate's gradient ``∂/∂σ [P + σ·(F − P)] = F − P``."""
        compute = bool(self.hard[g])
        routed = None if compute else self._routed(key, dh, de)
        if routed is not None and routed[0].shape != dh.shape:
            routed = None
        if routed is None and not compute:
            compute = True  # nothing cached yet: inference computes too
        ph, pe = routed if routed is not None else self._routed(key, dh, de) or (None, None)
        if ph is not None and ph.shape == dh.shape and self.gates is not None and self.gates.requires_grad:
            zero = self.gates[g] - self.gates[g].detach()
            zero = zero.to(dh.dtype)
            base_h = dh if compute else ph
            new_h = base_h + zero * (dh - ph.detach())
            if de is not None and pe is not None and pe.shape == de.shape:
                base_e = de if compute else pe
                new_e = base_e + zero * (de - pe.detach())
            else:
                new_e = de
            output = pack_output(io, h_in + new_h, (e_in + new_e) if new_e is not None else e_out)
        elif not compute:
            output = pack_output(io, h_in + ph, (e_in + pe) if (pe is not None and de is not None) else e_out)
        if compute:
            self.cache[key] = (dh.detach(), de.detach() if de is not None else None)
            if self.forecast_order > 0:
                self._record(key, dh, de)
        return output


class _GateHook(ModelHook):
    def __init__(self, gates: GroupGates, g: int, io: BlockIO, is_first: bool, is_last: bool):
        super().__init__()
        self.gates, self.g, self.io, self.is_first, self.is_last = gates, g, io, is_first, is_last

    def new_forward(self, module, *args, **kwargs):
        gates = self.gates
        if gates.mode != GroupGates.GATE:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.is_first:
            gates._inputs[self.g] = read_streams(self.io, module, args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_last:
            output = gates.group_end(self.g, self.io, output)
        return output


class _CallHook(ModelHook):
    def __init__(self, trainer: "RouterTrainer"):
        super().__init__()
        self.trainer = trainer

    def new_forward(self, module, *args, **kwargs):
        return self.trainer._on_call(self.fn_ref.original_forward, args, kwargs)


# ---------------------------------------------------------------------------------------------
# the trainer


class RouterTrainer:
    """Trains the logits of a :class:`Router` for ``pipe`` on ``samples`` (see module docstring)."""

    def __init__(self, pipe, samples: Sequence[Sample], settings: TrainSettings, adapter=None,
                 log: Callable[[str], None] | None = None):
        from ..adapters import adapter_for

        settings.validate()
        if not samples:
            raise ConfigError("train-router needs at least one training sample.")
        self.pipe = pipe
        self.model = pipe.transformer
        self.adapter = adapter if adapter is not None else adapter_for(self.model)
        self.samples = list(samples)
        self.s = settings
        self.log = log or (lambda msg: None)
        self.groups = group_layout(self.adapter.segments(), settings.group_size)
        G, T = len(self.groups), settings.steps
        init = settings.init_logit
        if init is None:
            init = math.log(settings.threshold / (1 - settings.threshold)) + 1.0
        self.logits = torch.full((T, G), float(init), dtype=torch.float32, requires_grad=True)
        # short second-moment memory: the gradient scale changes a lot while the gates move (σ' and
        # the λ controller), and a long memory of early large gradients would freeze the logits later
        self.opt = torch.optim.Adam([self.logits], lr=settings.lr, betas=(0.8, 0.9))
        self.lam = float(settings.speed_weight)
        self.proxy = torch.ones(T, dtype=torch.float64)
        self.proxy[0] = 0.0
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.group_flops: list[float] | None = None
        self.total_flops: float | None = None
        self.elapsed = 0.0
        self.gates = GroupGates(self.adapter, self.groups, settings.forecast_order if settings.ste else 0)
        self.clock = StepClock(pipe)
        self._mode = "off"
        self._acc: dict[str, float] = {}
        self._record: dict = {}
        self._inject_step = -1
        self._backward = False
        self._errors: dict[bytes, float] = {}
        self._full_latents: list[torch.Tensor] | None = None
        self._decode = settings.search_decode
        self.search_evals_done = 0
        self.init_info: dict[str, Any] = {}
        self.search_info: dict[str, Any] = {}
        self.searched: torch.Tensor | None = None

    # -- setup -----------------------------------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        return {**model_facts(self.adapter), "groups": [list(g) for g in self.groups], "steps": self.s.steps}

    @property
    def weights(self) -> torch.Tensor:
        if self.group_flops and sum(self.group_flops) > 0:
            w = torch.tensor(self.group_flops, dtype=torch.float32)
        else:
            w = torch.tensor([hi - lo for lo, hi in self.groups], dtype=torch.float32)
        return w / w.sum()

    @property
    def block_flops(self) -> float:
        return float(sum(self.group_flops or []))

    def target_fraction(self) -> float | None:
        if self.s.target_speedup is None:
            return None
        if not self.group_flops or not self.total_flops:
            return 1.0 / self.s.target_speedup
        f = fraction_for_speedup(self.s.target_speedup, self.block_flops, self.total_flops)
        return f

    # -- pipeline driving ----------------------------------------------------------------------------
    def _generate(self, sample: Sample, output_type: str = "latent"):
        kw = dict(sample.kwargs)
        kw.update(num_inference_steps=self.s.steps, generator=torch.Generator().manual_seed(int(sample.seed)),
                  output_type=output_type)
        with torch.no_grad():
            return _pipeline_output(self.pipe(**kw))

    def _batched(self, samples: Sequence[Sample]) -> dict[str, Any] | None:
        """One pipeline call's keyword arguments for several samples (tensor arguments concatenated, one
        seeded generator per sample), or None when the samples cannot be batched (prompts as strings of
        other types, other sizes)."""
        if len(samples) < 2:
            return None
        keys = set(samples[0].kwargs)
        if any(set(smp.kwargs) != keys for smp in samples):
            return None
        kw: dict[str, Any] = {}
        for k in keys:
            vals = [smp.kwargs[k] for smp in samples]
            if all(isinstance(v, torch.Tensor) for v in vals):
                if any(v.ndim == 0 or v.shape[0] != 1 or v.shape != vals[0].shape for v in vals):
                    return None
                kw[k] = torch.cat(vals, 0)
            elif all(isinstance(v, (int, float, bool, type(None))) and v == vals[0] for v in vals):
                kw[k] = vals[0]
            else:
                return None
        kw.update(num_inference_steps=self.s.steps, output_type="latent",
                  generator=[torch.Generator().manual_seed(int(smp.seed)) for smp in samples])
        return kw

    def _generate_many(self, samples: Sequence[Sample], output_type: str = "latent") -> list[torch.Tensor]:
        """Final latents (or images) of each sample (one batched pipeline call when possible)."""
        kw = self._batched(samples)
        if kw is None:
            return [self._generate(smp, output_type) for smp in samples]
        kw["output_type"] = output_type
        with torch.no_grad():
            x = _pipeline_output(self.pipe(**kw))
        return [x[i : i + 1] for i in range(len(samples))]

    def _on_call(self, forward, args, kwargs):
        hidden = read_arg(self.model, self.adapter.hidden_arg, args, kwargs)
        timestep = read_arg(self.model, self.adapter.timestep_arg, args, kwargs)
        sig = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None
        info = self.clock.tick(timestep, sig)
        if info.reset:
            self.gates.clear()
        if info.total_steps is not None and info.total_steps != self.s.steps:
            raise ConfigError(f"the pipeline ran {info.total_steps} steps; the router is trained for {self.s.steps}.")
        self.gates.branch = info.branch
        t = min(info.step, self.s.steps - 1)
        self.gates.step = t
        if self.total_flops is None:
            blocks = [b for _, b, _ in self.adapter.blocks()]
            with torch.no_grad(), FlopProfiler(blocks) as prof:
                out = forward(*args, **kwargs)
            p = prof.profile()
            per_block = [p.of(b) for b in blocks]
            self.group_flops = [float(sum(per_block[lo:hi])) for lo, hi in self.groups]
            self.total_flops = float(p.total)
        handler = getattr(self, f"_call_{self._mode}")
        return handler(forward, args, kwargs, t, info.branch)

    def _call_off(self, forward, args, kwargs, t, branch):
        return forward(*args, **kwargs)

    def _full_recording(self, forward, args, kwargs):
        """Full compute that records every group's residual in the cache (gates None = 1)."""
        self.gates.mode, self.gates.gates = GroupGates.GATE, None
        try:
            with torch.no_grad():
                return forward(*args, **kwargs)
        finally:
            self.gates.mode = GroupGates.OFF

    def _call_train(self, forward, args, kwargs, t, branch):
        if t == 0:
            return self._full_recording(forward, args, kwargs)
        self.gates.mode = GroupGates.OFF
        with torch.no_grad():
            teacher = _first_tensor(forward(*args, **kwargs)).float()
        self.gates.mode = GroupGates.GATE
        try:
            with torch.enable_grad():
                self.gates.gates = torch.sigmoid(self.logits[t])
                if self.s.ste:
                    self.gates.hard = self.gates.gates.detach() > self.s.threshold
                out = forward(*args, **kwargs)
                student = _first_tensor(out).float()
                rel = (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)
                loss = float(self.proxy[t]) * rel / (self.s.steps - 1)
                if loss.requires_grad and self._backward:
                    loss.backward()
        finally:
            self.gates.mode, self.gates.gates, self.gates.hard = GroupGates.OFF, None, None
        self._acc["quality"] = self._acc.get("quality", 0.0) + float(loss)
        self._acc["rel_err"] = self._acc.get("rel_err", 0.0) + float(rel) / (self.s.steps - 1)
        return _detach_output(out)

    def _call_reference(self, forward, args, kwargs, t, branch):
        out = self._full_recording(forward, args, kwargs)
        self._record[(t, branch)] = (_clone_output(out), dict(self.gates.cache))
        return out

    def _call_inject(self, forward, args, kwargs, t, branch):
        k = self._inject_step
        if t < k:
            return _clone_output(self._record[(t, branch)][0])
        if t > k:
            return forward(*args, **kwargs)
        self.gates.cache = dict(self._record[(k - 1, branch)][1])
        self.gates.mode, self.gates.gates = GroupGates.GATE, torch.sigmoid(self.logits[k].detach())
        try:
            with torch.no_grad():
                return forward(*args, **kwargs)
        finally:
            self.gates.mode, self.gates.gates = GroupGates.OFF, None

    def _run(self, mode: str, sample: Sample):
        self._mode = mode
        hook = "harmonica.train.call"
        # the model's weights are frozen: gradients flow to the router logits only
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        attach_hook(self.model, _CallHook(self), hook)
        self.gates.install()
        try:
            self.clock = StepClock(self.pipe)
            return self._generate(sample)
        finally:
            self.gates.remove()
            detach_hook(self.model, hook)
            for p in trainable:
                p.requires_grad_(True)
            self._mode = "off"

    # -- objective pieces -----------------------------------------------------------------------------
    def soft_fraction(self) -> torch.Tensor:
        """FLOP-weighted fraction computed with soft gates σ (step 0 counts as computed)."""
        s = torch.sigmoid(self.logits)
        s = torch.cat([torch.ones_like(s[:1]), s[1:]], 0)
        return (s * self.weights).sum() / self.s.steps

    def hard_fraction(self, logits: torch.Tensor | None = None) -> float:
        z = self.logits if logits is None else logits
        sched = torch.sigmoid(z.detach()) > self.s.threshold
        sched[0] = True
        return schedule_fraction(sched, self.weights)

    def refresh_proxy(self, sample: Sample) -> torch.Tensor:
        """IEPO weights: final-latent error of the router's caching at each single step (module docstring)."""
        self._record = {}
        ref = self._run("reference", sample)
        errs = torch.zeros(self.s.steps, dtype=torch.float64)
        for k in range(1, self.s.steps):
            self._inject_step = k
            x = self._run("inject", sample)
            errs[k] = float((x - ref).double().pow(2).mean())
        self._record = {}
        w = errs.clone()
        mean = float(w[1:].mean())
        w[1:] = w[1:] / mean if mean > 0 else 1.0
        w[1:] = w[1:].clamp_min(self.s.proxy_floor)
        w[1:] = w[1:] / w[1:].mean()
        self.proxy = w
        return errs

    def objective(self, samples: Sequence[Sample], backward: bool = False) -> dict[str, float]:
        """Quality term (mean over samples), speed term and total at the current logits."""
        self._backward = backward
        self._acc = {}
        for sample in samples:
            self._run("train", sample)
        n = len(samples)
        quality = self._acc.get("quality", 0.0) / n
        rel = self._acc.get("rel_err", 0.0) / n
        speed = self.lam * self.soft_fraction()
        if backward:
            speed.backward()
        speed_value = float(speed.detach())
        return {"quality": quality, "rel_err": rel, "speed": speed_value, "total": quality + speed_value}

    # -- hard schedules: init and search ---------------------------------------------------------------
    def logits_for_schedule(self, sched: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """Logits whose hard schedule is ``sched``: ``logit(threshold) ± init_margin``, or (``base`` given)
        ``base`` moved just past the threshold where its decision differs from ``sched``."""
        thr = math.log(self.s.threshold / (1 - self.s.threshold))
        sched = sched.to(torch.bool)
        if base is None:
            m = float(self.s.init_margin)
            return torch.where(sched, torch.tensor(thr + m), torch.tensor(thr - m)).to(torch.float32)
        b = base.detach().to(torch.float32)
        return torch.where(sched, torch.clamp(b, min=thr + 0.5), torch.clamp(b, max=thr - 0.5))

    def hard_schedule(self, logits: torch.Tensor | None = None) -> torch.Tensor:
        z = self.logits if logits is None else logits
        sched = torch.sigmoid(z.detach()) > self.s.threshold
        sched[0] = True
        return sched

    def search_set(self) -> list[Sample]:
        """``search_samples`` training samples, evenly strided (they cover the classes / prompts)."""
        n, k = len(self.samples), min(self.s.search_samples, len(self.samples))
        return [self.samples[(i * n) // k] for i in range(k)]

    def _ensure_profile(self) -> None:
        if self.total_flops is None:  # the first call of any rollout profiles the FLOPs
            self._run("off", self.samples[0])

    def schedule_error(self, sched: torch.Tensor) -> float:
        """Image-error objective of a hard schedule: mean over the search samples of the squared error of
        the decoded images (``search_decode``; else the relative squared error of the final latents) of the
        cached generation (HarmoniCa inference itself, with this trainer's forecast setting) against full
        compute."""
        import tempfile

        import ditaccel

        from .harmonica import HarmoniCaConfig

        key = bytes(sched.to(torch.uint8).flatten().tolist())
        hit = self._errors.get(key)
        if hit is not None:
            return hit
        samples = self.search_set()
        if self._full_latents is None:
            self._decode = self.s.search_decode
            if self._decode:
                try:
                    self._full_latents = self._generate_many(samples, "pt")
                except Exception as exc:  # noqa: BLE001 - a pipeline that cannot decode: score latents
                    self._decode = False
                    self.log(json.dumps({"search_space": "latent", "why": f"{type(exc).__name__}: {exc}"[:200]}))
            if not self._decode:
                self._full_latents = self._generate_many(samples, "latent")
        out_type = "pt" if self._decode else "latent"
        f = self.facts()
        router = Router(self.logits_for_schedule(sched), f["family"], f["transformer_class"], f["num_blocks"],
                        self.groups, self.s.threshold, self.group_flops, {})
        order = self.s.forecast_order if self.s.ste else 0
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "router.safetensors")
            router.save(path)
            cfg = HarmoniCaConfig(router=path, threshold=self.s.threshold, forecast=order > 0,
                                  forecast_order=max(order, 1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with ditaccel.accelerated(self.pipe, cfg):
                    xs = self._generate_many(samples, out_type)
        if self._decode:  # decoded images in [0, 1]: plain MSE (pooled PSNR = −10·log10 of the mean)
            errs = [float((x - ref).double().pow(2).mean()) for x, ref in zip(xs, self._full_latents)]
        else:
            errs = [float((x - ref).double().pow(2).mean() / ref.double().pow(2).mean().clamp_min(1e-30))
                    for x, ref in zip(xs, self._full_latents)]
        err = sum(errs) / len(errs)
        self._errors[key] = err
        self.search_evals_done += 1
        return err

    def budget_fraction(self) -> float:
        target = self.target_fraction()
        return 1.0 if target is None else target

    def initialise(self) -> dict[str, Any]:
        """Set the logits from ``init_schedule`` (before the first iteration)."""
        spec = self.s.init_schedule
        if spec is None or self.iteration > 0:
            return {}
        T, G = self.logits.shape
        info: dict[str, Any] = {}
        if spec == "auto":
            self._ensure_profile()
            budget = self.budget_fraction()
            scored = []
            seen = set()
            fitting = []
            for cand in fixed_schedule_candidates(T):
                steps = parse_schedule(cand, T)
                frac = float(steps.float().mean())
                key = tuple(steps.tolist())
                if frac <= budget + 1e-9 and key not in seen:
                    seen.add(key)
                    fitting.append((frac, cand, steps))
            if not fitting:
                raise ConfigError(f"init schedule 'auto': no fixed schedule computes at most {budget:.3f} of the work.")
            best_frac = max(f for f, _, _ in fitting)
            for frac, cand, steps in fitting:
                if frac < best_frac - 1.0 / T - 1e-9:
                    continue  # leaves more than one step of the budget unused
                err = self.schedule_error(steps.unsqueeze(1).expand(T, G))
                scored.append((err, -frac, cand))
                self.log(json.dumps({"init_candidate": cand, "fraction": round(frac, 4), "error": err}))
            err, _, spec_used = min(scored)
            info = {"init_schedule": spec_used, "init_error": err, "init_candidates": len(scored)}
            steps = parse_schedule(spec_used, T)
        else:
            steps = parse_schedule(spec, T)
            info = {"init_schedule": spec}
        with torch.no_grad():
            self.logits.copy_(self.logits_for_schedule(steps.unsqueeze(1).expand(T, G)))
        self.init_info = info
        return info

    def _moves(self, sched: torch.Tensor, budget: float) -> list[torch.Tensor]:
        """Neighbours of a hard schedule within the budget: tail shifts (every computed cell from a step on
        moves by ±1), whole-step moves of computed cells by ±1, ±2 steps, single-cell moves by ±1, ±2 steps in the same group, and single cells added where the
        budget allows. Step 0 never changes."""
        T, G = sched.shape
        w = self.weights
        out: list[torch.Tensor] = []
        # tail shifts: every computed cell from step t on moves by ±1 (stretches / compresses the schedule)
        for d in (-1, 1):
            for t in range(1, T):
                if not sched[t].any():
                    continue
                tail = sched[t:]
                c = sched.clone()
                c[t:] = False
                lo, hi = t + d, T + d
                if lo < 1:
                    continue
                if hi > T:
                    if tail[-1].any():
                        continue  # would drop the last step's cells
                    c[lo:] |= tail[: T - lo]
                else:
                    c[lo:hi] |= tail
                if not c.equal(sched) and c[1:].sum() == sched[1:].sum():
                    out.append(c)
        for d in (1, -1, 2, -2):
            for t in range(1, T):
                t2 = t + d
                if not 1 <= t2 < T:
                    continue
                movable = sched[t] & ~sched[t2]
                if movable.sum() < 2:
                    continue  # single cells below
                c = sched.clone()
                c[t] &= ~movable
                c[t2] |= movable
                out.append(c)
        for d in (1, -1, 2, -2):
            for t in range(1, T):
                t2 = t + d
                if not 1 <= t2 < T:
                    continue
                for g in range(G):
                    if sched[t, g] and not sched[t2, g]:
                        c = sched.clone()
                        c[t, g] = False
                        c[t2, g] = True
                        out.append(c)
        frac = schedule_fraction(sched, w)
        for t in range(1, T):
            for g in range(G):
                if not sched[t, g] and frac + float(w[g]) / T <= budget + 1e-9:
                    c = sched.clone()
                    c[t, g] = True
                    out.append(c)
        return out

    def search(self, start: torch.Tensor | None = None) -> dict[str, Any]:
        """Greedy search over hard schedules (first improvement, ``search_evals`` evaluations at most)
        from the better of the trained (calibrated) schedule and the init schedule."""
        if self.s.search_evals <= 0:
            return {}
        self._ensure_profile()
        budget = self.budget_fraction()
        T, G = self.logits.shape
        trained = self.hard_schedule(self.final_logits()[0]) if start is None else start.clone()
        candidates = [("trained", trained)]
        if self.init_info.get("init_schedule"):
            steps = parse_schedule(self.init_info["init_schedule"], T)
            candidates.append(("init", steps.unsqueeze(1).expand(T, G).clone()))
        scored = []
        for name, c in candidates:
            if schedule_fraction(c, self.weights) <= budget + 1e-9:
                scored.append((self.schedule_error(c), name, c))
        if not scored:
            return {}
        start_err, start_name, cur = min(scored, key=lambda x: x[0])
        info: dict[str, Any] = {"search_start": start_name, "search_start_error": start_err,
                                "search_space": "image" if self._decode else "latent",
                                "search_samples": [smp.label or str(smp.seed) for smp in self.search_set()],
                                "trained_error": next((e for e, n, _ in scored if n == "trained"), None)}
        err = start_err
        evals0 = self.search_evals_done
        accepted = 0
        improved, converged = True, False
        while improved and self.search_evals_done - evals0 < self.s.search_evals:
            improved = False
            moves = self._moves(cur, budget)
            for i, c in enumerate(moves):
                if self.search_evals_done - evals0 >= self.s.search_evals:
                    break
                if i == len(moves) - 1:
                    converged = True  # the last neighbour is being scored: no budget cut in this pass
                e = self.schedule_error(c)
                if e < err * (1 - 1e-3):
                    cur, err, improved = c, e, True
                    accepted += 1
                    self.log(json.dumps({"search_eval": self.search_evals_done - evals0, "accepted": accepted,
                                         "error": e, "fraction": round(schedule_fraction(c, self.weights), 4)}))
                    converged = False
                    break
            if not moves:
                converged = True
        self.searched = cur
        info.update(search_error=err, search_evals=self.search_evals_done - evals0, search_moves=accepted,
                    search_converged=converged and not improved)
        self.search_info = info
        return info

    # -- training ----------------------------------------------------------------------------------
    def batch_for(self, iteration: int) -> list[Sample]:
        n = len(self.samples)
        return [self.samples[(iteration * self.s.batch + j) % n] for j in range(self.s.batch)]

    def step(self) -> dict[str, Any]:
        """One iteration: maybe refresh the proxy, roll out the batch, one Adam step, adjust λ."""
        t0 = time.perf_counter()
        it = self.iteration
        batch = self.batch_for(it)
        info: dict[str, Any] = {"iteration": it}
        if self.s.proxy_every > 0 and it % self.s.proxy_every == 0:
            errs = self.refresh_proxy(batch[0])
            info["proxy_raw"] = [float(v) for v in errs]
        self.opt.zero_grad(set_to_none=True)
        obj = self.objective(batch, backward=True)
        self.opt.step()
        with torch.no_grad():  # keep σ' from vanishing: |logit| <= 6 (σ in [0.0025, 0.9975])
            self.logits.clamp_(-_MAX_LOGIT, _MAX_LOGIT)
        target = self.target_fraction()
        if self.s.project and target is not None:
            # projection onto the budget: one global shift puts the hard schedule on the most work within the
            # target, so the gradient only re-orders cells (which ones compute), never the speed
            with torch.no_grad():
                self.logits.add_(calibrate_bias(self.logits, self.weights, self.s.threshold, max(target, 0.0)))
                self.logits.clamp_(-_MAX_LOGIT, _MAX_LOGIT)
        hard = self.hard_fraction()
        if target is not None and not self.s.project:
            scale = max(target, 0.05)
            step = max(-_MAX_LOG_LAMBDA_STEP, min(_MAX_LOG_LAMBDA_STEP, self.s.lambda_gain * (hard - target) / scale))
            self.lam *= math.exp(step)
            # bounded around the initial value so the controller can come back within a few iterations
            self.lam = min(max(self.lam, self.s.speed_weight / 20), self.s.speed_weight * 20)
        info.update(obj, hard_fraction=hard, soft_fraction=float(self.soft_fraction().detach()), lam=self.lam,
                    seconds=time.perf_counter() - t0)
        self.history.append(info)
        self.iteration += 1
        self.elapsed += info["seconds"]
        return info

    def final_logits(self) -> tuple[torch.Tensor, float]:
        z = self.logits.detach().clone()
        target = self.target_fraction()
        if target is None or not self.s.calibrate:
            return z, 0.0
        b = calibrate_bias(z, self.weights, self.s.threshold, max(target, 0.0))
        return z + b, b

    def router(self) -> Router:
        z, bias = self.final_logits()
        if self.searched is not None:
            z = self.logits_for_schedule(self.searched, base=z)
        hard = self.hard_fraction(z)
        training = {
            "method": "HarmoniCa SDT + IEPO (ditaccel)", "settings": asdict(self.s),
            "iterations_done": self.iteration, "final_speed_weight": self.lam, "calibration_bias": bias,
            "fraction_computed": hard, "fraction_computed_uncalibrated": self.hard_fraction(),
            "flop_speedup": flop_speedup(hard, self.block_flops, self.total_flops or 0.0) if self.total_flops else None,
            "total_flops_per_call": self.total_flops, "samples": [s.label or str(s.seed) for s in self.samples],
            "proxy_weights": [round(float(v), 5) for v in self.proxy], "train_seconds": round(self.elapsed, 1),
        }
        if self.init_info:
            training["init"] = self.init_info
        if self.search_info:
            training["search"] = self.search_info
        if self.history:
            training["final_objective"] = {k: self.history[-1][k] for k in ("quality", "rel_err", "speed", "total")}
        f = self.facts()
        return Router(z, f["family"], f["transformer_class"], f["num_blocks"], self.groups, self.s.threshold,
                      self.group_flops, training)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "ditaccel.harmonica_train_checkpoint", "facts": self.facts(), "settings": asdict(self.s),
            "samples": [[s.label, s.seed] for s in self.samples], "logits": self.logits.detach().clone(),
            "opt": self.opt.state_dict(), "lam": self.lam, "proxy": self.proxy.clone(), "iteration": self.iteration,
            "history": self.history, "group_flops": self.group_flops, "total_flops": self.total_flops,
            "elapsed": self.elapsed, "init_info": self.init_info,
        }

    def save_checkpoint(self, path: str | Path) -> None:
        tmp = Path(str(path) + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)

    def load_checkpoint(self, path: str | Path) -> None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--resume {str(path)!r}: no such checkpoint file.")
        state = torch.load(str(p), map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != "ditaccel.harmonica_train_checkpoint":
            raise ConfigError(f"--resume {str(path)!r} is not a train-router checkpoint.")
        if state["facts"] != self.facts():
            raise ConfigError(f"--resume {str(path)!r} was made for another model or step count: checkpoint "
                              f"{state['facts']}, now {self.facts()}.")
        mine = asdict(self.s)
        theirs = state["settings"]
        diff = {k: (theirs.get(k), mine[k]) for k in mine if k != "iterations" and theirs.get(k) != mine[k]}
        if diff:
            raise ConfigError(f"--resume {str(path)!r}: the checkpoint was trained with other settings "
                              f"(checkpoint, now): {diff}. Use the same options (only --iterations may change).")
        if [list(x) for x in state["samples"]] != [[s.label, s.seed] for s in self.samples]:
            raise ConfigError(f"--resume {str(path)!r}: the checkpoint used other training samples.")
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.opt.load_state_dict(state["opt"])
        self.lam = float(state["lam"])
        self.proxy = state["proxy"].clone()
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.group_flops = state["group_flops"]
        self.total_flops = state["total_flops"]
        self.elapsed = float(state.get("elapsed", 0.0))
        self.init_info = dict(state.get("init_info") or {})


def train_router(pipe, samples: Sequence[Sample], settings: TrainSettings, *, checkpoint: str | Path | None = None,
                 resume: str | Path | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> tuple[Router, RouterTrainer]:
    """Train a router; checkpoint after every iteration when ``checkpoint`` is given."""
    trainer = RouterTrainer(pipe, samples, settings, log=log)
    if resume is not None:
        trainer.load_checkpoint(resume)
    t0 = time.perf_counter()
    if trainer.iteration == 0 and settings.init_schedule is not None and not trainer.init_info:
        trainer.initialise()
        trainer.elapsed += time.perf_counter() - t0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.iterations, initial=min(trainer.iteration, settings.iterations),
                   desc="train-router", unit="it")
    try:
        while trainer.iteration < settings.iterations:
            info = trainer.step()
            if checkpoint is not None:
                trainer.save_checkpoint(checkpoint)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(err=f"{info['rel_err']:.4f}", frac=f"{info['hard_fraction']:.2f}",
                                lam=f"{info['lam']:.3g}")
            if log is not None:
                log(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in info.items()
                                if k != "proxy_raw"}))
    finally:
        if bar is not None:
            bar.close()
    if settings.search_evals > 0:
        t0 = time.perf_counter()
        info = trainer.search()
        trainer.elapsed += time.perf_counter() - t0
        if log is not None:
            log(json.dumps({"search": info}))
    return trainer.router(), trainer
