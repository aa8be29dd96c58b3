"""The one-line API: ``handle = ditaccel.enable_acceleration(pipe)``."""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn

from .adapters.registry import adapter_for, find_transformer
from .config import MethodConfig, apply_function_for, resolve_configs
from .errors import ConfigError, DitAccelError, describe
from .hooks.engine import Engine

_HANDLE_ATTR = "_ditaccel_handle"


class AccelerationHandle:
    """What ``enable_acceleration`` returns: stats, removal, and a context-manager form.

    ``with ditaccel.enable_acceleration(pipe) as handle: ...`` removes the acceleration on exit.
    """

    def __init__(self, engine: Engine, configs: list[MethodConfig], owner):
        self._engine = engine
        self.configs = tuple(configs)
        self._owner = owner
        self.active = True

    @property
    def adapter(self):
        return self._engine.adapter

    @property
    def family(self) -> str:
        return self._engine.adapter.family

    @property
    def clock(self):
        """The step clock. Drive it yourself for a bare transformer: ``handle.clock.begin_generation(28)``."""
        return self._engine.clock

    def stats(self) -> dict[str, Any]:
        """Steps run, per-method computed/cached/forecast counts, flops_skipped_fraction, bytes held."""
        return self._engine.stats()

    def reset_stats(self) -> None:
        self._engine.reset_stats()

    def set_num_steps(self, total_steps: int | None) -> None:
        """For a bare transformer (no pipeline scheduler to read): the step count of each generation."""
        if not self.active:
            raise DitAccelError("set_num_steps was called on a removed AccelerationHandle: expected an active "
                                "handle. Enable again (handle = ditaccel.enable_acceleration(...)) and use the new one.")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ConfigError(f"set_num_steps expects a step count >= 1 or None, got {describe(total_steps)}.")
        self._engine.clock.set_num_steps(total_steps)

    def remove(self) -> None:
        """Detach every hook; the model is exactly as before ``enable_acceleration``."""
        if not self.active:
            return
        self._engine.remove()
        self.active = False
        for obj in (self._owner, self._engine.model):
            if getattr(obj, _HANDLE_ATTR, None) is self:
                delattr(obj, _HANDLE_ATTR)

    def __enter__(self) -> "AccelerationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        methods = ", ".join(c.method_name for c in self.configs)
        return f"AccelerationHandle({self.family}: {methods}; {state})"


def enable_acceleration(pipe_or_model, config: Any = "balanced", *, family: str | None = None,
                        count_flops: bool = True, nan_guard: bool = True, sync_ranks: bool | str = "auto",
                        **overrides) -> AccelerationHandle:
    """Accelerate a diffusers DiT pipeline (or a bare transformer) in place.

    Args:
        pipe_or_model: a diffusers pipeline with a ``transformer`` component, or the transformer.
        config: a preset name (``"quality"``, ``"balanced"``, ``"fast"``), one method config
            (e.g. ``ditaccel.StepCacheConfig(interval=3)``), or a list of method configs.
        family: force a model family instead of detecting it from the transformer class.
        count_flops: profile the FLOPs of the first call of each input shape, for
            ``stats()["flops_skipped_fraction"]``.
        nan_guard: after a transformer call in which a method cached, forecast or sparsified, check
            that its output is finite; if not, run the call again in full (caches refreshed from it),
            warn once and count it in ``stats()["nonfinite_fallbacks"]``. One ``isfinite`` reduction
            of the output per approximated call.
        sync_ranks: ``"auto"`` (default): under ``torch.distributed`` with more than one rank, every
            data-dependent decision (adaptive thresholds, non-finite fallbacks) is agreed across the
            ranks of the default process group (compute if any rank wants to), so collectives inside
            the model stay paired. ``False``: each rank decides alone (only safe when each rank runs
            its own, unsharded generation). ``True``: the same as ``"auto"``.
        **overrides: fields of the chosen method config(s), e.g. ``interval=3``.

    Enabling again replaces the previous acceleration. On any error nothing stays attached.
    """
    configs = resolve_configs(config, overrides)
    if not isinstance(count_flops, bool):
        raise ConfigError(f"count_flops must be True or False, got {describe(count_flops)}.")
    if not isinstance(nan_guard, bool):
        raise ConfigError(f"nan_guard must be True or False, got {describe(nan_guard)}.")
    if not (isinstance(sync_ranks, bool) or (isinstance(sync_ranks, str) and sync_ranks == "auto")):
        raise ConfigError(f"sync_ranks must be 'auto', True or False, got {describe(sync_ranks)}. "
                          "Use 'auto' (the default) unless each rank runs its own unsharded generation.")
    model, pipeline = find_transformer(pipe_or_model)
    adapter = adapter_for(model, family=family)
    apply_fns = [apply_function_for(c) for c in configs]

    previous = getattr(model, _HANDLE_ATTR, None)
    if previous is not None:
        previous.remove()
    # The pipeline's transformer was swapped since it was enabled: the old transformer's handle
    # follows this pipeline's scheduler, so it is removed too (the old transformer is plain again).
    stale = getattr(pipeline, _HANDLE_ATTR, None) if pipeline is not None else None
    if stale is not None and stale is not previous and stale.active:
        stale.remove()

    engine = Engine(adapter, pipeline=pipeline, count_flops=count_flops, nan_guard=nan_guard, sync_ranks=sync_ranks)
    methods = [fn(engine, c) for fn, c in zip(apply_fns, configs)]
    engine.install(methods)
    owner = pipeline if pipeline is not None else model
    handle = AccelerationHandle(engine, configs, owner)
    setattr(model, _HANDLE_ATTR, handle)
    if pipeline is not None:
        setattr(pipeline, _HANDLE_ATTR, handle)
    return handle


def disable_acceleration(pipe_or_model) -> bool:
    """Remove ditaccel from a pipeline or transformer. Returns True if something was removed."""
    model, pipeline = find_transformer(pipe_or_model)
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        return False
    handle.remove()
    return True


def get_handle(pipe_or_model) -> AccelerationHandle | None:
    model, _ = find_transformer(pipe_or_model)
    return getattr(model, _HANDLE_ATTR, None)


@contextlib.contextmanager
def accelerated(pipe_or_model, config: Any = "balanced", **kwargs):
    """``with ditaccel.accelerated(pipe, "fast") as handle: pipe(...)``."""
    handle = enable_acceleration(pipe_or_model, config, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
