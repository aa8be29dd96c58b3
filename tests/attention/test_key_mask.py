"""Masks on the sparse path: which masks are read as "drop these text keys" or "add this bias to the
text keys", and that sparse attention with them equals the model's own masked SDPA (HunyuanVideo and
Qwen-Image pass boolean padding masks; Chroma (diffusers 0.42) the product of its float {0, 1}
token masks, which SDPA adds to the scores: +1 on the kept pairs); everything else stays dense."""

from __future__ import annotations

import pytest
import torch

import ditaccel
from ditaccel.attention.key_mask import MASKED_BELOW, read_text_key_mask
from ditaccel.attention.sparse_method import attention_with_lse, with_text_keys
from helpers.tiny import call_kwargs, output_of, tiny_pipeline

B, H, T, N = 2, 3, 5, 12  # batch, heads, text tokens, image tokens
L = T + N


def _key_mask(pad: int = 2, batch: int = B, text_first: bool = True) -> torch.Tensor:
    """(batch, 1, 1, L) bool: the last ``pad`` text tokens masked, every image token kept."""
    text = torch.ones(batch, T, dtype=torch.bool)
    if pad:
        text[:, -pad:] = False
    image = torch.ones(batch, N, dtype=torch.bool)
    keys = torch.cat([text, image] if text_first else [image, text], 1)
    return keys[:, None, None, :]


@pytest.mark.parametrize("text_first", [True, False])
def test_key_padding_mask_gives_the_kept_text_keys(text_first):
    start = T if text_first else 0
    got = read_text_key_mask(_key_mask(2, text_first=text_first), B, H, L, L, start, N)
    assert got is not None and got.text_keep.tolist() == [0, 1, 2]
    assert got.text_rows is not None  # text queries get the mask itself


def test_additive_float_masks_and_outer_product_masks():
    keys = _key_mask(2)
    additive = torch.zeros(keys.shape).masked_fill(~keys, float("-inf"))
    assert read_text_key_mask(additive, B, H, L, L, T, N).text_keep.tolist() == [0, 1, 2]
    finfo_min = torch.zeros(keys.shape).masked_fill(~keys, torch.finfo(torch.float32).min)
    assert read_text_key_mask(finfo_min, B, H, L, L, T, N).text_keep.tolist() == [0, 1, 2]
    # Chroma-style outer product (B, 1, L, L): padded query rows are all masked, image rows equal
    outer = keys[:, :, 0, :, None] & keys
    got = read_text_key_mask(outer, B, H, L, L, T, N)
    assert got.text_keep.tolist() == [0, 1, 2] and got.text_rows.shape == (B, 1, T, L)
    assert torch.equal(got.text_rows, outer[:, :, :T])


def test_all_kept_and_image_only_calls():
    assert read_text_key_mask(_key_mask(0), B, H, L, L, T, N).text_keep is None
    only_image = torch.ones(B, 1, 1, N, dtype=torch.bool)
    got = read_text_key_mask(only_image, B, H, N, N, 0, N)
    assert got is not None and got.text_keep is None and got.text_rows is None


def test_per_batch_padding_and_soft_text_masks_become_a_text_bias():
    keys = _key_mask(2).clone()
    keys[1, ..., 1] = False  # the second prompt is one token shorter
    got = read_text_key_mask(keys, B, H, L, L, T, N)
    assert got.text_keep is None and got.text_bias.shape == (B, 1, 1, T)
    assert got.text_bias[0, 0, 0].tolist() == [0, 0, 0, MASKED_BELOW, MASKED_BELOW]
    assert got.text_bias[1, 0, 0].tolist() == [0, MASKED_BELOW, 0, MASKED_BELOW, MASKED_BELOW]
    # Chroma: the product of float {0, 1} token masks, added by SDPA: +1 on kept pairs; relative to the
    # image keys (+1), a kept text key gets 0 and a padding key -1
    tokens = _key_mask(2)[:, 0, 0].float()
    chroma = tokens[:, None, None, :] * tokens[:, None, :, None]
    got = read_text_key_mask(chroma, B, H, L, L, T, N)
    assert got.text_bias[0, 0, 0].tolist() == [0, 0, 0, -1, -1]
    assert torch.equal(got.text_rows, chroma[:, :, :T])


