"""Triton k-means assignment (ditaccel/kernels/triton/kmeans_assign.py).

Kernel tests run on CPU tensors under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU); the interpreter config uses BLOCK_N=16, BLOCK_C=16, so N=37
spans three point blocks (the last partial) and C > 16 spans two centroid blocks.  With CUDA the
compiled kernel is checked through the kmeans.assign dispatch instead.
"""

import os

import pytest
import torch

from ditaccel.attention import kmeans as km

pytest.importorskip("triton")

from ditaccel.kernels.triton.kmeans_assign import assign_reference, kmeans_assign  # noqa: E402

interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="interpreter tests on CPU tensors; with CUDA see test_cuda_assign_*")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

REL_GAP = 1e-4  # labels must agree where best and second-best fp64 scores differ by more than this


def _points(G, N, C, D, dtype, seed=0, device="cpu"):
    """Points and centroids drawn near some of the points (so assignments are not trivial)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(G, N, D, generator=g)
    pick = torch.randint(0, N, (G, C), generator=g)
    c = torch.gather(x, 1, pick.unsqueeze(-1).expand(G, C, D)) + 0.3 * torch.randn(G, C, D, generator=g)
    return x.to(device=device, dtype=dtype), c.to(device=device, dtype=dtype)


def _check_against_fp64(labels, x, c):
    """labels equal the fp64 argmax where the fp64 gap is clear; otherwise the chosen centroid's fp64
    score is within the same tolerance of the best."""
    xd, cd = x.double().cpu(), c.double().cpu()
    labels = labels.cpu()
    assert labels.dtype == torch.int64 and labels.shape == x.shape[:2]
    assert ((labels >= 0) & (labels < c.shape[1])).all()
    s = torch.bmm(xd, cd.transpose(1, 2)) - 0.5 * (cd * cd).sum(-1).unsqueeze(1)  # (G, N, C)
    # Scale of the terms summed into a score: |x|·max|c| + max ||c||²/2.
    cn = cd.norm(dim=-1)
    scale = xd.norm(dim=-1) * cn.max(-1).values.unsqueeze(1) + 0.5 * (cn * cn).max(-1).values.unsqueeze(1)
    best, want = s.max(-1)
    if s.shape[-1] > 1:
        second = s.topk(2, dim=-1).values[..., 1]
        clear = (best - second) > REL_GAP * scale
    else:
        clear = torch.ones_like(best, dtype=torch.bool)
    assert clear.float().mean() > 0.9, "test data should mostly have clear winners"
    mismatch = clear & (labels != want)
    assert not mismatch.any(), f"{int(mismatch.sum())} clear-cut points got the wrong centroid"
    chosen = torch.gather(s, -1, labels.unsqueeze(-1)).squeeze(-1)
    assert (best - chosen <= REL_GAP * scale).all()


@interpreter_only
@pytest.mark.parametrize(
    "dtype,N,C,D",
    [
        (torch.float32, 37, 5, 16),
        (torch.float32, 37, 19, 32),
        (torch.float32, 37, 17, 64),
        (torch.float32, 20, 7, 48),  # D not a power of two (padded to 64 with masks)
        (torch.float32, 9, 33, 256),
        (torch.float16, 37, 13, 32),
        (torch.bfloat16, 37, 19, 64),
        (torch.bfloat16, 37, 1, 16),  # a single centroid
    ],
)
def test_kernel_and_reference_match_fp64(dtype, N, C, D):
    x, c = _points(2, N, C, D, dtype, seed=N + C + D)
    _check_against_fp64(kmeans_assign(x, c), x, c)
    _check_against_fp64(assign_reference(x, c), x, c)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_ties_pick_smallest_index(dtype):
    # Small integers: every product, sum and half norm is exact in fp32, so ties are exact ties.
    g = torch.Generator().manual_seed(3)
    G, N, C, D = 2, 37, 19, 16
    c = torch.randint(-1, 2, (G, C, D), generator=g).float()
    c[:, 17] = c[:, 2]  # duplicates across centroid tiles (BLOCK_C=16) ...
    c[:, 5] = c[:, 2]  # ... and within one
    c[:, 18] = c[:, 0]
    x = torch.randint(-2, 3, (G, N, D), generator=g).float()
    x[:, :4] = c[:, 2:3]  # points sitting exactly on the duplicated centroid
    x[:, 4:6] = c[:, 18:19]
    x, c = x.to(dtype), c.to(dtype)
    s = torch.bmm(x.double(), c.double().transpose(1, 2)) - 0.5 * (c.double() ** 2).sum(-1).unsqueeze(1)
    best = s.max(-1, keepdim=True).values
    first = torch.where(s == best, torch.arange(C, dtype=torch.float64), float(C)).min(-1).values.long()
    assert (((s == best).sum(-1)) > 1).any(), "test data must contain ties"
    labels = kmeans_assign(x, c)
    assert torch.equal(labels, first)
    assert (labels[:, :4] == 2).all() and (labels[:, 4:6] == 0).all()
    assert torch.equal(assign_reference(x, c), first)


@interpreter_only
def test_strided_inputs():
    # x stored (N, G, D) and viewed as (G, N, D); centroids with a non-unit stride along D (copied).
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 2, 32, generator=g).transpose(0, 1)
    c = torch.randn(2, 32, 11, generator=g).transpose(1, 2)
    assert not x.is_contiguous() and c.stride(2) != 1
    labels = kmeans_assign(x, c)
    assert torch.equal(labels, kmeans_assign(x.contiguous(), c.contiguous()))
    _check_against_fp64(labels, x, c)


@interpreter_only
def test_empty_points():
    x, c = torch.zeros(2, 0, 16), torch.zeros(2, 3, 16)
    out = kmeans_assign(x, c)
    assert out.shape == (2, 0) and out.dtype == torch.int64


@interpreter_only
@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda x, c: (x[0], c), ValueError, r"x must be 3-D \(groups, points, dim\), got shape \(37, 16\)"),
        (lambda x, c: (x, c[0]), ValueError, r"centroids must be 3-D"),
        (lambda x, c: (x, c[:1]), ValueError, r"same number of groups, got x \(2, 37, 16\) \(2 groups\) "
                                              r"and centroids \(1, 5, 16\) \(1 groups\)"),
        (lambda x, c: (x, c[..., :8]), ValueError, "same dim, got x dim 16 and centroids dim 8"),
        (lambda x, c: (x, c[:, :0]), ValueError, "at least one centroid"),
        (lambda x, c: (x.long(), c), TypeError, r"unsupported x dtype torch.int64; expected one of "
                                                r"float32, float16, bfloat16"),
        (lambda x, c: (x, c.to(torch.int32)), TypeError, "unsupported centroids dtype torch.int32"),
        (lambda x, c: (x.double(), c.double()), TypeError, "unsupported x dtype torch.float64"),
        (lambda x, c: (x, c.half()), TypeError, "same dtype, got x torch.float32 and centroids torch.float16"),
        (lambda x, c: (x.numpy(), c), TypeError, "x must be a torch.Tensor, got ndarray"),
        (lambda x, c: (torch.zeros(2, 3, 300), torch.zeros(2, 2, 300)), ValueError,
         r"dim must be in 1\.\.256, got 300"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, exc, match):
    x, c = _points(2, 37, 5, 16, torch.float32)
    with pytest.raises(exc, match=match):
        kmeans_assign(*make(x, c))


def _old_assign(x, centroids):
    """kmeans.assign's torch path as it was before the Triton dispatch."""
    half_c2 = 0.5 * (centroids * centroids).sum(-1)
    score = torch.bmm(x, centroids.transpose(1, 2))
    score.sub_(half_c2.unsqueeze(1))
    return score.argmax(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_assign_is_the_old_torch_formula(dtype, monkeypatch):
    def no_triton():
        raise AssertionError("CPU assign must not reach the Triton dispatch")

    monkeypatch.setattr(km, "_triton_assign", no_triton)
    for G, N, C, D in ((2, 37, 5, 16), (3, 200, 19, 64), (1, 50, 50, 8)):
        x, c = _points(G, N, C, D, dtype, seed=C)
        assert torch.equal(km.assign(x, c), _old_assign(x, c))
    # and through kmeans() (CPU, fp32): the same labels as Lloyd's iterations with the old formula
    x, _ = _points(2, 64, 4, 16, torch.float32, seed=9)
    c0 = x[:, :4].clone()
    cent, labels, _ = km.kmeans(x, 4, 3, centroids=c0)
    ref = c0
    for _ in range(3):
        ref_labels = _old_assign(x, ref)
        ref, _ = km.update(x, ref_labels, ref)
    assert torch.equal(labels, ref_labels) and torch.equal(cent, ref)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,C,D", [(37, 19, 64), (1000, 100, 128), (513, 500, 128), (300, 7, 200)])
def test_cuda_assign_dispatches_to_kernel(dtype, N, C, D):
    x, c = _points(3, N, C, D, dtype, seed=C, device="cuda")
    labels = km.assign(x, c)
    assert labels.is_cuda
    _check_against_fp64(labels, x, c)
    assert torch.equal(labels, kmeans_assign(x, c))


@needs_cuda
def test_cuda_assign_float64_uses_torch_path():
    x, c = _points(2, 100, 9, 32, torch.float64, device="cuda")
    assert torch.equal(km.assign(x, c), _old_assign(x, c))


AOT_SCRIPT = r"""
import json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
import ditaccel.kernels.triton.kmeans_assign as m

fn = m._kmeans_assign_kernel.fn
names = fn.arg_names
const_names = ("D_PAD", "DOT_MODE", "UPCAST", "BLOCK_N", "BLOCK_C")
for case in json.loads(sys.argv[1]):
    sig = {n: case["dtype"] if n in ("X", "Cent") else "*i64" if n == "Labels"
           else "constexpr" if n in const_names else "i32" for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): case[k] for k in const_names})
    kern = triton.compile(src, target=GPUTarget("cuda", case["arch"], 32),
                          options={"num_warps": case["warps"], "num_stages": case["stages"]})
    print(json.dumps({"shared": kern.metadata.shared, "cubin": len(kern.asm["cubin"])}))
"""

# (case, shared-memory limit of its arch); the largest configs _prune keeps for these D/modes.
AOT_CASES = [
    (dict(dtype="*fp32", D_PAD=128, DOT_MODE=2, UPCAST=False, BLOCK_N=128, BLOCK_C=64, warps=8, stages=2, arch=90),
     227 * 1024),
    (dict(dtype="*bf16", D_PAD=128, DOT_MODE=0, UPCAST=False, BLOCK_N=128, BLOCK_C=128, warps=8, stages=3, arch=90),
     227 * 1024),
    (dict(dtype="*fp32", D_PAD=256, DOT_MODE=2, UPCAST=False, BLOCK_N=64, BLOCK_C=32, warps=4, stages=2, arch=80),
     163 * 1024),
]


@pytest.mark.slow
def test_kernel_compiles_for_gpu():
    """The real GPU lowering (sm_90 wgmma with TF32x3 / bf16, sm_80 mma) accepts the kernel and the
    largest kept tiles fit in shared memory.  Subprocess: conftest turns the interpreter on here."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from ditaccel.kernels.triton import kmeans_assign as m

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, json.dumps([c for c, _ in AOT_CASES])],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)
    if proc.returncode != 0 and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this Triton build cannot compile ahead of time")
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    assert len(infos) == len(AOT_CASES)
    for (case, limit), info in zip(AOT_CASES, infos):
        assert info["cubin"] > 0
        assert info["shared"] <= limit, (case, info)
        if case["DOT_MODE"] == m._DOT_TF32X3:  # the prune estimate must not undercount
            est = 4 * case["D_PAD"] * (2 * case["BLOCK_N"] + case["BLOCK_C"] * (case["stages"] + 1))
            assert info["shared"] <= est + 1024, (case, info, est)
