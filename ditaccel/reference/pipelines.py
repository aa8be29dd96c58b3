"""Load the small *trained* reference pipelines shipped in ``ditaccel/reference/checkpoints``.

Usage::

    from ditaccel.reference import load_reference_pipeline, reference_call_kwargs

    pipe, prompts = load_reference_pipeline("flux_tiny")
    kwargs = reference_call_kwargs(prompts, ["red_circle", "blue_square"], true_cfg_scale=3.0)
    images = pipe(**kwargs, num_inference_steps=28, height=64, width=64,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images

The pipelines are real ``diffusers`` pipelines (``FluxPipeline``/``WanPipeline``) loaded with
``from_pretrained`` from local files; they have no text encoder or tokenizer: the prompts are
fixed per-class embeddings stored next to the model (``prompts.safetensors`` + ``prompts.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "CHECKPOINT_ROOT",
    "REFERENCE_MODELS",
    "ReferenceModelError",
    "ReferencePrompts",
    "list_reference_models",
    "reference_model_path",
    "load_reference_pipeline",
    "load_reference_prompts",
    "reference_call_kwargs",
    "trajectory_relative_change",
    "sample_stats",
    "write_sample_stats",
]

CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"

REFERENCE_MODELS: dict[str, dict[str, Any]] = {
    "flux_tiny": {
        "pipeline": "FluxPipeline",
        "kind": "flux",
        "train": "PYTHONPATH=<repo> python -m ditaccel.reference.train_flux --out {path} --seed 0",
        "description": "FLUX-architecture DiT (2 double + 4 single blocks) + tiny AutoencoderKL, 16 shape/colour classes, 64x64 px = 256 tokens",
        "default_call": {"height": 64, "width": 64, "num_inference_steps": 28},
    },
    "wan_tiny": {
        "pipeline": "WanPipeline",
        "kind": "wan",
        "train": "PYTHONPATH=<repo> python -m ditaccel.reference.train_wan --out {path} --seed 0",
        "description": "Wan-architecture video DiT + tiny AutoencoderKLWan, moving shapes, 5 frames 32x32 = 192 tokens",
        "default_call": {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 28},
    },
}


class ReferenceModelError(FileNotFoundError):
    """A reference model name is unknown, or its checkpoint folder is missing/incomplete."""


@dataclass
class ReferencePrompts:
    """Per-class conditioning of a reference model.

    ``prompt_embeds[i]``/``pooled_prompt_embeds[i]`` belong to class ``i``; ``index`` maps a
    class name to its row, with ``""`` the null (empty / negative) prompt used for CFG.
    """

    name: str
    kind: str
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    index: dict[str, int]
    class_names: list[str] = field(default_factory=list)

    @property
    def null_index(self) -> int:
        return self.index[""]

    def rows(self, class_names: str | int | Sequence[str | int]) -> list[int]:
        items = [class_names] if isinstance(class_names, (str, int)) else list(class_names)
        rows = []
        for c in items:
            if isinstance(c, int):
                if not 0 <= c < len(self.class_names):
                    raise ValueError(
                        f"class index {c} out of range for reference model '{self.name}': expected 0..{len(self.class_names) - 1}"
                    )
                rows.append(c)
            elif c in self.index:
                rows.append(self.index[c])
            else:
                raise ValueError(
                    f"unknown class name {c!r} for reference model '{self.name}'. "
                    f"Expected one of: {', '.join(self.class_names)} (or '' for the null prompt)."
                )
        return rows


def list_reference_models(available_only: bool = False) -> list[str]:
    """Names of the reference models; with ``available_only`` only those whose checkpoint exists."""
    names = sorted(REFERENCE_MODELS)
    if available_only:
        names = [n for n in names if (CHECKPOINT_ROOT / n / "model_index.json").is_file()]
    return names


def _train_hint(name: str, folder: Path) -> str:
    return REFERENCE_MODELS[name]["train"].format(path=folder)


def reference_model_path(name: str, folder: str | Path | None = None) -> Path:
    """Checkpoint folder of reference model ``name``; raises :class:`ReferenceModelError` if unusable."""
    if name not in REFERENCE_MODELS:
        raise ReferenceModelError(
            f"unknown reference model {name!r}. Available: {', '.join(list_reference_models())} "
            f"(with checkpoints present: {', '.join(list_reference_models(True)) or 'none'})."
        )
    path = Path(folder) if folder is not None else CHECKPOINT_ROOT / name
    missing = [f for f in ("model_index.json", "prompts.safetensors", "prompts.json") if not (path / f).is_file()]
    if missing:
        raise ReferenceModelError(
            f"reference model {name!r} has no usable checkpoint at {path} (missing: {', '.join(missing)}). "
            f"Train it with: {_train_hint(name, path)}"
        )
    return path


def load_reference_prompts(name: str = "flux_tiny", folder: str | Path | None = None) -> ReferencePrompts:
    from safetensors.torch import load_file

    path = reference_model_path(name, folder)
    tensors = load_file(str(path / "prompts.safetensors"))
    index = json.loads((path / "prompts.json").read_text())
    class_names = [k for k, _ in sorted(index.items(), key=lambda kv: kv[1]) if k != ""]
    return ReferencePrompts(
        name=name,
        kind=REFERENCE_MODELS[name]["kind"],
        prompt_embeds=tensors["prompt_embeds"],
        pooled_prompt_embeds=tensors.get("pooled_prompt_embeds"),
        index=index,
        class_names=class_names,
    )


def load_reference_pipeline(
    name: str = "flux_tiny",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    folder: str | Path | None = None,
    progress_bar: bool = False,
):
    """Load reference model ``name`` as a diffusers pipeline from its local folder.

    Returns ``(pipe, prompts)``; ``prompts`` is a :class:`ReferencePrompts` for
    :func:`reference_call_kwargs`.  Weights are stored in fp16 and cast to ``dtype``.
    """
    path = reference_model_path(name, folder)
    import diffusers

    cls = getattr(diffusers, REFERENCE_MODELS[name]["pipeline"])
    none_components: dict[str, Any] = {"text_encoder": None, "tokenizer": None}
    if REFERENCE_MODELS[name]["kind"] == "flux":
        none_components.update(text_encoder_2=None, tokenizer_2=None)
    from diffusers.utils import deprecation_utils

    # diffusers >= 0.36 renamed ``torch_dtype`` to ``dtype`` (the old name still works, with a warning)
    dtype_kw = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    pipe = cls.from_pretrained(str(path), local_files_only=True, **{dtype_kw: dtype}, **none_components)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe, load_reference_prompts(name, path)


def reference_call_kwargs(
    prompts: ReferencePrompts,
    class_names: str | int | Sequence[str | int],
    true_cfg_scale: float = 1.0,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Keyword arguments for the pipeline call that condition on ``class_names`` (one sample each).

    FLUX: ``prompt_embeds`` + ``pooled_prompt_embeds``; with ``true_cfg_scale > 1`` also the null
    prompt as ``negative_prompt_embeds``/``negative_pooled_prompt_embeds`` and ``true_cfg_scale``
    (FluxPipeline's true classifier-free guidance).  Wan: ``prompt_embeds`` and, with a scale
    > 1, ``negative_prompt_embeds`` and ``guidance_scale`` (``guidance_scale=1`` otherwise).
    """
    rows = prompts.rows(class_names)
    null = [prompts.null_index] * len(rows)

    def take(t: torch.Tensor | None, r: list[int]) -> torch.Tensor | None:
        if t is None:
            return None
        out = t[r]
        return out.to(dtype=dtype or out.dtype, device=device or out.device)

    cfg = float(true_cfg_scale) > 1.0
    if prompts.kind == "flux":
        kw: dict[str, Any] = {
            "prompt_embeds": take(prompts.prompt_embeds, rows),
            "pooled_prompt_embeds": take(prompts.pooled_prompt_embeds, rows),
        }
        if cfg:
            kw["negative_prompt_embeds"] = take(prompts.prompt_embeds, null)
            kw["negative_pooled_prompt_embeds"] = take(prompts.pooled_prompt_embeds, null)
            kw["true_cfg_scale"] = float(true_cfg_scale)
        return kw
    kw = {"prompt_embeds": take(prompts.prompt_embeds, rows), "guidance_scale": float(true_cfg_scale) if cfg else 1.0}
    if cfg:
        kw["negative_prompt_embeds"] = take(prompts.prompt_embeds, null)
    return kw


