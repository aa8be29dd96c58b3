"""Toy transformers for the feature-caching tests: modules whose output is a known polynomial of the step."""

from __future__ import annotations

import torch
from torch import nn

import ditaccel


class PolyModule(nn.Module):
    """Output = cond · Σ_k c_k · s^k (shape of the input); NaN when ``s`` is in ``nan_steps``."""

    def __init__(self, dim: int, degree: int, seed: int, zero: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        coefs = torch.randn(degree + 1, dim, generator=g, dtype=torch.float64)
        self.coefs = nn.Parameter(torch.zeros_like(coefs) if zero else coefs)
        self.nan_steps: set[int] = set()

    def forward(self, x, s, cond):
        s = float(s)
        out = sum(c * s**k for k, c in enumerate(self.coefs))
        out = cond.reshape(-1, 1, 1) * out.expand_as(x)
        if int(s) in self.nan_steps:
            out = out * float("nan")
        return out


class ToyAttention(PolyModule):
    """Looks like a diffusers attention layer to the adapter (processor + set_processor)."""

    processor = None

    def set_processor(self, processor):
        self.processor = processor


class ToyBlock(nn.Module):
    def __init__(self, dim, degree, seed, identity=False):
        super().__init__()
        self.attn = ToyAttention(dim, degree, seed, zero=identity)
        self.ff = PolyModule(dim, degree, seed + 1000, zero=identity)

    def forward(self, hidden_states, temb, cond):
        return hidden_states + self.attn(hidden_states, temb, cond) + self.ff(hidden_states, temb, cond)


class ToyTransformer(nn.Module):
    def __init__(self, n_blocks=4, dim=3, degree=2, identity=(), seed=0):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(
            ToyBlock(dim, degree, seed + 10 * i, identity=i in identity) for i in range(n_blocks))
        self.dim = dim

    def forward(self, hidden_states, timestep, cond):
        h = hidden_states
        for block in self.transformer_blocks:
            h = block(h, timestep, cond)
        return h


def drive(model, steps, branches=((1.0,),), handle=None, x_of=None, batched=False):
    """Run a generation by hand: per step, one call per branch (sequential CFG) or one batched call.

    ``branches``: per branch, a cond value (float) or a callable step -> cond. Returns outputs[step][call].
    """
    if handle is not None:
        handle.clock.begin_generation(steps)
    outs = []
    for s in range(steps):
        if handle is not None:
            handle.clock.set_step(s, steps)
        conds = [b[0](s) if callable(b[0]) else b[0] for b in branches]
        calls = [conds] if batched else [[c] for c in conds]
        row = []
        for cs in calls:
            x = torch.ones(len(cs), 2, model.dim, dtype=torch.float64) * (0.5 + s) if x_of is None else x_of(s, len(cs))
            cond = torch.tensor(cs, dtype=torch.float64)
            with torch.no_grad():
                row.append(model(x, timestep=torch.tensor(float(s)), cond=cond))
        outs.append(row)
    return outs


def max_err(a, b):
    return max(float((x - y).abs().max()) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def method_of(handle):
    return handle._engine.methods[0]


def enable(model, config):
    return ditaccel.enable_acceleration(model, config)
