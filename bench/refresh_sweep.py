"""Fidelity-only sweep of the refresh-error schedule (what chose the presets' tolerances).

For each reference model and step count: the full-compute output, then TaylorSeer on block
residuals (order 1, last step computed) on the refresh-error schedule for every tolerance x cap x
warm-up combination; prints how many steps were computed in full and PSNR / SSIM of the decoded
output against full compute of the same seed. Deterministic (no timing), so it can share the box.

    .venv/bin/python bench/refresh_sweep.py --cases flux28 flux50 wan --tolerances 1.5 2 2.5 3 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import caching  # noqa: E402  (bench/caching.py: pipelines, generation, fidelity)

import ditaccel  # noqa: E402

CASES = {  # name -> (model, steps, build_pipeline options)
    "flux28": ("flux_tiny", 28, {}),
    "flux50": ("flux_tiny", 50, {}),
    "wan": ("wan_tiny", 28, {"size": 64, "frames": 9}),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["flux28", "flux50", "wan"])
    ap.add_argument("--tolerances", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0, 4.0])
    ap.add_argument("--caps", type=int, nargs="+", default=[10], help="max_consecutive_cached values")
    ap.add_argument("--warmups", type=int, nargs="+", default=[2], help="warmup_steps values")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.cases:
        model, steps, options = CASES[name]
        pipe, kw, description, compare_on = caching.build_pipeline(model=model, **options)
        print(f"# {name}: {description}, {steps} steps", flush=True)
        reference, _, _ = caching.generate(pipe, kw, steps)
        for tolerance in args.tolerances:
            for cap in args.caps:
                for warmup in args.warmups:
                    config = ditaccel.TaylorSeerConfig(granularity="block", order=1, refresh_tolerance=tolerance,
                                                       max_consecutive_cached=cap, warmup_steps=warmup,
                                                       final_steps=1)
                    with ditaccel.enable_acceleration(pipe, config, count_flops=False) as handle:
                        out, _, _ = caching.generate(pipe, kw, steps)
                        full = handle.stats()["methods"]["TaylorSeer"]["steps_computed"]
                    psnr, ssim = caching.fidelity(out, reference, compare_on)
                    print(f"{name} tol={tolerance:<4} cap={cap:<3} warmup={warmup}  full {full:3d}/{steps}  "
                          f"psnr {psnr:6.2f}  ssim {ssim:.4f}", flush=True)


if __name__ == "__main__":
    main()
