"""The bar a block-sparse attention result must meet, shared by the interpreter and GPU kernel tests."""

import torch
import torch.nn.functional as F

from ditaccel.attention.reference import dense_attention

ATOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def dense_error(q, k, v) -> float:
    """Max abs error of same-dtype dense torch attention against fp64: the bar the kernel must meet."""
    ref, _ = dense_attention(q.double(), k.double(), v.double())
    return (F.scaled_dot_product_attention(q, k, v).double() - ref).abs().max().item()


def check_against_reference(out, lse, ref_out, ref_lse, q, k, v, atol: dict, lse_atol: float) -> None:
    """out within 2x the dense same-dtype error (+ atol[dtype]) of the fp64 reference; rows that keep
    nothing give out = 0 and lse = -inf; lse within ``lse_atol`` elsewhere."""
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    tol = 2 * dense_error(q, k, v) + atol[q.dtype]
    err = (out.double() - ref_out).abs().max().item()
    assert err <= tol, f"out error {err:.3g} > {tol:.3g}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty)
    assert torch.all(out[empty] == 0)
    lse_err = (lse.double() - ref_lse)[~empty].abs().max().item()
    assert lse_err <= lse_atol, f"lse error {lse_err:.3g}"
