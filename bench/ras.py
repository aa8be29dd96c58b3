"""RAS benchmark: speed-up and fidelity versus the active fraction, on CPU.

    .venv/bin/python bench/ras.py                      # FLUX reference model if present, else tiny random FLUX
    .venv/bin/python bench/ras.py --model random --tokens 1024 4096 --runs 3

For each setting, a full-compute generation and one RAS generation per active fraction run with the
same seed, interleaved, ``--runs`` times; reported: median wall time and CPU time, speed-up of the
median wall time over full compute, and PSNR of the RAS result against full compute (decoded
images in [0, 1] when the pipeline has a VAE, else the latents with the full run's value range).
One thread (torch.set_num_threads(1)) so the numbers are comparable on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ditaccel  # noqa: E402
from ditaccel.methods.ras import RASConfig  # noqa: E402


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float | None = None) -> float:
    x, ref = x.double(), ref.double()
    if data_range is None:
        data_range = float(ref.max() - ref.min())
    mse = float(((x - ref) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def random_flux_pipeline(dim_heads: int = 4, head_dim: int = 64, double: int = 2, single: int = 4):
    """A random-weight FLUX pipeline (no VAE decode: latent output) wide enough that blocks dominate."""
    import diffusers as d

    torch.manual_seed(0)
    transformer = d.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=head_dim,
        num_attention_heads=dim_heads, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    ).eval()
    pipe = d.FluxPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                          text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    prompt = dict(prompt_embeds=torch.randn(1, 32, 64, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                  guidance_scale=3.5)
    return pipe, prompt


def load_model(which: str, classes: int = 1, cfg: float = 1.0):
    """(pipe, prompt kwargs, description, decodes)"""
    if which in ("auto", "reference"):
        try:
            from ditaccel.reference.pipelines import load_reference_pipeline, reference_call_kwargs

            pipe, prompts = load_reference_pipeline("flux_tiny")
            names = [n for n in prompts.class_names if n][:classes]
            kwargs = reference_call_kwargs(prompts, names, true_cfg_scale=cfg)
            pipe.set_progress_bar_config(disable=True)
            return pipe, kwargs, (f"trained FLUX reference model (flux_tiny), classes {names}, true_cfg_scale {cfg}, "
                                  "PSNR on decoded images in [0, 1]"), True
        except Exception as exc:  # noqa: BLE001 - report and fall back
            if which == "reference":
                raise
            print(f"# reference model unavailable ({type(exc).__name__}: {exc}); using a tiny random FLUX",
                  file=sys.stderr)
    pipe, kwargs = random_flux_pipeline()
    return pipe, kwargs, "tiny random-weight FLUX (4x64 heads, 2 double + 4 single blocks), latent output", False


def side_for(tokens: int, pipe) -> int:
    """Image side in pixels giving ``tokens`` packed tokens (square)."""
    vae = getattr(pipe, "vae", None)
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    grid = int(round(math.sqrt(tokens)))
    return grid * 2 * factor


def generate(pipe, kwargs, side: int, steps: int, seed: int, decodes: bool):
    out = pipe(**kwargs, height=side, width=side, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_type="pt" if decodes else "latent")
    return out.images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("auto", "reference", "random"), default="auto")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.375, 0.5, 0.75])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--reset-steps", type=int, nargs="*", default=None, help="default: 12/28 and 20/28 of the steps")
    ap.add_argument("--max-stale", type=int, default=4)
    ap.add_argument("--starvation-weight", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", type=int, default=1, help="reference model: batch of this many class prompts")
    ap.add_argument("--cfg", type=float, default=1.0, help="reference model: true_cfg_scale (> 1: two calls per step)")
    ap.add_argument("--json", type=str, default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    pipe, kwargs, description, decodes = load_model(args.model, args.classes, args.cfg)
    reset = None if args.reset_steps is None else tuple(args.reset_steps)
    print(f"# model: {description}")
    print(f"# steps {args.steps}, warm-up {args.warmup_steps}, resets "
          f"{RASConfig(reset_steps=reset).resets_for(args.steps)}, max_stale {args.max_stale}, "
          f"starvation_weight {args.starvation_weight}, runs {args.runs} (interleaved), threads 1")
    results = []
    with torch.no_grad():
        for tokens in args.tokens:
            side = side_for(tokens, pipe)
            configs = [None] + [RASConfig(active_fraction=f, warmup_steps=args.warmup_steps, reset_steps=reset,
                                          max_stale_steps=max(args.max_stale, math.ceil(1 / f) - 1),
                                          starvation_weight=args.starvation_weight) for f in args.fractions]
            wall = {i: [] for i in range(len(configs))}
            cpu = {i: [] for i in range(len(configs))}
            outputs, flops = {}, {}
            generate(pipe, kwargs, side, 2, args.seed, decodes)  # warm the allocator / first-call costs
            for _ in range(args.runs):
                for i, config in enumerate(configs):
                    # timed runs without the FLOP profiler (it would cost the accelerated runs their first call)
                    handle = (ditaccel.enable_acceleration(pipe, config, count_flops=False)
                              if config is not None else None)
                    t0, c0 = time.perf_counter(), time.process_time()
                    image = generate(pipe, kwargs, side, args.steps, args.seed, decodes)
                    wall[i].append(time.perf_counter() - t0)
                    cpu[i].append(time.process_time() - c0)
                    if handle is not None:
                        handle.remove()
                    outputs[i] = image
            for i, config in enumerate(configs):  # one untimed run per config for the FLOP count
                if config is not None:
                    with ditaccel.accelerated(pipe, config) as handle:
                        again = generate(pipe, kwargs, side, args.steps, args.seed, decodes)
                        flops[i] = handle.stats()["flops_skipped_fraction"]
                    assert torch.equal(again, outputs[i]), "RAS runs with the same seed must be identical"
            ref = outputs[0]
            base_wall, base_cpu = statistics.median(wall[0]), statistics.median(cpu[0])
            n_tok = None
            for i, config in enumerate(configs):
                w, c = statistics.median(wall[i]), statistics.median(cpu[i])
                row = {
                    "tokens": tokens, "side_px": side, "active_fraction": 1.0 if config is None else config.active_fraction,
                    "method": "full" if config is None else "RAS",
                    "wall_s": round(w, 3), "cpu_s": round(c, 3),
                    "speedup_wall": round(base_wall / w, 3), "speedup_cpu": round(base_cpu / c, 3),
                    "flops_skipped": round(flops.get(i, 0.0), 3),
                    "psnr_db": round(psnr(outputs[i], ref, 1.0 if decodes else None), 2),
                }
                results.append(row)
                n_tok = tokens
            print(f"\n## {n_tok} tokens ({side}x{side} px)")
            print("| method | active | wall s (median) | CPU s (median) | speed-up wall | speed-up CPU | FLOPs skipped | PSNR dB |")
            print("|---|---|---|---|---|---|---|---|")
            for row in results[-len(configs):]:
                print(f"| {row['method']} | {row['active_fraction']} | {row['wall_s']} | {row['cpu_s']} | "
                      f"{row['speedup_wall']}x | {row['speedup_cpu']}x | {row['flops_skipped']} | {row['psnr_db']} |")
            sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": description, "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
