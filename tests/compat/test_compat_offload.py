"""CPU offloading (accelerate's model offload, diffusers' group offloading) with acceleration.

This machine has no accelerator, so the offload "device" is the CPU itself: nothing moves, but the
hooks are the real ones (accelerate's forward wrapper for model offload; diffusers HookRegistry
hooks on every block or leaf module for group offloading), and what is checked is that they
compose with ours in either order and that remove() leaves the offload hooks working.
"""

from __future__ import annotations

import pytest
import torch

import diffusers
import ditaccel
from compat_helpers import TOLERANCE, rel_err, run
from helpers.tiny import tiny_pipeline

CPU = torch.device("cpu")
CONFIG = ditaccel.StepCacheConfig(interval=2, warmup_steps=2, final_steps=1)


def _offload(pipe, how):
    if how == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif how == "group-block":
        pipe.transformer.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="block_level",
                                              num_blocks_per_group=1)
    elif how == "group-leaf":
        pipe.transformer.enable_group_offload(onload_device=CPU, offload_device=CPU, offload_type="leaf_level")


def _group_offload_runs_without_accelerator() -> bool:
    """diffusers 0.35's group offloading asks torch for the current accelerator when it is set up
    and fails on a machine without one, even with a CPU onload device (no ditaccel involved)."""
    try:
        pipe = tiny_pipeline("flux")
        _offload(pipe, "group-block")
        run(pipe, "flux", steps=1)
        return True
    except AttributeError:
        return False


@pytest.fixture(scope="module")
def plain():
    pipe = tiny_pipeline("flux")
    ref = run(pipe, "flux", steps=8)
    with ditaccel.enable_acceleration(pipe, CONFIG):
        acc = run(pipe, "flux", steps=8)
    return ref, acc


@pytest.mark.parametrize("order", ["offload-first", "accelerate-first"])
@pytest.mark.parametrize("how", ["model", "group-block", "group-leaf"])
def test_offload_composes(how, order, plain):
    ref_plain, acc_plain = plain
    if how.startswith("group") and not _group_offload_runs_without_accelerator():
        pytest.skip(f"diffusers {diffusers.__version__}: group offloading needs an accelerator (fails without ditaccel)")
    pipe = tiny_pipeline("flux")
    if order == "offload-first":
        _offload(pipe, how)
        assert torch.equal(run(pipe, "flux", steps=8), ref_plain)
        handle = ditaccel.enable_acceleration(pipe, CONFIG)
    else:
        handle = ditaccel.enable_acceleration(pipe, CONFIG)
        _offload(pipe, how)
    acc = run(pipe, "flux", steps=8)
    stats = handle.stats()
    handle.remove()
    assert stats["methods"]["StepCache"]["cached"] > 0
    assert torch.equal(acc, acc_plain), "offload changed the accelerated computation"
    assert rel_err(acc, ref_plain) < TOLERANCE["StepCache"]
    assert torch.equal(run(pipe, "flux", steps=8), ref_plain), "offloaded pipeline differs after remove()"
