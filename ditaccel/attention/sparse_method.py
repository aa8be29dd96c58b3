"""Base of the sparse-attention methods (SVG2, Re-ttention, CLEAR).

A :class:`SparseAttentionMethod` is an :class:`~ditaccel.hooks.method.InstalledMethod` that
installs itself as the attention router (``ditaccel.attention.dispatch``) of every attention
module the adapter lists, and claims each module as its ``SPARSE_ATTENTION`` owner, so two
sparse methods on one layer fail with ``CompositionError`` before anything is attached.

For each intercepted scaled-dot-product attention it decides:

* **dense** — the first ``dense_steps_fraction`` of the steps, the first ``dense_layers``
  attention layers, cross-attention (text keys, ``Lq != Lk`` or ``module.is_cross_attention``),
  calls with an attention mask other than a mask / bias on the text keys (:mod:`ditaccel.attention.key_mask`:
  those run sparse and exact, the padding text keys left out or their bias added to the text
  part), calls whose token layout is unknown, and the one call of each
  input shape that the engine profiles for FLOPs (so ``flops_full`` is the dense count);
* **sparse** — self-attention over image tokens, or joint attention over ``[text, image]`` /
  ``[image, text]``. Then the image queries go to the method (:meth:`sparse_image_attention`),
  which receives the image keys and the text keys separately; text queries stay dense.

Skipped FLOPs are ``4·B·H·Lq_img·Lk·d·(1 − density)`` per call, added to ``call.skipped_flops``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..adapters.base import IMAGE_FIRST, SEPARATE, TEXT_FIRST, TokenLayout, read_arg
from ..errors import ConfigError
from ..hooks.method import SPARSE_ATTENTION, InstalledMethod
from .block_sparse import block_sparse_attention
from .cpu_flash import flash_attention_lse
from .dispatch import AttentionSite, install_attention_router, remove_attention_router
from .key_mask import TextKeyMask, read_text_key_mask, split_tokens
from .reference import merge_attention_by_lse

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# token layout


def infer_token_layout(adapter, args: tuple, kwargs: dict) -> TokenLayout:
    """The adapter's token layout, or one inferred from the input shapes for families whose
    adapter has none (SD3: latents (B, C, H, W), joint [image, text]; Wan: (B, C, T, H, W),
    text by cross-attention)."""
    if adapter.token_layout_fn is not None:
        return adapter.token_layout(args, kwargs)
    model = adapter.model
    hidden = read_arg(model, adapter.hidden_arg, args, kwargs)
    encoder = read_arg(model, "encoder_hidden_states", args, kwargs)
    text = int(encoder.shape[1]) if isinstance(encoder, torch.Tensor) and encoder.dim() == 3 else 0
    cfg = getattr(model, "config", None)
    patch = getattr(cfg, "patch_size", None) if cfg is not None else None
    cls = type(model).__name__
    if isinstance(hidden, torch.Tensor) and hidden.dim() in (4, 5) and patch is not None:
        spatial = tuple(hidden.shape[2:])
        p = tuple(patch) if isinstance(patch, (tuple, list)) else (1,) * (len(spatial) - 2) + (int(patch),) * 2
        if len(p) == len(spatial) and all(s % q == 0 for s, q in zip(spatial, p)):
            grid = tuple(s // q for s, q in zip(spatial, p))
            order = IMAGE_FIRST if "SD3" in cls else SEPARATE
            return TokenLayout(batch=hidden.shape[0], image_tokens=math.prod(grid), text_tokens=text,
                               grid=grid, joint_order=order)
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        return TokenLayout(batch=hidden.shape[0], image_tokens=hidden.shape[1], text_tokens=text,
                           grid=(hidden.shape[1],), joint_order=adapter.joint_order)
    return TokenLayout(batch=0, image_tokens=-1, text_tokens=text, grid=(), joint_order=SEPARATE)


@dataclass
class AttentionCall:
    """One sparse-eligible attention call, as a method sees it."""

    site: AttentionSite
    step: int
    total_steps: int | None
    branch: int
    layout: TokenLayout
    image_start: int  # image tokens are q/k/v[:, :, image_start:image_start + image_tokens]
    image_tokens: int
    scale: float
    # additive bias on the text keys' scores for the image queries (B | 1, H | 1, 1, T) float32, from a
    # mask (ditaccel.attention.key_mask); None: none. Only for methods with supports_text_bias.
    text_bias: torch.Tensor | None = None

    @property
    def key(self) -> tuple[int, int, int]:
        """Per-layer state key: (layer index, SDPA call within the module, CFG branch)."""
        return (self.site.layer_index, self.site.call_index, self.branch)

    @property
    def grid(self) -> tuple[int, ...]:
        g = tuple(self.layout.grid)
        return g if math.prod(g) == self.image_tokens else (self.image_tokens,)


def split_image_text(x: torch.Tensor, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    img, txt = split_tokens(x, call.image_start, call.image_tokens, dim=2)
    return img, (txt if txt.shape[2] else None)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, who: str) -> None:
    """Clear errors for inputs no sparse path can take."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(x).__name__}.")
        if x.dim() != 4:
            raise ValueError(f"{who}: {name} must be (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}.")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{who}: {name} has dtype {x.dtype}; sparse attention needs float16, bfloat16, "
                            "float32 or float64 inputs.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{who}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"{who}: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "q and k need the same head_dim, k and v the same tokens, all the same (batch, heads).")
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"{who}: value head_dim {v.shape[-1]} differs from query head_dim {q.shape[-1]}; "
                         "the block-sparse kernels need equal head dims.")


