"""The compiled Triton kernel and the CUDA extension on a real GPU (skipped without CUDA).

Same bar as the interpreter tests: error against an fp64 reference <= 2x the error of same-dtype
dense torch attention plus a small atol, now at realistic sizes (head dims 64/128, bf16/fp16,
lengths that are not a multiple of the block, 128-token blocks, SVG2-style variable clusters).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers.attention_checks import check_against_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA and the compiled (not interpreted) Triton kernel")

# fp32 on the GPU uses IEEE dots but a different summation order than the CPU interpreter: 1e-5.
ATOL = {torch.float16: 2e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}


def _qkv(B, H, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(B, H, Lq, D, device="cuda", generator=g).to(dtype),
            torch.randn(B, H, Lk, D, device="cuda", generator=g).to(dtype),
            torch.randn(B, H, Lk, D, device="cuda", generator=g).to(dtype))


def _check(out, lse, ref_out, ref_lse, q, k, v):
    check_against_reference(out, lse, ref_out, ref_lse, q, k, v, ATOL, lse_atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("L,block", [(1000, 128), (777, 64), (4096, 128)])
def test_fixed_blocks_match_fp64(dtype, D, L, block):
    from ditaccel.attention.block_sparse import build_block_index
    from ditaccel.attention.reference import block_sparse_attention_reference
    from ditaccel.kernels.layouts import random_block_mask
    from ditaccel.kernels.triton.block_sparse_attention import block_sparse_attention_triton

    B, H = 2, 3
    q, k, v = _qkv(B, H, L, L, D, dtype)
    n = math.ceil(L / block)
    mask = random_block_mask(B, H, n, n, 0.3, torch.Generator().manual_seed(1), keep_diagonal=False)
    mask[0, 1, 0] = False  # a query block that keeps nothing
    count, index = build_block_index(mask)
    count, index = count.cuda(), index.cuda()
    out, lse = block_sparse_attention_triton(q, k, v, count, index, block_m=block, block_n=block)
    torch.cuda.synchronize()
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), count, index,
                                           block_m=block, block_n=block)
    _check(out, lse, *ref, q, k, v)


@pytest.mark.parametrize("D", [64, 128])
def test_variable_clusters_match_fp64(D):
    from ditaccel.attention.block_sparse import build_block_index
    from ditaccel.attention.reference import block_sparse_attention_reference
    from ditaccel.kernels.layouts import random_block_mask, random_offsets

    from ditaccel.kernels.triton.block_sparse_attention import block_sparse_attention_triton

    B, H, Lq, Lk = 1, 4, 3001, 2999
    g = torch.Generator().manual_seed(5)
    q, k, v = _qkv(B, H, Lq, Lk, D, torch.bfloat16, seed=2)
    q_off = random_offsets(B, H, Lq, 40, g).cuda()  # clusters of varied size, some > 128 tokens
    k_off = random_offsets(B, H, Lk, 60, g).cuda()
    count, index = build_block_index(random_block_mask(B, H, 40, 60, 0.2, g))
    count, index = count.cuda(), index.cuda()
    out, lse = block_sparse_attention_triton(q, k, v, count, index, q_offsets=q_off, k_offsets=k_off)
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), count, index,
                                           q_offsets=q_off, k_offsets=k_off)
    _check(out, lse, *ref, q, k, v)


def test_full_density_equals_sdpa_and_lse_is_logsumexp():
    from ditaccel.attention.block_sparse import block_sparse_attention, build_block_index

    q, k, v = _qkv(1, 2, 2000, 2000, 128, torch.bfloat16, seed=3)
    n = math.ceil(2000 / 128)
    count, index = build_block_index(torch.ones(1, 2, n, n, dtype=torch.bool))
    out, lse = block_sparse_attention(q, k, v, count.cuda(), index.cuda(), block_m=128, block_n=128)
    dense = F.scaled_dot_product_attention(q, k, v)
    assert (out.float() - dense.float()).abs().max().item() < 2e-2
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(128)
    assert (lse.double() - torch.logsumexp(scores, -1)).abs().max().item() < 2e-2


def test_cuda_permute_extension_builds_and_matches_torch():
    from ditaccel.kernels.cuda import load_extension, permute_rows

    assert load_extension() is not None, "the csrc/ extension did not build on this CUDA machine"
    g = torch.Generator(device="cuda").manual_seed(0)
    x = [torch.randn(2, 3, 1000, 64, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3)]
    perm = torch.argsort(torch.rand(2, 3, 1000, device="cuda", generator=g), dim=-1)
    for index in (perm, perm.int()):
        gathered = permute_rows(x, index)
        idx = perm.unsqueeze(-1).expand_as(x[0])
        for src, out in zip(x, gathered):
            assert torch.equal(out, torch.gather(src, 2, idx))
        back = permute_rows(gathered, index, inverse=True)
        for src, out in zip(x, back):
            assert torch.equal(out, src)


@pytest.mark.parametrize("method", ["svg2", "clear", "rettention"])
def test_sparse_methods_run_on_cuda_bf16(method):
    """A tiny FLUX in bf16 on the GPU with each sparse method: finite output close to dense."""
    from diffusers import FluxTransformer2DModel

    import ditaccel
    from ditaccel.methods.clear import CLEARConfig
    from ditaccel.methods.rettention import RettentionConfig
    from ditaccel.methods.svg2 import SVG2Config

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(16, 24, 24)).cuda().to(torch.bfloat16)
    side, txt = 48, 8
    g = torch.Generator(device="cuda").manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, side * side, 16, device="cuda", generator=g).bfloat16(),
              encoder_hidden_states=torch.randn(1, txt, 32, device="cuda", generator=g).bfloat16(),
              pooled_projections=torch.randn(1, 32, device="cuda", generator=g).bfloat16(),
              timestep=torch.tensor([0.5], device="cuda").bfloat16(),
              img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(),
                                                 torch.arange(side).float(), indexing="ij"), -1).reshape(-1, 3).cuda(),
              txt_ids=torch.zeros(txt, 3, device="cuda"), return_dict=False)
    with torch.no_grad():
        ref = model(**kw)[0].float()
        config = {"svg2": SVG2Config(q_clusters=32, k_clusters=64, top_p=0.98, dense_steps_fraction=0.0,
                                     dense_layers=0),
                  "clear": CLEARConfig(radius=16, mode="blocks"),
                  "rettention": RettentionConfig(keep_fraction=0.25, dense_steps_fraction=0.0,
                                                 refresh_interval=1000)}[method]
        handle = ditaccel.enable_acceleration(model, config)
        out = model(**kw)[0].float()
        handle.remove()
        again = model(**kw)[0].float()
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.25, f"{method}: relative error {rel:.3f} against dense"
    assert torch.equal(again, ref)
