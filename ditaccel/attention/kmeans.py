"""Batched k-means in torch (one independent problem per batch row, e.g. per (batch, head)).

Runs on the tensors' device; assignments use ||c||² − 2·x·c (one batched matmul; on CUDA a fused
Triton kernel, ditaccel/kernels/triton/kmeans_assign.py, that never materialises the (G, N, C)
scores), updates use one flat index-add. Empty clusters keep their previous centroid. Used by SVG2
to cluster queries and keys per head; later denoising steps warm-start from the previous step's centroids.
"""

from __future__ import annotations

import functools

import torch

INITS = ("random", "kmeans++")


def _check(x: torch.Tensor, k: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"kmeans expects x of shape (groups, points, dim), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
    if not x.dtype.is_floating_point:
        raise TypeError(f"kmeans expects floating-point points, got {x.dtype}.")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"kmeans needs k >= 1 clusters, got {k!r}.")


@functools.lru_cache(maxsize=None)
def _triton_assign():
    try:
        from ditaccel.kernels.triton.kmeans_assign import kmeans_assign, supports
    except ImportError:
        return None
    return kmeans_assign, supports


_TRITON_ASSIGN_FAILED: list[str] = []


def _disable_triton_assign(err: Exception) -> None:
    """The fused kernel failed on this machine: warn once and use the torch path from now on."""
    import warnings

    _TRITON_ASSIGN_FAILED.append(f"{type(err).__name__}: {err}")
    warnings.warn(f"ditaccel: the fused k-means assignment kernel failed ({_TRITON_ASSIGN_FAILED[0][:300]}); "
                  "using the torch path (bmm + argmax) instead.", RuntimeWarning, stacklevel=3)


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (G, N) int64 for points x (G, N, D) and centroids (G, C, D).

    CUDA tensors go to the fused Triton kernel when Triton is importable and the kernel takes the
    inputs (fp32/fp16/bf16, D <= 256); otherwise (CPU, float64, ...) the torch path below runs.
    """
    if x.is_cuda and not _TRITON_ASSIGN_FAILED:
        triton_fns = _triton_assign()
        if triton_fns is not None and triton_fns[1](x, centroids):
            try:
                return triton_fns[0](x, centroids)
            except Exception as err:  # noqa: BLE001 - a kernel that fails to build or launch here
                _disable_triton_assign(err)
    # argmin_c ||x − c||² = argmax_c (x·c − ||c||²/2)
    half_c2 = 0.5 * (centroids * centroids).sum(-1)  # (G, C)
    score = torch.bmm(x, centroids.transpose(1, 2))
    score.sub_(half_c2.unsqueeze(1))
    return score.argmax(-1)


def update(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of the clusters (empty clusters keep ``centroids``) and the cluster sizes (G, C)."""
    G, N, D = x.shape
    C = centroids.shape[1]
    # One flat index_add_ of whole D-rows (3x faster on CPU than scatter_add_ over an expanded index).
    flat = (labels + (torch.arange(G, device=x.device) * C).unsqueeze(1)).reshape(-1)
    sums = torch.zeros(G * C, D, dtype=x.dtype, device=x.device).index_add_(0, flat, x.reshape(G * N, D))
    sizes = torch.bincount(flat, minlength=G * C).view(G, C)
    means = sums.view(G, C, D) / sizes.clamp(min=1).unsqueeze(-1).to(x.dtype)
    return torch.where((sizes > 0).unsqueeze(-1), means, centroids), sizes


def init_centroids(x: torch.Tensor, k: int, method: str = "random", generator: torch.Generator | None = None):
    """k initial centroids per group: distinct random points, or k-means++ seeding."""
    G, N, D = x.shape
    if method not in INITS:
        raise ValueError(f"kmeans init must be one of {INITS}, got {method!r}.")
    if method == "random":
        idx = torch.rand(G, N, generator=generator, device=x.device).argsort(dim=1)[:, :k]
        return torch.gather(x, 1, idx.unsqueeze(-1).expand(G, k, D)).clone()
    # k-means++: each next centroid is drawn with probability proportional to D(x)².
    out = torch.empty(G, k, D, dtype=x.dtype, device=x.device)
    first = torch.randint(0, N, (G,), generator=generator, device=x.device)
    rows = torch.arange(G, device=x.device)
    out[:, 0] = x[rows, first]
    x2 = (x * x).sum(-1)
    best = (x2 - 2 * (x @ out[:, 0].unsqueeze(-1)).squeeze(-1) + (out[:, 0] ** 2).sum(-1, keepdim=True)).clamp_(min=0)
    for j in range(1, k):
        w = best.clamp(min=0)
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))  # all points equal: uniform
        pick = torch.multinomial(w, 1, generator=generator).squeeze(-1)
        out[:, j] = x[rows, pick]
        d = (x2 - 2 * (x @ out[:, j].unsqueeze(-1)).squeeze(-1) + (out[:, j] ** 2).sum(-1, keepdim=True)).clamp_(min=0)
        best = torch.minimum(best, d)
    return out


def kmeans(x: torch.Tensor, k: int, iters: int, init: str = "random", centroids: torch.Tensor | None = None,
           generator: torch.Generator | None = None):
    """Lloyd's k-means per group.

    Args:
        x: (G, N, D) points (computed in float32, or float64 for float64 input).
        k: clusters per group (clamped to N).
        iters: assignment/update rounds.
        init: "random" or "kmeans++" when ``centroids`` is None.
        centroids: (G, k, D) warm start (e.g. the previous denoising step's).

    Returns:
        (centroids (G, k, D), labels (G, N) int64, sizes (G, k) int64): the labels of the last
        assignment and the centroids recomputed from them (means of their members).
    """
    _check(x, k)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(ct)
    G, N, D = x.shape
    k = min(k, N)
    if centroids is None or tuple(centroids.shape) != (G, k, D):
        centroids = init_centroids(x, k, init, generator)
    else:
        centroids = centroids.to(device=x.device, dtype=ct)
    labels = sizes = None
    for _ in range(max(1, iters)):
        labels = assign(x, centroids)
        centroids, sizes = update(x, labels, centroids)
    return centroids, labels, sizes


def inertia(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of squared distances of each point to its centroid, per group (G,)."""
    c = torch.gather(centroids, 1, labels.unsqueeze(-1).expand(*labels.shape, centroids.shape[-1]))
    return ((x.to(c.dtype) - c) ** 2).sum((-1, -2))


def cluster_permutation(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order that makes clusters contiguous, and the cluster offsets.

    labels (G, N) -> perm (G, N) int64 (position i holds token perm[i]; stable within a cluster),
    offsets (G, k + 1) int64 with cluster c at [offsets[c], offsets[c + 1]).
    """
    perm = torch.sort(labels, dim=1, stable=True).indices
    sizes = torch.zeros(labels.shape[0], k, dtype=torch.long, device=labels.device)
    sizes.scatter_add_(1, labels, torch.ones_like(labels))
    offsets = torch.zeros(labels.shape[0], k + 1, dtype=torch.long, device=labels.device)
    offsets[:, 1:] = sizes.cumsum(1)
    return perm, offsets
