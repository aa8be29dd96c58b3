"""Finite-difference (Newton) series of a list of tensors over the full steps, and its forecast.

TaylorSeer (Liu et al., "From Reusing to Forecasting: Accelerating Diffusion Models with
TaylorSeers", arXiv:2503.06923, Eq. 8) predicts a feature k steps after the last full step t as

    F(x_{t-k}) ≈ Σ_{i=0}^{m} Δ^i F(x_t) / (i! · N^i) · (−k)^i

where Δ^i F is the i-th backward finite difference over full steps N apart (its time runs from
T down to 0; our step index runs up, so −k becomes +k). Δ^i F / (i! N^i) is exactly the Newton
divided difference F[t, t−N, …, t−iN]. We keep the divided differences with the *actual* distances
between full steps (warm-up steps, stage changes and adaptive schedules make them uneven):

    d_0 = F(s_0),  d_j = F[s_0, …, s_j] = (d_{j−1}(new) − d_{j−1}(old)) / (s_0 − s_j)

with s_0 the newest full step. Two forecasts share these coefficients:

* ``"newton"`` (default): p(s) = Σ_j d_j · Π_{i<j} (s − s_i), the interpolating polynomial through
  the last m+1 full steps; exact for any F that is a polynomial of degree ≤ m in the step,
  whatever the spacing;
* ``"taylor"``: p(s) = Σ_j d_j · (s − s_0)^j, the paper's Taylor form (derivatives estimated by
  the differences). Equal to Newton for m ≤ 1.
"""

from __future__ import annotations

import torch

FORMULAS = ("newton", "taylor")


class TaylorSeries:
    """Divided differences ``d_0..d_J`` (J ≤ order) of a list of tensors (None entries allowed)."""

    __slots__ = ("order", "dtype", "nodes", "diffs", "nonfinite")

    def __init__(self, order: int, dtype: torch.dtype | None = None):
        self.order = order
        self.dtype = dtype
        self.nodes: list[int] = []  # full steps, newest first (at most order + 1 kept)
        self.diffs: list[list[torch.Tensor | None]] = []  # diffs[j][k]: j-th divided difference of tensor k
        self.nonfinite = False  # the last update held NaN/Inf: nothing to forecast from

    @property
    def ready(self) -> bool:
        return bool(self.diffs)

    def clear(self) -> None:
        self.nodes = []
        self.diffs = []

    def update(self, step: int, values: list[torch.Tensor | None]) -> None:
        """Add the values computed at full step ``step``."""
        if self.nodes and step == self.nodes[0]:
            return  # the same step again (a repeated call): keep the series
        if self.diffs and not _compatible(self.diffs[0], values):
            self.clear()  # shapes changed: restart the expansion
        prev = self.diffs
        work = [v.float() if v is not None and v.dtype in (torch.float16, torch.bfloat16) else v for v in values]
        new: list[list[torch.Tensor | None]] = [work]
        for j in range(1, min(self.order, len(prev)) + 1):
            gap = float(step - self.nodes[j - 1])
            lower, old = new[j - 1], prev[j - 1]
            new.append([None if (a is None or b is None) else (a - b.to(a.dtype)) / gap for a, b in zip(lower, old)])
        store = self.dtype
        self.diffs = [[None if t is None else t.to(store or v.dtype) for t, v in zip(level, values)] for level in new]
        self.nodes = ([step] + self.nodes)[: self.order + 1]
        self.nonfinite = False
        if not _all_finite(self.diffs[-1]):
            if len(self.diffs) > 1 and _all_finite(self.diffs[0]):
                # history was not finite: restart from the new values alone
                self.diffs = self.diffs[:1]
                self.nodes = self.nodes[:1]
            else:
                self.clear()
                self.nonfinite = True

    def forecast(self, step: int, dtype: torch.dtype | None = None, formula: str = "newton") -> list[torch.Tensor | None]:
        """The series' value at ``step`` (a list aligned with the values given to ``update``)."""
        coeffs = self.coefficients(step, formula)
        out: list[torch.Tensor | None] = []
        for k in range(len(self.diffs[0])):
            base = self.diffs[0][k]
            if base is None:
                out.append(None)
                continue
            target = dtype or base.dtype
            acc = base.to(target)
            for j in range(1, len(self.diffs)):
                d = self.diffs[j][k]
                if d is not None and coeffs[j] != 0.0:
                    acc = torch.add(acc, d.to(target), alpha=coeffs[j])
            out.append(acc)
        return out

    def coefficients(self, step: int, formula: str = "newton") -> list[float]:
        coeffs = [1.0]
        prod = 1.0
        for j in range(1, len(self.diffs)):
            if formula == "taylor":
                prod = float(step - self.nodes[0]) ** j
            else:
                prod *= float(step - self.nodes[j - 1])
            coeffs.append(prod)
        return coeffs

    def bytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for level in self.diffs for t in level if t is not None)


def _compatible(old: list, new: list) -> bool:
    if len(old) != len(new):
        return False
    for a, b in zip(old, new):
        if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
            return False
    return True


def _all_finite(tensors: list) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)
