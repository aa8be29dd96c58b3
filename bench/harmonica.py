"""HarmoniCa benchmark: trained routers against the best fixed schedules of StepCache, Δ-Cache and
TaylorSeer on the trained reference model ``flux_tiny``, at equal transformer-FLOP speedup.

Fidelity is PSNR of the decoded images (``output_type="pt"``, range [0, 1]) against full compute
with the same seeds. The evaluation set is held out from router training: ``train-router`` uses
classes 0-11 and seeds >= 10000; this bench uses classes 12-15 and generator seeds 0, 1, ...
Speedup is the transformer FLOP speedup counted by the engine (1 / (1 − skipped fraction)); wall
clock on a shared CPU is reported but not used for the comparison.

Routers are trained beforehand with the CLI, e.g.::

    ditaccel train-router --model flux_tiny --steps 20 --target-speedup 2.46 --threads 1 \
        --out bench/results/router_h2.46.safetensors                     # recipe 'search' (forecast=True)
    ditaccel train-router --model flux_tiny --steps 20 --speed-weight 0.1 --out bench/results/router_l0.1.safetensors

then::

    PYTHONPATH=. .venv/bin/python bench/harmonica.py --routers bench/results/router_*.safetensors \\
        --recalibrate 1.5 2.5 3.0 --out bench/results/harmonica.json

``--recalibrate`` adds variants of the first router whose logits are shifted (one global bias, as
``train-router`` does at the end) to other target speedups; they are labelled as such.
For each router the report gives the best fixed-schedule baseline at equal speedup: the upper
envelope of every baseline's (speedup, PSNR) points, linearly interpolated at the router's speedup,
and the best baseline point at least as fast as the router.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ditaccel  # noqa: E402
from ditaccel import DeltaCacheConfig, HarmoniCaConfig, StepCacheConfig, TaylorSeerConfig  # noqa: E402
from ditaccel.methods.harmonica_router import Router, calibrate_bias  # noqa: E402
from ditaccel.methods.harmonica_train import flop_speedup, fraction_for_speedup  # noqa: E402

HELD_OUT_CLASSES = slice(12, 16)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (x.double() - ref.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def load(args):
    from ditaccel.reference.pipelines import load_reference_pipeline, reference_call_kwargs

    pipe, prompts = load_reference_pipeline(args.model, folder=args.folder)
    classes = prompts.class_names[HELD_OUT_CLASSES]
    kw = reference_call_kwargs(prompts, classes)
    kw.update(height=64, width=64, output_type="pt", num_inference_steps=args.steps)
    return pipe, kw, classes


def generate(pipe, kw, seeds) -> tuple[torch.Tensor, float]:
    outs, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for s in seeds:
            outs.append(pipe(**kw, generator=torch.Generator().manual_seed(s)).images.float())
    return torch.cat(outs), time.perf_counter() - t0


def evaluate(pipe, kw, seeds, config, ref) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ditaccel.accelerated(pipe, config) as h:
            x, wall = generate(pipe, kw, seeds)
            st = h.stats()
    frac = st["flops_skipped_fraction"]
    return {"psnr": psnr(x, ref), "flop_speedup": 1.0 / (1.0 - frac), "wall_s": wall}


def baselines(steps: int) -> list[tuple[str, str, object]]:
    out = [("StepCache", "interval=2 warmup=1", StepCacheConfig(interval=2, warmup_steps=1, final_steps=1))]
    for interval in (2, 3, 4):
        out.append(("StepCache", f"interval={interval} warmup=2",
                    StepCacheConfig(interval=interval, warmup_steps=2, final_steps=1)))
    for interval in (2, 3, 4, 6):
        out.append(("DeltaCache", f"interval={interval}", DeltaCacheConfig(interval=interval, warmup_steps=2)))
    for interval in (2, 3, 4, 5):
        out.append(("TaylorSeer", f"interval={interval} order=1 module",
                    TaylorSeerConfig(interval=interval, order=1, warmup_steps=2)))
    # schedule variants: no forced final full step, longer warm-up (a wider search for the best fixed schedule)
    for interval in (2, 3, 4, 5):
        for warm, final in ((2, 0), (3, 0), (3, 1)):
            out.append(("TaylorSeer", f"interval={interval} order=1 module warmup={warm} final={final}",
                        TaylorSeerConfig(interval=interval, order=1, warmup_steps=warm, final_steps=final)))
    for interval in (3, 4):
        out.append(("DeltaCache", f"interval={interval} final=0",
                    DeltaCacheConfig(interval=interval, warmup_steps=2, final_steps=0)))
    for interval in (3, 4):
        out.append(("TaylorSeer", f"interval={interval} order=2 module",
                    TaylorSeerConfig(interval=interval, order=2, warmup_steps=2)))
        out.append(("TaylorSeer", f"interval={interval} order=1 block",
                    TaylorSeerConfig(interval=interval, order=1, granularity="block", warmup_steps=2)))
    return out


def envelope_at(points: list[tuple[float, float]], s: float) -> float | None:
    """Upper envelope of (speedup, psnr) points, piecewise linear, at speedup s (None outside)."""
    pts = sorted(points)
    best = None
    for (s0, p0) in pts:
        if abs(s0 - s) < 1e-9:
            best = p0 if best is None else max(best, p0)
    for (s0, p0) in pts:
        for (s1, p1) in pts:
            if s0 < s < s1:
                v = p0 + (p1 - p0) * (s - s0) / (s1 - s0)
                best = v if best is None else max(best, v)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="flux_tiny")
    ap.add_argument("--folder", default=None, help="checkpoint folder of the reference model (default: built-in)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--routers", nargs="*", default=[])
    ap.add_argument("--recalibrate", type=float, nargs="*", default=[])
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--baselines-from", default=None, help="re-use the baseline rows of an earlier result file")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/harmonica.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe, kw, classes = load(args)
    ref, wall_full = generate(pipe, kw, args.seeds)
    print(f"[bench] full compute: {ref.shape[0]} images ({classes}, seeds {args.seeds}) in {wall_full:.1f}s")
    rows = []
    if args.baselines_from:
        rows = json.loads(Path(args.baselines_from).read_text())["baselines"]
    elif not args.no_baselines:
        for method, label, cfg in baselines(args.steps):
            r = evaluate(pipe, kw, args.seeds, cfg, ref)
            r.update(method=method, config=label)
            rows.append(r)
            print(f"[bench] {method:10s} {label:30s} x{r['flop_speedup']:.2f} PSNR {r['psnr']:.2f}")
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    router_rows = []
    for i, path in enumerate(args.routers):
        router = Router.load(path)
        tr = router.training
        st = tr.get("settings", {})
        label = (f"target x{st.get('target_speedup')}" if st.get("target_speedup") else f"λ={st.get('speed_weight')}")
        if st.get("search_evals"):
            label += " search" + (f"+{tr.get('iterations_done')}it" if tr.get("iterations_done") else "")
        elif st.get("ste"):
            label += " STE"
        else:
            label += " soft"
        variants = [(label, path)]
        if i == 0 and args.recalibrate:
            total = tr.get("total_flops_per_call")
            block = sum(router.group_flops or [])
            for target in args.recalibrate:
                f = fraction_for_speedup(target, block, total)
                b = calibrate_bias(router.logits, router.weights(), router.threshold, f)
                v = Router(router.logits + b, router.family, router.transformer_class, router.num_blocks,
                           router.groups, router.threshold, router.group_flops, dict(tr, recalibrated_to=target))
                vpath = out_dir / f"{Path(path).stem}_recal{target}.safetensors"
                v.save(vpath)
                variants.append((f"{label} recalibrated to x{target}", str(vpath)))
        for vlabel, vpath in variants:
            for forecast in (False, True):
                cfg = HarmoniCaConfig(router=vpath, forecast=forecast)
                r = evaluate(pipe, kw, args.seeds, cfg, ref)
                r.update(method="HarmoniCa" + (" +forecast" if forecast else ""), config=vlabel, router=vpath,
                         train_seconds=tr.get("train_seconds"),
                         predicted_speedup=flop_speedup(Router.load(vpath).fraction_computed(), sum(router.group_flops or []),
                                                        tr.get("total_flops_per_call") or 0.0))
                router_rows.append(r)
                print(f"[bench] {r['method']:10s} {vlabel:30s} x{r['flop_speedup']:.2f} PSNR {r['psnr']:.2f}")
    # comparison at equal speedup
    fixed = [(r["flop_speedup"], r["psnr"]) for r in rows]
    for r in router_rows:
        s = r["flop_speedup"]
        env = envelope_at(fixed, s)
        faster = [(p, m, c) for (sp, p), m, c in zip(fixed, [x["method"] for x in rows], [x["config"] for x in rows])
                  if sp >= s * 0.98]
        best_fast = max(faster) if faster else None
        r["baseline_envelope_psnr"] = env
        r["gap_vs_envelope_db"] = None if env is None else r["psnr"] - env
        r["best_baseline_at_least_as_fast"] = None if best_fast is None else {
            "psnr": best_fast[0], "method": best_fast[1], "config": best_fast[2]}
        r["gap_vs_best_as_fast_db"] = None if best_fast is None else r["psnr"] - best_fast[0]
    result = {"model": args.model, "steps": args.steps, "held_out_classes": classes, "seeds": args.seeds,
              "full_wall_s": wall_full, "baselines": rows, "routers": router_rows,
              "note": "speedup = transformer FLOP speedup; PSNR of decoded images vs full compute"}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n| method | config | FLOP speedup | PSNR dB | best fixed at equal speedup (envelope) | gap dB | best fixed >= as fast | gap dB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in router_rows:
        env, bf = r["baseline_envelope_psnr"], r["best_baseline_at_least_as_fast"]
        env_s = "-" if env is None else f"{env:.2f}"
        gap_s = "-" if env is None else f"{r['gap_vs_envelope_db']:+.2f}"
        bf_s = "-" if bf is None else f"{bf['psnr']:.2f} ({bf['method']} {bf['config']})"
        bgap_s = "-" if bf is None else f"{r['gap_vs_best_as_fast_db']:+.2f}"
        print(f"| {r['method']} | {r['config']} | {r['flop_speedup']:.2f} | {r['psnr']:.2f} | {env_s} | {gap_s} | "
              f"{bf_s} | {bgap_s} |")
    print("\nbaseline Pareto points (speedup, PSNR):")
    for method in ("StepCache", "DeltaCache", "TaylorSeer"):
        pts = sorted((round(r["flop_speedup"], 2), round(r["psnr"], 2), r["config"]) for r in rows if r["method"] == method)
        front, best = [], -1e9
        for sp, p, c in sorted(pts, key=lambda x: -x[0]):
            if p > best:
                front.append((sp, p, c))
                best = p
        print(f"  {method}: " + "; ".join(f"x{sp} {p}dB [{c}]" for sp, p, c in sorted(front)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
