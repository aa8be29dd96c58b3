"""Two processes on loopback (gloo, CPU): diffusers context parallelism with ditaccel enabled gives
the single-process result, and a decision that differs between ranks is made identical."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

import diffusers  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built"),
    pytest.mark.skipif(not hasattr(diffusers, "ContextParallelConfig"),
                       reason="this diffusers has no context parallelism (added after 0.35)"),
]

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_flux_pipe():
    from test_api import _tiny_flux_pipe as build

    return build()


def _run(pipe, steps=6):
    from test_api import run

    return run(pipe, steps=steps, size=64)


def _worker(rank, world, port, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        import ditaccel
        from diffusers import ContextParallelConfig

        from ditaccel.hooks.distributed import RankSync

        # diffusers picks the rank's device as rank % accelerator count, which is 0 on a CPU-only
        # machine; one "device" (the CPU) is what this test has.
        torch.accelerator.device_count = lambda: 1

        sync = RankSync()
        forced = sync.agree(rank == 1)  # only rank 1 wants to compute
        mean = sync.mean_signal(float(rank))

        pipe = _tiny_flux_pipe()
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        with ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig(interval=2, warmup_steps=1)) as handle:
            out = _run(pipe)
            cached = handle.stats()["methods"]["StepCache"]["cached"]
        queue.put((rank, forced, mean, out.numpy(), cached, None))  # numpy pickles by value
    except Exception:  # reported to the parent, which fails the test with the traceback
        import traceback

        queue.put((rank, None, None, None, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_context_parallel_two_ranks_match_single_process():
    import ditaccel

    pipe = _tiny_flux_pipe()
    with ditaccel.enable_acceleration(pipe, ditaccel.StepCacheConfig(interval=2, warmup_steps=1)) as handle:
        single = _run(pipe)
        single_cached = handle.stats()["methods"]["StepCache"]["cached"]

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=200) for _ in procs]
    for p in procs:
        p.join(30)
    results.sort(key=lambda r: r[0])
    for rank, *_, error in results:
        assert error is None, f"rank {rank} failed:\n{error}"
    for rank, forced, mean, out, cached, _ in results:
        assert forced is True, "a compute decision wanted by one rank must be taken by all"
        assert mean == pytest.approx(0.5)
        assert cached == single_cached > 0
        torch.testing.assert_close(torch.from_numpy(out), single, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# adaptive decisions agreed across ranks

# steps at which each rank's (forced) probe signal says "compute"; every other probe says "cache"
WANT = {0: {3, 6}, 1: {4}}
ADAPTIVE_STEPS = 9


def _adaptive_worker(rank, world, port, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        import ditaccel
        from diffusers import ContextParallelConfig

        from ditaccel.methods import adaptive

        torch.accelerator.device_count = lambda: 1
        current = {}
        on_probe, end_call = adaptive.StepController.on_probe, adaptive.StepController.end_call
        log: list = []

        def probe(self, h_in, h_out):
            current["step"] = self.info.step if self.info is not None else None
            return on_probe(self, h_in, h_out)

        def signal(actual, reference):  # this rank's signal, forced to differ from the other rank's
            return 1.0 if current.get("step") in WANT[rank] else 0.0

        def end(self):
            step = self.info.step if self.info is not None else None
            mode = end_call(self)
            log.append((step, mode))
            return mode

        adaptive.StepController.on_probe = probe
        adaptive.relative_l1 = signal
        adaptive.StepController.end_call = end
        config = ditaccel.DeltaCacheConfig(threshold=0.5, warmup_steps=1, final_steps=1, max_consecutive_cached=8,
                                           boundary_step=100)  # one stage: only the signals decide

        pipe = _tiny_flux_pipe()
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        with ditaccel.enable_acceleration(pipe, config) as handle:
            out = _run(pipe, steps=ADAPTIVE_STEPS)
            synced = (list(log), handle.stats()["methods"]["DeltaCache"]["cached"], handle._engine.sync.calls)
        log.clear()
        # control: the same signals without rank agreement, on an unsharded model (no collectives
        # inside the model, so differing decisions cannot hang the test)
        plain = _tiny_flux_pipe()
        with ditaccel.enable_acceleration(plain, config, sync_ranks=False):
            _run(plain, steps=ADAPTIVE_STEPS)
        queue.put((rank, synced, list(log), out.numpy(), None))
    except Exception:
        import traceback

        queue.put((rank, None, None, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_adaptive_decisions_are_identical_on_all_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_adaptive_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=200) for _ in procs]
    for p in procs:
        p.join(30)
    results.sort(key=lambda r: r[0])
    for rank, *_, error in results:
        assert error is None, f"rank {rank} failed:\n{error}"
    (_, (log0, cached0, calls0), alone0, out0, _), (_, (log1, cached1, calls1), alone1, out1, _) = results
    assert log0 == log1, "ranks made different caching decisions"
    assert cached0 == cached1 > 0 and calls0 == calls1 > 0
    decided = dict(log0)
    for step in WANT[0] | WANT[1]:
        assert decided[step] == "compute", f"step {step}: one rank asked to compute, all must ({log0})"
    assert any(mode == "cache" for _, mode in log0)
    torch.testing.assert_close(torch.from_numpy(out0), torch.from_numpy(out1), rtol=0, atol=0)
    # without agreement the same signals give different decisions: the check above can fail
    assert alone0 != alone1
    assert dict(alone0)[3] == "compute" and dict(alone1)[3] == "cache"
    assert dict(alone0)[4] == "cache" and dict(alone1)[4] == "compute"
