"""Render a PNG grid of reference-model samples (one row per class, one column per seed).

    PYTHONPATH=/work/main python -m ditaccel.reference.samples --model flux_tiny --out docs/img/reference_flux_samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ditaccel.reference.pipelines import REFERENCE_MODELS, load_reference_pipeline, reference_call_kwargs


def sample_grid(name: str, seeds: int = 6, cfg: float = 1.0, steps: int = 28, classes=None, size: int | None = None,
                folder: Path | None = None) -> np.ndarray:
    """``folder``: a checkpoint folder laid out like the shipped one (e.g. a fresh train_* run)."""
    pipe, prompts = load_reference_pipeline(name, folder=folder)
    classes = classes or prompts.class_names
    call = dict(REFERENCE_MODELS[name]["default_call"], num_inference_steps=steps)
    if size:
        call.update(height=size, width=size)
    rows = []
    for c in classes:
        kw = reference_call_kwargs(prompts, [c] * seeds, true_cfg_scale=cfg)
        gens = [torch.Generator().manual_seed(s) for s in range(seeds)]
        out = pipe(**kw, **call, generator=gens, output_type="pt")
        x = out.frames if hasattr(out, "frames") else out.images
        if x.ndim == 5:  # (B, F, C, H, W): show the frames of the first clip side by side
            x = x[:2].flatten(0, 1)
        rows.append(torch.cat(list(x), dim=-1))
    grid = torch.cat(rows, dim=-2)
    return (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def main(argv=None):
    from PIL import Image

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="flux_tiny")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--folder", type=Path, default=None,
                    help="render this checkpoint folder (a train_flux/train_wan --out) instead of the shipped one")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of the PNG")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    arr = sample_grid(args.model, seeds=args.seeds, cfg=args.cfg, size=args.size, folder=args.folder)
    img = Image.fromarray(arr)
    img = img.resize((img.width * args.scale, img.height * args.scale), Image.NEAREST)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out} ({img.width}x{img.height})")


if __name__ == "__main__":
    main()
