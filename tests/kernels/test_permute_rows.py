"""permute_rows: gather into cluster order and scatter back (torch fallback on CPU)."""

import pytest
import torch

from ditaccel.kernels.cuda import permute_rows


def _data():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 3, 10, 4, generator=g) for _ in range(3)]
    perm = torch.stack([torch.randperm(10, generator=g) for _ in range(6)]).reshape(2, 3, 10)
    return x, perm


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_gather_then_scatter_roundtrip(index_dtype):
    x, perm = _data()
    gathered = permute_rows(x, perm.to(index_dtype))
    for src, out in zip(x, gathered):
        for b in range(2):
            for h in range(3):
                assert torch.equal(out[b, h], src[b, h, perm[b, h]])
    back = permute_rows(gathered, perm.to(index_dtype), inverse=True)
    for src, out in zip(x, back):
        assert torch.equal(out, src)


def test_non_contiguous_input():
    x, perm = _data()
    xt = x[0].transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert torch.equal(permute_rows([xt], perm)[0], permute_rows([x[0]], perm)[0])


def test_errors():
    x, perm = _data()
    with pytest.raises(TypeError, match="int32 or int64"):
        permute_rows(x, perm.float())
    with pytest.raises(ValueError, match=r"index must have shape \(B, H, L\)"):
        permute_rows(x, perm[..., :5])
    with pytest.raises(ValueError, match="shape/dtype/device of tensors\\[0\\]"):
        permute_rows([x[0], x[1][:, :, :5]], perm)
    with pytest.raises(TypeError, match="list of 1 to 3 tensors"):
        permute_rows(x[0], perm)
