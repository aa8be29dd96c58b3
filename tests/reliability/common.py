"""Shared helpers of the reliability tests: tiny FLUX pipelines, one generation, pristine checks."""

from __future__ import annotations

import gc

import torch

from ditaccel.hooks.attach import count_our_hooks
from tests.helpers import tiny

STEPS = 6


def flux_pipe():
    pipe = tiny.tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps: int = STEPS, seed: int = 0, size: int | None = None, case: str = "flux") -> torch.Tensor:
    kw = tiny.call_kwargs(case, steps=steps, seed=seed)
    if size is not None:
        kw.update(height=size, width=size)
    with torch.no_grad():
        return tiny.output_of(case, pipe(**kw))


def pristine(module: torch.nn.Module) -> bool:
    """No ditaccel hook and no instance ``forward`` left behind (diffusers itself may keep an empty
    hook registry on the transformer: a plain pipeline call creates one)."""
    if count_our_hooks(module) != 0:
        return False
    for m in module.modules():
        fwd = m.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is type(m).forward:
            return False
    return True


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so that RSS measures live
    memory rather than what earlier tests in this process freed; no-op where unavailable."""
    import ctypes
    import ctypes.util

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (Linux)."""
    import os

    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


APPROXIMATION_KEYS = ("cached", "forecast", "sparse", "sparse_calls")


def approximated(stats: dict) -> int:
    """Module calls / attention calls / RAS calls that were not the full computation, over all methods."""
    return sum(int(m.get(k, 0)) for m in stats["methods"].values() for k in APPROXIMATION_KEYS)
