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
"""

from __future__ import annotations

import json
import math
import time
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

_MAX_LOG_LAMBDA_STEP = math.log(1.5)
_MAX_LOGIT = 6.0

__all__ = ["TrainSettings", "Sample", "RouterTrainer", "train_router", "flop_speedup"]


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

    def __init__(self, adapter, groups: list[tuple[int, int]]):
        self.blocks = adapter.blocks()
        self.groups = groups
        self.mode = self.OFF
        self.gates: torch.Tensor | None = None  # (G,) values in [0, 1]; None: compute (gate 1)
        self.branch = 0
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
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
        self._inputs.clear()

    def group_end(self, g: int, io: BlockIO, output):
        h_in, e_in = self._inputs.pop(g)
        h_out, e_out = unpack_output(io, output)
        dh = h_out - h_in
        de = (e_out - e_in) if (e_out is not None and e_in is not None and e_out.shape == e_in.shape) else None
        key = (self.branch, g)
        prev = self.cache.get(key)
        gate = None if self.gates is None else self.gates[g]
        if gate is not None and prev is not None and prev[0].shape == dh.shape:
            gate = gate.to(dh.dtype)
            dh = gate * dh + (1 - gate) * prev[0]
            if de is not None and prev[1] is not None and prev[1].shape == de.shape:
                de = gate * de + (1 - gate) * prev[1]
            output = pack_output(io, h_in + dh, (e_in + de) if de is not None else e_out)
        self.cache[key] = (dh.detach(), de.detach() if de is not None else None)
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
        self.gates = GroupGates(self.adapter, self.groups)
        self.clock = StepClock(pipe)
        self._mode = "off"
        self._acc: dict[str, float] = {}
        self._record: dict = {}
        self._inject_step = -1
        self._backward = False

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
    def _generate(self, sample: Sample):
        kw = dict(sample.kwargs)
        kw.update(num_inference_steps=self.s.steps, generator=torch.Generator().manual_seed(int(sample.seed)),
                  output_type="latent")
        with torch.no_grad():
            out = self.pipe(**kw)
        x = getattr(out, "images", None)
        if x is None:
            x = getattr(out, "frames", None)
        if x is None:
            x = out[0]
        return torch.as_tensor(x).float()

    def _on_call(self, forward, args, kwargs):
        hidden = read_arg(self.model, self.adapter.hidden_arg, args, kwargs)
        timestep = read_arg(self.model, self.adapter.timestep_arg, args, kwargs)
        sig = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None
        info = self.clock.tick(timestep, sig)
        if info.reset:
            self.gates.cache.clear()
        if info.total_steps is not None and info.total_steps != self.s.steps:
            raise ConfigError(f"the pipeline ran {info.total_steps} steps; the router is trained for {self.s.steps}.")
        self.gates.branch = info.branch
        t = min(info.step, self.s.steps - 1)
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
                out = forward(*args, **kwargs)
                student = _first_tensor(out).float()
                rel = (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)
                loss = float(self.proxy[t]) * rel / (self.s.steps - 1)
                if loss.requires_grad and self._backward:
                    loss.backward()
        finally:
            self.gates.mode, self.gates.gates = GroupGates.OFF, None
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
        hard = self.hard_fraction()
        target = self.target_fraction()
        if target is not None:
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
        hard = self.hard_fraction(z)
        training = {
            "method": "HarmoniCa SDT + IEPO (ditaccel)", "settings": asdict(self.s),
            "iterations_done": self.iteration, "final_speed_weight": self.lam, "calibration_bias": bias,
            "fraction_computed": hard, "fraction_computed_uncalibrated": self.hard_fraction(),
            "flop_speedup": flop_speedup(hard, self.block_flops, self.total_flops or 0.0) if self.total_flops else None,
            "total_flops_per_call": self.total_flops, "samples": [s.label or str(s.seed) for s in self.samples],
            "proxy_weights": [round(float(v), 5) for v in self.proxy], "train_seconds": round(self.elapsed, 1),
        }
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
            "elapsed": self.elapsed,
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


def train_router(pipe, samples: Sequence[Sample], settings: TrainSettings, *, checkpoint: str | Path | None = None,
                 resume: str | Path | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> tuple[Router, RouterTrainer]:
    """Train a router; checkpoint after every iteration when ``checkpoint`` is given."""
    trainer = RouterTrainer(pipe, samples, settings, log=log)
    if resume is not None:
        trainer.load_checkpoint(resume)
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
    return trainer.router(), trainer
