"""The one-line API on a tiny FLUX pipeline: bit-identity, removal, replacement, bad input."""

import gc
import tracemalloc

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import ditaccel
from ditaccel.config import register_method
from ditaccel.hooks.attach import count_our_hooks
from ditaccel.hooks.method import InstalledMethod


def _tiny_flux_pipe():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=32,
    )
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _tiny_flux_pipe()


def run(pipe, steps=6, seed=0, batch=1, size=32):
    g = torch.Generator().manual_seed(seed)
    pe = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(1))
    pp = torch.randn(batch, 32, generator=torch.Generator().manual_seed(2))
    return pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, num_inference_steps=steps, height=size, width=size,
                generator=g, output_type="latent").images


def _pristine(module):
    return count_our_hooks(module) == 0 and all("forward" not in m.__dict__ for m in module.modules())


def test_enable_generate_disable_is_bit_identical(pipe):
    ref = run(pipe)
    handle = ditaccel.enable_acceleration(pipe)  # the balanced preset
    accelerated = run(pipe)
    method = handle.stats()["methods"]
    assert sum(m["cached"] + m["forecast"] for m in method.values()) > 0
    assert not torch.equal(accelerated, ref)  # the cache did change the computation
    handle.remove()
    assert _pristine(pipe.transformer)
    assert torch.equal(run(pipe), ref)


def test_never_skip_config_is_bit_identical_while_enabled(pipe):
    ref = run(pipe)
    with ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig(interval=1)) as handle:
        assert torch.equal(run(pipe), ref)
        stats = handle.stats()
    assert stats["methods"]["StepCache"]["cached"] == 0
    assert stats["methods"]["StepCache"]["computed"] == 6 * 3
    assert stats["flops_skipped_fraction"] == 0.0
    assert _pristine(pipe.transformer)


def test_stats_count_steps_and_skipped_flops(pipe):
    with ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig(interval=2, warmup_steps=2)) as handle:
        run(pipe, steps=8)
        s = handle.stats()
    assert s["generations"] == 1 and s["steps"] == 8 and s["transformer_calls"] == 8
    # warm-up 2, then every 2nd step computed, last step computed: steps 3 and 5 are cached.
    assert s["methods"]["StepCache"]["cached"] == 2 * 3
    # The blocks are most of the transformer's FLOPs: 2 of 8 steps skipped is a bit under 25%.
    assert 0.15 < s["flops_skipped_fraction"] < 0.25
    assert s["bytes_held"] > 0


def test_enabling_twice_replaces_previous(pipe):
    first = ditaccel.enable_acceleration(pipe, "fast")
    second = ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig())
    assert not first.active and second.active
    assert count_our_hooks(pipe.transformer) == 1 + 3  # engine hook + one per block
    assert ditaccel.disable_acceleration(pipe) is True
    assert ditaccel.disable_acceleration(pipe) is False
    assert _pristine(pipe.transformer)


def test_overrides_and_presets(pipe):
    with ditaccel.enable_acceleration(pipe, "balanced", interval=3) as handle:
        assert handle.configs[0].interval == 3


