"""The shipped trained reference pipelines load from local files, generate deterministically,
match the stored sample statistics, and are actually trained (class colours come out right)."""

from __future__ import annotations

import json

import pytest
import torch

from ditaccel.reference import (
    ReferenceModelError,
    list_reference_models,
    load_reference_pipeline,
    reference_call_kwargs,
    reference_model_path,
)
from ditaccel.reference.data import COLOUR_RGB, COLOURS
from ditaccel.reference.pipelines import _stats_call, generate_stats_images, sample_stats

AVAILABLE = list_reference_models(available_only=True)


def _needs(name):
    return pytest.mark.skipif(name not in AVAILABLE, reason=f"{name} checkpoint not shipped")


def _nearest_colour(img: torch.Tensor) -> tuple[str, float]:
    """Name of the class colour nearest to the mean of the saturated pixels of img (3,H,W in [0,1])."""
    sat = img.max(dim=0).values - img.min(dim=0).values
    mask = sat > 0.35
    frac = mask.float().mean().item()
    if frac == 0:
        return "none", 0.0
    rgb = img[:, mask].mean(dim=1)
    dist = {c: (rgb - torch.tensor(COLOUR_RGB[c])).norm().item() for c in COLOURS}
    return min(dist, key=dist.get), frac


def test_unknown_model_lists_available():
    with pytest.raises(ReferenceModelError) as e:
        load_reference_pipeline("no_such_model")
    assert "flux_tiny" in str(e.value) and "Available" in str(e.value)


def test_missing_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(ReferenceModelError) as e:
        reference_model_path("flux_tiny", folder=tmp_path)
    msg = str(e.value)
    assert "model_index.json" in msg and "ditaccel.reference.train_flux" in msg


@pytest.fixture(scope="module")
def flux():
    return load_reference_pipeline("flux_tiny")


@_needs("flux_tiny")
def test_flux_is_a_real_flux_pipeline(flux):
    import diffusers

    pipe, prompts = flux
    assert isinstance(pipe, diffusers.FluxPipeline)
    assert isinstance(pipe.transformer, diffusers.FluxTransformer2DModel)
    assert pipe.transformer.dtype == torch.float32
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert len(prompts.class_names) == 16 and prompts.null_index == 16
    with pytest.raises(ValueError, match="unknown class name"):
        reference_call_kwargs(prompts, ["purple_hexagon"])
    kw = reference_call_kwargs(prompts, ["red_circle", 3], true_cfg_scale=3.0)
    assert kw["prompt_embeds"].shape == (2, 8, 64) and kw["negative_pooled_prompt_embeds"].shape == (2, 64)


@pytest.fixture(scope="module")
def flux_samples(flux):
    pipe, prompts = flux
    return generate_stats_images("flux_tiny", pipe, prompts)


@_needs("flux_tiny")
def test_flux_matches_stored_stats(flux_samples):
    stored = json.loads((reference_model_path("flux_tiny") / "sample_stats.json").read_text())
    now = sample_stats(flux_samples)
    assert now["shape"] == stored["shape"]
    torch.testing.assert_close(torch.tensor(now["mean"]), torch.tensor(stored["mean"]), atol=5e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(now["std"]), torch.tensor(stored["std"]), atol=5e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(now["thumb4"]), torch.tensor(stored["thumb4"]), atol=2e-2, rtol=0)


@_needs("flux_tiny")
def test_flux_deterministic(flux):
    pipe, prompts = flux
    kw = reference_call_kwargs(prompts, ["green_ring"])
    outs = [
        pipe(**kw, num_inference_steps=28, height=64, width=64, generator=torch.Generator().manual_seed(7), output_type="pt").images
        for _ in range(2)
    ]
    assert torch.equal(outs[0], outs[1])


@_needs("flux_tiny")
def test_flux_is_trained_class_colours(flux_samples):
    stored = json.loads((reference_model_path("flux_tiny") / "sample_stats.json").read_text())
    for img, cls in zip(flux_samples, stored["classes"]):
        colour, frac = _nearest_colour(img)
        assert colour == cls.split("_")[0], f"{cls}: generated shape colour looks {colour}"
        assert 0.02 < frac < 0.6, f"{cls}: {frac:.3f} of the pixels are saturated, expected one shape on a dim background"
    # a trained model denoises smoothly: the transformer output changes a few % per step mid-trajectory
    rel = stored["per_step_rel_change"]
    mid = rel[len(rel) // 4 : 3 * len(rel) // 4]
    assert max(mid) < 0.2


@_needs("flux_tiny")
def test_flux_runs_at_1024_tokens(flux):
    pipe, prompts = flux
    img = pipe(
        **reference_call_kwargs(prompts, ["blue_circle"]),
        num_inference_steps=6,
        height=128,
        width=128,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert img.shape == (1, 3, 128, 128) and torch.isfinite(img).all()


@_needs("wan_tiny")
def test_wan_matches_stored_stats_and_colours():
    import diffusers

    pipe, prompts = load_reference_pipeline("wan_tiny")
    assert isinstance(pipe, diffusers.WanPipeline)
    frames = generate_stats_images("wan_tiny", pipe, prompts)
    stored = json.loads((reference_model_path("wan_tiny") / "sample_stats.json").read_text())
    now = sample_stats(frames)
    assert now["shape"] == stored["shape"]
    torch.testing.assert_close(torch.tensor(now["mean"]), torch.tensor(stored["mean"]), atol=5e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(now["thumb4"]), torch.tensor(stored["thumb4"]), atol=2e-2, rtol=0)
    again = pipe(**_stats_call("wan_tiny", prompts)).frames
    assert torch.equal(frames, again)
    for clip, cls in zip(frames, stored["classes"]):
        colour, _ = _nearest_colour(clip.mean(dim=0))
        assert colour == cls.split("_")[0], f"{cls}: generated clip colour looks {colour}"
