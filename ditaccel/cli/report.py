"""Results of ``ditaccel bench`` as a text table, Markdown, JSON, a Pareto plot and an image grid."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from .runner import VariantResult

COLUMNS = ["variant", "wall s", "cpu s", "speedup", "cpu speedup", "skipped", "PSNR lat", "SSIM lat", "PSNR img", "SSIM img",
           "peak MB", "status"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str, threads: int) -> dict[str, Any]:
    import diffusers
    import torch

    from .. import __version__

    info = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads, "device": device,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "ditaccel": __version__,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch thread(s)), device {m['device']}{gpu}; "
            f"torch {m['torch']}, diffusers {m['diffusers']}, ditaccel {m['ditaccel']}, Python {m['python']}")


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "ditaccel " + " ".join(shlex.quote(a) for a in args)


def _f(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, fmt)


def row(r: VariantResult) -> list[str]:
    fid = r.fidelity
    status = r.status if r.ok else f"{r.status}: {r.error}"
    skipped = "-" if r.flops_skipped_fraction is None else f"{100 * r.flops_skipped_fraction:.1f}%"
    if r.flops_source and r.flops_source.startswith("measured") and skipped != "-":
        skipped += "*"
    return [r.variant.label, _f(r.wall_median, ".3f"), _f(r.cpu_median, ".3f"), _f(r.speedup, ".2f") + ("x" if r.speedup else ""),
            _f(r.cpu_speedup, ".2f") + ("x" if r.cpu_speedup else ""), skipped, _f(fid.get("psnr_latent"), ".2f"), _f(fid.get("ssim_latent"), ".4f"),
            _f(fid.get("psnr_image"), ".2f"), _f(fid.get("ssim_image"), ".4f"), _f(r.peak_mem_mb, ".1f"), status]


def text_table(results: list[VariantResult]) -> str:
    rows = [COLUMNS] + [row(r) for r in results]
    widths = [max(len(x[i]) for x in rows[:]) if i < len(COLUMNS) - 1 else 0 for i in range(len(COLUMNS))]
    lines = []
    for k, cells in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if w else c for c, w in zip(cells, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * max(w, 6) for w in widths).rstrip())
    return "\n".join(lines)


def markdown_table(results: list[VariantResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in results:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row(r)) + " |")
    return "\n".join(lines)


LEGEND = ("wall/cpu s: median over the timed repeats (process CPU time for cpu s); speedup: baseline median wall / "
          "variant median wall (cpu speedup: the same with CPU time, steadier on a loaded machine); skipped: fraction of transformer FLOPs skipped (ditaccel's own count, or "
          "* measured with torch FlopCounterMode against the full run for peers); PSNR/SSIM against full compute "
          "of the same seed, on the final latents (data range of the reference) and on the decoded images in "
          "[0, 1]; peak MB: peak memory above the start of the untimed run (sampled process RSS on CPU, "
          "max allocated on CUDA).")


def _clean(value):
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _identical(fid: dict[str, Any]) -> bool | None:
    values = [fid.get(k) for k in ("psnr_latent", "psnr_image") if fid.get(k) is not None]
    return all(math.isinf(v) for v in values) if values else None


def result_dict(r: VariantResult) -> dict[str, Any]:
    fid = r.fidelity
    return _clean({
        "label": r.variant.label, "kind": r.variant.kind, "spec": r.variant.spec, "description": r.description,
        "status": r.status, "error": r.error,
        "wall_s": r.wall_s, "cpu_s": r.cpu_s, "wall_median_s": r.wall_median, "cpu_median_s": r.cpu_median,
        "speedup": r.speedup, "cpu_speedup": r.cpu_speedup,
        "flops_skipped_fraction": r.flops_skipped_fraction, "flops_source": r.flops_source,
        "transformer_flops": r.transformer_flops, "peak_mem_mb": r.peak_mem_mb,
        **{k: fid.get(k) for k in ("psnr_latent", "ssim_latent", "psnr_image", "ssim_image")},
        "identical_to_full": _identical(fid),
        "stats": r.stats, "traceback": r.traceback,
    })


def report_dict(results, header: dict[str, Any]) -> dict[str, Any]:
    return {**_clean(header), "legend": LEGEND, "results": [result_dict(r) for r in results]}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def markdown(results, header: dict[str, Any]) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `ditaccel bench`; regenerate with the command below.", "",
             f"- Command: `{header['command']}`",
             f"- Machine: {machine_line(header['machine'])}",
             f"- Model: {header['model']['description']}",
             f"- Settings: {header['settings']['steps']} steps, seed {header['settings']['seed']}, "
             f"{header['settings']['repeats']} timed repeats per variant, interleaved",
             ]
    for note in header.get("notes", []):
        lines.append(f"- Note: {note}")
    lines += ["", markdown_table(results), "", LEGEND, "", "Variants:", ""]
    for r in results:
        lines.append(f"- `{r.variant.label}`: {r.description}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# pictures


def pareto_plot(results: list[VariantResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r.speedup, r.fidelity.get("psnr_image"), r.variant.label) for r in results
           if r.ok and r.variant.kind != "baseline" and r.speedup and r.fidelity.get("psnr_image") is not None]
    finite = [p for _, p, _ in pts if not math.isinf(p)]
    cap = (max(finite) + 5.0) if finite else 60.0
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    shown = [(s, cap if math.isinf(p) else p, lab + (" (identical)" if math.isinf(p) else "")) for s, p, lab in pts]
    groups: dict[tuple[float, float], list[str]] = {}
    for s, p, lab in shown:
        groups.setdefault((round(s, 2), round(p, 1)), []).append(lab)
    for s, p, lab in shown:
        ax.scatter([s], [p], s=36)
    for (s, p), labels in groups.items():
        ax.annotate("\n".join(labels), (s, p), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front, best = [], -math.inf
    for s, p, _ in sorted(shown, key=lambda t: -t[0]):
        if p > best:
            front.append((s, p))
            best = p
    if len(front) > 1:
        front.sort()
        ax.plot([s for s, _ in front], [p for _, p in front], "--", color="gray", linewidth=1, label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    ax.axvline(1.0, color="lightgray", linewidth=1)
    ax.set_xlabel("speedup over full compute (wall time)")
    ax.set_ylabel("PSNR of decoded image vs full compute (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _to_pil(img):
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr)


def image_grid(results: list[VariantResult], path: Path, max_rows: int = 4, min_side: int = 128) -> None:
    """Rows: samples; columns: full compute, then each accelerated variant (video: middle frame)."""
    from PIL import Image, ImageDraw

    cols = [r for r in results if r.ok and r.outputs is not None and r.outputs.images is not None]
    if not cols:
        raise ValueError("no images to put in the grid")

    def frames(r):
        x = r.outputs.images
        return x[:, x.shape[1] // 2] if x.ndim == 5 else x

    n_rows = min(max_rows, frames(cols[0]).shape[0])
    h, w = frames(cols[0]).shape[-2:]
    scale = max(1, math.ceil(min_side / max(1, min(h, w))))
    cw, ch, label_h = w * scale, h * scale, 14
    grid = Image.new("RGB", (len(cols) * (cw + 4) + 4, label_h + n_rows * (ch + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for j, r in enumerate(cols):
        x0 = 4 + j * (cw + 4)
        label = "full" if r.variant.kind == "baseline" else r.variant.label
        draw.text((x0, 1), label[: max(4, cw // 6)], fill="black")
        imgs = frames(r)
        for i in range(n_rows):
            tile = _to_pil(imgs[i]).convert("RGB").resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (x0, label_h + 4 + i * (ch + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
