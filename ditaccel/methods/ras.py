"""Region-adaptive sampling (RAS): per step, only the image tokens that change most go through the model.

After ``warmup_steps`` full steps, each step scores every image token of each sample by the spread
(standard deviation over its values) of the model's last output for that token, times a bounded
starvation factor ``exp(starvation_weight * min(stale, max_stale_steps))`` (``stale``: consecutive
sparse steps the token was not computed). The top ``active_fraction`` of the tokens, plus every
token that would otherwise exceed ``max_stale_steps``, go through the transformer blocks; the
others reuse their last prediction. Text tokens are always computed. Attention of the computed
tokens still sees the whole image: each attention layer keeps the keys/values of every image token
from the last step that computed it (``attention/kv_cache.py``). Steps in ``reset_steps`` (default
12/28 and 20/28 of the steps, as in the paper for SD3) and the last ``final_steps`` run in full.

Where tokens are dropped: at the entry of the first block of each token region and restored at the
exit of its last block (``hooks/token_select.py``; per-family facts in ``adapters/tokens.py``), so
patch embedding, position embeddings, final norm and unpatchify run on the full grid. Batches are
handled per sample (own scores, own indices); CFG branches called separately keep separate state.

Starvation bound: no token is skipped more than ``max_stale_steps`` sparse steps in a row. The
selection is earliest-deadline-first feasible: each step it first takes the fewest tokens that
keep every future deadline reachable (the most starved first), then the best-scored. This always
succeeds when ``active_fraction * (max_stale_steps + 1) >= 1``, which the config enforces.

Composition: RAS owns the blocks of its regions for token selection (``TOKEN_SELECTION``). A step
cache whose cached segment spans a whole region (the plain ``StepCacheConfig``) composes when RAS
is listed first (its hooks then sit inside the step cache's): on steps the step cache skips, RAS
does nothing; on steps it computes, RAS may compute only some tokens, and the step cache sees the
full-grid hidden stream (inactive rows = their last computed value). Caches of modules inside the
blocks (TaylorSeer, per-module caches), partial block ranges, sparse attention on the same layers
and a second token selection are refused with a CompositionError: they assume the full token grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.tokens import output_to_tokens, token_facts, token_families, tokens_to_output
from ..attention.dispatch import install_attention_router, remove_attention_router
from ..attention.kv_cache import CachedKVRouter
from ..config import MethodConfig, check_float, check_int, register_method
from ..errors import CompositionError, ConfigError, UnsupportedModelError, describe
from ..hooks.attach import HOOK_PREFIX, our_hook_names
from ..hooks.method import SPARSE_ATTENTION, STEP_CACHE, TOKEN_SELECTION, InstalledMethod
from ..hooks.token_select import OFF, RECORD, SPARSE, TokenSelector, install_per_sample_attention

_CACHE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)
# The paper's SD3 schedule (28 steps): dense resets at steps 12 and 20.
DEFAULT_RESET_FRACTIONS = (12 / 28, 20 / 28)


@dataclass(frozen=True)
class RASConfig(MethodConfig):
    """Region-adaptive sampling: only the active fraction of image tokens goes through the model.

    ``active_fraction``: fraction of image tokens computed on sparse steps (0.25-0.75 is the useful
    range; 1.0 is exactly the plain model). ``reset_steps``: full steps after warm-up; ``None``
    uses 12/28 and 20/28 of the generation's steps, ``()`` none. ``max_stale_steps``: no token is
    reused more than this many sparse steps in a row.
    """

    active_fraction: float = 0.5
    warmup_steps: int = 4
    reset_steps: tuple[int, ...] | None = None
    final_steps: int = 0
    starvation_weight: float = 0.5
    max_stale_steps: int = 4
    cache_dtype: torch.dtype | None = None

    def validate(self) -> None:
        n = type(self).__name__
        check_float(n, "active_fraction", self.active_fraction, minimum=0.0, maximum=1.0, min_inclusive=False)
        check_int(n, "warmup_steps", self.warmup_steps, minimum=0)
        if self.reset_steps is not None and (
                not isinstance(self.reset_steps, tuple)
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.reset_steps)):
            raise ConfigError(f"{n}.reset_steps must be None (the default schedule) or a tuple of step indices >= 0, "
                              f"got {describe(self.reset_steps)}.")
        check_int(n, "final_steps", self.final_steps, minimum=0)
        check_float(n, "starvation_weight", self.starvation_weight, minimum=0.0, maximum=10.0)
        check_int(n, "max_stale_steps", self.max_stale_steps, minimum=1, maximum=1000)
        if self.active_fraction < 1.0 and self.active_fraction * (self.max_stale_steps + 1) < 1.0:
            need = math.ceil(1.0 / self.active_fraction) - 1
            raise ConfigError(
                f"{n}: with active_fraction={self.active_fraction} not every token can be refreshed within "
                f"max_stale_steps={self.max_stale_steps} steps. Use max_stale_steps >= {need} or a larger "
                "active_fraction.")
        if self.cache_dtype not in _CACHE_DTYPES:
            raise ConfigError(f"{n}.cache_dtype must be one of None, torch.float32, torch.float16, torch.bfloat16; "
                              f"got {describe(self.cache_dtype)}. Use None to keep caches in the model's dtype.")

    def resets_for(self, total_steps: int | None) -> tuple[int, ...]:
        if self.reset_steps is not None:
            return self.reset_steps
        if not total_steps:
            return ()
        return tuple(sorted({round(total_steps * f) for f in DEFAULT_RESET_FRACTIONS}))


# ---------------------------------------------------------------------------------------------
# selection


def active_count(fraction: float, tokens: int) -> int:
    return min(tokens, max(1, math.ceil(fraction * tokens - 1e-9)))


def select_tokens(score: torch.Tensor, stale: torch.Tensor, n: int, max_stale: int,
                  starvation_weight: float) -> torch.Tensor:
    """Indices (B, n), ascending, of the tokens to compute this step.

    ``score`` (B, N): per-token spread of the last output. ``stale`` (B, N): consecutive sparse steps
    each token was reused. Earliest-deadline-first: first the fewest most-starved tokens that keep
    every token within ``max_stale`` (if every later step computes ``n`` tokens), then the highest
    ``score / mean(score) * exp(w * min(stale, max_stale))``.
    """
    b, n_tok = score.shape
    s = score.float()
    s = s / s.mean(dim=1, keepdim=True).clamp_min(1e-12)
    stale = stale.to(s.device)
    soft = s * torch.exp(starvation_weight * stale.clamp(max=max_stale).float())
    deadline = (max_stale - stale).clamp(min=0)  # further skips allowed; 0 = compute now
    ks = torch.arange(max_stale + 1, device=s.device)
    counts = (deadline[:, :, None] <= ks).sum(dim=1)  # (B, K): tokens due within k more steps
    must = torch.maximum(counts[:, 0], (counts[:, 1:] - ks[1:] * n).amax(dim=1)).clamp(0, n)
    # most urgent first, ties by soft score
    urgency = deadline.float() - 0.5 * soft / (soft.amax(dim=1, keepdim=True) + 1e-12)
    order = torch.argsort(urgency, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_tok, device=s.device).expand(b, n_tok))
    key = torch.where(rank < must[:, None], torch.full_like(soft, float("inf")), soft)
    idx = torch.topk(key, n, dim=1).indices
    return torch.sort(idx, dim=1).values


# ---------------------------------------------------------------------------------------------
# the method


@dataclass
class _BranchState:
    prev: torch.Tensor | None = None  # (B, N, X) last output per image token
    score: torch.Tensor | None = None  # (B, N)
    stale: torch.Tensor | None = None  # (B, N) consecutive sparse steps not computed
    recorded: bool = False  # K/V and region outputs of a full call are held


def _sample_of(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.sample


def _with_sample(output, sample):
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, tuple):
        return (sample, *output[1:])
    output.sample = sample
    return output


def _refuse_sequence_parallel(model) -> None:
    if getattr(model, "_parallel_config", None) is not None:
        raise CompositionError(
            f"RAS cannot run on a {type(model).__name__} with a parallel config (diffusers context parallelism): "
            "its token selection gathers image tokens by their index in the full sequence at the first block, where "
            "each rank only holds a shard, and its per-token scores would differ per rank. Disable context "
            "parallelism for this model, or use a step cache (StepCacheConfig, DeltaCacheConfig) instead of RAS.")


class RAS(InstalledMethod):
    def __init__(self, engine, config: RASConfig, facts=None):
        super().__init__(engine, config)
        # ``facts``: token facts of another model code for the same family (ComfyUI's, for example)
        facts = facts if facts is not None else token_facts(engine.adapter.family)
        if facts is None:
            raise UnsupportedModelError(
                f"RAS needs per-family token facts; none for family {engine.adapter.family!r}. "
                f"Supported: {token_families()} (see ditaccel/adapters/tokens.py).")
        self.facts = facts
        self.model = engine.model
        _refuse_sequence_parallel(self.model)
        self.selector = TokenSelector(self.model, facts, "ras")
        if not self.selector.regions:
            raise UnsupportedModelError(f"RAS found none of the blocks {[r.blocks for r in facts.regions]} "
                                        f"in {type(self.model).__name__}.")
        self.router = CachedKVRouter(self.selector, facts.cross_attention, config.cache_dtype)
        self.branches: dict[int, _BranchState] = {}
        self._attention = [(name, m) for r in self.selector.regions for name, m in r.attention]
        self._routed: list = []
        self._split: list = []
        self._mode = OFF
        self._tokens = 0
        self._checked = False
        self.trace: list | None = None  # set to [] to record (step, branch, mode, active mask) per call

    # -- install -------------------------------------------------------------------------------
    def claims(self):
        return [(TOKEN_SELECTION, m, name) for r in self.selector.regions for name, m in r.blocks]

    def install(self) -> None:
        for region in self.selector.regions:
            for name, block in region.blocks:
                others = [h for h in our_hook_names(block)]
                if others:
                    raise CompositionError(
                        f"RAS must be listed before the methods that hook the blocks it selects tokens in "
                        f"({others} already on {name!r}): put RASConfig first in the config list, so its token "
                        "gathering runs inside the step cache's segment.")
        try:
            self.selector.install()
            self._routed = install_attention_router(self.router, self._attention, "ras.kv")
            self._split = install_per_sample_attention(self.selector, "ras.per_sample")
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        remove_attention_router(self._split, "ras.per_sample")
        remove_attention_router(self._routed, "ras.kv")
        self._split, self._routed = [], []
        self.selector.remove()
        self.reset()

    def reset(self) -> None:
        self.branches.clear()
        self.router.reset()
        self.selector.reset()
        self.router.active = False

    def bytes_held(self) -> int:
        held = self.router.bytes_held() + self.selector.bytes_held()
        for st in self.branches.values():
            for t in (st.prev, st.score, st.stale):
                if t is not None:
                    held += t.numel() * t.element_size()
        return held

    # -- composition ---------------------------------------------------------------------------
    def _check_composition(self) -> None:
        _refuse_sequence_parallel(self.model)  # parallelism may have been enabled after RAS
        regions = self.selector.regions
        block_ids = {id(b): r for r in regions for b in r.block_modules}
        inner_ids = {id(m) for r in regions for b in r.block_modules for m in b.modules() if m is not b}
        for other in self.engine.methods:
            if other is self:
                continue
            claimed = {}
            for kind, module, name in other.claims():
                if kind == TOKEN_SELECTION:
                    raise CompositionError(f"RAS and {other.name} both select tokens; use one of them.")
                if id(module) in inner_ids and kind in (STEP_CACHE, SPARSE_ATTENTION):
                    raise CompositionError(
                        f"{other.name} is the {kind} of {name!r}, inside a block where RAS computes only some "
                        "tokens; it assumes the full token grid. Use RAS with a whole-block step cache "
                        "(StepCacheConfig) only, or drop one of them.")
                if id(module) in block_ids and kind == STEP_CACHE:
                    claimed[id(module)] = module
            if not claimed:
                continue
            segments = getattr(other, "segments", None)
            for region in regions:
                blocks = region.block_modules
                if not any(id(b) in claimed for b in blocks):
                    continue
                spans = segments is not None and any(
                    seg.blocks and seg.blocks[0] is blocks[0] and seg.blocks[-1] is blocks[-1]
                    and len(seg.blocks) == len(blocks) for seg in segments)
                if not spans:
                    raise CompositionError(
                        f"{other.name} caches a block range that does not span RAS's whole region "
                        f"{region.region.blocks}; a residual over part of it would mix token counts. "
                        "Use a step cache over the whole block stack (StepCacheConfig), or drop one of them.")
                order = getattr(blocks[0], "_diffusers_hook", None)
                names = list(order._hook_order) if order is not None else []
                ours = HOOK_PREFIX + "ras"
                theirs = [i for i, h in enumerate(names) if h.startswith(HOOK_PREFIX) and not h.startswith(ours)]
                if ours in names and theirs and min(theirs) < names.index(ours):
                    raise CompositionError("RAS must be listed before the step cache in the config list.")

    # -- per call ------------------------------------------------------------------------------
    def _dense_step(self, step: int, total: int | None) -> bool:
        c = self.config
        if step < c.warmup_steps or step in c.resets_for(total):
            return True
        return total is not None and step >= total - c.final_steps

    def begin_call(self, call) -> None:
        if not self._checked:  # marked checked only once it passed: a refused composition fails every call
            self._check_composition()
            self._checked = True
        info = call.info
        c = self.config
        self._mode = OFF
        self.router.active = False
        if c.active_fraction >= 1.0:
            self.selector.begin(OFF, info.branch)
            return
        n_img, _ = self.facts.image_tokens(self.model, call.args, call.kwargs)
        self._tokens = n_img
        n = active_count(c.active_fraction, n_img)
        st = self.branches.setdefault(info.branch, _BranchState())
        blocked = any(call.kwargs.get(a) is not None for a in self.facts.dense_if_args)
        sparse = (n < n_img and not blocked and not call.force_full
                  and not self._dense_step(info.step, info.total_steps)
                  and st.recorded and st.prev is not None and st.prev.shape[1] == n_img)
        if sparse:
            if st.stale is None:
                st.stale = torch.zeros(st.score.shape, dtype=torch.long, device=st.score.device)
            index = select_tokens(st.score, st.stale, n, c.max_stale_steps, c.starvation_weight)
            self._mode = SPARSE
            self.selector.begin(SPARSE, info.branch, index, n_img)
        else:
            next_dense = self._dense_step(info.step + 1, info.total_steps)
            self._mode = RECORD if (n < n_img and not blocked and not next_dense) else OFF
            self.selector.begin(self._mode, info.branch)
        self.router.active = self._mode != OFF

    def end_call(self, call, output):
        info = call.info
        sel = self.selector
        mode = self._mode
        self.selector.end()
        self.router.active = False
        if self.config.active_fraction >= 1.0:
            return output
        st = self.branches.setdefault(info.branch, _BranchState())
        sample = _sample_of(output)
        tokens = output_to_tokens(self.facts, self.model, sample)
        ran = sel.regions_entered > 0
        active = None
        if mode == SPARSE and ran and not sel.failed:
            active = sel.active
            prev = st.prev.to(tokens.dtype)
            tokens = torch.where(active[..., None], tokens, prev)
            output = _with_sample(output, tokens_to_output(self.facts, self.model, tokens, sample.shape))
            st.stale = torch.where(active, torch.zeros_like(st.stale), st.stale + 1)
            self.counters["sparse_calls"] += 1
            self.counters["tokens_computed"] += int(active.sum().item())
            self.counters["tokens_reused"] += int((~active).sum().item())
            self._count_skipped(call)
        elif ran:
            if mode == SPARSE:  # the call could not be reduced (see selector.failed): it ran in full
                self.counters["fallback_full_calls"] += 1
                self.warn_once("fallback", f"a call ran in full instead of sparse: {sel.failed}")
            st.stale = None
            self.counters["dense_calls"] += 1
        # else: no region ran (a step cache skipped the blocks): not a RAS decision, staleness unchanged
        if ran:
            self.counters["computed"] += sum(len(r.blocks) for r in sel.regions if r.entered)
        if mode == RECORD and ran and not sel.failed:
            st.recorded = True
        if st.stale is None:
            st.stale = torch.zeros(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        st.prev = tokens.detach().clone()
        st.score = tokens.detach().float().std(dim=-1)
        missing = self.router.counters["missing_kv_cache"] + self.router.counters["unmatched_attention"]
        if missing:
            self.warn_once("kv", "some attention layers had no cached keys/values for inactive tokens; "
                                 f"they attended to the active tokens only ({dict(self.router.counters)}).")
        if self.trace is not None:
            self.trace.append((info.step, info.branch, mode if ran else "skipped",
                               None if active is None else active.detach().clone()))
        return output

    def _count_skipped(self, call) -> None:
        total = 0.0
        for region in self.selector.regions:
            if not region.sparse:
                continue
            full = region.full_length()
            if full <= 0:
                continue
            frac = 1.0 - region.kept_length() / full
            total += frac * sum(self.engine.flops_of(b) for b in region.block_modules)
        call.skipped_flops += total

    def stats(self):
        out = super().stats()
        for key in ("sparse_calls", "dense_calls", "tokens_computed", "tokens_reused"):
            out.setdefault(key, 0)
        out.update({k: int(v) for k, v in self.router.counters.items()})
        return out


@register_method(RASConfig)
def apply_ras(engine, config: RASConfig) -> RAS:
    return RAS(engine, config)
