"""Benchmark block-sparse attention against dense attention.

GPU (CUDA + Triton): Triton block-sparse kernel vs dense F.scaled_dot_product_attention, bf16,
densities 5-50%, lengths 4k-75k, head dims 64/128.  TFLOP/s counts 4*B*H*Lq*Lk*d (x density for
sparse); speedup = dense time / sparse time.  Density 1.0 is the kernel's dense mode (every block
kept).  --svg2 adds the SVG2 pipeline breakdown on clustered synthetic q/k/v: warm k-means (2
iterations, Q and K), permutation (torch gather vs the csrc/ CUDA extension), block-index build
(top-p cluster selection + query-block split), variable-block attention, against dense SDPA.
--kmeans adds the k-means assignment step alone (fused Triton kernel vs torch bmm + argmax) at
SVG2-like shapes: 24 heads, 32k points, 500 and 100 centroids, D=128, fp32 and bf16 (fp32 both with
and without TF32); --kmeans-only runs just that.  Default output dir: bench/results/<gpu-name>/.

CPU: PyTorch gather path vs dense SDPA at density 10%, 8k tokens, one thread; median of
interleaved runs, wall and process CPU time.

    .venv/bin/python bench/kernels.py --device cpu
    python bench/kernels.py --device cuda --densities 0.05 0.1 0.2 0.3 0.5 1.0 --svg2
    python bench/kernels.py --device cuda --kmeans-only
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

    torch.backends.cuda.matmul.allow_tf32 = True
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
            dense_mode = [r for r in rows[-len(args.densities):] if r["density"] >= 0.999]
            for r in rows[-len(args.densities):]:
                r["target_speedup"] = 0.6 / r["density"]  # issue #7: speedup >= 0.6 / density
                if dense_mode:  # throughput on the kept blocks relative to the kernel's own dense mode
                    r["kept_vs_dense_mode"] = r["tflops"] / dense_mode[0]["tflops"]
            del q, k, v
            torch.cuda.empty_cache()
    import triton

    return rows, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "sdpa_backends": {n: getattr(torch.backends.cuda, f"{n}_sdp_enabled")()
                                    for n in ("flash", "mem_efficient", "cudnn", "math")
                                    if hasattr(torch.backends.cuda, f"{n}_sdp_enabled")}}


def _clustered(G, N, D, clusters, gen, dtype):
    """Points around random centres (a stand-in for real q/k, which cluster well per head)."""
    centres = torch.randn(G, clusters, D, device="cuda", generator=gen) * 2.0
    which = torch.randint(0, clusters, (G, N), device="cuda", generator=gen)
    x = torch.gather(centres, 1, which.unsqueeze(-1).expand(G, N, D))
    return (x + torch.randn(G, N, D, device="cuda", generator=gen)).to(dtype)


def bench_svg2_breakdown(args):
    """Per-stage CUDA time of one warm SVG2 attention call vs dense SDPA (issue #7 overhead targets)."""
    from ditaccel.attention.kmeans import cluster_permutation, kmeans
    from ditaccel.attention.sparse_method import permute_tokens, run_block_sparse, unpermute_tokens
    from ditaccel.kernels.cuda import load_extension, permute_rows
    from ditaccel.methods.svg2 import SVG2State, select_key_clusters, svg2_attention, svg2_block_layout

    rows = []
    B, H, D, dtype = 1, args.heads, 128, torch.bfloat16
    Cq, Ck, top_p, block = 100, 500, 0.9, 64
    for L in args.svg2_lengths:
        gen = torch.Generator(device="cuda").manual_seed(0)
        G = B * H
        q = _clustered(G, L, D, 200, gen, dtype).reshape(B, H, L, D)
        k = _clustered(G, L, D, 800, gen, dtype).reshape(B, H, L, D)
        v = torch.randn(B, H, L, D, device="cuda", generator=gen, dtype=dtype)
        scale = D ** -0.5
        qf, kf = q.reshape(G, L, D), k.reshape(G, L, D)
        cq, ql, qs = kmeans(qf, Cq, 10, "random", None, gen)  # the cold start (first sparse step)
        ck, kl, ks = kmeans(kf, Ck, 10, "random", None, gen)
        t = {}
        t["kmeans_warm_2it"] = _cuda_time(lambda: (kmeans(qf, Cq, 2, "random", cq, gen),
                                                   kmeans(kf, Ck, 2, "random", ck, gen)), args.repeats)
        q_perm, q_off = cluster_permutation(ql, Cq)
        k_perm, k_off = cluster_permutation(kl, Ck)
        pq, pk = q_perm.reshape(B, H, L), k_perm.reshape(B, H, L)
        t["cluster_permutation"] = _cuda_time(lambda: (cluster_permutation(ql, Cq), cluster_permutation(kl, Ck)),
                                              args.repeats)
        t["permute_torch"] = _cuda_time(lambda: (permute_tokens(q, pq), permute_tokens(k, pk), permute_tokens(v, pk),
                                                 unpermute_tokens(q, pq)), args.repeats)
        if load_extension() is not None:
            t["permute_cuda_ext"] = _cuda_time(lambda: (permute_rows([q], pq), permute_rows([k, v], pk),
                                                        permute_rows([q], pq, inverse=True)), args.repeats)

        def index():  # exactly what svg2_attention does between k-means/permutation and the kernel
            order, count = select_key_clusters(cq, ck, ks, scale, top_p, 0.1 * L)
            lay = svg2_block_layout(order, count, q_off, k_off, L, block)
            P = lay[0].shape[1]
            return (lay[0].reshape(B, H, P), lay[1].reshape(B, H, P, Ck), lay[2].reshape(B, H, P + 1),
                    lay[3].reshape(B, H, Ck + 1))

        t["index_build"] = _cuda_time(index, args.repeats)
        kv_count, kv_index, p_off, k_off32 = index()
        qp, kp, vp = permute_tokens(q, pq), permute_tokens(k, pk), permute_tokens(v, pk)
        t["attention_sparse"] = _cuda_time(lambda: run_block_sparse(qp, kp, vp, kv_count, kv_index, p_off, k_off32,
                                                                    scale=scale, max_q_block_size=block),
                                           args.repeats)
        t["svg2_total"] = _cuda_time(lambda: svg2_attention(q, k, v, q_clusters=Cq, k_clusters=Ck, top_p=top_p,
                                                            iters=2, block_size=block, generator=gen,
                                                            state=SVG2State(cq, ck)),
                                     args.repeats)
        t["dense_sdpa"] = _cuda_time(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats)
        sizes = (kv_count.long().unsqueeze(-1) > torch.arange(Ck, device="cuda")).long()
        kept = torch.gather(ks.reshape(B, H, 1, Ck).expand(B, H, kv_index.shape[2], Ck), -1,
                            kv_index.long().clamp(min=0)) * sizes
        piece = (p_off[..., 1:] - p_off[..., :-1]).long()
        density = float((piece * kept.sum(-1)).sum() / (G * L * L))
        row = dict(L=L, H=H, D=D, q_clusters=Cq, k_clusters=Ck, top_p=top_p, density=density,
                   **{f"{n}_ms": v_ * 1e3 for n, v_ in t.items()})
        att = t["attention_sparse"]
        row["index_over_attention"] = t["index_build"] / att
        row["permutation_over_attention"] = min(t["permute_torch"], t.get("permute_cuda_ext", math.inf)) / att
        row["kmeans_over_attention"] = t["kmeans_warm_2it"] / att
        row["speedup_attention_only"] = t["dense_sdpa"] / att
        row["speedup_svg2_total"] = t["dense_sdpa"] / t["svg2_total"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v, qp, kp, vp
        torch.cuda.empty_cache()
    return rows


def _torch_assign(x, centroids):
    """kmeans.assign's torch path: the (G, N, C) score tensor, then argmax."""
    half_c2 = 0.5 * (centroids * centroids).sum(-1)
    score = torch.bmm(x, centroids.transpose(1, 2))
    score.sub_(half_c2.unsqueeze(1))
    return score.argmax(-1)


def bench_kmeans_assign(args):
    """k-means assignment step: fused Triton kernel vs torch bmm + argmax (CUDA only)."""
    from ditaccel.kernels.triton.kmeans_assign import kmeans_assign

    rows = []
    G, N, D = args.heads, args.kmeans_points, 128
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for C in (500, 100):
            for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                gen = torch.Generator(device="cuda").manual_seed(0)
                x = _clustered(G, N, D, 2 * C, gen, dtype)
                c = x[:, torch.randperm(N, device="cuda", generator=gen)[:C]].contiguous()
                t_torch = _cuda_time(lambda: _torch_assign(x, c), args.repeats)
                t_triton = _cuda_time(lambda: kmeans_assign(x, c), args.repeats)  # first call autotunes
                agree = float((_torch_assign(x, c) == kmeans_assign(x, c)).float().mean())
                # the torch path writes and reads back the (G, N, C) scores
                score_bytes = 2 * G * N * C * torch.empty((), dtype=dtype).element_size()
                row = dict(G=G, N=N, C=C, D=D, dtype=str(dtype).replace("torch.", ""), allow_tf32=tf32,
                           torch_ms=t_torch * 1e3, triton_ms=t_triton * 1e3, speedup=t_torch / t_triton,
                           label_agreement=agree, torch_score_traffic_gb=score_bytes / 1e9)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del x, c
                torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return rows


def kmeans_markdown(rows):
    lines = ["k-means assignment, median CUDA-event time", "",
             "| G | N | C | D | dtype | TF32 | torch bmm+argmax ms | Triton ms | speedup | same labels |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['G']} | {r['N']} | {r['C']} | {r['D']} | {r['dtype']} | {r['allow_tf32']} | "
                     f"{r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['label_agreement']:.2%} |")
    return "\n".join(lines)


def gpu_markdown(rows, meta):
    lines = [f"GPU {meta['device']}, bf16, median CUDA-event time", "",
             "| impl | L | D | density | ms | TFLOP/s | speedup | target 0.6/density | kept / dense-mode TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tgt = f"{r['target_speedup']:.2f}x" if "target_speedup" in r else ""
        kept = f"{r['kept_vs_dense_mode']:.0%}" if "kept_vs_dense_mode" in r else ""
        lines.append(f"| {r['impl']} | {r['L']} | {r['D']} | {r['density']:.3f} | {r['time_s'] * 1e3:.2f} | "
                     f"{r['tflops']:.1f} | {r['speedup']:.2f}x | {tgt} | {kept} |")
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
    p.add_argument("--svg2", action="store_true", help="GPU: also time the SVG2 pipeline stages")
    p.add_argument("--svg2-lengths", type=int, nargs="+", default=[32768, 75600])
    p.add_argument("--kmeans", action="store_true", help="GPU: also time the k-means assignment step")
    p.add_argument("--kmeans-only", action="store_true", help="GPU: time only the k-means assignment step")
    p.add_argument("--kmeans-points", type=int, default=32768, help="points per head for --kmeans")
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        p.error("--device cuda given but torch.cuda.is_available() is False")
    args.heads = args.heads or (24 if on_gpu else 2)
    args.block = args.block or (128 if on_gpu else 64)
    args.repeats = max(3, args.repeats or (20 if on_gpu else 5))

    if (args.kmeans or args.kmeans_only) and not on_gpu:
        print("k-means assignment timing (--kmeans / --kmeans-only) needs CUDA; skipped on CPU.")
        if args.kmeans_only:
            return
    if on_gpu and args.kmeans_only:
        import triton

        rows = bench_kmeans_assign(args)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
        md = kmeans_markdown(rows)
        out = args.out or Path(__file__).resolve().parent / "results" / re.sub(r"[^A-Za-z0-9_.-]+", "-",
                                                                            meta["device"]).strip("-")
        print(md)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kmeans_assign.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (out / "kmeans_assign.md").write_text(md + "\n")
        print(f"wrote {out / 'kmeans_assign.json'} and {out / 'kmeans_assign.md'}")
        return
    if on_gpu:
        rows, meta = bench_gpu(args)
        md = gpu_markdown(rows, meta)
        if args.kmeans:
            meta["kmeans_assign"] = bench_kmeans_assign(args)
            md += "\n\n" + kmeans_markdown(meta["kmeans_assign"])
        if args.svg2:
            meta["svg2_breakdown"] = bench_svg2_breakdown(args)
            md += "\n\nSVG2 stages (ms): " + "\n".join(json.dumps(r) for r in meta["svg2_breakdown"])
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
