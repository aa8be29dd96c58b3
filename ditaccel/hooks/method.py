"""Base class of an installed method: the interface between the engine and one method."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

from torch import nn

# Kinds of ownership. One module may have at most one owner of each kind.
STEP_CACHE = "step cache"
SPARSE_ATTENTION = "sparse attention"
TOKEN_SELECTION = "token selection"


class InstalledMethod:
    """One method installed on one model by the engine.

    Subclasses fill ``claims`` (checked for conflicts before anything is attached), ``parts`` (or
    ``install`` / ``remove`` themselves), ``reset`` and optionally the per-call callbacks. ``counters`` holds the numbers
    ``handle.stats()`` reports: ``computed``, ``cached`` and ``forecast`` module calls, and
    ``nonfinite_fallbacks``.
    """

    def __init__(self, engine, config):
        self.engine = engine
        self.config = config
        self.counters: Counter = Counter()
        self._warned: set[str] = set()

    @property
    def name(self) -> str:
        return self.config.method_name

    def claims(self) -> list[tuple[str, nn.Module, str]]:
        """(kind, module, module name) pairs this method needs to own exclusively."""
        return []

    def parts(self) -> list:
        """The pieces (segments, module caches, probes) ``install``/``remove`` attach and detach, in order."""
        raise NotImplementedError(f"{type(self).__name__} must define parts() or install()/remove()")

    def install(self) -> None:
        self.install_parts(self.parts())

    def remove(self) -> None:
        for part in reversed(self.parts()):
            part.remove()

    def reset(self) -> None:
        """Forget all state (new generation, or new input shapes)."""

    def begin_call(self, call) -> None:
        """Called before each transformer call, after the step clock ticked."""

    def end_call(self, call, output: Any) -> Any:
        return output

    def bytes_held(self) -> int:
        return 0

    def stats(self) -> dict[str, Any]:
        out = {k: int(self.counters.get(k, 0)) for k in ("computed", "cached", "forecast")}
        out.update({k: int(v) for k, v in self.counters.items() if k not in out})
        out["bytes_held"] = int(self.bytes_held())
        return out

    # -- helpers shared by the methods -------------------------------------------------------------
    @staticmethod
    def install_parts(parts) -> None:
        """Install pieces (segments, module caches, probes) in order; on failure remove the installed ones."""
        done = []
        try:
            for part in parts:
                part.install()
                done.append(part)
        except BaseException:
            for part in reversed(done):
                part.remove()
            raise

    def count_segment(self, seg, computed: bool, skipped_kind: str = "cached") -> None:
        """Count a segment's blocks as computed, or as ``skipped_kind`` with their FLOPs skipped."""
        n = len(seg.entries)
        if computed:
            self.counters["computed"] += n
            return
        self.counters[skipped_kind] += n
        call = self.engine.current_call
        if call is not None:
            call.skipped_flops += sum(self.engine.flops_of(b) for b in seg.blocks)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"ditaccel {self.name}: {message}", RuntimeWarning, stacklevel=3)
