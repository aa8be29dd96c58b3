"""The benchmark loop: one untimed pass per variant (outputs, stats, FLOPs, memory), then timed
passes interleaved across the variants, each repeat in a rotated order."""

from __future__ import annotations

import gc
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import metrics
from .models import BenchModel
from .specs import Variant


@dataclass
class Outputs:
    latents: torch.Tensor | None
    images: torch.Tensor | None


@dataclass
class VariantResult:
    variant: Variant
    description: str = ""
    status: str = "ok"
    error: str | None = None
    traceback: str | None = None
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    outputs: Outputs | None = None
    stats: dict[str, Any] | None = None
    flops_skipped_fraction: float | None = None
    flops_source: str | None = None
    transformer_flops: float | None = None
    peak_mem_mb: float | None = None
    fidelity: dict[str, float | None] = field(default_factory=dict)
    speedup: float | None = None
    cpu_speedup: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def wall_median(self) -> float | None:
        return statistics.median(self.wall_s) if self.wall_s else None

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_s) if self.cpu_s else None


# ---------------------------------------------------------------------------------------------
# one generation


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def generate(model: BenchModel, steps: int, seed: int, device: str, pipe=None) -> Outputs:
    """One pipeline call; the latents are captured at the VAE decode (so they are the final,
    unpacked latents for every family) and the images come back as ``output_type="pt"``."""
    pipe = model.pipe if pipe is None else pipe
    vae = getattr(pipe, "vae", None)
    captured: dict[str, torch.Tensor] = {}
    had_own = vae is not None and "decode" in vae.__dict__
    if vae is not None:
        original = vae.decode

        def decode(z, *args, **kwargs):
            captured["latents"] = z.detach().float().cpu().clone()
            return original(z, *args, **kwargs)

        vae.decode = decode
    try:
        call = model.make_call(seed)
        out = pipe(**call, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="pt")
        _sync(device)
    finally:
        if vae is not None:
            if had_own:
                vae.decode = original
            else:
                del vae.decode
    images = getattr(out, "images", None)
    if images is None:
        images = getattr(out, "frames", None)
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu()
    else:
        images = None
    return Outputs(latents=captured.get("latents"), images=images)


# ---------------------------------------------------------------------------------------------
# memory


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory of a block above its start: CUDA max allocated, or sampled process RSS."""

    def __init__(self, device: str, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.peak_delta: int | None = None

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_delta = torch.cuda.max_memory_allocated() - self._start
            return False
        if self._start is not None:
            self._stop.set()
            self._thread.join()
            rss = _rss_bytes()
            if rss is not None:
                self._peak = max(self._peak, rss)
            self.peak_delta = self._peak - self._start
        return False


# ---------------------------------------------------------------------------------------------
# variants on and off


def _snapshot(root) -> list[tuple[Any, set[str]]]:
    return [(m, set(vars(m))) for m in root.modules()]


def _restore(snapshot: list[tuple[Any, set[str]]]) -> list[str]:
    """Delete instance attributes a peer added and left behind after its own removal (cache-dit
    leaves ``transformer.forward`` patched); diffusers' empty hook registries may stay."""
    removed = []
    for module, keys in snapshot:
        for key in [k for k in vars(module) if k not in keys and not k.startswith("_diffusers")]:
            value = vars(module)[key]
            harmless = value is None or getattr(value, "__func__", None) is getattr(type(module), key, None)
            delattr(module, key)
            if not harmless:
                removed.append(f"{type(module).__name__}.{key}")
    return removed


def _pipe_for(variant: Variant, model: BenchModel):
    peer = variant.peer
    if peer is None or not peer.isolated:
        return model.pipe
    if "pipe" not in peer.state:
        import copy

        peer.state["pipe"] = copy.deepcopy(model.pipe)
    return peer.state["pipe"]


def _apply(variant: Variant, model: BenchModel, steps: int, count_flops: bool, leftovers: set | None = None):
    """Install the variant; returns (remove function, handle or None)."""
    if variant.kind == "baseline":
        return (lambda: None), None
    if variant.kind == "peer":
        pipe = _pipe_for(variant, model)
        snapshot = _snapshot(pipe.transformer)
        variant.peer.enable(pipe, steps)

        def remove():
            try:
                variant.peer.disable(pipe)
            finally:
                removed = _restore(snapshot)
                if removed and leftovers is not None:
                    leftovers.add(f"{variant.label}: its removal left {', '.join(sorted(set(removed)))} behind; "
                                  "the bench deleted them before the next variant")

        return remove, None
    import ditaccel

    handle = ditaccel.enable_acceleration(model.pipe, variant.configs, count_flops=count_flops)
    return handle.remove, handle


def _transformer_flops(model: BenchModel, fn: Callable[[], Any]):
    from torch.utils.flop_counter import FlopCounterMode

    from ..hooks.flops import _custom_mapping

    key = type(model.pipe.transformer).__name__
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        result = fn()
    counts = counter.get_flop_counts()
    return result, float(sum(counts.get(key, {}).values()))


def _describe(variant: Variant) -> str:
    if variant.kind == "baseline":
        return "full compute (plain pipeline, no hooks)"
    if variant.kind == "peer":
        return variant.peer.description
    if variant.kind == "preset":
        from ..config import resolve_configs

        return f"ditaccel preset {variant.configs!r}: " + ", ".join(repr(c) for c in resolve_configs(variant.configs, {}))
    return "ditaccel " + ", ".join(repr(c) for c in variant.configs)


