"""Tiny, randomly initialised ComfyUI models loaded through ComfyUI's own loading code, for the
tests and the benchmark (no weights are downloaded; call :func:`.vendored.use_vendored_comfyui`
first when running outside ComfyUI).

* Wan: a state dict in ComfyUI's Wan key format goes through ``comfy.sd.load_diffusion_model_state_dict``
  (model detection from the keys, dtype choice, ``model_base.WAN21``, ``ModelPatcher``), exactly
  like a ``.safetensors`` file from the "Load Diffusion Model" node.
* FLUX: ComfyUI's FLUX detection fixes 24 heads of 128 channels (a 12B-sized width), so the tiny
  FLUX is made from an explicit unet config through ``comfy.model_detection.model_config_from_unet_config``
  (ComfyUI's model matching) and then the same steps as ``load_diffusion_model_state_dict``; the
  tiny Chroma the same way.
"""

from __future__ import annotations

import torch


def _init_(module: torch.nn.Module, seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "norm" in name or "scale" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std * 0.1)


def _patcher_from_config(unet_config: dict, sd: dict):
    """The tail of ``comfy.sd.load_diffusion_model_state_dict`` for a known unet config."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, sd)
    if model_config is None:
        raise RuntimeError(f"ComfyUI found no model for unet config {unet_config}")
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    unet_dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd),
                               supported_dtypes=list(model_config.supported_inference_dtypes),
                               weight_dtype=comfy.utils.weight_dtype(sd))
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    model = model_config.get_model(sd, "")
    model = model.to(offload_device)
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def flux_unet_config(hidden: int = 256, heads: int = 2, depth: int = 2, depth_single: int = 4,
                     context_dim: int = 64, vec_dim: int = 32) -> dict:
    if hidden // heads != 128:
        raise ValueError("FLUX's rotary axes (16, 56, 56) need 128 channels per head: hidden = 128 * heads.")
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": vec_dim,
            "context_in_dim": context_dim, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads,
            "depth": depth, "depth_single_blocks": depth_single, "axes_dim": [16, 56, 56], "theta": 10000,
            "patch_size": 2, "qkv_bias": True, "guidance_embed": True}


def _flux_like(net_class, cfg: dict, seed: int, std: float):
    """A MODEL from a FLUX-family config: the net built with ComfyUI's ops, random init, then
    loaded back through ComfyUI's model matching."""
    import comfy.ops

    net = net_class(**{k: v for k, v in cfg.items() if k != "image_model"}, image_model=cfg["image_model"],
                    operations=comfy.ops.disable_weight_init)
    _init_(net, seed, std)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return _patcher_from_config(cfg, sd)


def tiny_flux(seed: int = 0, std: float = 0.02, **sizes):
    """A ComfyUI MODEL (ModelPatcher over ``model_base.Flux``) with a tiny random FLUX-dev."""
    import comfy.ldm.flux.model

    return _flux_like(comfy.ldm.flux.model.Flux, flux_unet_config(**sizes), seed, std)


def chroma_unet_config(hidden: int = 256, heads: int = 2, depth: int = 2, depth_single: int = 4,
                       context_dim: int = 64) -> dict:
    """Chroma: FLUX's blocks without per-block modulation; an approximator (64 -> hidden) makes the
    modulations from the timestep, guidance and a fixed modulation index."""
    if hidden // heads != 128:
        raise ValueError("Chroma's rotary axes (16, 56, 56) need 128 channels per head: hidden = 128 * heads.")
    return {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": context_dim,
            "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": heads, "depth": depth,
            "depth_single_blocks": depth_single, "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2,
            "qkv_bias": True, "in_dim": 64, "out_dim": hidden, "hidden_dim": 128, "n_layers": 2}


def tiny_chroma(seed: int = 0, std: float = 0.02, **sizes):
    """A ComfyUI MODEL (``model_base.Chroma``) with a tiny random Chroma, from an explicit config
    through ComfyUI's model matching (like the tiny FLUX)."""
    import comfy.ldm.chroma.model

    return _flux_like(comfy.ldm.chroma.model.Chroma, chroma_unet_config(**sizes), seed, std)


def chroma_conditioning(seed: int, tokens: int = 16, context_dim: int = 64, guidance: float = 0.0):
    """Chroma reads no pooled vector, but ComfyUI's FLUX-based model_base asks for one: an empty one."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, context_dim, generator=g), {"pooled_output": torch.zeros(1, 0),
                                                                "guidance": guidance}]]


def wan_state_dict(seed: int = 0, std: float = 0.02, dim: int = 128, ffn_dim: int = 256, layers: int = 2,
                   text_dim: int = 4096) -> dict:
    """A Wan 2.1 t2v state dict in ComfyUI's key format (one 128-channel head per 128 of ``dim``)."""
    import comfy.ldm.wan.model
    import comfy.ops

    net = comfy.ldm.wan.model.WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=dim,
                                       ffn_dim=ffn_dim, freq_dim=256, text_dim=text_dim, out_dim=16,
                                       num_heads=dim // 128, num_layers=layers,
                                       operations=comfy.ops.disable_weight_init)
    _init_(net, seed, std)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def tiny_wan(seed: int = 0, std: float = 0.02, **sizes):
    """A ComfyUI MODEL loaded with ``comfy.sd.load_diffusion_model_state_dict`` (real detection)."""
    import comfy.sd

    model = comfy.sd.load_diffusion_model_state_dict(wan_state_dict(seed, std, **sizes))
    if model is None:
        raise RuntimeError("ComfyUI did not detect the tiny Wan state dict")
    return model