def test_hundred_cycles_leave_nothing_behind(pipe):
    ref = run(pipe, steps=2)
    gc.collect()
    tracemalloc.start()
    for i in range(100):
        handle = ditaccel.enable_acceleration(pipe, "balanced" if i % 2 else ditaccel.StepCacheConfig())
        if i == 5:
            gc.collect()
            base, _ = tracemalloc.get_traced_memory()
        handle.remove()
    gc.collect()
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert _pristine(pipe.transformer)
    assert after - base < 200_000, f"memory grew by {after - base} bytes over 95 enable/disable cycles"
    assert torch.equal(run(pipe, steps=2), ref)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: ditaccel.enable_acceleration(p, "turbo"), "Unknown preset 'turbo'"),
        (lambda p: ditaccel.enable_acceleration(p, "balanced", intervall=3), "Did you mean 'interval'"),
        (lambda p: ditaccel.enable_acceleration(p, 42), "config must be a preset name"),
        (lambda p: ditaccel.enable_acceleration(p, [ditaccel.StepCacheConfig(), "fast"]), r"config\[1\]"),
        (lambda p: ditaccel.enable_acceleration(p, []), "empty list"),
        (lambda p: ditaccel.enable_acceleration(p, "balanced", interval=-1), "interval must be >= 1"),
        (lambda p: ditaccel.enable_acceleration(p, "balanced", interval="2"), "must be an int"),
        (lambda p: ditaccel.enable_acceleration(p, count_flops="yes"), "count_flops must be True or False"),
        (lambda p: ditaccel.enable_acceleration(p, family="nope"), "Unknown model family 'nope'"),
        (lambda p: ditaccel.enable_acceleration(p, [ditaccel.StepCacheConfig(), ditaccel.StepCacheConfig(interval=3)]),
         "can have one step cache|given twice"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_pipeline_untouched(pipe, call, match):
    ref = run(pipe, steps=2)
    with pytest.raises(ditaccel.DitAccelError, match=match):
        call(pipe)
    assert _pristine(pipe.transformer)
    assert ditaccel.get_handle(pipe) is None
    assert torch.equal(run(pipe, steps=2), ref)


def test_unet_pipeline_is_rejected():
    class FakeUNetPipeline:
        def __init__(self):
            self.unet = torch.nn.Conv2d(4, 4, 3)

        @property
        def components(self):
            return {"unet": self.unet}

    fake = FakeUNetPipeline()
    with pytest.raises(ditaccel.UnsupportedModelError, match="UNet pipeline"):
        ditaccel.enable_acceleration(fake)
    assert "_diffusers_hook" not in fake.unet.__dict__


def test_model_without_blocks_is_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ditaccel.UnsupportedModelError, match="Found no transformer blocks.*register an adapter"):
        ditaccel.enable_acceleration(model)
    assert _pristine(model)


def test_not_a_pipeline_is_rejected():
    with pytest.raises(ditaccel.UnsupportedModelError, match="Expected a diffusers pipeline"):
        ditaccel.enable_acceleration("flux")


def test_config_not_yet_available_is_a_clear_error(pipe):
    class _Unregistered(ditaccel.MethodConfig):
        pass

    with pytest.raises(ditaccel.ConfigError, match="not available in this version"):
        ditaccel.enable_acceleration(pipe, _Unregistered())
    assert _pristine(pipe.transformer)


class _FailingInstall(InstalledMethod):
    def install(self):
        raise RuntimeError("install failed on purpose")

    def remove(self):
        pass


class _FailingConfig(ditaccel.MethodConfig):
    pass


register_method(_FailingConfig)(lambda engine, config: _FailingInstall(engine, config))


def test_enable_is_transactional(pipe):
    ref = run(pipe, steps=2)
    with pytest.raises(RuntimeError, match="on purpose"):
        # The step cache installs first (hooks on every block), then the second method fails.
        ditaccel.enable_acceleration(pipe, [ditaccel.StepCacheConfig(), _FailingConfig()])
    assert _pristine(pipe.transformer)
    assert torch.equal(run(pipe, steps=2), ref)


def test_bare_transformer_with_explicit_clock(pipe):
    model = pipe.transformer
    n = 16
    kwargs = dict(hidden_states=torch.randn(1, n, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(8, 3),
                  return_dict=False)
    with torch.no_grad():
        refs = [model(timestep=torch.tensor([1.0 - i / 6]), **kwargs)[0] for i in range(6)]
        with ditaccel.enable_acceleration(model, ditaccel.StepCacheConfig(interval=1)) as handle:
            handle.set_num_steps(6)
            outs = [model(timestep=torch.tensor([1.0 - i / 6]), **kwargs)[0] for i in range(6)]
            assert handle.stats()["steps"] == 6 and handle.stats()["generations"] == 1
    assert all(torch.equal(a, b) for a, b in zip(refs, outs))
