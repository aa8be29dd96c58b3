"""HarmoniCa routers: learnable (steps x block groups) logits, their schedule, and their file format.

A *block group* is a run of consecutive blocks inside one of the adapter's segments
(``adapter.segments()``), so a group can be skipped by re-using its residual (output − input per
stream). The router holds one logit per (denoising step, group); at inference a threshold turns
``sigmoid(logits)`` into a compute (``sigmoid > threshold``) / reuse schedule. Step 0 always
computes: nothing is cached before it.

The file is a ``.safetensors`` with one tensor ``logits`` (float32, steps x groups) and string
metadata (see :data:`METADATA_KEYS`): the model family, transformer class, block count, group
layout, step count, the threshold the router was calibrated for, the FLOPs of each group (for the
fraction-computed accounting) and the training settings (JSON). :meth:`Router.check_model` refuses
a router made for another model; :meth:`Router.for_steps` refuses another step count unless
interpolation is asked for (linear interpolation of the logits over normalised time t/(T−1)).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

FORMAT = "ditaccel.harmonica_router"
FORMAT_VERSION = "1"
METADATA_KEYS = ("format", "version", "family", "transformer_class", "num_blocks", "groups", "steps",
                 "threshold", "group_flops", "training")


class RouterMismatchError(ConfigError):
    """A router file was made for another model (family, class, block count, groups) or step count."""


# ---------------------------------------------------------------------------------------------
# group layout


def default_group_size(num_blocks: int) -> int:
    """Blocks per group so that a model has about 4-16 groups (1 for models of <= 16 blocks)."""
    if num_blocks <= 16:
        return 1
    return max(1, math.ceil(num_blocks / 16))


def group_layout(segments: list[list], group_size: int | None = None) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` over global block indices: each segment cut into runs of ``group_size``
    blocks (the last run of a segment may be shorter). Groups never cross a segment boundary."""
    num_blocks = sum(len(s) for s in segments)
    if num_blocks == 0:
        raise ConfigError("HarmoniCa: the model has no transformer blocks to route.")
    size = default_group_size(num_blocks) if group_size is None else int(group_size)
    if size < 1:
        raise ConfigError(f"HarmoniCa group_size must be >= 1, got {group_size}.")
    groups, offset = [], 0
    for seg in segments:
        n = len(seg)
        for lo in range(0, n, size):
            groups.append((offset + lo, offset + min(n, lo + size)))
        offset += n
    return groups


def model_facts(adapter) -> dict[str, Any]:
    return {"family": adapter.family, "transformer_class": type(adapter.model).__name__,
            "num_blocks": adapter.num_blocks}


# ---------------------------------------------------------------------------------------------
# the router


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


