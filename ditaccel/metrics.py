"""Fidelity metrics: PSNR and SSIM of an accelerated output against the full-compute output.

* Images are expected in [0, 1] (``output_type="pt"``): data range 1.
* Latents have no fixed range: PSNR/SSIM use the data range of the *reference* (max - min).

PSNR is ``10 * log10(R^2 / MSE)`` (checked against torchmetrics' ``peak_signal_noise_ratio`` in
the tests); identical inputs give ``inf``. SSIM is pytorch-msssim's gaussian-window SSIM
(win 11, sigma 1.5, K=(0.01, 0.03)), with the window shrunk to the largest odd size that fits
images smaller than 11 pixels. Video tensors are folded so frames become batch entries.
"""

from __future__ import annotations

import math

import torch

__all__ = ["psnr", "ssim", "latent_psnr", "latent_ssim", "as_image_batch", "as_latent_batch", "fidelity"]


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{name} expects two torch.Tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{name} expects tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError(f"{name} got empty tensors of shape {tuple(a.shape)}")


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB of ``x`` against ``ref`` over all elements; ``inf`` when they are identical."""
    _check_pair("psnr", x, ref)
    if not data_range > 0:
        raise ValueError(f"psnr data_range must be > 0, got {data_range}")
    mse = (x.detach().double() - ref.detach().double()).pow(2).mean().item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def as_image_batch(x: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) stays; (B,F,C,H,W) video frames (diffusers ``output_type="pt"``) -> (B*F,C,H,W)."""
    if x.ndim == 4:
        return x
    if x.ndim == 5:
        return x.reshape(-1, *x.shape[2:])
    if x.ndim == 3:
        return x.unsqueeze(0)
    raise ValueError(f"expected images (B,C,H,W), (C,H,W) or video (B,F,C,H,W), got shape {tuple(x.shape)}")


def as_latent_batch(x: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) stays; video latents (B,C,F,H,W) -> (B*F,C,H,W); packed (B,N,D) -> (B,D,N,1)."""
    if x.ndim == 4:
        return x
    if x.ndim == 5:
        return x.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1], *x.shape[3:])
    if x.ndim == 3:
        return x.transpose(1, 2).unsqueeze(-1)
    raise ValueError(f"expected latents of 3 to 5 dims, got shape {tuple(x.shape)}")


def _win_size(h: int, w: int) -> int:
    win = min(11, h, w)
    return win if win % 2 == 1 else win - 1


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM of image batches (B,C,H,W) (or video, folded) with pytorch-msssim."""
    from pytorch_msssim import ssim as _ssim

    _check_pair("ssim", x, ref)
    a, b = as_image_batch(x).double(), as_image_batch(ref).double()
    win = _win_size(a.shape[-2], a.shape[-1])
    if win < 1:
        raise ValueError(f"ssim needs images of at least 1x1 pixels, got {tuple(x.shape)}")
    return float(_ssim(a, b, data_range=data_range, size_average=True, win_size=win))


def _reference_range(ref: torch.Tensor) -> float:
    r = float(ref.max() - ref.min())
    return r if r > 0 else 1.0


def latent_psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR with the data range of the reference latents."""
    return psnr(x, ref, data_range=_reference_range(ref))


def latent_ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """SSIM of latents (channels as SSIM channels) with the data range of the reference."""
    _check_pair("latent_ssim", x, ref)
    return ssim(as_latent_batch(x), as_latent_batch(ref), data_range=_reference_range(ref))


def fidelity(latents: torch.Tensor | None, ref_latents: torch.Tensor | None,
             images: torch.Tensor | None, ref_images: torch.Tensor | None) -> dict[str, float | None]:
    """All four numbers at once; a missing pair gives ``None``."""
    out: dict[str, float | None] = {"psnr_latent": None, "ssim_latent": None, "psnr_image": None, "ssim_image": None}
    if latents is not None and ref_latents is not None:
        out["psnr_latent"] = latent_psnr(latents, ref_latents)
        out["ssim_latent"] = latent_ssim(latents, ref_latents)
    if images is not None and ref_images is not None:
        a, b = images.float().clamp(0, 1), ref_images.float().clamp(0, 1)
        out["psnr_image"] = psnr(a, b)
        out["ssim_image"] = ssim(a, b)
    return out