# ---------------------------------------------------------------------------------------------
# attention pieces shared by the methods


def run_block_sparse(q, k, v, kv_count, kv_index, q_offsets=None, k_offsets=None, block_m=64, block_n=64,
                     scale=None, max_q_block_size=None):
    """The kernel layer's dispatcher (Triton on CUDA, torch gather path elsewhere): (out, lse fp32)."""
    return block_sparse_attention(q, k, v, kv_count, kv_index, q_offsets, k_offsets, block_m, block_n, scale,
                                  max_q_block_size=max_q_block_size)


def attention_with_lse(q, k, v, scale: float, chunk_elements: int = 1 << 22, bias=None):
    """Dense attention that also returns the natural-log LSE (B, H, Lq) in float32.

    ``bias``: None, or an additive float bias broadcastable to (B, H, 1, Lk) (the same for every
    query; finite). Query chunks keep the score tensor under ``chunk_elements`` floats. Used for
    the (short) text keys of joint attention and as the exact reference in tests.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if Lk > 0 and v.shape[-1] == D:
        fb = None if bias is None else bias.to(q.dtype).expand(B, H, Lq, Lk)
        fused = flash_attention_lse(q, k, v, fb, scale)  # CPU: torch's fused flash kernel
        if fused is not None:
            return fused[0], fused[1] if q.dtype == torch.float64 else fused[1].float()
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(B, H, Lq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32 if ct == torch.float32 else ct, device=q.device)
    step = max(1, chunk_elements // max(1, B * H * Lk))
    kt = k.to(ct).transpose(-1, -2)
    vc = v.to(ct)
    for i in range(0, Lq, step):
        s = torch.matmul(q[:, :, i:i + step].to(ct), kt).mul_(scale)
        if bias is not None:
            s = s.add_(bias.to(ct))
        m = s.amax(-1, keepdim=True)
        p = s.sub_(m).exp_()
        l_ = p.sum(-1, keepdim=True)
        out[:, :, i:i + step] = (torch.matmul(p, vc) / l_).to(q.dtype)
        lse[:, :, i:i + step] = (m + l_.log()).squeeze(-1).to(lse.dtype)
    return out, lse


def with_text_keys(out_img, lse_img, q_img, k_txt, v_txt, scale, bias=None):
    """Merge a partial attention over image keys with dense attention over the text keys (plus
    their additive ``bias`` (B | 1, H | 1, 1, T), see :mod:`ditaccel.attention.key_mask`)."""
    if k_txt is None or k_txt.shape[2] == 0:
        return out_img, lse_img
    out_t, lse_t = attention_with_lse(q_img, k_txt, v_txt, scale, bias=bias)
    return merge_attention_by_lse(out_img, lse_img, out_t, lse_t)


def permute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D), perm (B, H, L) -> x[..., perm, :] (new position i holds old token perm[i])."""
    return torch.gather(x, 2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]))


