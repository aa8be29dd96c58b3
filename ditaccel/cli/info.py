"""``ditaccel info``: families, methods, presets, backends and versions."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="supported families, methods, presets, backends and versions",
                       description="Show the model families ditaccel supports, its methods (and which are "
                                   "available), presets, installed backends and versions.")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(func=run)
    return p


def _backend(module: str, dist: str) -> dict:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    version = None
    if found:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
    return {"installed": found, "version": version}


def collect() -> dict:
    import diffusers
    import torch

    from .. import __version__
    from ..adapters import registered_families
    from .models import TINY_BUILDERS, available_reference_names, reference_names
    from .specs import method_status, preset_rows

    cuda = torch.cuda.is_available()
    return {
        "versions": {"ditaccel": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "cuda": {"available": cuda, "torch_cuda": torch.version.cuda,
                 "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []},
        "backends": {
            "triton": _backend("triton", "triton"),
            "flash-attn": _backend("flash_attn", "flash-attn"),
            "xformers": _backend("xformers", "xformers"),
            "cache-dit (peer)": _backend("cache_dit", "cache-dit"),
        },
        "families": [{"family": e.family, "transformer_classes": list(e.model_classes), "description": e.description}
                     for e in registered_families().values()],
        "methods": [{"method": n, "available": a, "description": d} for n, a, d in method_status()],
        "presets": [{"preset": n, "description": d} for n, d in preset_rows()],
        "bench_models": {"reference": reference_names(), "reference_with_checkpoint": available_reference_names(),
                         "tiny_random": ["tiny:" + f for f in TINY_BUILDERS]},
    }


def run(args: argparse.Namespace, argv=None) -> int:
    data = collect()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    v = data["versions"]
    print(f"ditaccel {v['ditaccel']}  (torch {v['torch']}, diffusers {v['diffusers']}, Python {v['python']})")
    c = data["cuda"]
    print(f"CUDA: {'available: ' + ', '.join(c['devices']) if c['available'] else 'not available'}"
          + (f" (torch built for CUDA {c['torch_cuda']})" if c["torch_cuda"] else " (CPU build of torch)"))
    print("\nBackends:")
    for name, b in data["backends"].items():
        print(f"  {name:18s} {'installed ' + str(b['version']) if b['installed'] else 'not installed'}")
    print("\nModel families (transformer classes):")
    for f in data["families"]:
        desc = f" - {f['description']}" if f["description"] else ""
        print(f"  {f['family']:14s} {', '.join(f['transformer_classes'])}{desc}")
    print("  (other DiTs: generic adapter, detected from their block ModuleLists)")
    print("\nMethods (config name; available = registered in this install):")
    for m in data["methods"]:
        state = "available" if m["available"] else "not yet available"
        print(f"  {m['method']:12s} {state:18s} {m['description']}")
    print("\nPresets:")
    for p in data["presets"]:
        print(f"  {p['preset']:10s} {p['description']}")
    b = data["bench_models"]
    print("\nBench models: reference " + (", ".join(b["reference"]) or "none")
          + f" (with checkpoint: {', '.join(b['reference_with_checkpoint']) or 'none'}); random "
          + ", ".join(b["tiny_random"]))
    return 0
