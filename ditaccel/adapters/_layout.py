"""Small helpers shared by the family adapters to read token layouts from a transformer call."""

from __future__ import annotations

import torch

from .base import TokenLayout, model_arg


def as_tuple(value, n: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value)
    return (int(value),) * n


def text_tokens(model, args, kwargs, name: str = "encoder_hidden_states") -> int:
    encoder = model_arg(model, name, args, kwargs)
    return int(encoder.shape[1]) if isinstance(encoder, torch.Tensor) and encoder.ndim >= 2 else 0


def image_2d_layout(model, args, kwargs, joint_order: str, patch: int | None = None) -> TokenLayout:
    """Latents given as (B, C, H, W) and cut into ``patch`` x ``patch`` tokens."""
    hidden = model_arg(model, "hidden_states", args, kwargs)
    p = int(patch if patch is not None else model.config.patch_size)
    grid = (hidden.shape[-2] // p, hidden.shape[-1] // p)
    return TokenLayout(batch=hidden.shape[0], image_tokens=grid[0] * grid[1],
                       text_tokens=text_tokens(model, args, kwargs), grid=grid, joint_order=joint_order)


def video_3d_layout(model, args, kwargs, joint_order: str, patch_t: int, patch_h: int, patch_w: int,
                    frames_dim: int = 2, extra_text: int = 0) -> TokenLayout:
    """Latents given as (B, C, F, H, W) (``frames_dim=2``) or (B, F, C, H, W) (``frames_dim=1``)."""
    hidden = model_arg(model, "hidden_states", args, kwargs)
    frames = hidden.shape[frames_dim]
    grid = (frames // patch_t, hidden.shape[-2] // patch_h, hidden.shape[-1] // patch_w)
    return TokenLayout(batch=hidden.shape[0], image_tokens=grid[0] * grid[1] * grid[2],
                       text_tokens=text_tokens(model, args, kwargs) + extra_text, grid=grid,
                       joint_order=joint_order)
