"""``ditaccel train-router``: train a HarmoniCa cache router for a pipeline and write it to a file.

    ditaccel train-router --model flux_tiny --steps 20 --target-speedup 2.0 --out router.safetensors

Recipes (``--recipe``; every option can still be set on its own): ``search`` (the default with a
target speedup) trains a router for ``HarmoniCaConfig(forecast=True)``: straight-through estimator,
forecasting student, init from the best fixed schedule within the target, budget projection, then a
greedy search over hard schedules scored by the decoded-image error; ``soft`` (the default with
``--speed-weight``) is the soft-gated SDT + IEPO training with the λ controller.
``--model`` is a built-in reference model name (``flux_tiny``; prompts are its classes) or a local
diffusers pipeline folder with its text encoders (prompts from ``--prompt``). Training is
deterministic under ``--seed`` (fixed samples, fixed sample order, seeded generators); a checkpoint
is written after every iteration (``--checkpoint``, default ``<out>.ckpt``) and ``--resume`` goes
on from one. Reference models: training uses the first 12 classes and seeds 10000 + 1000·seed + i;
the benchmark (bench/harmonica.py) holds out the last 4 classes and seeds < 10000.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_PROMPTS = [
    "a photo of a red fox in the snow", "a watercolor painting of a lighthouse at dusk",
    "a bowl of ramen on a wooden table", "an astronaut riding a horse on the moon",
    "a futuristic city skyline at night", "a close-up of a hummingbird drinking nectar",
    "a cozy cabin in a pine forest", "a vintage car parked on a rainy street",
]
TRAIN_CLASSES = 12  # reference models: classes [0, 12) for training, the rest held out
RECIPES = ("search", "soft")
RECIPE_DEFAULTS = {
    "search": {"samples": 12, "iterations": 0, "ste": True, "forecast_order": 1, "init_schedule": "auto",
               "project": True, "search_evals": 200},
    "soft": {"samples": 8, "iterations": 40, "ste": False, "forecast_order": 0, "init_schedule": None,
             "project": False, "search_evals": 0},
}


def resolve_recipe(args) -> str:
    """Fill the options left unset (None) from the recipe's defaults; returns the recipe."""
    UsageError = _usage_error()
    recipe = args.recipe
    if recipe is None:
        recipe = "soft" if args.speed_weight is not None else "search"
    if recipe == "search" and args.speed_weight is not None:
        raise UsageError("--recipe search needs a target speedup (--target-speedup), not --speed-weight.")
    for key, value in RECIPE_DEFAULTS[recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.init_schedule in ("none", ""):
        args.init_schedule = None
    return recipe


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train-router", help="train a HarmoniCa cache router (learned step x block-group schedule)",
        description="Train a HarmoniCa router (Step-Wise Denoising Training with the image-error proxy objective) "
                    "for a diffusers pipeline, and write it as a .safetensors file for "
                    "ditaccel.HarmoniCaConfig(router=...).")
    p.add_argument("--model", required=True,
                   help="reference model name (e.g. flux_tiny) or a local diffusers pipeline folder")
    p.add_argument("--steps", type=int, default=20, help="denoising steps the router is for (default 20)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--target-speedup", type=float, default=None,
                       help="transformer FLOP speedup to reach (λ adjusted to hit it; default 2.0)")
    speed.add_argument("--speed-weight", type=float, default=None,
                       help="fixed speed weight λ of the fraction-computed term instead of a target speedup")
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="'search' (default with a target speedup): straight-through training of a forecasting "
                        "router from the best fixed schedule, then a search on the image error; 'soft' (default "
                        "with --speed-weight): soft-gated SDT + IEPO with the λ controller. Options below override.")
    p.add_argument("--samples", type=int, default=None,
                   help="training samples (prompt, seed pairs; default 12 for 'search', 8 for 'soft')")
    p.add_argument("--iterations", type=int, default=None,
                   help="optimisation steps on the router (default 0 for 'search', 40 for 'soft')")
    p.add_argument("--batch", type=int, default=1, help="samples rolled out per iteration (default 1)")
    p.add_argument("--lr", type=float, default=0.2, help="Adam learning rate of the logits (default 0.2)")
    p.add_argument("--threshold", type=float, default=0.1, help="inference threshold on sigmoid(logits) (0.1)")
    p.add_argument("--group-size", type=int, default=None, help="blocks per group (default: ~4-16 groups)")
    p.add_argument("--proxy-every", type=int, default=10,
                   help="refresh the image-error proxy every K iterations (0: uniform step weights; default 10)")
    p.add_argument("--init-logit", type=float, default=None,
                   help="initial logit of every cell (default logit(threshold) + 1)")
    p.add_argument("--ste", action=argparse.BooleanOptionalAction, default=None,
                   help="straight-through estimator: hard compute/skip decisions in the student's forward "
                        "(as at inference), the sigmoid's gradient backward (default on for 'search')")
    p.add_argument("--forecast-order", type=int, default=None,
                   help="student forecasts skipped groups with a TaylorSeer series of this order, as "
                        "HarmoniCaConfig(forecast=True) does at inference (0: reuse; needs --ste; default 1 for 'search', 0 "
                        "for 'soft')")
    p.add_argument("--init-schedule", default=None,
                   help="initial hard schedule: 'auto' (the best fixed step schedule within the target speedup, "
                        "measured on the search samples; default for 'search'), 'interval=3,warmup=3,final=0', "
                        "'steps=0,1,2,4,...' or 'none' (default for 'soft')")
    p.add_argument("--init-margin", type=float, default=1.0,
                   help="initial logits are logit(threshold) ± this on the init schedule (default 1)")
    p.add_argument("--project", action=argparse.BooleanOptionalAction, default=None,
                   help="with --target-speedup: after every step shift the logits so the hard schedule meets the "
                        "target (projection) instead of adjusting λ (default on for 'search')")
    p.add_argument("--search-evals", type=int, default=None,
                   help="after the iterations, greedy search over hard schedules within the target speedup, "
                        "at most this many candidate generations scored by image error (default 200 for 'search', 0 for "
                        "'soft')")
    p.add_argument("--search-samples", type=int, default=4,
                   help="training samples the search and --init-schedule auto measure on (default 4)")
    p.add_argument("--search-latents", action="store_true",
                   help="score the search on final latents instead of decoded images")
    p.add_argument("--no-calibrate", action="store_true",
                   help="do not shift the final logits to meet the target speedup exactly")
    p.add_argument("--seed", type=int, default=0, help="seed of the training samples (default 0)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale of the training generations (default 1)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--prompt", action="append", default=None, help="training prompt (folder models; repeatable)")
    p.add_argument("--out", required=True, help="router file to write (.safetensors)")
    p.add_argument("--checkpoint", default=None, help="checkpoint written after every iteration (default <out>.ckpt)")
    p.add_argument("--resume", default=None, help="checkpoint to resume from")
    p.add_argument("--log", default=None, help="write one JSON line per iteration to this file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _usage_error():
    try:
        from .errors import UsageError
    except ImportError:  # pragma: no cover
        return ValueError
    return UsageError


def load_training_setup(args):
    """(pipe, samples, description) for ``--model``."""
    import torch

    from ..methods.harmonica_train import Sample

    UsageError = _usage_error()
    spec = args.model
    from ..reference import pipelines as ref

    if spec in ref.REFERENCE_MODELS:
        try:
            pipe, prompts = ref.load_reference_pipeline(spec, device=args.device)
        except ref.ReferenceModelError as exc:
            raise UsageError(str(exc)) from exc
        size = {k: v for k, v in ref.REFERENCE_MODELS[spec].get("default_call", {}).items()
                if k != "num_inference_steps"}
        if args.height:
            size["height"] = args.height
        if args.width:
            size["width"] = args.width
        classes = prompts.class_names[:TRAIN_CLASSES] or prompts.class_names
        samples = []
        for i in range(args.samples):
            cls = classes[i % len(classes)]
            kw = ref.reference_call_kwargs(prompts, [cls], true_cfg_scale=args.cfg)
            kw.update(size)
            samples.append(Sample(kw, seed=10_000 + 1000 * args.seed + i, label=f"{cls}@{10_000 + 1000 * args.seed + i}"))
        return pipe, samples, f"reference model {spec}"
    path = Path(spec)
    if not path.is_dir():
        raise UsageError(f"--model {spec!r} is neither a reference model ({sorted(ref.REFERENCE_MODELS)}) nor an "
                         "existing diffusers pipeline folder.")
    import diffusers

    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--model {spec}: could not load a diffusers pipeline from this folder "
                         f"({type(exc).__name__}: {exc}).") from exc
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = args.prompt or DEFAULT_PROMPTS
    samples = []
    for i in range(args.samples):
        kw = {"prompt": prompts[i % len(prompts)]}
        if args.cfg != 1.0:
            kw["guidance_scale"] = args.cfg
        if args.height:
            kw["height"] = args.height
        if args.width:
            kw["width"] = args.width
        samples.append(Sample(kw, seed=10_000 + 1000 * args.seed + i, label=f"{kw['prompt'][:40]}@{i}"))
    del torch
    return pipe, samples, f"pipeline {type(pipe).__name__} from {path}"


