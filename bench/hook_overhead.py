"""Hook overhead of ditaccel's "off" preset (hooks attached, nothing skipped) against the plain pipeline.

    .venv/bin/python bench/hook_overhead.py [--steps 28] [--repeats 7] [--tokens 1024] [--threads 1]

Tiny random FLUX (2 double + 4 single blocks) at 128x128 px: VAE scale 2 -> 64x64 latent -> 2x2
packing -> 32x32 = 1024 image tokens (+ 8 text tokens). Three identical copies of the pipeline:

* ``plain``: no hooks;
* ``off``: ``ditaccel.enable_acceleration(pipe, "off")`` with its defaults (FLOP profiling on, its
  one-off profile taken in the warm-up run), enabled once as a user would;
* ``off, count_flops=False``: the same without FLOP accounting.

Each repeat runs the three in a rotated order (interleaved); the pipeline returns latents
(``output_type="latent"``) so the VAE decode does not dilute the overhead. Reported: median wall
and process CPU time per generation, overhead = median(off) / median(plain) - 1, and the median of
the per-repeat paired ratios. The target is < 1 %. The "off" output is checked to be bit-identical.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per variant (>= 5; default 7)")
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens, a square number (default 1024)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=200, help="calls per block of the direct hook-cost measure")
    ap.add_argument("--blocks", type=int, default=15, help="blocks per variant of the direct hook-cost measure")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error(f"--repeats must be >= 5 for a meaningful median, got {args.repeats}")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(args.threads)

    import ditaccel
    from ditaccel.cli.models import _tiny_flux
    from ditaccel.cli.report import cpu_model

    model = _tiny_flux(tokens=args.tokens, batch=1)
    call = model.make_call(0)
    pipes = {"plain": model.pipe, "off": copy.deepcopy(model.pipe), "off, count_flops=False": copy.deepcopy(model.pipe)}
    handles = {"off": ditaccel.enable_acceleration(pipes["off"], "off"),
               "off, count_flops=False": ditaccel.enable_acceleration(pipes["off, count_flops=False"], "off",
                                                                        count_flops=False)}

    def run(pipe):
        return pipe(**call, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images

    names = list(pipes)
    outputs = {n: run(pipes[n]) for n in names}  # warm-up (and the off preset's one-off FLOP profile)
    identical = {n: bool(torch.equal(outputs[n], outputs["plain"])) for n in names}
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for n in order:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            run(pipes[n])
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {wall[n][-1]:.3f}s wall {cpu[n][-1]:.3f}s cpu"
                                                              for n in names), file=sys.stderr, flush=True)

    med = {n: {"wall_s": statistics.median(wall[n]), "cpu_s": statistics.median(cpu[n])} for n in names}
    result = {
        "machine": f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s)",
        "setting": f"{model.description}, {args.steps} steps, output_type=latent",
        "repeats": args.repeats, "median": med, "wall_s": wall, "cpu_s": cpu, "bit_identical": identical,
        "stats_off": handles["off"].stats(),
    }
    for n in names[1:]:
        result[f"overhead[{n}]"] = {
            "wall": med[n]["wall_s"] / med["plain"]["wall_s"] - 1,
            "cpu": med[n]["cpu_s"] / med["plain"]["cpu_s"] - 1,
            "wall_paired_median": statistics.median(a / b for a, b in zip(wall[n], wall["plain"])) - 1,
            "cpu_paired_median": statistics.median(a / b for a, b in zip(cpu[n], cpu["plain"])) - 1,
        }
    per_call = hook_cost_per_call(args.calls, args.blocks)
    calls_per_generation = result["stats_off"]["transformer_calls"] / max(1, result["stats_off"]["generations"])
    result["direct"] = per_call
    result["estimated_overhead_cpu"] = per_call["hook_cost_s"] * calls_per_generation / med["plain"]["cpu_s"]
    print(f"\n{result['setting']}; {result['machine']}; median of {args.repeats} interleaved runs")
    print(f"{'variant':24s} {'wall s':>8s} {'cpu s':>8s} {'wall ovh':>9s} {'cpu ovh':>9s} {'paired wall':>12s} "
          f"{'paired cpu':>11s}  identical")
    for n in names:
        o = result.get(f"overhead[{n}]")
        cells = ("", "", "", "") if o is None else (f"{100 * o['wall']:+.2f}%", f"{100 * o['cpu']:+.2f}%",
                                                   f"{100 * o['wall_paired_median']:+.2f}%",
                                                   f"{100 * o['cpu_paired_median']:+.2f}%")
        print(f"{n:24s} {med[n]['wall_s']:8.3f} {med[n]['cpu_s']:8.3f} {cells[0]:>9s} {cells[1]:>9s} "
              f"{cells[2]:>12s} {cells[3]:>11s}  {identical[n]}")
    print(f"\ndirect hook cost: plain {1e6 * per_call['plain_s']:.1f} us/call, off {1e6 * per_call['off_s']:.1f} us/call "
          f"(minimal-width FLUX, median of {args.blocks} blocks x {args.calls} calls) -> {1e6 * per_call['hook_cost_s']:.1f} "
          f"us per transformer call; x {calls_per_generation:.0f} calls / plain generation CPU {med['plain']['cpu_s']:.3f} s "
          f"= estimated overhead {100 * result['estimated_overhead_cpu']:+.3f}%")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def hook_cost_per_call(calls: int, blocks: int) -> dict:
    """Median CPU time per bare transformer call, plain and with the "off" preset, at minimal width."""
    import ditaccel
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    plain = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4,
                                   attention_head_dim=8, num_attention_heads=1, joint_attention_dim=8,
                                   pooled_projection_dim=8, guidance_embeds=False, axes_dims_rope=(2, 2, 4)).eval()
    hooked = copy.deepcopy(plain)
    handle = ditaccel.enable_acceleration(hooked, "off")
    handle.set_num_steps(calls)
    inputs = dict(hidden_states=torch.randn(1, 4, 4), encoder_hidden_states=torch.randn(1, 2, 8),
                  pooled_projections=torch.randn(1, 8), img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(2, 3))
    timesteps = torch.linspace(1.0, 0.0, calls + 1)[:-1]

    def block(model) -> float:
        c0 = time.process_time()
        with torch.no_grad():
            for t in timesteps:  # a decreasing timestep: one generation of ``calls`` steps
                model(timestep=t.reshape(1), **inputs, return_dict=False)
        return (time.process_time() - c0) / calls

    block(plain), block(hooked)  # warm-up, FLOP profile
    times = {"plain": [], "off": []}
    for i in range(blocks):
        for name in (("plain", "off") if i % 2 == 0 else ("off", "plain")):
            times[name].append(block(plain if name == "plain" else hooked))
    p, o = statistics.median(times["plain"]), statistics.median(times["off"])
    return {"plain_s": p, "off_s": o, "hook_cost_s": o - p, "calls": calls, "blocks": blocks,
            "steps_seen": handle.stats()["steps"]}


if __name__ == "__main__":
    sys.exit(main())