def _fail(r: VariantResult, prefix: str, exc: BaseException) -> None:
    import traceback

    r.status, r.error = "failed", prefix + _error_text(exc)
    r.traceback = traceback.format_exc()
    r.wall_s, r.cpu_s, r.peak_mem_mb, r.outputs = [], [], None, None
    r.flops_skipped_fraction = r.flops_source = r.transformer_flops = None


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def run_bench(model: BenchModel, variants: list[Variant], steps: int, seed: int, repeats: int, device: str,
              progress: bool = True) -> tuple[list[VariantResult], list[str]]:
    from tqdm.auto import tqdm

    notes: list[str] = []
    leftovers: set[str] = set()
    results = [VariantResult(v, description=_describe(v)) for v in variants]
    for r in results:
        peer = r.variant.peer
        if peer is not None and peer.error:
            r.status, r.error = "unavailable", peer.error
    baseline = results[0]
    assert baseline.variant.kind == "baseline"
    want_measured_flops = any(r.variant.kind == "peer" and r.ok for r in results)

    bar = tqdm(total=sum(1 + repeats for r in results if r.ok), desc="bench", unit="run", disable=None if progress else True,
               leave=False, dynamic_ncols=True)

    # peers that need one-off preparation (MagCache calibration), untimed
    for r in results:
        peer = r.variant.peer
        if r.ok and peer is not None and peer.prepare is not None:
            try:
                pipe = _pipe_for(r.variant, model)
                peer.prepare(pipe, steps, lambda: generate(model, steps, seed, device, pipe))
            except Exception as exc:  # noqa: BLE001
                _fail(r, "preparation: ", exc)
                bar.total -= 1 + repeats

    # pass 1: outputs, stats, FLOPs, memory (untimed; also the warm-up)
    for r in results:
        if not r.ok:
            continue
        bar.set_postfix_str(f"{r.variant.label} (untimed)")
        remove = None
        try:
            remove, handle = _apply(r.variant, model, steps, count_flops=True, leftovers=leftovers)
            pipe = _pipe_for(r.variant, model)
            gc.collect()
            with PeakMemory(device) as mem:
                if want_measured_flops and r.variant.kind in ("baseline", "peer"):
                    r.outputs, r.transformer_flops = _transformer_flops(
                        model, lambda: generate(model, steps, seed, device, pipe))
                else:
                    r.outputs = generate(model, steps, seed, device, pipe)
            r.peak_mem_mb = None if mem.peak_delta is None else mem.peak_delta / 2**20
            if handle is not None:
                r.stats = handle.stats()
                r.flops_skipped_fraction = r.stats.get("flops_skipped_fraction")
                r.flops_source = "ditaccel stats"
        except Exception as exc:  # noqa: BLE001
            if r is baseline:
                raise
            _fail(r, "", exc)
            bar.total -= repeats
        finally:
            if remove is not None:
                try:
                    remove()
                except Exception as exc:  # noqa: BLE001
                    if r.ok:
                        _fail(r, "removal: ", exc)
        bar.update(1)
    if baseline.transformer_flops:
        for r in results:
            if r.variant.kind == "peer" and r.transformer_flops is not None:
                r.flops_skipped_fraction = max(0.0, 1.0 - r.transformer_flops / baseline.transformer_flops)
                r.flops_source = "measured (FlopCounterMode)"

    # pass 2: timed, interleaved, rotated order per repeat
    drift = 0.0
    for rep in range(repeats):
        live = [r for r in results if r.ok]
        shift = rep % len(live)
        for r in live[shift:] + live[:shift]:
            bar.set_postfix_str(f"{r.variant.label} ({rep + 1}/{repeats})")
            remove = None
            try:
                remove, _ = _apply(r.variant, model, steps, count_flops=False, leftovers=leftovers)
                pipe = _pipe_for(r.variant, model)
                gc.collect()
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                out = generate(model, steps, seed, device, pipe)
                t1, c1 = time.perf_counter(), time.process_time()
                r.wall_s.append(t1 - t0)
                r.cpu_s.append(c1 - c0)
                if r is baseline and out.images is not None and baseline.outputs.images is not None:
                    drift = max(drift, float((out.images - baseline.outputs.images).abs().max()))
            except Exception as exc:  # noqa: BLE001
                if r is baseline:
                    raise
                _fail(r, "", exc)
            finally:
                if remove is not None:
                    remove()
            bar.update(1)
    bar.close()
    notes += sorted(leftovers)
    if drift > 0:
        notes.append(f"the full-compute output changed between runs (max abs image diff {drift:.3g}): a variant's "
                     "removal may leave state behind, or the backend is non-deterministic")

    # fidelity and speedups
    ref = baseline.outputs
    for r in results:
        if not r.ok or r.outputs is None:
            continue
        r.fidelity = metrics.fidelity(r.outputs.latents, ref.latents, r.outputs.images, ref.images)
        if r.wall_s and baseline.wall_s:
            r.speedup = baseline.wall_median / r.wall_median
            r.cpu_speedup = baseline.cpu_median / r.cpu_median if r.cpu_median else None
    return results, notes
