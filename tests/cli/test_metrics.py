"""ditaccel.metrics against known values."""

import math

import pytest
import torch

from ditaccel import metrics


def test_psnr_of_known_mse():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    # +-d on every element: MSE is exactly d**2
    d = 0.05
    signs = torch.where(torch.rand(x.shape, generator=g) > 0.5, 1.0, -1.0).double()
    y = x + d * signs
    assert metrics.psnr(y, x) == pytest.approx(10 * math.log10(1 / d**2), abs=1e-9)


def test_psnr_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = float(tm.peak_signal_noise_ratio(y.double(), x.double(), data_range=1.0))
    assert metrics.psnr(y, x) == pytest.approx(ref, rel=1e-6)


def test_psnr_identical_is_inf_and_data_range():
    x = torch.rand(1, 3, 8, 8)
    assert metrics.psnr(x, x) == math.inf
    # scaling the data and the range together leaves PSNR unchanged
    y = x + 0.01
    assert metrics.psnr(10 * y, 10 * x, data_range=10.0) == pytest.approx(metrics.psnr(y, x), rel=1e-6)


def test_latent_psnr_uses_reference_range():
    ref = torch.linspace(-3, 5, 64).reshape(1, 1, 8, 8)
    x = ref + 0.1
    expected = 10 * math.log10(8.0**2 / 0.01)
    assert metrics.latent_psnr(x, ref) == pytest.approx(expected, rel=1e-6)


def test_ssim_identical_is_one_and_noise_lowers_it():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert metrics.ssim(noisy, x) < 0.95


def test_ssim_small_images_and_video():
    x = torch.rand(1, 3, 6, 6)
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    video = torch.rand(1, 5, 3, 16, 16)  # (B, F, C, H, W)
    assert metrics.ssim(video, video) == pytest.approx(1.0, abs=1e-6)
    lat = torch.randn(1, 16, 3, 8, 8)  # video latents (B, C, F, H, W)
    assert metrics.latent_ssim(lat, lat) == pytest.approx(1.0, abs=1e-6)


def test_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
