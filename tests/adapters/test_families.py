"""Every supported family: the adapter is found from the pipeline, lists the right blocks and
attention layers, and reads the token layout of a real transformer call correctly.

All pipelines are tiny random-weight ones from ``tests.helpers.tiny`` (no text encoders: the
prompts are precomputed embeddings), so the facts checked here are the ones of the real
diffusers classes, at a small size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ditaccel
from ditaccel.adapters.base import (
    CFG_BATCHED, CFG_GUIDANCE_EMBED, CFG_SEQUENTIAL, IMAGE_FIRST, SEPARATE, TEXT_FIRST, TokenLayout,
)
from ditaccel.adapters.registry import adapter_for, find_transformer, registered_families
from ditaccel.errors import UnsupportedModelError
from ditaccel.hooks.attach import count_our_hooks
from helpers.tiny import CASES, FAMILIES, FAMILY, TEXT_TOKENS, call_kwargs, tiny_pipeline, tiny_transformer

# family -> ({block list: number of blocks}, attention layers, cfg style, joint order), for the tiny configs
EXPECTED = {
    "flux": ({"transformer_blocks": 1, "single_transformer_blocks": 1}, 2, CFG_GUIDANCE_EMBED, TEXT_FIRST),
    "sd3": ({"transformer_blocks": 2}, 2, CFG_BATCHED, IMAGE_FIRST),
    "pixart": ({"transformer_blocks": 2}, 4, CFG_BATCHED, SEPARATE),  # attn1 + attn2 (cross) per block
    "dit": ({"transformer_blocks": 2}, 2, CFG_BATCHED, SEPARATE),  # self-attention only
    "lumina2": ({"layers": 2}, 2, CFG_SEQUENTIAL, TEXT_FIRST),  # refiners not grouped
    "sana": ({"transformer_blocks": 2}, 4, CFG_BATCHED, SEPARATE),
    "wan": ({"blocks": 2}, 4, CFG_SEQUENTIAL, SEPARATE),
    "hunyuan_video": ({"transformer_blocks": 1, "single_transformer_blocks": 1}, 2, CFG_GUIDANCE_EMBED, IMAGE_FIRST),
    "cogvideox": ({"transformer_blocks": 2}, 2, CFG_BATCHED, TEXT_FIRST),
    "qwenimage": ({"transformer_blocks": 2}, 2, CFG_SEQUENTIAL, TEXT_FIRST),
    "ltx": ({"transformer_blocks": 2}, 4, CFG_BATCHED, SEPARATE),
    "chroma": ({"transformer_blocks": 1, "single_transformer_blocks": 1}, 2, CFG_SEQUENTIAL, TEXT_FIRST),
}

# family -> number of cacheable segments (runs of blocks carrying the same streams)
EXPECTED_SEGMENTS = {f: 1 for f in EXPECTED}
EXPECTED_SEGMENTS["chroma"] = 2  # dual-stream blocks, then single blocks on the joint sequence

# case -> (image tokens, grid) at the default tiny size of tests.helpers.tiny
EXPECTED_TOKENS = {
    "flux": (16, (4, 4)),
    "sd3": (16, (4, 4)),
    "pixart": (16, (4, 4)),
    "pixart_sigma": (16, (4, 4)),
    "dit": (16, (4, 4)),
    "lumina2": (16, (4, 4)),
    "sana": (16, (4, 4)),
    "wan": (32, (2, 4, 4)),
    "hunyuan_video": (32, (2, 4, 4)),
    "cogvideox": (32, (2, 4, 4)),
    "qwenimage": (16, (4, 4)),
    "ltx": (32, (2, 4, 4)),
    "chroma": (16, (4, 4)),
}
BATCHED_CFG_CASES = {"sd3", "pixart", "pixart_sigma", "dit", "sana", "cogvideox", "ltx"}


def test_every_family_is_registered():
    assert set(FAMILIES) <= set(registered_families())
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_bare_transformer_is_detected(family):
    adapter = adapter_for(tiny_transformer(family))
    assert adapter.family == family


@pytest.mark.parametrize("case", CASES)
def test_adapter_from_pipeline(case):
    pipe = tiny_pipeline(case)
    model, pipeline = find_transformer(pipe)
    assert model is pipe.transformer and pipeline is pipe
    adapter = adapter_for(model)
    family = FAMILY[case]
    groups, n_attention, cfg_style, joint_order = EXPECTED[family]
    assert adapter.family == family
    assert {g.name: len(g.blocks) for g in adapter.block_groups} == groups
    assert adapter.num_blocks == sum(groups.values())
    # the blocks listed are the model's own modules, in execution order
    for g in adapter.block_groups:
        assert g.blocks == list(model.get_submodule(g.name))
    assert len(adapter.attention_modules()) == n_attention
    assert adapter.cfg_style == cfg_style
    assert adapter.joint_order == joint_order
    assert len(adapter.segments()) == EXPECTED_SEGMENTS[family]
    assert adapter.describe()["family"] == family


def _record_transformer_call(pipe, adapter, kwargs):
    """Run the pipeline; return (model args, model kwargs) of its first transformer call and the
    streams the first block of each group received."""
    model = pipe.transformer
    seen: dict = {}

    def model_hook(module, args, kw):
        seen.setdefault("model", (args, dict(kw)))

    handles = [model.register_forward_pre_hook(model_hook, with_kwargs=True)]
    for g in adapter.block_groups:
        def block_hook(module, args, kw, name=g.name, io=g.io):
            if name not in seen:
                from ditaccel.adapters.base import read_streams

                seen[name] = read_streams(io, module, args, kw)
        handles.append(g.blocks[0].register_forward_pre_hook(block_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            pipe(**kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("cfg", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("case", CASES)
def test_token_layout_matches_the_real_call(case, cfg):
    pipe = tiny_pipeline(case)
    adapter = adapter_for(pipe.transformer)
    seen = _record_transformer_call(pipe, adapter, call_kwargs(case, steps=2, batch=1, cfg=cfg))
    args, kw = seen["model"]
    layout = adapter.token_layout(args, kw)
    assert isinstance(layout, TokenLayout)
    image_tokens, grid = EXPECTED_TOKENS[case]
    rows = 2 if (cfg and case in BATCHED_CFG_CASES) else 1
    assert layout.batch == rows
    assert layout.image_tokens == image_tokens
    assert layout.grid == grid
    assert layout.joint_order == adapter.joint_order
    if case == "lumina2":  # the joint rows' text: the effective caption (mask sum, 5 of 6 tokens)
        assert layout.text_tokens == TEXT_TOKENS - 1
    else:
        assert layout.text_tokens == (0 if case == "dit" else TEXT_TOKENS)

    # cross-check with what the blocks really receive
    first = adapter.block_groups[0]
    hidden, encoder = seen[first.name]
    assert hidden.shape[0] == rows
    if case == "lumina2":
        # `layers` see [text, image]: the longest effective caption (mask sum, 5 of 6) + image tokens
        assert hidden.shape[1] == layout.text_tokens + image_tokens
    else:
        assert hidden.shape[1] == image_tokens
    if first.io.encoder_arg:
        assert encoder.shape[1] == layout.text_tokens
    if case == "chroma":
        joint, _ = seen["single_transformer_blocks"]
        assert joint.shape[1] == layout.text_tokens + image_tokens


def test_token_layout_follows_resolution_and_frames():
    pipe = tiny_pipeline("wan")
    adapter = adapter_for(pipe.transformer)
    seen = _record_transformer_call(pipe, adapter, call_kwargs("wan", steps=2, batch=2, height=16, width=32, frames=5))
    layout = adapter.token_layout(*seen["model"])
    # VAE /2 in time and space, patch (1, 2, 2): 5 frames -> 3 latent frames, 16 x 32 px -> 4 x 8 tokens
    assert (layout.batch, layout.grid, layout.image_tokens) == (2, (3, 4, 8), 3 * 4 * 8)
    assert seen["blocks"][0].shape[:2] == (2, 3 * 4 * 8)


# ---------------------------------------------------------------------------------------------
# clear errors, object untouched


def _hook_free(module: nn.Module) -> bool:
    return all(getattr(m, "_diffusers_hook", None) is None and "forward" not in m.__dict__ for m in module.modules())


def test_unet_pipeline_is_rejected_and_untouched():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"UNet pipeline.*diffusion transformers"):
        ditaccel.enable_acceleration(pipe)
    assert not hasattr(pipe, "_ditaccel_handle") and not hasattr(unet, "_ditaccel_handle")
    assert _hook_free(unet)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_without_blocks_is_rejected_and_untouched():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(2, 4)
    y = model(x)
    with pytest.raises(UnsupportedModelError, match=r"Found no transformer blocks in Sequential"):
        ditaccel.enable_acceleration(model)
    assert not hasattr(model, "_ditaccel_handle")
    assert _hook_free(model) and count_our_hooks(model) == 0
    assert torch.equal(model(x), y)


def test_object_without_transformer_is_rejected():
    with pytest.raises(UnsupportedModelError, match=r"Expected a diffusers pipeline with a `transformer` component"):
        ditaccel.enable_acceleration(object())
