"""Keeping caching decisions identical on every rank.

Under context parallelism (diffusers ``ContextParallelConfig``, xDiT) each rank holds a shard of the
sequence, so a data-dependent signal (a residual's relative change, a forecast error) differs per
rank. If one rank skipped a block range while another computed it, their collectives would no
longer pair up. Every data-dependent decision therefore goes through ``agree``: the ranks compute
if any of them wants to (an all-reduce of the flag with MAX), and signals are averaged with
``mean_signal`` when a method thresholds a number.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RankSync:
    """Agreement across the ranks of the default process group (no-op in a single process)."""

    def __init__(self, enabled: bool | str = "auto", group=None):
        self._enabled = enabled
        self.group = group
        self.calls = 0

    @property
    def active(self) -> bool:
        if self._enabled is False or not (dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size(self.group) > 1

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree(self, compute: bool) -> bool:
        """True on every rank if ``compute`` is True on any rank."""
        if not self.active:
            return compute
        self.calls += 1
        flag = torch.tensor([1.0 if compute else 0.0], device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item() > 0)

    def mean_signal(self, value: float) -> float:
        """The mean over ranks of a scalar decision signal (e.g. a relative L1 change)."""
        if not self.active:
            return value
        self.calls += 1
        t = torch.tensor([float(value)], device=self._device(), dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return float(t.item()) / dist.get_world_size(self.group)