def test_text_bias_gives_the_biased_dense_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(B, 1, 1, L, dtype=torch.float64)
    mask[0, ..., :T] = torch.tensor([0.5, -2.0, 0.0, float("-inf"), 1.0], dtype=torch.float64)
    mask[1, ..., :T] = torch.tensor([float("-inf")] * T, dtype=torch.float64)  # no text at all
    got = read_text_key_mask(mask, B, H, L, L, T, N)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    q_img, k_img, v_img, k_txt, v_txt = q[:, :, T:], k[:, :, T:], v[:, :, T:], k[:, :, :T], v[:, :, :T]
    out, lse = attention_with_lse(q_img, k_img, v_img, 0.3)
    out, _ = with_text_keys(out, lse, q_img, k_txt, v_txt, 0.3, got.text_bias)
    torch.testing.assert_close(out, ref[:, :, T:], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("what", ["masked image key", "image bias", "image rows differ",
                                  "int mask", "wrong length", "cross attention"])
def test_other_masks_are_not_taken(what):
    keys = _key_mask(2)
    lq = lk = L
    if what == "masked image key":
        keys = keys.clone()
        keys[..., T + 3] = False
    elif what == "image bias":
        keys = torch.zeros(keys.shape).masked_fill(~keys, float("-inf"))
        keys[..., T] = -0.5
    elif what == "image rows differ":
        keys = keys.expand(B, 1, L, L).clone()
        keys[:, :, T + 1, T + 2] = False
    elif what == "int mask":
        keys = keys.long()
    elif what == "wrong length":
        keys = keys[..., :-1]
    elif what == "cross attention":
        lk = L + 1
    assert read_text_key_mask(keys, B, H, lq, lk, T, N) is None


# ---------------------------------------------------------------------------------------------
# on models whose pipelines pass text-padding masks

EXACT_SVG2 = ditaccel.SVG2Config(q_clusters=5, k_clusters=9, top_p=1.0, kmeans_iters_first=3, kmeans_iters=1,
                                 dense_steps_fraction=0.0, dense_layers=0)
MASK_ARG = {"hunyuan_video": "prompt_attention_mask", "qwenimage": "prompt_embeds_mask",
            "chroma": "prompt_attention_mask"}


def _masked_kwargs(case: str, batch: int, differ: bool) -> dict:
    kw = call_kwargs(case, steps=3, batch=batch)
    mask = kw[MASK_ARG[case]].clone()
    mask[:, -3:] = 0  # three padding tokens
    if differ:
        mask[0, -4] = 0  # one more in the first prompt only
    kw[MASK_ARG[case]] = mask
    return kw


EXACT_CONFIGS = [EXACT_SVG2, ditaccel.CLEARConfig(radius=100.0, dense_steps_fraction=0.0),
                 ditaccel.RettentionConfig(keep_fraction=0.05, refresh_interval=1, dense_steps_fraction=0.0)]
EXACT_IDS = ["svg2_top_p_1", "clear_covering_radius", "rettention_refresh_every_step"]


@pytest.mark.parametrize("case,batch,differ", [("hunyuan_video", 1, False), ("qwenimage", 1, False),
                                               ("hunyuan_video", 2, True), ("qwenimage", 2, True),
                                               ("chroma", 1, False), ("chroma", 2, True)])
@pytest.mark.parametrize("config", EXACT_CONFIGS, ids=EXACT_IDS)
def test_padded_prompts_run_sparse_and_equal_the_masked_model(case, batch, differ, config):
    """One padding length (dropped keys), per-prompt lengths in one batch and Chroma's soft mask (a
    text-key bias): sparse, and equal to the model's own masked attention."""
    pipe = tiny_pipeline(case)
    ref = output_of(case, pipe(**_masked_kwargs(case, batch, differ)))
    with ditaccel.enable_acceleration(pipe, config) as handle:
        out = output_of(case, pipe(**_masked_kwargs(case, batch, differ)))
        stats = handle.stats()["methods"][config.method_name]
    assert stats.get("sparse", 0) > 0 and stats.get("dense_masked", 0) == 0, stats
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the mask matters: attending to every text key alike changes the output by far more than the tolerance
    unmasked = _masked_kwargs(case, batch, differ)
    unmasked[MASK_ARG[case]] = torch.ones_like(unmasked[MASK_ARG[case]])
    assert (output_of(case, pipe(**unmasked)) - ref).abs().max() > 1e-3


def test_a_method_without_text_bias_support_stays_dense_on_biased_masks(monkeypatch):
    from ditaccel.methods.svg2 import SVG2

    monkeypatch.setattr(SVG2, "supports_text_bias", False)
    pipe = tiny_pipeline("chroma")
    ref = output_of("chroma", pipe(**_masked_kwargs("chroma", 1, False)))
    with ditaccel.enable_acceleration(pipe, EXACT_SVG2) as handle:
        out = output_of("chroma", pipe(**_masked_kwargs("chroma", 1, False)))
        stats = handle.stats()["methods"]["SVG2"]
    assert stats.get("dense_masked", 0) > 0 and stats.get("sparse", 0) == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Lumina2: the joint rows hold [effective caption, image], padded at the end


def _lumina2_kwargs(batch: int, valid: list[int]) -> dict:
    kw = call_kwargs("lumina2", steps=3, batch=batch)
    mask = torch.zeros_like(kw["prompt_attention_mask"])
    for row, n in enumerate(valid):
        mask[row, :n] = 1
    kw["prompt_attention_mask"] = mask
    return kw


@pytest.mark.parametrize("config", [EXACT_SVG2, ditaccel.CLEARConfig(radius=100.0, dense_steps_fraction=0.0)],
                         ids=["svg2_top_p_1", "clear_covering_radius"])
def test_lumina2_rows_of_one_caption_length_run_sparse_and_exact(config):
    pipe = tiny_pipeline("lumina2")
    kw = _lumina2_kwargs(2, [3, 3])
    ref = output_of("lumina2", pipe(**kw))
    with ditaccel.enable_acceleration(pipe, config) as handle:
        out = output_of("lumina2", pipe(**_lumina2_kwargs(2, [3, 3])))
        stats = handle.stats()["methods"][config.method_name]
    assert stats.get("sparse", 0) > 0 and stats.get("dense_unknown_layout", 0) == 0, stats
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_lumina2_rows_of_different_caption_lengths_stay_dense():
    pipe = tiny_pipeline("lumina2")
    ref = output_of("lumina2", pipe(**_lumina2_kwargs(2, [2, 4])))
    with ditaccel.enable_acceleration(pipe, EXACT_SVG2) as handle:
        out = output_of("lumina2", pipe(**_lumina2_kwargs(2, [2, 4])))
        stats = handle.stats()["methods"]["SVG2"]
    assert stats.get("sparse", 0) == 0 and stats.get("dense_unknown_layout", 0) + stats.get("dense_masked", 0) > 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
