"""Tiny random-weight diffusers pipelines and transformers for every supported family.

Every builder is deterministic (seeded) and small enough that one denoising step takes a few
milliseconds on one CPU thread: 1-2 blocks, 2 heads of 8 dims, 8-32 image tokens. No text
encoder or tokenizer is built: every pipeline here accepts precomputed prompt embeddings, so
``call_kwargs`` passes random ``prompt_embeds`` (and the pooled embeddings / attention masks the
pipeline needs) and the text-encoder components are ``None``. Runs use ``output_type="latent"``
except DiT, whose pipeline always decodes (its tiny VAE does that in a few ms).

    pipe = tiny_pipeline("wan")
    out = pipe(**call_kwargs("wan", steps=4, cfg=True))   # out.frames: the latents

``CASES`` lists the pipeline cases (one per family, plus ``pixart_sigma``), ``FAMILY`` maps a case
to its adapter family, and ``output_of(case, out)`` picks the latents tensor of a pipeline output.
"""

from __future__ import annotations

import zlib

import torch

# pipeline case -> adapter family
FAMILY = {
    "flux": "flux",
    "sd3": "sd3",
    "pixart": "pixart",
    "pixart_sigma": "pixart",
    "dit": "dit",
    "lumina2": "lumina2",
    "sana": "sana",
    "wan": "wan",
    "hunyuan_video": "hunyuan_video",
    "cogvideox": "cogvideox",
    "qwenimage": "qwenimage",
    "ltx": "ltx",
    "chroma": "chroma",
}
CASES = tuple(FAMILY)
FAMILIES = tuple(dict.fromkeys(FAMILY.values()))
VIDEO_CASES = ("wan", "hunyuan_video", "cogvideox", "ltx")

TEXT_DIM = 16  # width of every tiny prompt embedding
POOLED_DIM = 8
TEXT_TOKENS = 6

# Defaults per case: (height, width, frames) in pixels / frames given to the pipeline.
DEFAULT_SIZE = {
    "flux": (16, 16, None),  # VAE /2, 2x2 packing -> 4 x 4 = 16 tokens
    "sd3": (8, 8, None),  # VAE /2, patch 1 -> 4 x 4 = 16 tokens
    "pixart": (8, 8, None),  # VAE /2, patch 1 -> 16 tokens
    "pixart_sigma": (8, 8, None),
    "dit": (None, None, None),  # latent size fixed by transformer.config.sample_size: 8 x 8 / patch 2 = 16 tokens
    "lumina2": (64, 64, None),  # the pipeline's VAE factor is fixed at 8; patch 2 -> 4 x 4 = 16 tokens
    "sana": (32, 32, None),  # the pipeline wants multiples of 32; DC-AE /8, patch 1 -> 4 x 4 = 16 tokens
    "wan": (16, 16, 3),  # VAE /2 spatial, /2 temporal; patch (1,2,2) -> 2 x 4 x 4 = 32 tokens
    "hunyuan_video": (32, 32, 5),  # VAE /8 spatial, /4 temporal; patch 1 -> 2 x 4 x 4 = 32 tokens
    "cogvideox": (16, 16, 5),  # VAE /2 spatial, /4 temporal; patch 2 -> 2 x 4 x 4 = 32 tokens
    "qwenimage": (32, 32, None),  # VAE /4, 2x2 packing -> 4 x 4 = 16 tokens
    "ltx": (32, 32, 9),  # the pipeline wants multiples of 32; VAE /8 spatial and temporal; patch 1 -> 2 x 4 x 4 = 32 tokens
    "chroma": (16, 16, None),  # as FLUX
}


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) % (2**31)


