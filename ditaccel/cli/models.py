"""The model a benchmark runs on: a trained reference model, a local diffusers folder, or a tiny
random pipeline (``tiny:<family>``) built from a config, whose fidelity numbers mean nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UsageError

RANDOM_NOTE = "random weights: fidelity not meaningful"


@dataclass
class BenchModel:
    name: str
    pipe: Any
    description: str
    random_weights: bool
    # seed -> keyword arguments of one pipeline call (conditioning + size), without generator/steps
    make_call: Callable[[int], dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        from ..adapters.registry import _entry_for  # noqa: PLC0415

        entry = _entry_for(self.pipe.transformer)
        return entry.family if entry is not None else "generic"


# ---------------------------------------------------------------------------------------------
# tiny random pipelines (same architecture as the flux_tiny reference model)


def _tiny_flux(tokens: int | None = 256, batch: int = 1, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> BenchModel:
    tokens = 256 if tokens is None else tokens
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=4,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
        layers_per_block=1, latent_channels=16, norm_num_groups=32, sample_size=64,
        mid_block_add_attention=False, scaling_factor=1.0, shift_factor=0.0,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer.eval())
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    side = int(round((tokens ** 0.5))) * 2 * pipe.vae_scale_factor  # 2x2 packing after the VAE
    g = torch.Generator().manual_seed(1234)
    prompt_embeds = torch.randn(batch, 8, 64, generator=g).to(device=device, dtype=dtype)
    pooled = torch.randn(batch, 64, generator=g).to(device=device, dtype=dtype)

    def make_call(seed: int) -> dict[str, Any]:
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "height": side, "width": side}

    n_tok = (side // (2 * pipe.vae_scale_factor)) ** 2
    return BenchModel(
        name="tiny:flux", pipe=pipe, random_weights=True, make_call=make_call,
        description=(f"tiny random FLUX (2 double + 4 single blocks, 4x32 heads), {side}x{side} px = {n_tok} "
                     f"image tokens, batch {batch} ({RANDOM_NOTE})"),
    )


TINY_BUILDERS: dict[str, Callable[..., BenchModel]] = {"flux": _tiny_flux}


# ---------------------------------------------------------------------------------------------
# trained reference models / local folders


def _reference_api():
    """The reference-model API, or None when that module is not there."""
    try:
        from ..reference import pipelines  # noqa: PLC0415
    except Exception:  # pragma: no cover - depends on another part of the project
        return None
    if not all(hasattr(pipelines, n) for n in ("load_reference_pipeline", "reference_call_kwargs",
                                               "list_reference_models")):
        return None
    return pipelines


def reference_names() -> list[str]:
    api = _reference_api()
    return list(api.list_reference_models()) if api is not None else []


def available_reference_names() -> list[str]:
    api = _reference_api()
    if api is None:
        return []
    try:
        return list(api.list_reference_models(available_only=True))
    except TypeError:
        return list(api.list_reference_models())


def _image_size_for_tokens(pipe, tokens: int, name: str, frames: int | None = None) -> dict[str, int]:
    """Call size of a reference model for ``tokens`` image tokens (per frame for video models):
    FLUX-kind: 2x2-packed latents; Wan-kind: 1x2x2 patches, ``frames`` frames (4k + 1)."""
    kind = type(pipe).__name__
    if kind == "FluxPipeline" and frames is None:
        side = int(round(tokens ** 0.5)) * 2 * pipe.vae_scale_factor
        return {"height": side, "width": side}
    if kind == "WanPipeline":
        out = {}
        if tokens is not None:
            side = int(round(tokens ** 0.5)) * 2 * pipe.vae_scale_factor_spatial
            out.update(height=side, width=side)
        if frames is not None:
            if (frames - 1) % pipe.vae_scale_factor_temporal:
                raise UsageError(f"--frames must be {pipe.vae_scale_factor_temporal}k + 1 for {name} "
                                 f"(e.g. 5, 9, 17), got {frames}.")
            out["num_frames"] = frames
        return out
    raise UsageError(f"--tokens applies to the tiny random models and FLUX-kind reference models, --frames to "
                     f"video reference models; {name} is a {kind}. Leave them out for it.")


def _tokens_of(pipe, size: dict) -> int | None:
    """Image tokens the transformer sees for a call of this size (video: all frames), if known."""
    kind = type(pipe).__name__
    if kind == "FluxPipeline" and "height" in size:
        return (size["height"] // (2 * pipe.vae_scale_factor)) * (size["width"] // (2 * pipe.vae_scale_factor))
    if kind == "WanPipeline" and "height" in size:
        f = (size.get("num_frames", 1) - 1) // pipe.vae_scale_factor_temporal + 1
        per = 2 * pipe.vae_scale_factor_spatial
        return f * (size["height"] // per) * (size["width"] // per)
    return None


def _load_reference(name: str, batch: int, device: str, tokens: int | None = None,
                    dtype: torch.dtype = torch.float32, folder: Path | None = None,
                    frames: int | None = None) -> BenchModel:
    """Reference model ``name`` from its shipped checkpoint, or from ``folder`` laid out like it."""
    api = _reference_api()
    pipe, prompts = api.load_reference_pipeline(name, device=device, dtype=dtype, folder=folder)
    pipe.set_progress_bar_config(disable=True)
    classes = list(getattr(prompts, "class_names", []))[:batch] or [0]
    info = getattr(api, "REFERENCE_MODELS", {}).get(name, {})
    size = {k: v for k, v in info.get("default_call", {}).items() if k != "num_inference_steps"}
    if tokens is not None or frames is not None:
        size.update(_image_size_for_tokens(pipe, tokens, name, frames))
    kw = api.reference_call_kwargs(prompts, classes, dtype=dtype, device=device)

    def make_call(seed: int) -> dict[str, Any]:
        return {**kw, **size}

    at = ""
    if tokens is not None or frames is not None:
        f = f"{size['num_frames']} frames of " if "num_frames" in size else ""
        at = f"; run at {f}{size['height']}x{size['width']} px ({_tokens_of(pipe, size)} image tokens)"
    if folder is None:
        desc = f"trained reference model {name}: {info.get('description', name)}"
    else:
        desc = f"reference-model folder {folder} ({info.get('pipeline', name)})"
    return BenchModel(name=name if folder is None else str(folder), pipe=pipe, random_weights=False,
                      make_call=make_call, description=f"{desc}{at}; classes {classes}; {dtype}")


def _reference_name_of_folder(path: Path) -> str | None:
    """The reference model a folder is laid out like (model_index.json + prompts.safetensors), if any."""
    import json

    api = _reference_api()
    if api is None or not (path / "prompts.safetensors").is_file():
        return None
    pipeline_class = json.loads((path / "model_index.json").read_text()).get("_class_name")
    names = [n for n, v in getattr(api, "REFERENCE_MODELS", {}).items() if v.get("pipeline") == pipeline_class]
    return names[0] if names else None


def _load_folder(path: Path, device: str, batch: int = 1, tokens: int | None = None,
                 dtype: torch.dtype = torch.float32, frames: int | None = None) -> BenchModel:
    import diffusers

    if (path / "model_index.json").is_file():
        name = _reference_name_of_folder(path)
        if name is not None:
            return _load_reference(name, batch, device, tokens, dtype, folder=path, frames=frames)
    _no_frames(frames, f"the diffusers pipeline folder {path}")

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise UsageError(
            f"--model {path}: could not load a diffusers pipeline from this folder ({type(exc).__name__}: {exc}). "
            "Expected a folder written by pipeline.save_pretrained() with a model_index.json."
        ) from exc
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "text_encoder", None) is None and getattr(pipe, "text_encoder_2", None) is None:
        raise UsageError(
            f"--model {path}: the pipeline has no text encoder, so the bench cannot make prompt embeddings. "
            "Use a reference model name or a pipeline folder with its text encoders."
        )

    def make_call(seed: int) -> dict[str, Any]:
        return {"prompt": "a photo of a red fox in the snow"}

    return BenchModel(name=str(path), pipe=pipe, random_weights=False, make_call=make_call,
                      description=f"diffusers pipeline {type(pipe).__name__} from {path}")


def _no_frames(frames: int | None, what: str) -> None:
    if frames is not None:
        raise UsageError(f"--frames applies to video reference models (wan_tiny); {what} is not one. Leave it out.")


def load_bench_model(spec: str | None, batch: int = 1, device: str = "cpu", tokens: int | None = None,
                     dtype: torch.dtype = torch.float32, frames: int | None = None) -> BenchModel:
    """``None`` -> the FLUX reference model if its checkpoint is there, else tiny random FLUX.

    ``tokens``: image tokens (tiny random models: default 256; reference models: default their
    training size; per frame for video models).  ``frames``: frames of a video reference model.
    ``dtype``: the weights' and conditioning's dtype."""
    if spec is None:
        _no_frames(frames, "the default FLUX model")
        if "flux_tiny" in available_reference_names():
            try:
                return _load_reference("flux_tiny", batch, device, tokens, dtype)
            except UsageError:
                raise
            except Exception as exc:  # noqa: BLE001 - fall back, but say why
                model = _tiny_flux(tokens=tokens, batch=batch, device=device, dtype=dtype)
                model.notes.append(f"flux_tiny reference model failed to load ({type(exc).__name__}: {exc}); "
                                   "fell back to tiny random FLUX")
                return model
        model = _tiny_flux(tokens=tokens, batch=batch, device=device, dtype=dtype)
        model.notes.append("flux_tiny reference checkpoint not found; using tiny random FLUX")
        return model
    if spec.startswith("tiny:"):
        family = spec.split(":", 1)[1]
        _no_frames(frames, f"--model {spec}")
        if family not in TINY_BUILDERS:
            raise UsageError(f"--model {spec}: no tiny random pipeline for family {family!r}. "
                             f"Expected one of {['tiny:' + f for f in TINY_BUILDERS]}.")
        return TINY_BUILDERS[family](tokens=tokens, batch=batch, device=device, dtype=dtype)
    if spec in reference_names():
        if spec not in available_reference_names():
            raise UsageError(f"--model {spec}: the reference model's checkpoint is missing. "
                             f"Reference models with checkpoints: {available_reference_names() or 'none'}. "
                             f"Use --model tiny:flux for a random model.")
        return _load_reference(spec, batch, device, tokens, dtype, frames=frames)
    path = Path(spec)
    if path.is_dir():
        return _load_folder(path, device, batch, tokens, dtype, frames)
    raise UsageError(
        f"--model {spec!r} is neither a reference model ({reference_names() or 'none installed'}), "
        f"a tiny random model ({['tiny:' + f for f in TINY_BUILDERS]}), nor an existing folder. "
        "Pass one of those, or a path to a diffusers pipeline folder."
    )
