"""Feature-caching benchmark: ditaccel's Δ-Cache / TaylorSeer / presets against diffusers' and
cache-dit's caches (each swept over its thresholds/intervals) on a FLUX-architecture model or the
Wan-architecture video model (``--model wan_tiny``), at 28 and 50 steps.

For every method: speedup (wall clock and process CPU time, median of ``--repeats`` runs,
baseline and method runs interleaved; also against the median of all baseline runs of the benchmark,
``speedup_pooled``, which the summary ranks by), the fraction of transformer FLOPs skipped (counted the same
way for every method: torch's FlopCounterMode around every transformer call, with ditaccel's
CPU-SDPA formula), and PSNR / SSIM of the output against full compute with the same seed.

Model: the trained reference model ``flux_tiny`` (``ditaccel.reference``) when its checkpoint is
present, compared on decoded images in [0, 1]; otherwise a random-weight FLUX transformer of the
same architecture (2 double + 4 single blocks, 256 image tokens), compared on the unpacked latents
(data range of the full-compute latents), and the report says so.

    PYTHONPATH=. .venv/bin/python bench/caching.py --steps 28 50 --repeats 3 --out bench/results/caching.json
    PYTHONPATH=. .venv/bin/python bench/caching.py --model wan_tiny --steps 28 --out bench/results/caching_wan.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ditaccel  # noqa: E402
from ditaccel import DeltaCacheConfig, StepCacheConfig, TaylorSeerConfig  # noqa: E402
from ditaccel.hooks.flops import _custom_mapping  # noqa: E402


# ---------------------------------------------------------------------------------------------
# model


def build_wan_pipeline(size: int = 32, frames: int = 5):
    """The trained Wan video reference model, two classes; compared on decoded frames.  It was
    trained on 5 frames of 32x32 (192 tokens); larger sizes run it outside that, which still
    compares the same model's full and accelerated outputs but at a token count where compute,
    not per-op overhead, dominates (as in real video models)."""
    from ditaccel.reference.pipelines import load_reference_pipeline, reference_call_kwargs

    pipe, prompts = load_reference_pipeline("wan_tiny")
    kw = reference_call_kwargs(prompts, ["red_circle", "blue_square"])
    kw.update(height=size, width=size, num_frames=frames, output_type="pt")
    tokens = ((frames - 1) // 2 + 1) * (size // 4) ** 2
    return pipe, kw, (f"trained reference model wan_tiny (Wan DiT, 4 layers), {frames} frames {size}x{size} = "
                      f"{tokens} tokens, batch 2"), "images"


def build_pipeline(force_random: bool = False, model: str = "flux_tiny", size: int = 32, frames: int = 5):
    """(pipe, call_kwargs, description, compare_on)."""
    if model == "wan_tiny":
        return build_wan_pipeline(size, frames)
    if not force_random:
        try:
            from ditaccel.reference.pipelines import load_reference_pipeline, reference_call_kwargs

            pipe, prompts = load_reference_pipeline("flux_tiny")
            kw = reference_call_kwargs(prompts, ["red_circle", "blue_square"])
            kw.update(height=64, width=64, output_type="pt")
            return pipe, kw, "trained reference model flux_tiny (2 double + 4 single blocks, 64x64 px, batch 2)", "images"
        except Exception as exc:  # noqa: BLE001 - any reason the checkpoint is unusable
            print(f"[bench] reference model unavailable ({type(exc).__name__}: {str(exc)[:120]}); using random FLUX")
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from ditaccel.reference import train_flux as tf

    torch.manual_seed(0)
    transformer = tf.build_transformer().eval()
    vae = tf.build_vae().eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**tf.SCHEDULER_CONFIG), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    kw = dict(prompt_embeds=torch.randn(2, 8, tf.JOINT_DIM, generator=g),
              pooled_prompt_embeds=torch.randn(2, tf.POOLED_DIM, generator=g),
              height=64, width=64, output_type="latent")
    return pipe, kw, "random-weight FLUX transformer, reference architecture (2 double + 4 single blocks, 256 tokens, batch 2)", "latents"


def generate(pipe, kw, steps: int, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    t_cpu, t_wall = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        out = pipe(**kw, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    wall, cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
    x = out.frames if hasattr(out, "frames") else out.images
    if kw.get("output_type") == "latent":
        x = pipe._unpack_latents(x, kw["height"], kw["width"], pipe.vae_scale_factor)
    return x.float(), wall, cpu


class _GlobalOnly:
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def transformer_flops(pipe, kw, steps: int) -> float:
    """Total FLOPs of all transformer calls of one generation (whatever skips them inside)."""
    total = [0.0]
    state = {}

    def pre(module, args, kwargs):
        from torch.utils.flop_counter import FlopCounterMode

        mode = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
        mode.mod_tracker = _GlobalOnly()  # no per-module tracking (cache-dit's patched model has cycles)
        state["mode"] = mode
        mode.__enter__()

    def post(module, args, kwargs, output):
        mode = state.pop("mode")
        mode.__exit__(None, None, None)
        total[0] += sum(mode.flop_counts["Global"].values())

    h1 = pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = pipe.transformer.register_forward_hook(post, with_kwargs=True)
    try:
        generate(pipe, kw, steps)
    finally:
        h1.remove()
        h2.remove()
    return total[0]


def fidelity(x: torch.Tensor, ref: torch.Tensor, compare_on: str) -> tuple[float, float]:
    from ditaccel import metrics

    if compare_on == "images":
        return metrics.psnr(x, ref), metrics.ssim(x, ref)
    return metrics.latent_psnr(x, ref), metrics.latent_ssim(x, ref)


# ---------------------------------------------------------------------------------------------
# methods: name -> (group, enable(pipe, steps) -> disable())


def ours(config):
    def enable(pipe, steps):
        # No FLOP profiling inside ditaccel (its first call would run under FlopCounterMode, in every
        # timed run, since each repeat enables afresh): the table's FLOPs come from
        # transformer_flops, measured the same way for every method in an untimed run.
        handle = ditaccel.enable_acceleration(pipe, config, count_flops=False)
        return handle.remove

    return enable


def diffusers_cache(make_config):
    def enable(pipe, steps):
        pipe.transformer.enable_cache(make_config(steps))
        return pipe.transformer.disable_cache

    return enable


def cache_dit_cache(calibrated: bool, threshold: float, fn: int = 1, warmup: int = 4):
    def enable(pipe, steps):
        import cache_dit

        cal = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if calibrated else None
        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=fn, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=warmup,
            num_inference_steps=steps), calibrator_config=cal)
        return lambda: cache_dit.disable_cache(pipe)

    return enable


_MAG_RATIOS: dict[int, list[float]] = {}


def calibrate_magcache(pipe, kw, steps: int) -> list[float] | None:
    from diffusers import MagCacheConfig
    from diffusers.hooks import mag_cache as mc

    captured = []
    logger = mc.logger
    orig = logger.info, logger.warning
    logger.info = logger.warning = lambda msg, *a, **k: captured.append(str(msg))
    try:
        pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        generate(pipe, kw, steps)
    finally:
        pipe.transformer.disable_cache()
        logger.info, logger.warning = orig
    import re

    for msg in captured:
        m = re.search(r"\[([-0-9.,\se]+)\]", msg)
        if m:
            vals = [float(v) for v in m.group(1).split(",") if v.strip()]
            if len(vals) == steps:
                return vals
    return None


def peer_methods(steps_list):
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    out = {}
    for th in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4):
        out[f"diffusers FBCache th={th}"] = ("peer", diffusers_cache(lambda s, th=th: FirstBlockCacheConfig(threshold=th)))
    for n in (2, 3, 5):
        out[f"diffusers TaylorSeer N={n} O=1"] = ("peer", diffusers_cache(
            lambda s, n=n: TaylorSeerCacheConfig(cache_interval=n, max_order=1, disable_cache_before_step=3,
                                                 taylor_factors_dtype=torch.float32)))
    for th in (0.02, 0.06, 0.12, 0.24, 0.36, 0.5, 1.0):
        out[f"diffusers MagCache th={th}"] = ("peer", diffusers_cache(
            lambda s, th=th: MagCacheConfig(threshold=th, num_inference_steps=s, mag_ratios=_MAG_RATIOS.get(s),
                                            max_skip_steps=3, retention_ratio=0.2) if _MAG_RATIOS.get(s) else None))
    try:
        import cache_dit  # noqa: F401

        for th in (0.04, 0.08, 0.16, 0.24, 0.32, 0.48):
            out[f"cache-dit DBCache F1B0 rdt={th}"] = ("peer", cache_dit_cache(False, th))
            out[f"cache-dit DBCache+TaylorSeer F1B0 rdt={th}"] = ("peer", cache_dit_cache(True, th))
    except Exception as exc:  # noqa: BLE001
        print(f"[bench] cache-dit not importable: {exc}")
    return out


def our_methods():
    m = {}
    for name in ("quality", "balanced", "fast"):
        m[f"ditaccel preset {name}"] = ("ours", ours(name))
    m["ditaccel StepCache N=2"] = ("ours", ours(StepCacheConfig(interval=2)))
    m["ditaccel DeltaCache N=2"] = ("ours", ours(DeltaCacheConfig(interval=2)))
    m["ditaccel DeltaCache adaptive th=0.1"] = ("ours", ours(DeltaCacheConfig(threshold=0.1)))
    m["ditaccel TaylorSeer module N=4 O=1"] = ("ours", ours(TaylorSeerConfig(interval=4, order=1)))
    m["ditaccel TaylorSeer module N=6 O=2"] = ("ours", ours(TaylorSeerConfig(interval=6, order=2)))
    for n, o in ((3, 1), (5, 1), (7, 1), (8, 1), (10, 1), (5, 2)):
        m[f"ditaccel TaylorSeer block N={n} O={o}"] = ("ours", ours(TaylorSeerConfig(interval=n, order=o,
                                                                                   granularity="block")))
    # the presets' schedule (refresh-error) over its tolerance, block and module units
    for tol in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
        m[f"ditaccel TaylorSeer block refresh tol={tol}"] = ("ours", ours(TaylorSeerConfig(
            granularity="block", refresh_tolerance=tol, max_consecutive_cached=10)))
    for tol in (1.0, 2.0):
        m[f"ditaccel TaylorSeer module refresh tol={tol}"] = ("ours", ours(TaylorSeerConfig(
            granularity="module", refresh_tolerance=tol, max_consecutive_cached=10)))
    m["ditaccel TaylorSeer probe module O=1 th=0.5"] = ("ours", ours(TaylorSeerConfig(
        threshold=0.5, order=1, warmup_steps=3, max_consecutive_cached=8)))
    return m


# ---------------------------------------------------------------------------------------------


def bench(steps: int, methods: dict, pipe, kw, compare_on: str, repeats: int, only: list[str] | None) -> list[dict]:
    ref, _, _ = generate(pipe, kw, steps)
    full_flops = transformer_flops(pipe, kw, steps)
    rows = []
    for name, (group, enable) in methods.items():
        if only and not any(o in name for o in only):
            continue
        try:
            disable = enable(pipe, steps)
        except Exception as exc:  # noqa: BLE001
            print(f"[bench] {name}: not usable ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                flops = transformer_flops(pipe, kw, steps)
                x, _, _ = generate(pipe, kw, steps)
        finally:
            disable()
        p, s = fidelity(x, ref, compare_on)
        base_w, base_c, m_w, m_c = [], [], [], []
        for _ in range(repeats):  # interleaved: baseline, method, baseline, method, ...
            _, w, c = generate(pipe, kw, steps)
            base_w.append(w)
            base_c.append(c)
            disable = enable(pipe, steps)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _, w, c = generate(pipe, kw, steps)
            finally:
                disable()
            m_w.append(w)
            m_c.append(c)
        row = dict(steps=steps, method=name, group=group, psnr=p, ssim=s,
                   flops_skipped_fraction=1 - flops / full_flops, flops_reduction=full_flops / max(flops, 1.0),
                   speedup=statistics.median(base_w) / statistics.median(m_w),
                   cpu_speedup=statistics.median(base_c) / statistics.median(m_c),
                   base_wall_s=statistics.median(base_w), wall_s=statistics.median(m_w),
                   base_wall_samples=base_w, wall_samples=m_w)
        rows.append(row)
        print(f"{steps:3d} {name:48s} psnr {p:7.2f} ssim {s:.4f} flops-skip {row['flops_skipped_fraction']:.3f} "
              f"({row['flops_reduction']:.2f}x) speedup {row['speedup']:.2f}x cpu {row['cpu_speedup']:.2f}x", flush=True)
    pool_pooled_speedups(rows)
    return rows


def pool_pooled_speedups(rows: list[dict]) -> None:
    """``speedup_pooled``: the median of every baseline run of the step count over the method's median.

    Each row's own baseline median comes from ``repeats`` runs and wanders by ±10 % on a shared box
    (the same runs of the same pipeline); pooling all baseline runs of the benchmark gives one steadier
    reference, so rows compare with each other through their own wall times only. Rows without samples
    (older JSON) pool their baseline medians.
    """
    for steps in {r["steps"] for r in rows}:
        sel = [r for r in rows if r["steps"] == steps]
        samples = [w for r in sel for w in r.get("base_wall_samples", [r["base_wall_s"]])]
        pooled = statistics.median(samples)
        for r in sel:
            r["pooled_base_wall_s"] = pooled
            r["speedup_pooled"] = pooled / r["wall_s"]
            print(f"{steps:3d} {r['method']:48s} psnr {r['psnr']:7.2f} speedup vs pooled baseline "
                  f"{r['speedup_pooled']:.2f}x (own baseline {r['speedup']:.2f}x)", flush=True)


def summary(rows: list[dict], min_psnr: float = 30.0) -> dict:
    out = {}
    for steps in sorted({r["steps"] for r in rows}):
        sel = [r for r in rows if r["steps"] == steps and r["psnr"] >= min_psnr]
        key = "speedup_pooled" if all("speedup_pooled" in r for r in sel) else "speedup"
        best = {g: max((r for r in sel if r["group"] == g), key=lambda r: r[key], default=None) for g in ("ours", "peer")}
        best_f = max((r for r in sel if r["group"] == "ours"), key=lambda r: r["flops_reduction"], default=None)
        out[steps] = {
            "speedup": key,
            "best_ours": best["ours"] and (best["ours"]["method"], round(best["ours"][key], 3)),
            "best_peer": best["peer"] and (best["peer"]["method"], round(best["peer"][key], 3)),
            "ratio_vs_best_peer": (best["ours"][key] / best["peer"][key]) if best["ours"] and best["peer"] else None,
            "best_ours_flops_reduction": best_f and (best_f["method"], round(best_f["flops_reduction"], 3), round(best_f["psnr"], 2)),
        }
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[28, 50])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="+", default=None, help="run only methods whose name contains one of these")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peers-only", action="store_true")
    ap.add_argument("--random", action="store_true", help="use the random-weight FLUX even if the reference exists")
    ap.add_argument("--model", choices=("flux_tiny", "wan_tiny"), default="flux_tiny")
    ap.add_argument("--wan-size", type=int, default=32, help="wan_tiny: frame height = width in pixels")
    ap.add_argument("--wan-frames", type=int, default=5, help="wan_tiny: number of frames (4k+1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for steps in args.steps:
        # a fresh pipeline per step count: cache-dit leaves the transformer's forward patched after
        # disable_cache, so its methods run last and nothing runs after them on the same model
        pipe, kw, desc, compare_on = build_pipeline(force_random=args.random, model=args.model, size=args.wan_size,
                                                    frames=args.wan_frames)
        print(f"[bench] model: {desc}; fidelity on {compare_on}; threads {args.threads}; repeats {args.repeats}")
        methods = {} if args.peers_only else dict(our_methods())
        if not args.no_peers:
            ratios = calibrate_magcache(pipe, kw, steps)
            if ratios:
                _MAG_RATIOS[steps] = ratios
            methods.update(peer_methods(args.steps))
        rows += bench(steps, methods, pipe, kw, compare_on, args.repeats, args.only)
    summ = summary(rows)
    print(json.dumps(summ, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": desc, "compare_on": compare_on, "rows": rows, "summary": summ},
                                             indent=1) + "\n")


if __name__ == "__main__":
    main()
