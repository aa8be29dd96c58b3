"""State and memory: long runs keep memory flat, handles do not share state (pipelines, threads),
and the acceleration composes with accelerate's model CPU offload and diffusers' group offloading."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import ditaccel
from ditaccel.hooks.attach import count_our_hooks
from tests.reliability.common import approximated, flux_pipe, generate, pristine, release_freed_memory, rss_bytes

SIZE = 64  # 32x32 latents, 256 image tokens
WARMUP, GENERATIONS = 10, 100
# Bound on RSS growth over the 90 measured generations. Measured growth of these runs (allocator,
# interpreter noise): 0-32 KB. A leak of one generation's caches (handle.stats()["bytes_held"]:
# 17 KB for the step cache, ~100 KB for balanced and RAS here) would add 1.5-9 MB; the
# sensitivity test below shows such a leak is caught.
RSS_BOUND = 1 << 20

CONFIGS = {
    "balanced": "balanced",
    "stepcache": lambda: ditaccel.StepCacheConfig(interval=2, warmup_steps=2),
    "ras": lambda: ditaccel.RASConfig(active_fraction=0.5, warmup_steps=1, max_stale_steps=2),
}


def _config(name):
    c = CONFIGS[name]
    return c() if callable(c) else c


def _rss_growth(pipe, generations: int, leak: list | None = None, handle=None) -> tuple[int, int]:
    for _ in range(WARMUP):
        generate(pipe, size=SIZE)
    release_freed_memory()
    base = rss_bytes()
    for _ in range(generations - WARMUP):
        generate(pipe, size=SIZE)
        if leak is not None:  # sensitivity check: keep one copy of the caches per generation
            leak.append(torch.empty(handle.stats()["bytes_held"] // 4 + 1).fill_(1.0))
    release_freed_memory()
    return rss_bytes() - base, base


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["balanced", "stepcache", "ras"])
def test_hundred_generations_keep_memory_flat(name):
    pipe = flux_pipe()
    with ditaccel.enable_acceleration(pipe, _config(name)) as handle:
        growth, _ = _rss_growth(pipe, GENERATIONS)
        stats = handle.stats()
    assert stats["generations"] == GENERATIONS
    assert approximated(stats) > 0, stats  # the method did work in these runs
    assert growth < RSS_BOUND, f"{name}: RSS grew by {growth} bytes over {GENERATIONS - WARMUP} generations"


@pytest.mark.timeout(600)
def test_memory_check_detects_a_leak_of_one_cache_per_generation():
    """The measure above is sensitive enough: keeping one cache copy per generation exceeds the bound."""
    pipe = flux_pipe()
    leak: list = []
    with ditaccel.enable_acceleration(pipe, "balanced") as handle:
        growth, _ = _rss_growth(pipe, GENERATIONS, leak=leak, handle=handle)
    assert growth > RSS_BOUND, f"a leak of {sum(t.numel() * 4 for t in leak)} bytes was not visible ({growth})"


def _run_sequence(pipe, seeds):
    return [generate(pipe, seed=s) for s in seeds]


def test_two_pipelines_with_separate_handles_do_not_share_state():
    a, b = flux_pipe(), flux_pipe()
    # different weights in b (a LoRA-free "other model"), so a shared cache could not go unnoticed
    with torch.no_grad():
        for p in b.transformer.parameters():
            p.mul_(1.05)
    seeds_a, seeds_b = [0, 1, 2], [5, 6, 7]
    with ditaccel.enable_acceleration(a, "balanced"):
        solo_a = _run_sequence(a, seeds_a)
    with ditaccel.enable_acceleration(b, ditaccel.TaylorSeerConfig(interval=2, warmup_steps=1)):
        solo_b = _run_sequence(b, seeds_b)
    ha = ditaccel.enable_acceleration(a, "balanced")
    hb = ditaccel.enable_acceleration(b, ditaccel.TaylorSeerConfig(interval=2, warmup_steps=1))
    inter_a, inter_b = [], []
    for sa, sb in zip(seeds_a, seeds_b):
        inter_a.append(generate(a, seed=sa))
        inter_b.append(generate(b, seed=sb))
    assert ha.stats()["generations"] == hb.stats()["generations"] == 3
    assert approximated(ha.stats()) > 0 and hb.stats()["methods"]["TaylorSeer"]["forecast"] > 0
    ha.remove()
    hb.remove()
    for x, y in zip(inter_a, solo_a):
        assert torch.equal(x, y)
    for x, y in zip(inter_b, solo_b):
        assert torch.equal(x, y)
    assert pristine(a.transformer) and pristine(b.transformer)


@pytest.mark.timeout(300)
def test_threads_each_with_own_pipeline_and_handle_match_sequential_runs():
    configs = ["balanced", ditaccel.StepCacheConfig(interval=2, warmup_steps=1),
               ditaccel.SVG2Config(q_clusters=4, k_clusters=4, kmeans_iters_first=3, dense_steps_fraction=0.2,
                                   dense_layers=0)]
    seeds = [0, 1, 2, 3]
    pipes = [flux_pipe() for _ in configs]
    sequential = []
    for pipe, cfg in zip(pipes, configs):
        with ditaccel.enable_acceleration(pipe, cfg):
            sequential.append(_run_sequence(pipe, seeds))
    results: list = [None] * len(pipes)
    errors: list = []
    barrier = threading.Barrier(len(pipes))

    def work(i):
        try:
            with ditaccel.enable_acceleration(pipes[i], configs[i]) as handle:
                barrier.wait()
                results[i] = (_run_sequence(pipes[i], seeds), handle.stats())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pipes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    for i, (outs, stats) in enumerate(results):
        assert stats["generations"] == len(seeds)
        for x, y in zip(outs, sequential[i]):
            assert torch.equal(x, y), f"thread {i} ({configs[i]}) differs from its sequential run"
    assert results[2][1]["methods"]["SVG2"]["sparse"] > 0


# ---------------------------------------------------------------------------------------------
# offloading


def SC():
    return ditaccel.StepCacheConfig(interval=2, warmup_steps=2)


def _accelerate_state(model):
    return model.__dict__.get("_hf_hook"), model.__dict__.get("_old_forward")


def _check_offload(order: str):
    pipe = flux_pipe()
    ref = [generate(pipe, seed=s) for s in (0, 1, 2)]
    with ditaccel.enable_acceleration(pipe, SC()) as h:
        acc = [generate(pipe, seed=s) for s in (0, 1, 2)]
        cached_plain = h.stats()["methods"]["StepCache"]["cached"]
    assert cached_plain > 0
    if order == "offload_first":
        pipe.enable_model_cpu_offload(device="cpu")
        handle = ditaccel.enable_acceleration(pipe, SC())
    else:
        handle = ditaccel.enable_acceleration(pipe, SC())
        pipe.enable_model_cpu_offload(device="cpu")
    outs = [generate(pipe, seed=s) for s in (0, 1, 2)]  # maybe_free_model_hooks re-adds accelerate's hook each time
    stats = handle.stats()
    assert stats["generations"] == 3, stats
    assert stats["methods"]["StepCache"]["cached"] == cached_plain, "the acceleration was lost after a generation"
    for x, y in zip(outs, acc):
        assert torch.equal(x, y)
    model = pipe.transformer
    hook, _ = _accelerate_state(model)
    assert hook is not None
    handle.remove()
    hook_after, old_after = _accelerate_state(model)
    assert hook_after is not None, "removal must leave accelerate's offload hook in place"
    assert getattr(old_after, "__func__", None) is type(model).forward, "accelerate must wrap the plain forward again"
    assert pristine(model)
    for x, y in zip([generate(pipe, seed=s) for s in (0, 1, 2)], ref):
        assert torch.equal(x, y)
    # offload still works after removal and the next generation's re-hooking
    assert model.__dict__.get("_hf_hook") is not None
    pipe.remove_all_hooks()
    assert count_our_hooks(model) == 0


@pytest.mark.parametrize("order", ["offload_first", "enable_first"])
def test_model_cpu_offload_both_orders(order):
    _check_offload(order)


@pytest.mark.parametrize("order", ["offload_first", "enable_first"])
def test_group_offloading_both_orders(order):
    pipe = flux_pipe()
    ref = generate(pipe)
    with ditaccel.enable_acceleration(pipe, SC()) as h:
        acc = generate(pipe)
        cached_plain = h.stats()["methods"]["StepCache"]["cached"]
    assert cached_plain > 0
    cpu = torch.device("cpu")

    def offload():
        pipe.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                                              num_blocks_per_group=1)

    if order == "offload_first":
        offload()
        handle = ditaccel.enable_acceleration(pipe, SC())
    else:
        handle = ditaccel.enable_acceleration(pipe, SC())
        offload()
    assert torch.equal(generate(pipe), acc)
    assert torch.equal(generate(pipe), acc)
    assert handle.stats()["methods"]["StepCache"]["cached"] == 2 * cached_plain
    handle.remove()
    assert torch.equal(generate(pipe), ref)
    assert count_our_hooks(pipe.transformer) == 0