def flux_conditioning(seed: int, tokens: int = 16, context_dim: int = 64, vec_dim: int = 32, guidance: float = 3.5):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, context_dim, generator=g),
             {"pooled_output": torch.randn(1, vec_dim, generator=g), "guidance": guidance}]]


def wan_conditioning(seed: int, tokens: int = 16, text_dim: int = 4096):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, text_dim, generator=g), {}]]


def ksample(model, positive, negative, latent: torch.Tensor, steps: int, cfg: float, seed: int = 0,
            sampler: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """ComfyUI's KSampler node (``nodes.KSampler``), as the graph executor would call it."""
    import nodes

    (out,) = nodes.KSampler().sample(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                      {"samples": latent.clone()}, denoise=1.0)
    return out["samples"]


# -- SD3, HunyuanVideo, LTXV (real detection from the keys) and Lumina 2 (explicit config) ------------


def _state_dict_for(unet_config: dict, seed: int, std: float) -> dict:
    """A random state dict in ComfyUI's key format for ``unet_config``: ComfyUI's model matching
    builds the model class, which is initialised and read back."""
    import comfy.model_detection

    model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
    if model_config is None:
        raise RuntimeError(f"ComfyUI found no model for unet config {unet_config}")
    net = model_config.get_model({}).diffusion_model
    _init_(net, seed, std)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in net.named_buffers():
            if name.endswith("pos_embed"):  # MMDiT's position table is a buffer made with torch.empty
                b.copy_(torch.randn(b.shape, generator=g) * std)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _load_detected(sd: dict, name: str):
    import comfy.sd

    model = comfy.sd.load_diffusion_model_state_dict(sd)
    if model is None:
        raise RuntimeError(f"ComfyUI did not detect the tiny {name} state dict")
    return model


def sd3_unet_config(depth: int = 2, context_dim: int = 64, pooled_dim: int = 32) -> dict:
    """What ComfyUI's MMDiT detection reads from an SD3 state dict: width 64 * depth, 64-channel heads."""
    return {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": depth, "input_size": None,
            "adm_in_channels": pooled_dim,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": context_dim, "out_features": 64 * depth}},
            "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
            "x_block_self_attn_layers": []}


def tiny_sd3(seed: int = 0, std: float = 0.02, **sizes):
    """A ComfyUI MODEL (``model_base.SD3``, MMDiT) from ``comfy.sd.load_diffusion_model_state_dict``."""
    return _load_detected(_state_dict_for(sd3_unet_config(**sizes), seed, std), "SD3")


def hunyuan_video_unet_config(depth: int = 2, depth_single: int = 2, context_dim: int = 64) -> dict:
    """ComfyUI's HunyuanVideo detection fixes 128-channel heads and rotary axes (16, 56, 56)."""
    return {"image_model": "hunyuan_video", "in_channels": 16, "patch_size": [1, 2, 2], "out_channels": 16,
            "vec_in_dim": 768, "axes_dim": [16, 56, 56], "meanflow": False, "context_in_dim": context_dim,
            "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 1, "depth": depth,
            "depth_single_blocks": depth_single, "theta": 256, "qkv_bias": True, "byt5": False,
            "guidance_embed": True, "use_cond_type_embedding": False, "vision_in_dim": None}


def tiny_hunyuan_video(seed: int = 0, std: float = 0.02, **sizes):
    return _load_detected(_state_dict_for(hunyuan_video_unet_config(**sizes), seed, std), "HunyuanVideo")


def ltxv_unet_config(layers: int = 2, head_dim: int = 4) -> dict:
    """ComfyUI's LTXV detection: 32 heads of ``attn2.to_k`` rows / 32 channels; 128 latent channels."""
    return {"image_model": "ltxv", "num_layers": layers, "attention_head_dim": head_dim,
            "cross_attention_dim": 32 * head_dim}


def tiny_ltxv(seed: int = 0, std: float = 0.02, **sizes):
    return _load_detected(_state_dict_for(ltxv_unet_config(**sizes), seed, std), "LTXV")


def lumina2_unet_config(dim: int = 128, layers: int = 2, cap_dim: int = 64) -> dict:
    """Lumina 2 detection fixes heads and rotary axes only for the real widths (2304, 3840), so the
    tiny one is matched from an explicit config (ComfyUI's model matching, like FLUX)."""
    return {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": dim, "cap_feat_dim": cap_dim,
            "n_layers": layers, "qk_norm": True, "n_heads": 4, "n_kv_heads": 2, "axes_dims": [8, 12, 12],
            "axes_lens": [300, 64, 64], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}


def tiny_lumina2(seed: int = 0, std: float = 0.02, **sizes):
    cfg = lumina2_unet_config(**sizes)
    return _patcher_from_config(cfg, _state_dict_for(cfg, seed, std))


def text_conditioning(seed: int, dim: int, tokens: int = 16, pooled: int | None = None, **extra):
    """``[[cross_attn, {pooled_output, ...}]]`` with random text features."""
    g = torch.Generator().manual_seed(seed)
    opts = dict(extra)
    if pooled:
        opts["pooled_output"] = torch.randn(1, pooled, generator=g)
    return [[torch.randn(1, tokens, dim, generator=g), opts]]
