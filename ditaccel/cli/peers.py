"""Peer methods run by ``ditaccel bench --compare-peers`` on the same pipeline, seeds and run:
diffusers' own caches (FirstBlockCache, TaylorSeerCache, MagCache via ``transformer.enable_cache``)
and cache-dit's DBCache, with and without its TaylorSeer calibrator, when it is importable. A peer that cannot run is reported with its error."""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Peer:
    label: str
    description: str
    # prepare(pipe, steps, run) -> None: one-off work before the runs (e.g. MagCache calibration);
    # ``run()`` makes one full-compute generation of the bench's call.
    enable: Callable[[Any, int], None]
    disable: Callable[[Any], None]
    prepare: Callable[[Any, int, Callable[[], Any]], None] | None = None
    error: str | None = None
    # run on a private deep copy of the pipeline: for peers whose removal does not restore it
    isolated: bool = False
    state: dict = field(default_factory=dict)


def _enable_cache(config_factory):
    def enable(pipe, steps):
        pipe.transformer.enable_cache(config_factory(steps))

    return enable


def _disable_cache(pipe):
    transformer = pipe.transformer
    if getattr(transformer, "is_cache_enabled", False):
        transformer.disable_cache()


def _first_block_cache() -> Peer:
    from diffusers.hooks import FirstBlockCacheConfig

    return Peer("diffusers:FirstBlockCache", "diffusers FirstBlockCacheConfig(threshold=0.05) (default)",
                _enable_cache(lambda steps: FirstBlockCacheConfig(threshold=0.05)), _disable_cache)


def _taylorseer_cache() -> Peer:
    import torch
    from diffusers.hooks import TaylorSeerCacheConfig

    def make(steps):
        return TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3, max_order=1,
                                     taylor_factors_dtype=torch.float32)

    return Peer("diffusers:TaylorSeerCache",
                "diffusers TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3, max_order=1), "
                "fp32 factors", _enable_cache(make), _disable_cache)


def _mag_cache() -> Peer:
    from diffusers.hooks import MagCacheConfig

    peer = Peer("diffusers:MagCache", "", None, _disable_cache)  # type: ignore[arg-type]

    def prepare(pipe, steps, run):
        # MagCache needs model-specific magnitude ratios: calibrate them on this model first
        # (diffusers prints them at the end of a calibrate=True generation).
        pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                run()
        finally:
            _disable_cache(pipe)
        found = re.findall(r"\[([^\[\]]+)\]", buf.getvalue().split("Calibration Complete", 1)[-1])
        if not found:
            raise RuntimeError("MagCache calibration printed no ratios")
        peer.state["ratios"] = [float(v) for v in found[-1].split(",")]

    def enable(pipe, steps):
        pipe.transformer.enable_cache(MagCacheConfig(threshold=0.06, max_skip_steps=3, retention_ratio=0.2,
                                                     num_inference_steps=steps, mag_ratios=peer.state["ratios"]))

    peer.enable = enable
    peer.prepare = prepare
    peer.description = ("diffusers MagCacheConfig(threshold=0.06, max_skip_steps=3, retention_ratio=0.2), "
                        "mag_ratios calibrated on this model and call (one untimed calibrate=True run)")
    return peer


def _import_cache_dit():
    """cache-dit with its INFO logging (every step of its setup) turned down to warnings."""
    import cache_dit  # noqa: PLC0415

    try:
        import logging

        from cache_dit import logger as _cd_logger  # noqa: PLC0415

        handler = getattr(_cd_logger, "_default_handler", None)
        if handler is not None:
            handler.setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001
        pass
    return cache_dit


def _cache_dit_peer(calibrated: bool) -> Peer:
    label = "cache-dit:DBCache-F1B0" + ("+TaylorSeer" if calibrated else "")
    try:
        cache_dit = _import_cache_dit()
    except Exception as exc:  # noqa: BLE001
        return Peer(label, "cache-dit (DBCache)", lambda p, s: None, lambda p: None,
                    error=f"not importable ({type(exc).__name__}: {exc}); `pip install cache-dit` to compare")

    def enable(pipe, steps):
        # The default DBCache (F8B0, 8 warm-up steps) needs >= 8 blocks in a stack; F1B0 is cache-dit's
        # first-block variant and fits any model. Same threshold as cache-dit's default (0.08).
        config = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.08,
                                         max_warmup_steps=min(8, max(1, steps // 4)), num_inference_steps=steps)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if calibrated else None
        cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)

    def disable(pipe):
        cache_dit.disable_cache(pipe)

    extra = ", TaylorSeerCalibratorConfig(order 1) on the cached residuals" if calibrated else ""
    return Peer(label,
                f"cache-dit {getattr(cache_dit, '__version__', '?')} DBCacheConfig(Fn=1, Bn=0, rdt=0.08, "
                f"warm-up min(8, steps/4)){extra}; on a deep copy of the pipeline, since its disable_cache does "
                "not fully restore it (diffusers' FirstBlockCache fails on the same pipeline afterwards)",
                enable, disable, isolated=True)


def _cache_dit() -> Peer:
    return _cache_dit_peer(calibrated=False)


def _cache_dit_taylorseer() -> Peer:
    return _cache_dit_peer(calibrated=True)


PEER_FACTORIES = [_first_block_cache, _taylorseer_cache, _mag_cache, _cache_dit, _cache_dit_taylorseer]


def build_peers() -> list[Peer]:
    peers = []
    for factory in PEER_FACTORIES:
        name = factory.__name__.strip("_")
        try:
            peers.append(factory())
        except Exception as exc:  # noqa: BLE001 - an unavailable peer is reported, not hidden
            peers.append(Peer(name, name, lambda p, s: None, lambda p: None,
                              error=f"unavailable ({type(exc).__name__}: {exc})"))
    return peers
