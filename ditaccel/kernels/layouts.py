"""Random block-sparse layouts for tests and benchmarks (not used at inference time)."""

from __future__ import annotations

import torch


def random_block_mask(B, H, nq, nk, density, generator=None, device="cpu", keep_diagonal=True):
    """Bool (B, H, nq, nk) keep-mask with about ``density`` of the blocks kept.

    keep_diagonal keeps block (i, i * nk // nq) so every query block has >= 1 key block.
    """
    mask = torch.rand(B, H, nq, nk, generator=generator) < density
    if keep_diagonal:
        rows = torch.arange(nq)
        mask[:, :, rows, rows * nk // nq] = True
    return mask.to(device)


def random_offsets(B, H, L, n_blocks, generator=None, device="cpu", allow_empty=True):
    """int32 (B, H, n_blocks + 1) cluster offsets from 0 to L with random sizes (some may be 0)."""
    if allow_empty:
        cuts = torch.randint(0, L + 1, (B, H, n_blocks - 1), generator=generator)
    else:
        if L < n_blocks:
            raise ValueError(f"need L >= n_blocks for non-empty blocks, got L={L}, n_blocks={n_blocks}")
        cuts = torch.stack([torch.randperm(L - 1, generator=generator)[: n_blocks - 1] + 1
                            for _ in range(B * H)]).reshape(B, H, n_blocks - 1)
    cuts = torch.sort(cuts, dim=-1).values
    zero = torch.zeros(B, H, 1, dtype=cuts.dtype)
    end = torch.full((B, H, 1), L, dtype=cuts.dtype)
    return torch.cat([zero, cuts, end], dim=-1).to(torch.int32).to(device)
