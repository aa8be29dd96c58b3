"""Tiny, randomly initialised ComfyUI models loaded through ComfyUI's own loading code, for the
tests and the benchmark (no weights are downloaded; call :func:`.vendored.use_vendored_comfyui`
first when running outside ComfyUI).

* Wan: a state dict in ComfyUI's Wan key format goes through ``comfy.sd.load_diffusion_model_state_dict``
  (model detection from the keys, dtype choice, ``model_base.WAN21``, ``ModelPatcher``), exactly
  like a ``.safetensors`` file from the "Load Diffusion Model" node.
* FLUX: ComfyUI's FLUX detection fixes 24 heads of 128 channels (a 12B-sized width), so the tiny
  FLUX is made from an explicit unet config through ``comfy.model_detection.model_config_from_unet_config``
  (ComfyUI's model matching) and then the same steps as ``load_diffusion_model_state_dict``.
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


def tiny_flux(seed: int = 0, std: float = 0.02, **sizes):
    """A ComfyUI MODEL (ModelPatcher over ``model_base.Flux``) with a tiny random FLUX-dev."""
    import comfy.ldm.flux.model
    import comfy.ops

    cfg = flux_unet_config(**sizes)
    net = comfy.ldm.flux.model.Flux(**{k: v for k, v in cfg.items() if k != "image_model"},
                                    image_model="flux", operations=comfy.ops.disable_weight_init)
    _init_(net, seed, std)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return _patcher_from_config(cfg, sd)


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
