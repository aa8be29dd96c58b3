"""Region-adaptive sampling (RAS): token selection, cached K/V attention, families, batches, composition."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ditaccel
from ditaccel.adapters.tokens import token_facts
from ditaccel.config import MethodConfig, register_method
from ditaccel.errors import CompositionError, ConfigError
from ditaccel.hooks.attach import count_our_hooks
from ditaccel.hooks.method import STEP_CACHE, InstalledMethod
from ditaccel.hooks.token_select import RegionRuntime, gather_tokens, keep_index, scatter_tokens
from ditaccel.methods.ras import RASConfig, select_tokens
from tests.helpers.tiny import call_kwargs, output_of, tiny_pipeline

# sizes giving 64+ image tokens, non-square where the family allows it
SIZES = {
    "flux": dict(height=64, width=32),  # VAE /2, 2x2 packing: 16 x 8 = 128 tokens
    "sd3": dict(height=16, width=24),  # 8 x 12 = 96 tokens
    "lumina2": dict(height=128, width=96),  # 8 x 6 = 48 tokens
    "wan": dict(height=16, width=32),  # 2 x 4 x 8 = 64 tokens
}
FAMILIES = tuple(SIZES)


def _ras(handle):
    return next(m for m in handle._engine.methods if m.name == "RAS")


def _run(pipe, case, **kw):
    return output_of(case, pipe(**call_kwargs(case, **kw)))


def _capture_inputs(pipe, case, **kw):
    """args/kwargs of the transformer's first call in a pipeline run."""
    seen = {}

    def pre(module, args, kwargs):
        if not seen:
            seen["args"], seen["kwargs"] = args, dict(kwargs)

    handle = pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        pipe(**call_kwargs(case, steps=1, **kw))
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


# ---------------------------------------------------------------------------------------------
# index plumbing


def test_keep_index_layouts():
    active = torch.tensor([[True, False, True, False], [False, True, True, False]])
    # image only
    assert keep_index(active, 0, 4).tolist() == [[0, 2], [1, 2]]
    # text first (3 text tokens)
    assert keep_index(active, 3, 7).tolist() == [[0, 1, 2, 3, 5], [0, 1, 2, 4, 5]]
    # image first, text after
    assert keep_index(active, 0, 7).tolist() == [[0, 2, 4, 5, 6], [1, 2, 4, 5, 6]]
    # per-row text length with padding after the image (Lumina2 rows)
    idx = keep_index(active, torch.tensor([1, 2]), 7)
    assert idx.tolist() == [[0, 1, 3, 5, 6], [0, 1, 3, 4, 6]]


def test_gather_scatter_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 5, generator=g)
    index = torch.stack([torch.randperm(10, generator=g)[:4].sort().values for _ in range(3)])
    part = gather_tokens(x, index, 1)
    assert part.shape == (3, 4, 5)
    for b in range(3):
        assert torch.equal(part[b], x[b, index[b]])
    full = scatter_tokens(torch.zeros_like(x), index, part)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask.scatter_(1, index, True)
    assert torch.equal(full[mask], x[mask])
    assert torch.equal(full[~mask], torch.zeros_like(full[~mask]))
    # batch-broadcast input (1, L, ...) and another sequence dim
    rope = torch.randn(1, 10, 1, 6, generator=g)
    r = gather_tokens(rope, index, 1)
    assert r.shape == (3, 4, 1, 6) and torch.equal(r[2], rope[0, index[2]])
    y = torch.randn(3, 2, 10, 4, generator=g)
    assert torch.equal(gather_tokens(y, index, 2)[1], y[1][:, index[1]])


