"""End-to-end benchmark of the sparse-attention methods (SVG2, Re-ttention, CLEAR) on CPU.

Runs the FLUX-architecture reference transformer (2 double + 4 single blocks, 4 heads x 32) at a
large token count (default 64 x 64 = 4096 image tokens + the prompt's text tokens) through a plain Euler
flow-matching loop from the same seed, dense and each method interleaved ``--repeats`` times, and
reports the median wall and CPU time, speedup over dense (headline: process CPU time, which shared
machines disturb less than wall time; wall speedup beside it), PSNR of the decoded images (the
reference VAE, peak 1 on [0, 1] images) and of the final latents against the dense run of the same
seed, and the attention sparsity each method reached. Uses the trained reference weights (``flux_tiny``) when the
checkpoint exists, else the same architecture with seeded random weights (said in the output).

This is the CPU path (gathered windows / blocks through torch's fused flash CPU kernel, one
thread); the Triton kernel is for CUDA. Example:

    python bench/sparse_attention.py --grid 64 --steps 20
    python bench/sparse_attention.py --grid 64 --steps 20 --methods svg2 rettention --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch


def build_model(use_reference: bool = True):
    """(transformer, prompt_embeds (1, T, C), pooled (1, P), description, vae or None)."""
    if use_reference:
        try:
            from ditaccel.reference.pipelines import load_reference_pipeline, reference_call_kwargs

            pipe, prompts = load_reference_pipeline("flux_tiny")
            kw = reference_call_kwargs(prompts, [prompts.class_names[0]])
            return (pipe.transformer.eval(), kw["prompt_embeds"], kw["pooled_prompt_embeds"],
                    "trained reference flux_tiny", pipe.vae.eval())
        except Exception as exc:  # no checkpoint: fall back to the architecture with random weights
            print(f"[bench] reference model unavailable ({type(exc).__name__}: {str(exc)[:120]}); "
                  "using the same architecture with seeded random weights", file=sys.stderr)
    from ditaccel.reference.train_flux import build_transformer

    torch.manual_seed(0)
    model = build_transformer().eval()
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(1, 8, model.config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, model.config.pooled_projection_dim, generator=g)
    return model, emb, pooled, "flux_tiny architecture, random weights (seed 0)", None


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def generate(model, emb, pooled, grid: int, steps: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = model.config.in_channels
    x = torch.randn(1, grid * grid, c, generator=g)
    ids = image_ids(grid, grid)
    txt_ids = torch.zeros(emb.shape[1], 3)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            s = sigmas[i]
            v = model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                      timestep=s.expand(1), img_ids=ids, txt_ids=txt_ids, return_dict=False)[0]
            x = x + (sigmas[i + 1] - s) * v
    return x


def decode(vae, x: torch.Tensor, grid: int) -> torch.Tensor:
    """Packed FLUX latents (1, grid², 4C) -> image (1, 3, H, W) in [0, 1] (FluxPipeline's unpack + VAE)."""
    c = x.shape[-1] // 4
    lat = x.view(1, grid, grid, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, c, 2 * grid, 2 * grid)
    lat = lat / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        img = vae.decode(lat, return_dict=False)[0]
    return (img.clamp(-1, 1) + 1) / 2


def image_psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (peak 1)."""
    mse = float(((x.double() - ref.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def latent_psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB with the reference's value range as the peak."""
    mse = float(((x.double() - ref.double()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def method_configs(names):
    import ditaccel

    table = {
        "svg2": ditaccel.SVG2Config(q_clusters=64, k_clusters=256, top_p=0.9, min_density=0.05,
                                    kmeans_iters_first=10, kmeans_iters=2, dense_steps_fraction=0.2, dense_layers=1),
        "svg2_fast": ditaccel.SVG2Config(q_clusters=32, k_clusters=128, top_p=0.9, min_density=0.03,
                                         kmeans_iters_first=5, kmeans_iters=1, dense_steps_fraction=0.2, dense_layers=1),
        "svg2_p07": ditaccel.SVG2Config(q_clusters=32, k_clusters=128, top_p=0.7, min_density=0.03,
                                        kmeans_iters_first=5, kmeans_iters=1, dense_steps_fraction=0.2, dense_layers=1),
        "svg2_p05": ditaccel.SVG2Config(q_clusters=32, k_clusters=128, top_p=0.5, min_density=0.03,
                                        kmeans_iters_first=5, kmeans_iters=1, dense_steps_fraction=0.2, dense_layers=1),
        # each clustering step's pattern also serves the layer's next 1 / 2 sparse steps (no k-means there)
        "svg2_reuse1": ditaccel.SVG2Config(q_clusters=64, k_clusters=256, top_p=0.9, min_density=0.05,
                                           kmeans_iters_first=10, kmeans_iters=2, dense_steps_fraction=0.2,
                                           dense_layers=1, reuse_steps=1),
        "svg2_reuse2": ditaccel.SVG2Config(q_clusters=64, k_clusters=256, top_p=0.9, min_density=0.05,
                                           kmeans_iters_first=10, kmeans_iters=2, dense_steps_fraction=0.2,
                                           dense_layers=1, reuse_steps=2),
        "svg2_p05_reuse2": ditaccel.SVG2Config(q_clusters=32, k_clusters=128, top_p=0.5, min_density=0.03,
                                               kmeans_iters_first=5, kmeans_iters=1, dense_steps_fraction=0.2,
                                               dense_layers=1, reuse_steps=2),
        "rettention": ditaccel.RettentionConfig(keep_fraction=0.03, refresh_interval=5, dense_steps_fraction=0.2),
        "rettention_ratio": ditaccel.RettentionConfig(keep_fraction=0.03, refresh_interval=5, dense_steps_fraction=0.2,
                                                      correction="ratio"),
        "rettention_nocorr": ditaccel.RettentionConfig(keep_fraction=0.03, refresh_interval=10 ** 6,
                                                       dense_steps_fraction=0.2, correction="none", residual=False),
        "rettention_t2": ditaccel.RettentionConfig(keep_fraction=0.03, refresh_interval=5, dense_steps_fraction=0.2,
                                                   tile=(2, 2)),  # small grids: 2x2 tiles so 3% is reachable
        "rettention_t2_nocorr": ditaccel.RettentionConfig(keep_fraction=0.03, refresh_interval=10 ** 6,
                                                          dense_steps_fraction=0.2, correction="none",
                                                          residual=False, tile=(2, 2)),
        "rettention_r10": ditaccel.RettentionConfig(keep_fraction=0.03, refresh_interval=10, dense_steps_fraction=0.2),
        "rettention_d1": ditaccel.RettentionConfig(keep_fraction=0.03, refresh_interval=5, dense_steps_fraction=0.1),
        "rettention_d1_r10": ditaccel.RettentionConfig(keep_fraction=0.03, refresh_interval=10,
                                                       dense_steps_fraction=0.1),
        "clear_r8_d2": ditaccel.CLEARConfig(radius=8.0, dense_steps_fraction=0.2),
        "clear_r16_d2": ditaccel.CLEARConfig(radius=16.0, dense_steps_fraction=0.2),
        "clear_r4": ditaccel.CLEARConfig(radius=4.0),
        "clear_r6": ditaccel.CLEARConfig(radius=6.0),
        "clear_r12": ditaccel.CLEARConfig(radius=12.0),
        "clear_r8_t48": ditaccel.CLEARConfig(radius=8.0, tile=(4, 8)),
        "clear_r8_blocks": ditaccel.CLEARConfig(radius=8.0, mode="blocks"),
        "clear_r8": ditaccel.CLEARConfig(radius=8.0),
        "clear_r16": ditaccel.CLEARConfig(radius=16.0),
    }
    return {n: table[n] for n in names}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grid", type=int, default=64, help="image tokens per side (64 -> 4096 tokens)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["svg2", "rettention", "clear_r8", "clear_r16"])
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of dense and each method (median)")
    p.add_argument("--random-weights", action="store_true", help="skip the trained reference checkpoint")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ditaccel

    model, emb, pooled, desc, vae = build_model(not args.random_weights)
    load0 = os.getloadavg()
    tokens = args.grid * args.grid
    print(f"model: {desc}; {tokens} image + {emb.shape[1]} text tokens; {args.steps} Euler steps; "
          f"CPU, {args.threads} thread(s), torch {torch.__version__}")
    configs = method_configs(args.methods)
    times: dict[str, list] = {name: [] for name in ["dense", *configs]}
    outs, stats = {}, {}
    # Interleaved: each repeat runs dense and then every method, so load changes hit all alike.
    for rep in range(args.repeats):
        for name in times:
            cfg = configs.get(name)
            handle = None
            if cfg is not None:
                handle = ditaccel.enable_acceleration(model, cfg, count_flops=False)
                handle.set_num_steps(args.steps)
            t0, c0 = time.perf_counter(), time.process_time()
            out = generate(model, emb, pooled, args.grid, args.steps)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
            if handle is not None:
                stats[name] = handle.stats()["methods"][cfg.method_name]
                handle.remove()
            if rep == 0:
                outs[name] = out
        print(f"[repeat {rep + 1}/{args.repeats}] " + "  ".join(
            f"{n} {t[-1][1]:.2f}s" for n, t in times.items()), file=sys.stderr)
    med = {n: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for n, t in times.items()}
    t_dense, c_dense = med["dense"]
    ref = outs["dense"]
    ref_img = decode(vae, ref, args.grid) if vae is not None else None
    print(f"median of {args.repeats} interleaved runs; load average before: {load0}")
    print(f"{'dense':18s} wall {t_dense:8.2f} s  cpu {c_dense:8.2f} s   1.00x")
    results = {"model": desc, "tokens": tokens, "steps": args.steps, "threads": args.threads,
               "repeats": args.repeats, "load_average_before": load0,
               "dense_s": t_dense, "dense_cpu_s": c_dense, "dense_runs": times["dense"], "methods": {}}
    for name, cfg in configs.items():
        dt, ct = med[name]
        st = stats[name]
        r = {"seconds": dt, "cpu_seconds": ct, "speedup_wall": t_dense / dt, "speedup": c_dense / ct,
             "runs": times[name], "psnr_db": latent_psnr(outs[name], ref),
             "image_psnr_db": image_psnr(decode(vae, outs[name], args.grid), ref_img) if vae is not None else None,
             "attention_sparsity_overall": st["attention_sparsity"],
             "mean_density_sparse_calls": st["mean_density"], "config": repr(cfg),
             "counters": {k: v for k, v in st.items() if isinstance(v, int)}}
        results["methods"][name] = r
        img = f"{r['image_psnr_db']:6.2f}" if r["image_psnr_db"] is not None else "   n/a"
        print(f"{name:18s} wall {dt:8.2f} s  cpu {ct:8.2f} s   {r['speedup']:.2f}x cpu  {r['speedup_wall']:.2f}x wall   "
              f"PSNR image {img} dB  latent {r['psnr_db']:6.2f} dB   sparsity overall "
              f"{r['attention_sparsity_overall']:.3f}   density of sparse calls {r['mean_density_sparse_calls']:.3f}")
    results["load_average_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
