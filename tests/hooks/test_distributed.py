"""Two processes on loopback (gloo, CPU): diffusers context parallelism with ditaccel enabled gives
the single-process result, and a decision that differs between ranks is made identical."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

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
