"""Benchmark block-sparse attention against dense attention.

GPU (CUDA + Triton): Triton block-sparse kernel vs dense F.scaled_dot_product_attention, bf16,
densities 5-50%, lengths 4k-75k, head dims 64/128.  TFLOP/s counts 4*B*H*Lq*Lk*d (x density for
sparse); speedup = dense time / sparse time.  Default output dir: bench/results/<gpu-name>/.

CPU: PyTorch gather path vs dense SDPA at density 10%, 8k tokens, one thread; median of
interleaved runs, wall and process CPU time.

    .venv/bin/python bench/kernels.py --device cpu
    .venv/bin/python bench/kernels.py --device cuda --out bench/results/h100
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ditaccel.attention.block_sparse import build_block_index  # noqa: E402
from ditaccel.attention.block_sparse_torch import block_sparse_attention_torch  # noqa: E402
from ditaccel.kernels.layouts import random_block_mask  # noqa: E402


def _layout(B, H, L, block, density, device, seed=0):
    n = math.ceil(L / block)
    g = torch.Generator().manual_seed(seed)
    mask = random_block_mask(B, H, n, n, density, g)
    sizes = torch.full((n,), block, dtype=torch.float64)
    sizes[-1] = L - block * (n - 1)
    kept = (mask.double() * sizes[:, None] * sizes[None, :]).sum() / (B * H * L * L)  # token-level density
    count, index = build_block_index(mask)
    return count.to(device), index.to(device), float(kept)


def _flops(B, H, L, D, density=1.0):
    return 4.0 * B * H * L * L * D * density


# ----------------------------------------------------------------------------------------------- CPU
def bench_cpu(args):
    torch.set_num_threads(1)
    B, H, L, D, block = args.batch, args.heads, args.cpu_len, args.cpu_head_dim, args.block
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    count, index, density = _layout(B, H, L, block, args.cpu_density, "cpu")

    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    def sparse():
        return block_sparse_attention_torch(q, k, v, count, index, block_m=block, block_n=block)

    runs = {"dense_sdpa": dense, "sparse_torch": sparse}
    for fn in runs.values():  # warm-up
        fn()
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved so drift and neighbours hit both alike
        for name, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    rows = []
    for name in runs:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        dens = 1.0 if name == "dense_sdpa" else density
        rows.append(dict(impl=name, B=B, H=H, L=L, D=D, block=block, density=dens, wall_s=w, cpu_s=c,
                         gflops=_flops(B, H, L, D, dens) / w / 1e9, wall_runs=wall[name], cpu_runs=cpu[name]))
    rows[1]["speedup_wall"] = rows[0]["wall_s"] / rows[1]["wall_s"]
    rows[1]["speedup_cpu"] = rows[0]["cpu_s"] / rows[1]["cpu_s"]
    return rows, {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def cpu_markdown(rows, meta):
    lines = [f"CPU ({meta['device']}, torch.set_num_threads({meta['threads']})), median of interleaved runs", "",
             "| impl | B | H | L | D | density | wall s | CPU s | GFLOP/s | speedup (wall / CPU) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup_wall']:.2f}x / {r['speedup_cpu']:.2f}x" if "speedup_wall" in r else "1x"
        lines.append(f"| {r['impl']} | {r['B']} | {r['H']} | {r['L']} | {r['D']} | {r['density']:.3f} | "
                     f"{r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['gflops']:.1f} | {sp} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- GPU
def _cuda_time(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench_gpu(args):
    from ditaccel.kernels.triton.block_sparse_attention import block_sparse_attention_triton

    rows = []
    B, H, block = args.batch, args.heads, args.block
    for L in args.lengths:
        for D in args.head_dims:
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
            t_dense = _cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
            rows.append(dict(impl="dense_sdpa", B=B, H=H, L=L, D=D, block=block, density=1.0, time_s=t_dense,
                             tflops=_flops(B, H, L, D) / t_dense / 1e12, speedup=1.0))
            for dens in args.densities:
                count, index, real = _layout(B, H, L, block, dens, "cuda")
                t = _cuda_time(lambda: block_sparse_attention_triton(q, k, v, count, index, block_m=block,
                                                                     block_n=block), args.repeats)
                rows.append(dict(impl="sparse_triton", B=B, H=H, L=L, D=D, block=block, density=real, time_s=t,
                                 tflops=_flops(B, H, L, D, real) / t / 1e12, speedup=t_dense / t))
                print(f"L={L} D={D} density={real:.3f}: {t * 1e3:.2f} ms, {rows[-1]['tflops']:.1f} TFLOP/s, "
                      f"{t_dense / t:.2f}x over dense", flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    return rows, {"device": torch.cuda.get_device_name(), "torch": torch.__version__}


def gpu_markdown(rows, meta):
    lines = [f"GPU {meta['device']}, bf16, median CUDA-event time", "",
             "| impl | L | D | density | ms | TFLOP/s | speedup |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['L']} | {r['D']} | {r['density']:.3f} | {r['time_s'] * 1e3:.2f} | "
                     f"{r['tflops']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, default=None, help="write results.json + results.md here "
                   "(GPU default: bench/results/<gpu-name>/)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default: 24 on GPU, 2 on CPU")
    p.add_argument("--block", type=int, default=None, help="block size; default 128 on GPU, 64 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="default 20 on GPU, 5 on CPU (>= 3)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 75600])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--cpu-len", type=int, default=8192)
    p.add_argument("--cpu-density", type=float, default=0.1)
    p.add_argument("--cpu-head-dim", type=int, default=64)
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        p.error("--device cuda given but torch.cuda.is_available() is False")
    args.heads = args.heads or (24 if on_gpu else 2)
    args.block = args.block or (128 if on_gpu else 64)
    args.repeats = max(3, args.repeats or (20 if on_gpu else 5))

    if on_gpu:
        rows, meta = bench_gpu(args)
        md = gpu_markdown(rows, meta)
        out = args.out or Path(__file__).resolve().parent / "results" / re.sub(r"[^A-Za-z0-9_.-]+", "-",
                                                                            meta["device"]).strip("-")
    else:
        rows, meta = bench_cpu(args)
        md = cpu_markdown(rows, meta)
        out = args.out
    print(md)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps({"meta": meta, "args": {k: str(v) for k, v in vars(args).items()},
                                                      "rows": rows}, indent=2))
        (out / "kernels.md").write_text(md + "\n")
        print(f"wrote {out / 'kernels.json'} and {out / 'kernels.md'}")


if __name__ == "__main__":
    main()