def unpermute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`permute_tokens`."""
    out = torch.empty_like(x)
    out.scatter_(2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]), x)
    return out


# ---------------------------------------------------------------------------------------------
# the method base


class SparseAttentionMethod(InstalledMethod):
    """Shared machinery; subclasses implement :meth:`sparse_image_attention` (and may override
    :meth:`dense_attention` to observe dense calls, e.g. to cache statistics)."""

    hook_name = "sparse_attention"
    # whether sparse_image_attention applies ``call.text_bias``; calls that carry one stay dense otherwise
    supports_text_bias = False

    def __init__(self, engine, config):
        super().__init__(engine, config)
        self.modules = list(engine.adapter.attention_modules())
        self._hooked: list = []
        self._layout: TokenLayout | None = None
        self.active = True
        self._density_sum = 0.0
        self._flops_attn_full = 0.0
        self._flops_attn_skipped = 0.0
        self._mask_cache: dict = {}

    # -- InstalledMethod ------------------------------------------------------------------------
    def claims(self):
        return [(SPARSE_ATTENTION, module, name) for name, module in self.modules]

    def install(self) -> None:
        if not self.modules:
            raise ConfigError(f"{self.name}: the {self.engine.adapter.family} adapter lists no attention modules, "
                              "so there is nothing to sparsify.")
        self._hooked = install_attention_router(self, self.modules, f"{self.hook_name}.{self.name}")

    def remove(self) -> None:
        remove_attention_router(self._hooked, f"{self.hook_name}.{self.name}")
        self._hooked = []
        self.reset()

    def reset(self) -> None:
        """Forget per-layer state (subclasses extend)."""

    def begin_call(self, call) -> None:
        self._mask_cache = {}
        try:
            self._layout = infer_token_layout(self.engine.adapter, call.args, call.kwargs)
        except Exception:  # a layout we cannot read: every attention stays dense
            self._layout = None

    def end_call(self, call, output: Any) -> Any:
        self._layout = None
        self._mask_cache = {}
        return output

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        n = self.counters.get("sparse", 0)
        out["mean_density"] = (self._density_sum / n) if n else 1.0
        full = self._flops_attn_full
        out["attention_sparsity"] = (self._flops_attn_skipped / full) if full else 0.0
        return out

    # -- schedule -------------------------------------------------------------------------------
    def dense_steps(self, total: int | None) -> int:
        frac = getattr(self.config, "dense_steps_fraction", 0.0)
        if total is None:
            if frac > 0:
                self.warn_once("no_total", "the number of steps is unknown (bare transformer without "
                               "handle.set_num_steps), so dense_steps_fraction cannot apply; all steps are sparse.")
            return 0
        return int(math.ceil(frac * total - 1e-9))

    def is_dense(self, call: AttentionCall) -> bool:
        if call.site.layer_index < getattr(self.config, "dense_layers", 0):
            return True
        return call.step < self.dense_steps(call.total_steps)

    # -- router ---------------------------------------------------------------------------------
    def _classify(self, site: AttentionSite, q, k) -> tuple[int, int] | str:
        layout = self._layout
        Lq, Lk = q.shape[2], k.shape[2]
        if getattr(site.module, "is_cross_attention", False) or Lq != Lk:
            return "cross"
        if layout is None or layout.image_tokens <= 0:
            return "unknown_layout"
        n, t = layout.image_tokens, layout.text_tokens
        if Lq == n:
            return (0, n)
        if t > 0 and Lq == n + t:
            if layout.joint_order == TEXT_FIRST:
                return (t, n)
            if layout.joint_order == IMAGE_FIRST:
                return (0, n)
        return "unknown_layout"

    def attend(self, site: AttentionSite, q, k, v, attn_mask, scale):
        engine_call = self.engine.current_call
        if engine_call is None:
            return None
        kind = self._classify(site, q, k)
        if isinstance(kind, str):
            self.counters[f"dense_{kind}"] += 1
            return None
        start, n = kind
        check_attention_inputs(q, k, v, self.name)
        text_mask = None
        if attn_mask is not None:
            text_mask = self._text_key_mask(attn_mask, q, start, n)
            if text_mask is None or (text_mask.text_bias is not None and not self.supports_text_bias):
                self.counters["dense_masked"] += 1  # the model's own SDPA, with its mask
                return None
        info = engine_call.info
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        call = AttentionCall(site, info.step, info.total_steps, info.branch, self._layout, start, n, scale,
                             text_bias=None if text_mask is None else text_mask.text_bias)
        B, H, Lq, D = q.shape
        full_flops = 4.0 * B * H * Lq * k.shape[2] * D
        self._flops_attn_full += full_flops
        # dense calls with a mask go to the model's own SDPA (None), which applies it
        dense = (lambda: None) if attn_mask is not None else (lambda: self.dense_attention(call, q, k, v))
        if engine_call.profiler is not None:
            # The FLOP profile of this input shape is being taken: keep it the dense count.
            self.counters["dense_profiled"] += 1
            return dense()
        if getattr(engine_call, "force_full", False):
            # The NaN/Inf guard's full re-run: dense, and the layer's per-step state (SVG2 centroids,
            # Re-ttention ratio/residual) is dropped so the next sparse step rebuilds it.
            self.counters["dense_forced"] += 1
            getattr(self, "_state", {}).pop(call.key, None)
            return dense()
        if self.is_dense(call):
            self.counters["dense"] += 1
            return dense()
        q_img, q_txt = split_image_text(q, call)
        k_img, k_txt = split_image_text(k, call)
        v_img, v_txt = split_image_text(v, call)
        if text_mask is not None and text_mask.text_keep is not None:  # drop the padding text keys
            k_txt, v_txt = k_txt.index_select(2, text_mask.text_keep), v_txt.index_select(2, text_mask.text_keep)
            if k_txt.shape[2] == 0:
                k_txt = v_txt = None
        result = self.sparse_image_attention(call, q_img, k_img, v_img, k_txt, v_txt)
        if result is None:
            self.counters["dense_fallback"] += 1
            return dense()
        out_img, density_img = result  # density over (image queries) x (all keys)
        self.counters["sparse"] += 1
        self._density_sum += density_img
        skipped = 4.0 * B * H * n * k.shape[2] * D * (1.0 - density_img)
        self._flops_attn_skipped += skipped
        engine_call.skipped_flops += skipped
        if q_txt is None:
            return out_img.to(q.dtype)
        rows = None if text_mask is None else text_mask.text_rows
        out_txt = F.scaled_dot_product_attention(q_txt, k, v, attn_mask=rows, scale=scale)
        out = torch.empty_like(q)
        out[:, :, start:start + n] = out_img
        if start > 0:
            out[:, :, :start] = out_txt[:, :, :start]
        if start + n < Lq:
            out[:, :, start + n:] = out_txt[:, :, start:]
        return out

    def _text_key_mask(self, attn_mask, q, start: int, n: int) -> TextKeyMask | None:
        """:func:`read_text_key_mask`, once per mask tensor and transformer call (the blocks of a
        model share one mask)."""
        B, H, L = q.shape[:3]
        key = (id(attn_mask), attn_mask._version, B, H, L, start, n)
        cache = self._mask_cache
        if key not in cache:
            cache[key] = (attn_mask, read_text_key_mask(attn_mask, B, H, L, L, start, n))  # holds the mask: id stays valid
        return cache[key][1]

    # -- for subclasses -------------------------------------------------------------------------
    def dense_attention(self, call: AttentionCall, q, k, v):
        """Dense attention of a call (None: let the model's own SDPA run)."""
        return None

    def sparse_image_attention(self, call: AttentionCall, q_img, k_img, v_img, k_txt, v_txt):
        """Return (out for the image queries (B, H, N, D), density in [0, 1] over all keys), or None
        for dense. ``k_txt``/``v_txt`` are None for image-only self-attention."""
        raise NotImplementedError
