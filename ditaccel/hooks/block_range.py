"""Sub-ranges of a segment, and a segment cache whose skipped calls add a *provided* residual.

``range_entries`` maps global block indices (execution order over all blocks) to the entries of
one segment, with a clear error when the range is outside the model or crosses a segment.

``ProvidedResidualSegment`` is a :class:`SegmentCache` whose residual on skipped calls comes from
a callback (a Taylor forecast, say) and whose measured residual on computed calls is handed to
another callback instead of being kept. The measuring (including the loop's own additions between
blocks) is the base class's; only where the residual goes and comes from differs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..adapters.base import BlockIO, pack_output
from ..errors import ConfigError
from .segment_cache import SegmentCache

Entry = tuple[str, nn.Module, BlockIO]


def segment_spans(segments: list[list[Entry]]) -> list[tuple[int, int]]:
    spans, offset = [], 0
    for seg in segments:
        spans.append((offset, offset + len(seg)))
        offset += len(seg)
    return spans


def range_entries(segments: list[list[Entry]], start: int, stop: int, what: str = "block range") -> list[Entry]:
    """The entries of blocks ``[start, stop)``; the range must lie inside one segment."""
    spans = segment_spans(segments)
    total = spans[-1][1] if spans else 0
    if not 0 <= start < stop <= total:
        raise ConfigError(f"{what} ({start}, {stop}) is outside the model: it has {total} blocks, so a range "
                          f"must satisfy 0 <= start < stop <= {total}. Segments (start, stop): {spans}.")
    for (lo, hi), seg in zip(spans, segments):
        if lo <= start and stop <= hi:
            return seg[start - lo: stop - lo]
    raise ConfigError(f"{what} ({start}, {stop}) crosses a segment boundary; a cached range must lie inside one "
                      f"run of blocks carrying the same streams. Segments (start, stop): {spans}.")


Residual = tuple[torch.Tensor, torch.Tensor | None]


class ProvidedResidualSegment(SegmentCache):
    """``provide(seg) -> (dh, de)`` supplies the residual of skipped calls; ``record(seg, dh, de)``
    receives the residual measured on computed calls (when ``want_residual()`` was True)."""

    def __init__(self, entries, hook_name, decide, want_residual, on_result,
                 provide: Callable[["ProvidedResidualSegment"], Residual],
                 record: Callable[["ProvidedResidualSegment", torch.Tensor, torch.Tensor | None], None]):
        super().__init__(entries, hook_name, decide, want_residual, on_result, cache_dtype=None)
        self.provide = provide
        self.record = record

    def skipped_output(self, io: BlockIO, h: torch.Tensor, e: torch.Tensor | None):
        dh, de = self.provide(self)
        h_out = h + dh.to(h.dtype)
        e_out = e + de.to(e.dtype) if (e is not None and de is not None) else e
        return pack_output(io, h_out, e_out)

    def exit(self, io: BlockIO, output) -> None:
        if not self._keep:
            return
        super().exit(io, output)
        st = self.states.pop(self.branch, None)
        if st is not None and st.dh is not None:
            self.record(self, st.dh, st.de)