@dataclass
class Router:
    logits: torch.Tensor  # (steps, groups) float32
    family: str
    transformer_class: str
    num_blocks: int
    groups: list[tuple[int, int]]
    threshold: float = 0.1
    group_flops: list[float] | None = None  # FLOPs of one call of each group (relative weights)
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.logits = self.logits.detach().to(torch.float32).contiguous()
        self.groups = [tuple(int(v) for v in g) for g in self.groups]
        if self.logits.ndim != 2 or self.logits.shape[1] != len(self.groups):
            raise ConfigError(f"HarmoniCa router logits must have shape (steps, {len(self.groups)} groups), "
                              f"got {tuple(self.logits.shape)}.")
        if self.logits.shape[0] < 1:
            raise ConfigError("HarmoniCa router has no steps.")

    @property
    def steps(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def weights(self) -> torch.Tensor:
        """Relative cost of each group (its FLOPs, or its block count when unknown), summing to 1."""
        if self.group_flops and len(self.group_flops) == self.num_groups and sum(self.group_flops) > 0:
            w = torch.tensor(self.group_flops, dtype=torch.float64)
        else:
            w = torch.tensor([hi - lo for lo, hi in self.groups], dtype=torch.float64)
        return (w / w.sum()).to(torch.float32)

    # -- schedule ------------------------------------------------------------------------------
    def schedule(self, threshold: float | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Bool (steps, groups): True = compute. ``sigmoid(logit) > threshold``; step 0 always computes."""
        thr = self.threshold if threshold is None else threshold
        z = self.logits if logits is None else logits
        out = torch.sigmoid(z.detach().float()) > thr
        out[0] = True
        return out

    def fraction_computed(self, threshold: float | None = None) -> float:
        """FLOP-weighted fraction of the block work computed over all steps (step 0 included)."""
        return schedule_fraction(self.schedule(threshold), self.weights())

    def for_steps(self, steps: int, interpolate: bool = False) -> "Router":
        """This router for a generation of ``steps`` steps: itself, or (with ``interpolate``) the logits
        linearly interpolated over normalised time s/(steps−1) ∈ [0, 1]."""
        if steps == self.steps:
            return self
        if not interpolate:
            raise RouterMismatchError(
                f"HarmoniCa router was trained for {self.steps} denoising steps, but this generation has {steps}. "
                f"Run with num_inference_steps={self.steps}, train a router for {steps} steps "
                f"(`ditaccel train-router --steps {steps}`), or pass HarmoniCaConfig(interpolate_steps=True) to "
                "interpolate the logits over normalised time.")
        logits = interpolate_logits(self.logits, steps)
        return Router(logits, self.family, self.transformer_class, self.num_blocks, list(self.groups), self.threshold,
                      self.group_flops, dict(self.training, interpolated_from_steps=self.steps))

    def check_model(self, adapter, path: str = "router") -> None:
        facts = model_facts(adapter)
        problems = []
        for key in ("family", "transformer_class", "num_blocks"):
            mine = getattr(self, key)
            if mine != facts[key]:
                problems.append(f"{key}: router {mine!r}, model {facts[key]!r}")
        spans = []
        offset = 0
        for seg in adapter.segments():
            spans.append((offset, offset + len(seg)))
            offset += len(seg)
        for lo, hi in self.groups:
            if not any(a <= lo < hi <= b for a, b in spans):
                problems.append(f"group ({lo}, {hi}) does not lie inside one segment of the model {spans}")
                break
        if problems:
            raise RouterMismatchError(
                f"HarmoniCa router {path} was trained for another model ({'; '.join(problems)}). "
                "Train a router for this model with `ditaccel train-router --model <this model>`.")

    # -- file I/O ------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "family": self.family,
            "transformer_class": self.transformer_class, "num_blocks": str(self.num_blocks),
            "groups": json.dumps([list(g) for g in self.groups]), "steps": str(self.steps),
            "threshold": repr(float(self.threshold)),
            "group_flops": json.dumps(self.group_flops) if self.group_flops else "null",
            "training": json.dumps(self.training, sort_keys=True, default=str),
        }

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"logits": self.logits.contiguous()}, str(path), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> "Router":
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"HarmoniCa router file not found: {str(path)!r}. Train one with "
                              "`ditaccel train-router --out router.safetensors`.")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                logits = f.get_tensor("logits") if "logits" in keys else None
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
            raise ConfigError(f"HarmoniCa router {str(path)!r} is not a readable .safetensors file "
                              f"({type(exc).__name__}: {str(exc)[:120]}). Train one with `ditaccel train-router`.") from exc
        if meta.get("format") != FORMAT or logits is None:
            raise ConfigError(f"HarmoniCa router {str(path)!r} is a safetensors file but not a ditaccel router "
                              f"(metadata format {meta.get('format')!r}, tensors {keys}). "
                              "Train one with `ditaccel train-router`.")
        if meta.get("version") != FORMAT_VERSION:
            raise ConfigError(f"HarmoniCa router {str(path)!r} has format version {meta.get('version')!r}; this "
                              f"ditaccel reads version {FORMAT_VERSION}. Retrain it with `ditaccel train-router`.")
        try:
            groups = [tuple(g) for g in json.loads(meta["groups"])]
            flops = json.loads(meta.get("group_flops", "null"))
            router = cls(logits=logits, family=meta["family"], transformer_class=meta["transformer_class"],
                         num_blocks=int(meta["num_blocks"]), groups=groups, threshold=float(meta["threshold"]),
                         group_flops=flops, training=json.loads(meta.get("training", "{}")))
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"HarmoniCa router {str(path)!r} has broken metadata ({type(exc).__name__}: {exc}).") from exc
        if int(meta.get("steps", router.steps)) != router.steps:
            raise ConfigError(f"HarmoniCa router {str(path)!r}: metadata says {meta['steps']} steps but the logits "
                              f"have {router.steps} rows.")
        return router


def schedule_fraction(schedule: torch.Tensor, weights: torch.Tensor) -> float:
    """FLOP-weighted fraction of (step, group) cells computed."""
    s = schedule.to(torch.float64)
    w = weights.to(torch.float64)
    return float((s * w).sum() / (w.sum() * s.shape[0]))


def interpolate_logits(logits: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear interpolation of (T, G) logits at ``steps`` points of normalised time in [0, 1]."""
    T = logits.shape[0]
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}.")
    if T == 1:
        return logits.expand(steps, -1).clone()
    pos = torch.linspace(0, T - 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=T - 2)
    frac = (pos - lo.to(torch.float64)).to(logits.dtype).unsqueeze(1)
    return logits[lo] * (1 - frac) + logits[lo + 1] * frac


def calibrate_bias(logits: torch.Tensor, weights: torch.Tensor, threshold: float, target_fraction: float) -> float:
    """A global shift b so that ``schedule(logits + b)`` computes the most work <= ``target_fraction``.

    Cells (steps >= 1) are kept in descending logit order; the boundary is put half-way between the
    last kept and the first dropped logit. Ties are dropped together. Returns b (0 when no shift is
    needed to get under the target because it already is and no cell could be added)."""
    T, G = logits.shape
    z = logits[1:].detach().double().reshape(-1)
    w = weights.double().repeat(T - 1)
    total = float(weights.double().sum()) * T
    budget = target_fraction * total - float(weights.double().sum())  # step 0 always computes
    order = torch.argsort(z, descending=True)
    zs, ws = z[order], w[order]
    cum = torch.cumsum(ws, 0)
    k = int((cum <= budget + 1e-9).sum())  # cells that fit
    while 0 < k < len(zs) and zs[k - 1] == zs[k]:  # do not split ties
        k -= 1
    thr_logit = _logit(threshold)
    if k == 0:
        cut = float(zs[0]) + 1.0
    elif k == len(zs):
        cut = float(zs[-1]) - 1.0
    else:
        cut = 0.5 * (float(zs[k - 1]) + float(zs[k]))
    return thr_logit - cut
