"""SVG2: semantic-aware permutation sparse attention (Yang et al., 2025, "Sparse VideoGen2").

Per (batch, head), the image queries and keys are clustered with k-means (first sparse step
``kmeans_iters_first`` Lloyd rounds from a random or k-means++ start; later steps warm-start from
the previous step's centroids with ``kmeans_iters`` rounds). Tokens are permuted so each cluster
is contiguous. The attention mass of a (query-cluster, key-cluster) pair is estimated as
``|key cluster| · exp(c_q · c_k · scale)``; for each query cluster the key clusters are kept in
decreasing estimated mass until the cumulative share reaches ``top_p`` and at least
``min_density`` of the image keys are kept. The variable-size block-sparse kernel then attends
each query cluster (split into pieces of at most ``block_size`` queries) to its kept key
clusters, and the output is permuted back. With ``reuse_steps`` = r > 0, each clustering step's
permutation and selection serve the layer's next r sparse steps as well (no k-means there): the
attention within the kept blocks stays exact for the new q/k/v, only the choice of blocks is r steps
old. On a GPU k-means was ~80 % of SVG2's attention time at 32k tokens (docs/sparse_attention.md).

Joint attention: the text keys are one always-kept set (merged by LSE with the sparse image part)
and the text queries attend densely. Cross-attention stays dense (see ``SparseAttentionMethod``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.block_sparse_torch import block_sparse_attention_torch
from ..attention.kmeans import INITS, cluster_permutation, kmeans
from ..attention.sparse_method import (
    SparseAttentionMethod, check_attention_inputs, permute_tokens, run_block_sparse, unpermute_tokens,
    with_text_keys,
)
from ..config import MethodConfig, check_choice, check_float, check_int, register_method


@dataclass(frozen=True)
class SVG2Config(MethodConfig):
    """SVG2: k-means semantic permutation of Q/K per head, top-p key-cluster selection."""

    q_clusters: int = 100
    k_clusters: int = 500
    top_p: float = 0.9
    min_density: float = 0.1
    kmeans_iters_first: int = 50
    kmeans_iters: int = 2
    kmeans_init: str = "random"  # or "kmeans++"
    dense_steps_fraction: float = 0.2
    dense_layers: int = 1
    block_size: int = 64  # query clusters are split into pieces of at most this many tokens
    seed: int = 0
    # after each clustering step, the next ``reuse_steps`` sparse steps of a layer attend with its
    # permutation and key-cluster selection as they are (no k-means, no selection, no index build)
    reuse_steps: int = 0

    def validate(self) -> None:
        n = type(self).__name__
        check_int(n, "q_clusters", self.q_clusters, minimum=1)
        check_int(n, "k_clusters", self.k_clusters, minimum=1)
        check_float(n, "top_p", self.top_p, minimum=0.0, maximum=1.0, min_inclusive=False)
        check_float(n, "min_density", self.min_density, minimum=0.0, maximum=1.0)
        check_int(n, "kmeans_iters_first", self.kmeans_iters_first, minimum=1)
        check_int(n, "kmeans_iters", self.kmeans_iters, minimum=1)
        check_choice(n, "kmeans_init", self.kmeans_init, INITS)
        check_float(n, "dense_steps_fraction", self.dense_steps_fraction, minimum=0.0, maximum=1.0)
        check_int(n, "dense_layers", self.dense_layers, minimum=0)
        check_int(n, "block_size", self.block_size, minimum=1)
        check_int(n, "seed", self.seed, minimum=0)
        check_int(n, "reuse_steps", self.reuse_steps, minimum=0)


# ---------------------------------------------------------------------------------------------
# the algorithm, usable without a model


def select_key_clusters(cq, ck, k_sizes, scale: float, top_p: float, min_tokens: float):
    """Per query cluster, the key clusters to keep.

    cq (G, Cq, D), ck (G, Ck, D) centroids, k_sizes (G, Ck). Returns (order (G, Cq, Ck) key
    cluster ids by decreasing estimated mass, count (G, Cq) how many of them are kept). Empty key
    clusters are never kept; the kept clusters are the shortest prefix of ``order`` whose mass
    share reaches ``top_p`` and whose token count reaches ``min_tokens`` (all of them at top_p=1).
    """
    # Few, large torch ops (no host sync): on a GPU this glue is bound by kernel launches, and it is
    # the "index build" of the issue's <= 5 %-of-attention budget.
    sizes = k_sizes.to(cq.dtype)
    # mass ∝ |cluster| · exp(c_q · c_k · scale); log(0) = -inf gives empty clusters mass 0.
    logw = torch.baddbmm(sizes.log().unsqueeze(1), cq, ck.transpose(1, 2), alpha=scale)
    mass = torch.softmax(logw, dim=-1).masked_fill_((k_sizes == 0).unsqueeze(1), -1.0)  # empty: sort last
    m_sorted, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    if top_p >= 1.0:
        return order, (k_sizes > 0).sum(-1, keepdim=True).expand(order.shape[:2])
    t_sorted = torch.gather(sizes.unsqueeze(1).expand_as(mass), -1, order)
    mass_before = m_sorted.cumsum(-1).sub_(m_sorted)
    tok_before = t_sorted.cumsum(-1).sub_(t_sorted)
    keep = (mass_before < top_p).logical_or_(tok_before < min_tokens).logical_and_(m_sorted >= 0)
    return order, keep.sum(-1)


def split_query_blocks(offsets: torch.Tensor, block: int, n_tokens: int | None = None):
    """Split clusters (G, C + 1 offsets) into pieces of at most ``block`` tokens.

    Returns (piece offsets (G, P + 1), piece -> cluster id (G, P)). With ``n_tokens`` (N, the
    clustered length) P = C + ceil(N / block), a bound known without a device sync; without it P is
    the largest exact piece count (read back from the device). Groups with fewer pieces are padded
    with empty pieces at the end (offset = N)."""
    G, C = offsets.shape[0], offsets.shape[1] - 1
    last = offsets[:, -1:]
    pieces = (offsets.diff(dim=1) + (block - 1)).div_(block, rounding_mode="floor")
    cum = pieces.cumsum(1)
    P = C + -(-n_tokens // block) if n_tokens is not None else max(1, int(cum[:, -1].max()))
    j = torch.arange(P, device=offsets.device).expand(G, P)
    cluster = torch.searchsorted(cum, j.contiguous(), right=True).clamp_(max=C - 1)
    # piece j is piece (j - pieces before its cluster) of its cluster
    start = torch.gather(offsets[:, :-1] - (cum - pieces) * block, 1, cluster).add_(j * block)
    start = torch.where(j < cum[:, -1:], start, last)
    return torch.cat([start, last], dim=1), cluster


def svg2_block_layout(order, count, q_offsets, k_offsets, n_tokens: int, block: int):
    """The kernel's layout from a key-cluster selection (``select_key_clusters``): (kv_count (G, P),
    kv_index (G, P, Ck), query piece offsets (G, P + 1), key cluster offsets (G, Ck + 1)), int32,
    with the query clusters split into pieces of at most ``block`` tokens. ``n_tokens`` is the
    clustered length N, so nothing is read back to the host on a GPU (on the CPU reading the exact
    piece count is free and leaves no empty padding pieces for the gather path)."""
    p_off, p_cluster = split_query_blocks(q_offsets, block, n_tokens if q_offsets.is_cuda else None)
    P, Ck = p_cluster.shape[1], order.shape[2]
    kv_index = torch.gather(order.to(torch.int32), 1, p_cluster.unsqueeze(-1).expand(-1, P, Ck))
    kv_count = torch.gather(count, 1, p_cluster).to(torch.int32)
    return kv_count, kv_index, p_off.to(torch.int32), k_offsets.to(torch.int32)


@dataclass
class SVG2State:
    q_centroids: torch.Tensor  # (B*H, Cq, D) float32
    k_centroids: torch.Tensor  # (B*H, Ck, D)
    # the clustering's attention pattern, for steps that reuse it (``reuse_steps``)
    perm_q: torch.Tensor | None = None  # (B, H, N)
    perm_k: torch.Tensor | None = None
    layout: tuple | None = None  # (kv_count, kv_index, piece offsets, key offsets), see svg2_block_layout
    image_density: float = 1.0  # kept fraction of the (image query, image key) pairs
    reused: int = 0  # steps this pattern has been reused for

    def nbytes(self) -> int:
        ts = [self.q_centroids, self.k_centroids, self.perm_q, self.perm_k, *(self.layout or ())]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def svg2_attention(q, k, v, *, q_clusters: int = 100, k_clusters: int = 500, top_p: float = 0.9,
                   min_density: float = 0.1, iters: int = 10, init: str = "random", state: SVG2State | None = None,
                   k_txt=None, v_txt=None, scale: float | None = None, block_size: int = 64,
                   generator: torch.Generator | None = None, reuse: bool = False, txt_bias=None):
    """SVG2 attention of image queries q (B, H, N, D) over image keys k/v (B, H, N, D) plus the
    always-kept text keys k_txt/v_txt (B, H, T, D) if given.

    ``reuse=True`` (with a ``state`` from an earlier call on the same shapes) skips clustering and
    selection and attends with the state's permutation and block layout. ``txt_bias``: additive
    bias on the text keys' scores (see ``with_text_keys``).
    Returns (out (B, H, N, D), lse (B, H, N) float32, density over all keys, new state).
    """
    check_attention_inputs(q, k, v, "SVG2")
    B, H, N, D = q.shape
    if k.shape[2] != N:
        raise ValueError(f"SVG2: image queries and keys must be the same tokens (self-attention), got "
                         f"{N} queries and {k.shape[2]} keys.")
    scale = D ** -0.5 if scale is None else float(scale)
    T = 0 if k_txt is None else k_txt.shape[2]
    if reuse:
        if state is None or state.layout is None:
            raise ValueError("SVG2: reuse=True needs the state of an earlier svg2_attention call (its pattern).")
        out, lse = _attend(q, k, v, state.perm_q, state.perm_k, state.layout, scale, block_size)
        out, lse = with_text_keys(out, lse, q, k_txt, v_txt, scale, txt_bias)
        density = (state.image_density * N + T) / (N + T)
        state.reused += 1
        return out, lse, density, state
    G = B * H
    qf, kf = q.reshape(G, N, D), k.reshape(G, N, D)
    cq, q_labels, q_sizes = kmeans(qf, q_clusters, iters, init, state.q_centroids if state else None, generator)
    ck, k_labels, k_sizes = kmeans(kf, k_clusters, iters, init, state.k_centroids if state else None, generator)
    Cq, Ck = cq.shape[1], ck.shape[1]
    q_perm, q_off = cluster_permutation(q_labels, Cq)
    k_perm, k_off = cluster_permutation(k_labels, Ck)

    order, count = select_key_clusters(cq, ck, k_sizes, scale, top_p, min_density * N)
    # density: kept key tokens per query cluster, weighted by the cluster's size
    kept_tok = (torch.gather(k_sizes.unsqueeze(1).expand(G, Cq, Ck), -1, order)
                * (torch.arange(Ck, device=q.device) < count.unsqueeze(-1))).sum(-1)
    image_density = float((q_sizes * kept_tok).sum() / (G * N * N))
    density = (image_density * N + T) / (N + T)

    perm_q = q_perm.reshape(B, H, N)
    perm_k = k_perm.reshape(B, H, N)
    kv_count, kv_index, p_off, k_off = svg2_block_layout(order, count, q_off, k_off, N, block_size)
    P = kv_count.shape[1]
    layout = (kv_count.reshape(B, H, P), kv_index.reshape(B, H, P, Ck), p_off.reshape(B, H, P + 1),
              k_off.reshape(B, H, Ck + 1))
    out, lse = _attend(q, k, v, perm_q, perm_k, layout, scale, block_size)
    out, lse = with_text_keys(out, lse, q, k_txt, v_txt, scale, txt_bias)
    return out, lse, density, SVG2State(cq, ck, perm_q, perm_k, layout, image_density)


def _attend(q, k, v, perm_q, perm_k, layout, scale: float, block_size: int):
    """Block-sparse attention over the permuted tokens; (out, lse) in token order."""
    if not q.is_cuda:
        # CPU gather path: reads q/k/v through the permutations, returns out/lse in token order
        return block_sparse_attention_torch(q, k, v, *layout, scale=scale, q_perm=perm_q, k_perm=perm_k)
    out_p, lse_p = run_block_sparse(permute_tokens(q, perm_q), permute_tokens(k, perm_k), permute_tokens(v, perm_k),
                                    *layout, scale=scale, max_q_block_size=block_size)
    return unpermute_tokens(out_p, perm_q), unpermute_tokens(lse_p.unsqueeze(-1), perm_q).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# the installed method


class SVG2(SparseAttentionMethod):
    supports_text_bias = True

    def __init__(self, engine, config: SVG2Config):
        super().__init__(engine, config)
        self._state: dict = {}
        self._generator: torch.Generator | None = None

    def reset(self) -> None:
        self._state = {}
        self._generator = None

    def _gen(self, device) -> torch.Generator:
        if self._generator is None or self._generator.device != torch.device(device):
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.config.seed)
        return self._generator

    def sparse_image_attention(self, call, q_img, k_img, v_img, k_txt, v_txt):
        c = self.config
        state = self._state.get(call.key)
        if state is not None and (state.q_centroids.shape[0] != q_img.shape[0] * q_img.shape[1]
                                  or state.q_centroids.shape[-1] != q_img.shape[-1]):
            state = None
        warm = state is not None
        reuse = warm and state.reused < c.reuse_steps and state.perm_q is not None \
            and state.perm_q.shape == q_img.shape[:3]
        iters = c.kmeans_iters if warm else c.kmeans_iters_first
        out, _, density, state = svg2_attention(
            q_img, k_img, v_img, q_clusters=c.q_clusters, k_clusters=c.k_clusters, top_p=c.top_p,
            min_density=c.min_density, iters=iters, init=c.kmeans_init, state=state, k_txt=k_txt, v_txt=v_txt,
            scale=call.scale, block_size=c.block_size, generator=self._gen(q_img.device), reuse=reuse,
            txt_bias=call.text_bias,
        )
        if c.reuse_steps == 0 and state.layout is not None:
            # only the centroids warm-start the next step; the pattern (permutations and the block
            # layout, tens of MB per layer at video lengths) is kept only when it will be reused
            state = SVG2State(state.q_centroids, state.k_centroids)
        self._state[call.key] = state
        self.counters["pattern_reused" if reuse else "kmeans_warm" if warm else "kmeans_first"] += 1
        return out, density

    def bytes_held(self) -> int:
        return sum(s.nbytes() for s in self._state.values())


@register_method(SVG2Config)
def apply_svg2(engine, config: SVG2Config) -> SVG2:
    return SVG2(engine, config)
