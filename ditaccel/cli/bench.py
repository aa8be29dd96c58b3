"""``ditaccel bench``: speed and fidelity of presets, methods and peers against full compute."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UsageError

DESCRIPTION = """\
Benchmark ditaccel presets/methods (and, with --compare-peers, diffusers' own caches and cache-dit)
against full compute of the same seed: median wall and CPU time over interleaved repeats,
speedup, FLOPs skipped, PSNR/SSIM on latents and decoded images, peak memory.

Default: the trained FLUX reference model (flux_tiny) if its checkpoint is installed, otherwise a
tiny random FLUX pipeline (random weights: fidelity not meaningful); preset "balanced"; 28 steps.
"""

EPILOG = """\
examples:
  ditaccel bench
  ditaccel bench --presets quality balanced fast --compare-peers --out bench/out
  ditaccel bench --model tiny:flux --steps 8 --methods StepCache:interval=3,warmup_steps=1
  ditaccel bench --markdown docs/benchmarks.md --json bench/out/results.json
"""


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} (an integer >= {minimum}), got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} (an integer >= {minimum}), got {value}")
        return value

    return parse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark speed and fidelity against full compute",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="NAME|DIR|tiny:FAMILY",
                   help="reference model name (e.g. flux_tiny), a local diffusers pipeline folder, or tiny:<family> "
                        "for a random pipeline (default: flux_tiny, else tiny:flux)")
    p.add_argument("--presets", nargs="+", action="extend", default=None, metavar="PRESET",
                   help="presets to run (space- or comma-separated); default 'balanced' when no --methods")
    p.add_argument("--methods", nargs="+", action="extend", default=None, metavar="METHOD[:k=v,...]",
                   help="method configs with options, e.g. StepCache:interval=3,warmup_steps=1")
    p.add_argument("--compare-peers", action="store_true",
                   help="also run diffusers FirstBlockCache/TaylorSeerCache/MagCache and cache-dit (if importable)")
    p.add_argument("--steps", type=_int_at_least(1, "the number of inference steps"), default=28)
    p.add_argument("--seed", type=_int_at_least(0, "a seed"), default=0)
    p.add_argument("--repeats", type=_int_at_least(1, "the number of timed repeats"), default=3,
                   help="timed runs per variant, interleaved (median reported; default 3)")
    p.add_argument("--batch", type=_int_at_least(1, "a batch size"), default=2,
                   help="samples per generation (reference model: its first N classes; default 2)")
    p.add_argument("--tokens", type=_int_at_least(16, "an image token count"), default=None,
                   help="image tokens, a square number (tiny random model: default 256 = 64x64 px; reference "
                        "model: default its training size, e.g. --tokens 65536 for 1024x1024 px; per frame for "
                        "video models)")
    p.add_argument("--frames", type=_int_at_least(1, "a frame count"), default=None,
                   help="frames of a video reference model (wan_tiny: 4k + 1, default 5)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="weights/activations dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=_int_at_least(1, "a thread count"), default=1,
                   help="torch.set_num_threads (default 1, for stable CPU timings)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="write results as JSON")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="write a Markdown report")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write results.json, pareto.png (speedup vs PSNR) and grid.png (full vs accelerated)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _resolve_device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"--device: expected 'cpu', 'cuda' or 'cuda:N', got {name!r}.")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available in this torch ({torch.__version__}). Use --device cpu.")
    return name


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import torch

    from .models import RANDOM_NOTE, load_bench_model
    from .peers import build_peers
    from .report import (image_grid, machine_info, markdown, pareto_plot, report_dict, text_table, write_json,
                         command_line)
    from .runner import run_bench
    from .specs import Variant, parse_methods, parse_presets

    if args.tokens is not None and round(args.tokens ** 0.5) ** 2 != args.tokens:
        raise UsageError(f"--tokens must be a square number (e.g. 256, 1024), got {args.tokens}.")
    # validate everything before loading anything
    variants = [Variant(label="full", kind="baseline")]
    if args.presets is None and args.methods is None:
        variants += parse_presets(["balanced"])
    else:
        variants += parse_presets(args.presets) + parse_methods(args.methods)
    device = _resolve_device(args.device)
    for path in (args.json, args.markdown):
        if path is not None and path.exists() and path.is_dir():
            raise UsageError(f"{path} is a folder; --json/--markdown expect a file path.")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder; pass a folder path.")

    torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model = load_bench_model(args.model, batch=args.batch, device=device, tokens=args.tokens, frames=args.frames,
                             dtype=getattr(torch, dtype_name))
    if args.compare_peers:
        variants += [Variant(label=p.label, kind="peer", peer=p, spec=p.label) for p in build_peers()]
    notes = list(model.notes)
    if model.random_weights:
        notes.append(RANDOM_NOTE)
    print(f"model: {model.description}", file=sys.stderr)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    results, run_notes = run_bench(model, variants, steps=args.steps, seed=args.seed, repeats=args.repeats,
                                   device=device, progress=not args.no_progress)
    notes += run_notes
    header = {
        "command": command_line(argv),
        "machine": machine_info(device, args.threads),
        "model": {"name": model.name, "description": model.description, "family": model.family,
                  "random_weights": model.random_weights},
        "settings": {"steps": args.steps, "seed": args.seed, "repeats": args.repeats, "batch": args.batch,
                     "threads": args.threads, "device": device, "dtype": dtype_name, "tokens": args.tokens,
                     "frames": args.frames},
        "notes": notes,
    }
    print(f"\n{model.description}; {args.steps} steps, seed {args.seed}, {args.repeats} timed repeats, "
          f"{args.threads} thread(s), {device}")
    print(text_table(results))
    for note in notes:
        print(f"note: {note}")
    data = report_dict(results, header)
    written = []
    if args.json is not None:
        write_json(args.json, data)
        written.append(args.json)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results, header))
        written.append(args.markdown)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "results.json", data)
        title = f"{model.name}, {args.steps} steps" + (f" ({RANDOM_NOTE})" if model.random_weights else "")
        pareto_plot(results, args.out / "pareto.png", title)
        image_grid(results, args.out / "grid.png")
        written += [args.out / "results.json", args.out / "pareto.png", args.out / "grid.png"]
    for path in written:
        print(f"wrote {path}")
    failed = [r for r in results if r.variant.kind != "peer" and not r.ok]
    return 1 if failed else 0