def _flow_scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def _kl_vae(latent_channels: int = 4):
    """AutoencoderKL with scale factor 2 (two blocks)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=4, sample_size=16, mid_block_add_attention=False,
    )


# ---------------------------------------------------------------------------------------------
# transformers


def tiny_transformer(family: str) -> torch.nn.Module:
    """A tiny random-weight transformer of ``family`` (a case name such as ``pixart_sigma`` works too)."""
    family = FAMILY.get(family, family)
    torch.manual_seed(_seed(family))
    import diffusers as d

    if family == "flux":
        model = d.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
            guidance_embeds=True, axes_dims_rope=(2, 2, 4),
        )
    elif family == "sd3":
        model = d.SD3Transformer2DModel(
            sample_size=4, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=POOLED_DIM,
            out_channels=4, pos_embed_max_size=16,
        )
    elif family == "pixart":
        model = d.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=16, caption_channels=TEXT_DIM, sample_size=4, patch_size=1,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
            use_additional_conditions=False,
        )
    elif family == "dit":
        model = d.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        )
    elif family == "lumina2":
        model = d.Lumina2Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2, num_refiner_layers=1,
            num_attention_heads=2, num_kv_heads=2, multiple_of=16, norm_eps=1e-5, scaling_factor=1.0,
            axes_dim_rope=(4, 2, 2), axes_lens=(64, 32, 32), cap_feat_dim=TEXT_DIM,
        )
    elif family == "sana":
        model = d.SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=TEXT_DIM, mlp_ratio=2.0, sample_size=4, patch_size=1,
        )
    elif family == "wan":
        model = d.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )
    elif family == "hunyuan_video":
        model = d.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM, rope_axes_dim=(2, 2, 4),
        )
    elif family == "cogvideox":
        model = d.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=TEXT_DIM, num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
            patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_TOKENS,
        )
    elif family == "qwenimage":
        model = d.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=TEXT_DIM, guidance_embeds=False, axes_dims_rope=(2, 2, 4),
        )
    elif family == "ltx":
        model = d.LTXVideoTransformer3DModel(
            in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
            cross_attention_dim=16, num_layers=2, caption_channels=TEXT_DIM,
        )
    elif family == "chroma":
        model = d.ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4),
            approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1,
        )
    else:
        raise KeyError(f"no tiny transformer for family {family!r}; known: {FAMILIES}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# pipelines


def tiny_pipeline(case: str):
    """A tiny pipeline of ``case`` (see ``CASES``) with random weights and no text encoders."""
    import diffusers as d

    family = FAMILY[case]
    transformer = tiny_transformer(family)
    torch.manual_seed(_seed(case) + 1)
    if case == "flux":
        pipe = d.FluxPipeline(scheduler=_flow_scheduler(), vae=_kl_vae(4), text_encoder=None, tokenizer=None,
                              text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    elif case == "sd3":
        pipe = d.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=_flow_scheduler(), vae=_kl_vae(4), text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )
    elif case in ("pixart", "pixart_sigma"):
        cls = d.PixArtAlphaPipeline if case == "pixart" else d.PixArtSigmaPipeline
        pipe = cls(tokenizer=None, text_encoder=None, vae=_kl_vae(4), transformer=transformer,
                   scheduler=d.DPMSolverMultistepScheduler())
    elif case == "dit":
        pipe = d.DiTPipeline(transformer=transformer, vae=_kl_vae(4), scheduler=d.DPMSolverMultistepScheduler())
    elif case == "lumina2":
        pipe = d.Lumina2Pipeline(transformer=transformer, scheduler=_flow_scheduler(), vae=_kl_vae(4),
                                 text_encoder=None, tokenizer=None)
    elif case == "sana":
        vae = d.AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=2,
            encoder_block_types="ResBlock", decoder_block_types="ResBlock",
            encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
            encoder_qkv_multiscales=((),) * 4, decoder_qkv_multiscales=((),) * 4,
            decoder_norm_types="rms_norm", decoder_act_fns="silu",
        )
        pipe = d.SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                              scheduler=d.DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                                                     use_flow_sigmas=True, flow_shift=3.0))
    elif case == "wan":
        vae = d.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
                                 scale_factor_temporal=2, scale_factor_spatial=2)
        pipe = d.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=_flow_scheduler(shift=3.0),
                             transformer=transformer)
    elif case == "hunyuan_video":
        vae = d.AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
            spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=False,
        )
        pipe = d.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                      scheduler=_flow_scheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None)
    elif case == "cogvideox":
        vae = d.AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
            up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 8), latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        )
        pipe = d.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                   scheduler=d.CogVideoXDDIMScheduler())
    elif case == "qwenimage":
        vae = d.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                       temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                       latents_std=[1.0] * 4)
        pipe = d.QwenImagePipeline(scheduler=_flow_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                                   transformer=transformer)
    elif case == "ltx":
        vae = d.AutoencoderKLLTXVideo(
            latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
            patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
        )
        pipe = d.LTXPipeline(scheduler=_flow_scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    elif case == "chroma":
        pipe = d.ChromaPipeline(scheduler=_flow_scheduler(), vae=_kl_vae(4), text_encoder=None, tokenizer=None,
                                transformer=transformer)
    else:
        raise KeyError(f"no tiny pipeline {case!r}; known: {CASES}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# call arguments


def _embeds(case: str, batch: int, negative: bool):
    g = torch.Generator().manual_seed(_seed(case) + (7 if negative else 3))
    emb = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g)
    pooled = torch.randn(batch, POOLED_DIM, generator=g)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.long)
    mask[:, -1] = 0  # one padding token, as tokenizers would give
    return emb, pooled, mask


def call_kwargs(case: str, steps: int = 4, batch: int = 1, height: int | None = None, width: int | None = None,
                frames: int | None = None, cfg: bool = False, seed: int = 0) -> dict:
    """Keyword arguments of ``tiny_pipeline(case)(**kwargs)``: precomputed embeddings, latent output.

    ``cfg=True`` turns classifier-free guidance on in the pipeline's own style: batched
    [uncond, cond] rows (SD3, PixArt, DiT, Sana, CogVideoX, LTX), two calls per step (Wan, Lumina2,
    Chroma; FLUX / Qwen-Image / HunyuanVideo true CFG with a negative prompt). ``cfg=False`` gives one
    branch (FLUX and HunyuanVideo still get their distilled ``guidance`` embedding).
    A new seeded generator is made at each call, so equal arguments give equal latents.
    """
    dh, dw, df = DEFAULT_SIZE[case]
    height = height if height is not None else dh
    width = width if width is not None else dw
    frames = frames if frames is not None else df
    emb, pooled, mask = _embeds(case, batch, negative=False)
    nemb, npooled, nmask = _embeds(case, batch, negative=True)
    kw: dict = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed), "output_type": "latent"}
    if case != "dit":
        kw.update(height=height, width=width)
    if case in VIDEO_CASES:
        kw["num_frames"] = frames

    if case == "flux":
        kw.update(prompt_embeds=emb, pooled_prompt_embeds=pooled, guidance_scale=3.5)
        if cfg:
            kw.update(negative_prompt_embeds=nemb, negative_pooled_prompt_embeds=npooled, true_cfg_scale=4.0)
    elif case == "sd3":
        kw.update(prompt_embeds=emb, pooled_prompt_embeds=pooled, guidance_scale=5.0 if cfg else 1.0)
        if cfg:
            kw.update(negative_prompt_embeds=nemb, negative_pooled_prompt_embeds=npooled)
    elif case in ("pixart", "pixart_sigma", "sana"):
        kw.update(prompt_embeds=emb, prompt_attention_mask=mask, guidance_scale=4.5 if cfg else 1.0,
                  use_resolution_binning=False, negative_prompt=None)
        if cfg:
            kw.update(negative_prompt_embeds=nemb, negative_prompt_attention_mask=nmask)
        if case == "sana":
            kw["complex_human_instruction"] = None
    elif case == "dit":
        labels = [(3 * i + 1) % 1000 for i in range(batch)]
        kw.update(class_labels=labels, guidance_scale=4.0 if cfg else 1.0, output_type="pt")
    elif case in ("lumina2", "ltx"):
        kw.update(prompt_embeds=emb, prompt_attention_mask=mask, guidance_scale=4.0 if cfg else 1.0)
        if cfg:
            kw.update(negative_prompt_embeds=nemb, negative_prompt_attention_mask=nmask)
    elif case in ("wan", "cogvideox"):
        kw.update(prompt_embeds=emb, guidance_scale=5.0 if cfg else 1.0)
        if cfg:
            kw.update(negative_prompt_embeds=nemb)
    elif case == "hunyuan_video":
        kw.update(prompt_embeds=emb, pooled_prompt_embeds=pooled, prompt_attention_mask=mask, guidance_scale=6.0)
        if cfg:
            kw.update(negative_prompt_embeds=nemb, negative_pooled_prompt_embeds=npooled,
                      negative_prompt_attention_mask=nmask, true_cfg_scale=4.0)
    elif case == "qwenimage":
        kw.update(prompt_embeds=emb, prompt_embeds_mask=mask)
        if cfg:
            kw.update(negative_prompt_embeds=nemb, negative_prompt_embeds_mask=nmask, true_cfg_scale=4.0)
    elif case == "chroma":
        # ChromaPipeline builds float masks (model dtype) from the tokenizer mask
        kw.update(prompt_embeds=emb, prompt_attention_mask=mask.float(), guidance_scale=4.0 if cfg else 1.0)
        if cfg:
            kw.update(negative_prompt_embeds=nemb, negative_prompt_attention_mask=nmask.float())
    return kw


def output_of(case: str, out) -> torch.Tensor:
    """The tensor a pipeline call returned (latents, or DiT's decoded images)."""
    for name in ("images", "frames"):
        value = getattr(out, name, None)
        if value is not None:
            return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return out[0]


def run_plain_and_accelerated(case: str, config, steps: int = 3, size: tuple[int, int] | None = None,
                              cfg: bool = False):
    """(plain output, accelerated output, handle stats) of one tiny pipeline of ``case`` with the same inputs."""
    import ditaccel

    pipe = tiny_pipeline(case)
    kw = {} if size is None else dict(zip(("height", "width"), size))
    ref = output_of(case, pipe(**call_kwargs(case, steps=steps, cfg=cfg, **kw)))
    handle = ditaccel.enable_acceleration(pipe, config)
    out = output_of(case, pipe(**call_kwargs(case, steps=steps, cfg=cfg, **kw)))
    stats = handle.stats()
    handle.remove()
    return ref, out, stats