def test_flux_rope_of_selected_tokens_equals_dense_then_select():
    """The gathered FLUX rotary table for the kept tokens equals the table computed from their ids."""
    model = tiny_pipeline("flux").transformer
    txt_ids = torch.zeros(3, 3)
    h, w = 4, 6
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                         indexing="ij"), -1).reshape(-1, 3)
    cos, sin = model.pos_embed(torch.cat([txt_ids, img_ids]))
    facts = token_facts("flux")
    region = RegionRuntime(facts.regions[0], [], [], facts.joint_order)
    active = torch.zeros(2, h * w, dtype=torch.bool)
    active[0, [1, 5, 6, 20]] = True
    active[1, [0, 2, 13, 23]] = True
    region.image_index = keep_index(active, 0, h * w)
    region.joint_index = keep_index(active, 3, 3 + h * w)
    region.shared = False
    gc, gs = region.gather_arg(facts.regions[0].per_token[0], (cos, sin))
    assert gc.shape == (2, 3 + 4, cos.shape[-1])
    for b in range(2):
        ids = torch.cat([txt_ids, img_ids[active[b]]])
        ec, es = model.pos_embed(ids)
        torch.testing.assert_close(gc[b], ec, rtol=0, atol=0)
        torch.testing.assert_close(gs[b], es, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# selection and the starvation bound


@pytest.mark.parametrize("fraction,max_stale", [(0.25, 3), (0.3, 4), (0.5, 1), (0.75, 1)])
def test_every_token_refreshed_within_starvation_bound(fraction, max_stale):
    g = torch.Generator().manual_seed(1)
    b, n_tok = 2, 97
    n = max(1, -(-int(fraction * 1000) * n_tok // 1000))
    fixed = torch.rand(b, n_tok, generator=g)  # adversarial: the same tokens always score highest
    stale = torch.zeros(b, n_tok, dtype=torch.long)
    for step in range(60):
        score = fixed if step % 2 else torch.rand(b, n_tok, generator=g) ** 4
        idx = select_tokens(score, stale, n, max_stale, starvation_weight=0.0)
        assert idx.shape == (b, n) and bool((idx[:, 1:] > idx[:, :-1]).all())
        active = torch.zeros(b, n_tok, dtype=torch.bool).scatter_(1, idx, True)
        stale = torch.where(active, torch.zeros_like(stale), stale + 1)
        assert int(stale.max()) <= max_stale


def test_selection_prefers_high_spread_tokens():
    score = torch.tensor([[0.1, 5.0, 0.2, 4.0, 0.3, 0.1]])
    stale = torch.zeros(1, 6, dtype=torch.long)
    assert select_tokens(score, stale, 2, 4, 0.5).tolist() == [[1, 3]]
    # a starved token overtakes when its deadline comes
    stale = torch.tensor([[0, 0, 0, 0, 4, 0]])
    assert select_tokens(score, stale, 2, 4, 0.5).tolist() == [[1, 4]]


def test_config_validation():
    with pytest.raises(ConfigError, match="max_stale_steps"):
        RASConfig(active_fraction=0.25, max_stale_steps=2)
    with pytest.raises(ConfigError):
        RASConfig(active_fraction=0.0)
    with pytest.raises(ConfigError):
        RASConfig(reset_steps=[3])
    assert RASConfig().resets_for(28) == (12, 20)
    assert RASConfig(reset_steps=()).resets_for(28) == ()


# ---------------------------------------------------------------------------------------------
# exactness


def test_active_fraction_one_is_bit_identical():
    pipe = tiny_pipeline("flux")
    ref = _run(pipe, "flux", steps=6, **SIZES["flux"])
    with ditaccel.accelerated(pipe, RASConfig(active_fraction=1.0, warmup_steps=1)) as handle:
        out = _run(pipe, "flux", steps=6, **SIZES["flux"])
        assert handle.stats()["methods"]["RAS"]["sparse_calls"] == 0
    assert torch.equal(out, ref)
    assert count_our_hooks(pipe.transformer) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_call_on_same_input_equals_dense(family):
    """Record a full call, then run a sparse call on the same input: with the cached K/V of the
    inactive tokens, the computed tokens see exactly the same attention context, so every output
    token equals the full call's. Exercises gather, per-token position arguments (RoPE, masks),
    the joint text/image order and the K/V join; batch 2 with different prompts (own indices per
    sample) and a non-square grid."""
    pipe = tiny_pipeline(family)
    args, kwargs = _capture_inputs(pipe, family, batch=2, **SIZES[family])
    model = pipe.transformer
    if family in ("flux", "sd3", "wan"):  # make the two samples differ more: different prompts
        enc = kwargs["encoder_hidden_states"]
        kwargs["encoder_hidden_states"] = torch.cat([enc[:1], enc[1:] * -2.0 + 0.5])
    if family == "lumina2":  # different caption lengths -> padded rows and an attention mask
        mask = kwargs["encoder_attention_mask"].clone()
        mask[1, -3:] = 0
        kwargs["encoder_attention_mask"] = mask
    hidden = kwargs["hidden_states"]
    kwargs["hidden_states"] = hidden * torch.tensor([1.0, -1.5]).view(2, *[1] * (hidden.ndim - 1))
    handle = ditaccel.enable_acceleration(model, RASConfig(active_fraction=0.5, warmup_steps=1, reset_steps=()))
    ras = _ras(handle)
    try:
        handle.clock.begin_generation(10)
        handle.clock.set_step(0)
        with torch.no_grad():
            dense = model(*args, **kwargs)[0]
        handle.clock.set_step(1)
        with torch.no_grad():
            sparse = model(*args, **kwargs)[0]
        index = ras.selector.index
        stats = handle.stats()["methods"]["RAS"]
    finally:
        handle.remove()
    assert stats["sparse_calls"] == 1 and stats["joined_attention"] > 0
    assert stats.get("missing_kv_cache", 0) == 0 and stats.get("unmatched_attention", 0) == 0
    assert not torch.equal(index[0], index[1]), "samples should select different tokens"
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
    # the check has teeth: without the cached K/V the active tokens see a different context
    with torch.no_grad():
        plain = model(*args, **kwargs)[0]
    assert torch.equal(plain, dense)


def test_sparse_without_kv_join_differs():
    """Control for the test above: dropping the cached K/V (active tokens attend to active tokens only)
    changes the outputs, so equality there is not automatic."""
    pipe = tiny_pipeline("flux")
    args, kwargs = _capture_inputs(pipe, "flux", **SIZES["flux"])
    model = pipe.transformer
    handle = ditaccel.enable_acceleration(model, RASConfig(active_fraction=0.5, warmup_steps=1, reset_steps=()))
    ras = _ras(handle)
    try:
        handle.clock.begin_generation(10)
        handle.clock.set_step(0)
        with torch.no_grad():
            dense = model(*args, **kwargs)[0]
        ras.router.caches.clear()  # no cached K/V: the router falls back to the kept tokens only
        handle.clock.set_step(1)
        with pytest.warns(RuntimeWarning, match="keys/values"), torch.no_grad():
            sparse = model(*args, **kwargs)[0]
    finally:
        handle.remove()
    assert (sparse - dense).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# pipelines


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_runs_sparse_and_stays_close(family):
    pipe = tiny_pipeline(family)
    ref = _run(pipe, family, steps=8, **SIZES[family])
    config = RASConfig(active_fraction=0.5, warmup_steps=2, reset_steps=(5,))
    with ditaccel.accelerated(pipe, config) as handle:
        out = _run(pipe, family, steps=8, **SIZES[family])
        stats = handle.stats()
    ras = stats["methods"]["RAS"]
    assert ras["sparse_calls"] == 5 and ras["dense_calls"] == 3
    assert ras["tokens_reused"] > 0 and 0.1 < stats["flops_skipped_fraction"] < 0.6
    assert torch.isfinite(out).all()
    assert 0 < _rel_err(out, ref) < 0.3


def test_trace_respects_starvation_bound_in_pipeline():
    pipe = tiny_pipeline("flux")
    config = RASConfig(active_fraction=0.25, warmup_steps=1, reset_steps=(), max_stale_steps=3)
    with ditaccel.accelerated(pipe, config) as handle:
        ras = _ras(handle)
        ras.trace = []
        _run(pipe, "flux", steps=12, batch=2, **SIZES["flux"])
    masks = [m for _, _, mode, m in ras.trace if mode == "sparse"]
    assert len(masks) == 11
    stale = torch.zeros_like(masks[0], dtype=torch.long)
    for m in masks:
        stale = torch.where(m, torch.zeros_like(stale), stale + 1)
        assert int(stale.max()) <= 3


def test_batch_of_two_prompts_equals_two_single_runs():
    """Scores and indices are per sample: a batch of two prompts gives each sample's single run."""
    pipe = tiny_pipeline("flux")
    size = SIZES["flux"]
    kw2 = call_kwargs("flux", steps=6, batch=2, **size)
    kw2["prompt_embeds"] = torch.cat([kw2["prompt_embeds"][:1], kw2["prompt_embeds"][1:] * -1.0])
    latents = torch.randn(2, 128, 16, generator=torch.Generator().manual_seed(3))
    config = RASConfig(active_fraction=0.5, warmup_steps=2, reset_steps=())
    with ditaccel.accelerated(pipe, config) as handle:
        ras = _ras(handle)
        ras.trace = []
        both = output_of("flux", pipe(**kw2, latents=latents))
        masks = [m for _, _, mode, m in ras.trace if mode == "sparse"]
        singles = []
        for b in range(2):
            kw1 = dict(kw2, prompt_embeds=kw2["prompt_embeds"][b:b + 1],
                       pooled_prompt_embeds=kw2["pooled_prompt_embeds"][b:b + 1],
                       generator=torch.Generator().manual_seed(0))
            singles.append(output_of("flux", pipe(**kw1, latents=latents[b:b + 1])))
    assert any(not torch.equal(m[0], m[1]) for m in masks)
    torch.testing.assert_close(both, torch.cat(singles), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,scheduler", [("sd3", "heun"), ("wan", "unipc")])
def test_second_scheduler(family, scheduler):
    import diffusers as d

    pipe = tiny_pipeline(family)
    if scheduler == "heun":
        pipe.scheduler = d.FlowMatchHeunDiscreteScheduler()
    else:
        pipe.scheduler = d.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                   flow_shift=3.0)
    ref = _run(pipe, family, steps=6, **SIZES[family])
    with ditaccel.accelerated(pipe, RASConfig(active_fraction=0.5, warmup_steps=2, reset_steps=())) as handle:
        out = _run(pipe, family, steps=6, **SIZES[family])
        ras = handle.stats()["methods"]["RAS"]
    assert ras["sparse_calls"] >= 3
    assert torch.isfinite(out).all() and 0 < _rel_err(out, ref) < 0.3


def test_state_resets_between_calls_and_cfg_branches():
    pipe = tiny_pipeline("wan")  # sequential CFG: two calls per step, state per branch
    config = RASConfig(active_fraction=0.5, warmup_steps=2, reset_steps=())
    with ditaccel.accelerated(pipe, config) as handle:
        a = _run(pipe, "wan", steps=6, cfg=True, **SIZES["wan"])
        other = _run(pipe, "wan", steps=4, cfg=True, height=16, width=16)  # other shape in between
        b = _run(pipe, "wan", steps=6, cfg=True, **SIZES["wan"])
        ras = handle.stats()["methods"]["RAS"]
    assert torch.equal(a, b)
    assert other.shape != a.shape
    assert ras["sparse_calls"] == 2 * (4 + 4 + 2)


# ---------------------------------------------------------------------------------------------
# composition


def test_composes_with_step_cache_on_other_steps():
    pipe = tiny_pipeline("flux")
    ref = _run(pipe, "flux", steps=10, **SIZES["flux"])
    configs = [RASConfig(active_fraction=0.5, warmup_steps=2, reset_steps=()),
               ditaccel.StepCacheConfig(interval=2, warmup_steps=2, final_steps=1)]
    with ditaccel.accelerated(pipe, configs) as handle:
        out = _run(pipe, "flux", steps=10, **SIZES["flux"])
        stats = handle.stats()["methods"]
    assert stats["StepCache"]["cached"] > 0 and stats["RAS"]["sparse_calls"] > 0
    # steps the step cache skipped are not RAS steps
    assert stats["RAS"]["sparse_calls"] + stats["RAS"]["dense_calls"] < 10
    assert torch.isfinite(out).all() and _rel_err(out, ref) < 0.5


def test_step_cache_listed_first_is_refused():
    pipe = tiny_pipeline("flux")
    with pytest.raises(CompositionError, match="RASConfig first"):
        ditaccel.enable_acceleration(pipe, [ditaccel.StepCacheConfig(), RASConfig()])
    assert count_our_hooks(pipe.transformer) == 0


@dataclasses.dataclass(frozen=True)
class _InnerCacheConfig(MethodConfig):
    pass


class _InnerCache(InstalledMethod):
    """A stand-in for a per-module cache (TaylorSeer-like) claiming an attention module."""

    def claims(self):
        name, module = self.engine.adapter.attention_modules()[0]
        return [(STEP_CACHE, module, name)]

    def install(self):
        pass

    def remove(self):
        pass


register_method(_InnerCacheConfig)(lambda engine, config: _InnerCache(engine, config))


def test_module_cache_inside_blocks_is_refused():
    pipe = tiny_pipeline("flux")
    with ditaccel.accelerated(pipe, [RASConfig(), _InnerCacheConfig()]):
        with pytest.raises(CompositionError, match="full token grid"):
            _run(pipe, "flux", steps=2, **SIZES["flux"])
    with pytest.raises(CompositionError):
        ditaccel.enable_acceleration(pipe, [RASConfig(), RASConfig()])