def trajectory_relative_change(pipe, call_kwargs: dict[str, Any]) -> list[float]:
    """Run ``pipe(**call_kwargs)`` and return, for each step ``t >= 1``, the relative change of the
    transformer output ``mean|v_t - v_{t-1}| / mean|v_{t-1}|`` (conditional branch only)."""
    outs: list[torch.Tensor] = []

    def hook(_module, _args, output):
        v = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        outs.append(v.detach().float().clone())

    handle = pipe.transformer.register_forward_hook(hook)
    try:
        pipe(**call_kwargs)
    finally:
        handle.remove()
    if call_kwargs.get("true_cfg_scale", 1.0) > 1.0 or call_kwargs.get("guidance_scale", 1.0) > 1.0:
        outs = outs[0::2]  # cond, uncond alternate
    return [((b - a).abs().mean() / a.abs().mean().clamp_min(1e-12)).item() for a, b in zip(outs[:-1], outs[1:])]


# Fixed generation used for the stored regression statistics (sample_stats.json).
STATS_CLASSES = {
    "flux_tiny": ["red_circle", "green_square", "blue_triangle", "yellow_ring"],
    "wan_tiny": ["red_circle", "blue_square"],
}


def _stats_call(name: str, prompts: ReferencePrompts) -> dict[str, Any]:
    kw = reference_call_kwargs(prompts, STATS_CLASSES[name])
    kw.update(REFERENCE_MODELS[name]["default_call"])
    kw.update(generator=torch.Generator().manual_seed(0), output_type="pt")
    return kw