def run(args, argv=None) -> int:
    import torch

    from ..errors import ConfigError
    from ..methods.harmonica_train import TrainSettings, train_router

    UsageError = _usage_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = resolve_recipe(args)
    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}.")
    target = args.target_speedup
    if target is None and args.speed_weight is None:
        target = 2.0
    settings = TrainSettings(
        steps=args.steps, target_speedup=target,
        speed_weight=args.speed_weight if args.speed_weight is not None else TrainSettings.speed_weight,
        iterations=args.iterations, batch=args.batch, lr=args.lr, threshold=args.threshold,
        init_logit=args.init_logit, group_size=args.group_size, proxy_every=args.proxy_every,
        calibrate=not args.no_calibrate, seed=args.seed, ste=args.ste, forecast_order=args.forecast_order,
        init_schedule=args.init_schedule, init_margin=args.init_margin, project=args.project, search_evals=args.search_evals,
        search_samples=args.search_samples, search_decode=not args.search_latents,
    )
    try:
        settings.validate()
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    torch.manual_seed(args.seed)
    pipe, samples, desc = load_training_setup(args)
    out = Path(args.out)
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path(str(out) + ".ckpt")
    log_file = open(args.log, "a") if args.log else None  # noqa: SIM115

    def log(line: str) -> None:
        if log_file is not None:
            log_file.write(line + "\n")
            log_file.flush()

    print(f"train-router: {desc}; {len(samples)} samples, {settings.iterations} iterations x {settings.batch}, "
          f"{settings.steps} steps, " + (f"target speedup {target}" if target else f"λ = {settings.speed_weight}")
          + f", recipe {recipe}",
          file=sys.stderr)
    t0 = time.perf_counter()
    try:
        router, trainer = train_router(pipe, samples, settings, checkpoint=checkpoint, resume=args.resume,
                                       progress=not args.no_progress, log=log)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    finally:
        if log_file is not None:
            log_file.close()
    router.save(out)
    tr = router.training
    summary = {
        "out": str(out), "checkpoint": str(checkpoint), "seconds_this_run": round(time.perf_counter() - t0, 1),
        "train_seconds_total": tr.get("train_seconds"), "groups": [list(g) for g in router.groups],
        "steps": router.steps, "fraction_computed": round(tr["fraction_computed"], 4),
        "flop_speedup": round(tr["flop_speedup"], 3) if tr.get("flop_speedup") else None,
        "final_speed_weight": tr["final_speed_weight"], "final_objective": tr.get("final_objective"),
        "init": tr.get("init"), "search": tr.get("search"),
    }
    print(json.dumps(summary, indent=1))
    if settings.ste and settings.forecast_order > 0:
        print(f"use it with ditaccel.HarmoniCaConfig(router={str(out)!r}, forecast=True, "
              f"forecast_order={settings.forecast_order}) (it was trained for forecasting on skipped groups)",
              file=sys.stderr)
    sched = router.schedule()
    print("schedule (rows = steps, # = compute, . = reuse):", file=sys.stderr)
    for t in range(router.steps):
        print(f"  {t:3d} " + "".join("#" if v else "." for v in sched[t].tolist()), file=sys.stderr)
    return 0
