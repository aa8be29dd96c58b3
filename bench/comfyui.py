"""ditaccel in ComfyUI vs ComfyUI's own EasyCache node, on the same tiny model and seed, in one run.

Everything runs in real ComfyUI code: the tiny random FLUX (or Wan) MODEL is built through
ComfyUI's loading code, the ditaccel node and ComfyUI's EasyCache / LazyCache nodes
(comfy_extras.nodes_easycache) are applied to it, and each variant is sampled with ComfyUI's
KSampler node. RAS rows use ditaccel's defaults (warm-up 4, full steps at 12/28 and 20/28 of the
run); the HarmoniCa row uses a hand-made router file (no router is trained for a random model:
each block computes on the first 2 steps, the last step, and every 3rd step, staggered by block),
so it shows the block-patch plumbing, not what a trained router would reach. Reported per variant: wall time (median of --repeats), speedup over the unpatched
run, DiT block executions (counted with forward pre-hooks; a block whose attention and MLP are
forecast by TaylorSeer's module units still runs its cheap rest, so it is counted), and PSNR of the final latent against
the unpatched run's latent (peak = the reference latent's max - min).

    .venv/bin/python bench/comfyui.py --threads 1        # FLUX, 20 steps
    .venv/bin/python bench/comfyui.py --model wan --steps 20 --repeats 3

The models are tiny and random: timings are dominated by CPU noise and per-call overhead more
than a real model's would be, and PSNR on a random model says how far each cache drifts from the
full computation, not how an image looks. Treat the numbers as a like-for-like comparison only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditaccel.integrations.comfyui import use_vendored_comfyui  # noqa: E402

use_vendored_comfyui()

from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode  # noqa: E402

from ditaccel.methods.configs import TaylorSeerConfig  # noqa: E402
from ditaccel.methods.harmonica import HarmoniCaConfig  # noqa: E402
from ditaccel.methods.harmonica_router import Router  # noqa: E402
from ditaccel.methods.ras import RASConfig  # noqa: E402
from ditaccel.methods.step_cache import StepCacheConfig  # noqa: E402
from ditaccel.integrations.comfyui import tiny  # noqa: E402
from ditaccel.integrations.comfyui.nodes import DitAccelerate  # noqa: E402
from ditaccel.integrations.comfyui.runtime import accelerate_model, last_stats  # noqa: E402


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float(((x - ref) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def staggered_router(model, n_blocks: int, steps: int, path: Path) -> str:
    """A hand-made HarmoniCa router: block g computes at steps 0, 1, the last, and s with (s + g) % 3 == 0."""
    z = torch.full((steps, n_blocks), -4.0)
    for s in range(steps):
        for g in range(n_blocks):
            if s < 2 or s == steps - 1 or (s + g) % 3 == 0:
                z[s, g] = 4.0
    dm = model.model.diffusion_model
    family = "flux" if hasattr(dm, "double_blocks") else "wan"
    Router(z, family, type(dm).__name__, n_blocks, [(g, g + 1) for g in range(n_blocks)], 0.1).save(path)
    return str(path)


def note_of(stats) -> str:
    ras = (stats or {}).get("methods", {}).get("RAS")
    if not ras:
        return ""
    done, reused = ras.get("tokens_computed", 0), ras.get("tokens_reused", 0)
    share = reused / (done + reused) if done + reused else 0.0
    return f"{ras.get('sparse_calls', 0)} sparse calls, {share:.0%} of their image tokens reused"


def build(args):
    if args.model == "flux":
        model = tiny.tiny_flux(seed=args.seed, hidden=128 * args.heads, heads=args.heads, depth=args.depth,
                               depth_single=args.depth_single)
        dm = model.model.diffusion_model
        blocks = list(dm.double_blocks) + list(dm.single_blocks)
        pos, neg = tiny.flux_conditioning(args.seed + 1), tiny.flux_conditioning(args.seed + 2)
        latent = torch.zeros(1, 16, args.size // 8, args.size // 8)
    else:
        model = tiny.tiny_wan(seed=args.seed, dim=128 * args.heads, ffn_dim=256 * args.heads,
                              layers=args.depth + args.depth_single)
        dm = model.model.diffusion_model
        blocks = list(dm.blocks)
        pos, neg = tiny.wan_conditioning(args.seed + 1), tiny.wan_conditioning(args.seed + 2)
        latent = torch.zeros(1, 16, args.frames, args.size // 8, args.size // 8)
    return model, blocks, pos, neg, latent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["flux", "wan"], default="flux")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=1.0, help="1.0: one model call per step (FLUX-dev style)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (latent side = size/8)")
    p.add_argument("--frames", type=int, default=3, help="Wan latent frames")
    p.add_argument("--heads", type=int, default=2, help="width = 128 * heads")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--depth-single", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default="", help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, blocks, pos, neg, latent = build(args)
    calls = [0]
    handles = [b.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1)) for b in blocks]

    variants = {"unpatched": model}
    for preset in ("quality", "balanced", "fast"):  # TaylorSeer, block residuals, refresh-error schedule
        variants[f"ditaccel {preset}"] = DitAccelerate.execute(model, preset=preset).result[0]
    for n in (3, 4, 6):  # the presets before the refresh-error schedule: module units, fixed interval
        variants[f"ditaccel TaylorSeer module units, interval {n}"] = accelerate_model(
            model, TaylorSeerConfig(interval=n, order=1, warmup_steps=3, final_steps=1, granularity="module"))
    variants["ditaccel TaylorSeer interval 6 (model scope)"] = accelerate_model(
        model, TaylorSeerConfig(interval=6, order=1, warmup_steps=3, final_steps=1), scope="model")
    variants["ditaccel StepCache interval 3"] = accelerate_model(model, StepCacheConfig(interval=3, warmup_steps=2))
    router = staggered_router(model, len(blocks), args.steps, Path(tempfile.mkdtemp()) / "router.safetensors")
    variants["ditaccel HarmoniCa (hand-made router)"] = accelerate_model(model, HarmoniCaConfig(router=router))
    variants["ditaccel RAS 0.5"] = accelerate_model(model, RASConfig(active_fraction=0.5))
    variants["ditaccel RAS 0.25"] = accelerate_model(model, RASConfig(active_fraction=0.25))
    variants["EasyCache (ComfyUI, defaults)"] = EasyCacheNode.execute(model, 0.2, 0.15, 0.95, False).result[0]
    variants["EasyCache (ComfyUI, threshold 0.05)"] = EasyCacheNode.execute(model, 0.05, 0.15, 0.95, False).result[0]
    variants["LazyCache (ComfyUI, defaults)"] = LazyCacheNode.execute(model, 0.2, 0.15, 0.95, False).result[0]

    tiny.ksample(model, pos, neg, latent, steps=2, cfg=args.cfg, seed=args.seed)  # warm-up (allocations, caches)
    rows, ref = [], None
    for name, m in variants.items():
        times, out, n_calls = [], None, 0
        for _ in range(args.repeats):
            calls[0] = 0
            t = time.perf_counter()
            out = tiny.ksample(m, pos, neg, latent, steps=args.steps, cfg=args.cfg, seed=args.seed)
            times.append(time.perf_counter() - t)
            n_calls = calls[0]
        if ref is None:
            ref = out
        stats = last_stats(m)
        rows.append({"variant": name, "time_s": statistics.median(times), "block_calls": n_calls,
                     "psnr_db": psnr(out, ref), "rel_l2": float((out - ref).norm() / ref.norm()),
                     "ditaccel_skip_fraction": None if stats is None else stats["block_skip_fraction"],
                     "note": note_of(stats)})
    for h in handles:
        h.remove()

    base = rows[0]["time_s"]
    print(f"\nComfyUI {model.model.__class__.__name__} tiny ({args.model}), {args.steps} steps, cfg {args.cfg}, "
          f"latent {tuple(latent.shape)}, torch threads {torch.get_num_threads()}, repeats {args.repeats}")
    print("Random-weight tiny model: PSNR says how far a variant drifts from the full computation, not how an image "
          "looks. RAS runs every block on fewer tokens, so its blocks-run count equals the unpatched one.")
    print(f"{'variant':38s} {'time s':>8s} {'speedup':>8s} {'blocks run':>10s} {'PSNR dB':>8s} {'rel L2':>8s}")
    for r in rows:
        r["speedup"] = base / r["time_s"]
        ps = "inf" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.1f}"
        print(f"{r['variant']:38s} {r['time_s']:8.2f} {r['speedup']:8.2f} {r['block_calls']:10d} {ps:>8s} "
              f"{r['rel_l2']:8.4f}  {r['note']}".rstrip())
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