def sample_stats(images: torch.Tensor) -> dict[str, Any]:
    """Summary of a batch of generated images/videos in [0, 1]: per-sample mean/std and a 4x4
    (per channel, frame-averaged) thumbnail, rounded."""
    x = images.float()
    if x.ndim == 5:  # Wan output_type="pt": (B, F, C, H, W)
        x = x.mean(dim=1)
    thumb = torch.nn.functional.adaptive_avg_pool2d(x, 4)
    return {
        "shape": list(images.shape),
        "mean": [round(v, 5) for v in x.mean(dim=(1, 2, 3)).tolist()],
        "std": [round(v, 5) for v in x.std(dim=(1, 2, 3)).tolist()],
        "thumb4": [[round(v, 4) for v in t.flatten().tolist()] for t in thumb],
    }


def generate_stats_images(name: str, pipe, prompts: ReferencePrompts) -> torch.Tensor:
    out = pipe(**_stats_call(name, prompts))
    return out.frames if hasattr(out, "frames") else out.images


def write_sample_stats(name: str = "flux_tiny", folder: str | Path | None = None) -> dict[str, Any]:
    """Generate the fixed regression samples with the saved checkpoint (as loaded, fp32 CPU) and
    write ``sample_stats.json`` beside it, including the per-step transformer-output change."""
    torch.manual_seed(0)
    pipe, prompts = load_reference_pipeline(name, folder=folder)
    imgs = generate_stats_images(name, pipe, prompts)
    stats = {"model": name, "classes": STATS_CLASSES[name], "call": REFERENCE_MODELS[name]["default_call"], "seed": 0}
    stats.update(sample_stats(imgs))
    rel = trajectory_relative_change(pipe, _stats_call(name, prompts))
    stats["per_step_rel_change"] = [round(v, 5) for v in rel]
    path = reference_model_path(name, folder)
    (path / "sample_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    mid = rel[len(rel) // 4 : 3 * len(rel) // 4]
    print(f"[stats] per-step rel change: first {rel[0]:.3f} middle-half mean {sum(mid) / len(mid):.4f} last {rel[-1]:.3f}")
    return stats


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))
