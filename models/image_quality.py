"""Image quality metrics in torch, per example: PSNR and SSIM for frames and clips.

Inputs are (B, C, H, W) images or (B, C, T, H, W) clips with values in [0, data_range].
Both metrics return one number per example, so they can be averaged over a test set
without one large clip outweighing another.

SSIM follows Wang et al. (2004) exactly as `skimage.metrics.structural_similarity` with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False`` (11x11 window, K1 0.01,
K2 0.03), averaged over channels and frames. Borders: skimage filters the whole image with
reflect padding and then drops a 5-pixel border before averaging; here the filter is applied
only where the window fits ("valid" convolution), which yields the same kept pixels, so the
means agree with skimage to float rounding. Frames must therefore be at least 11 pixels wide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # skimage: int(truncate * sigma + 0.5) with truncate 3.5 -> an 11x11 window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per example over all its pixels (and frames): (B,).

    An exact match gives +inf, as in skimage.
    """
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).to(pred.dtype)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The normalised 1-D gaussian skimage/scipy use (sigma 1.5, radius 5)."""
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=dtype, device=device)
    window = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return window / window.sum()


def _blur_valid(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable gaussian filter of (N, 1, H, W) images, only where the window fits."""
    size = window.numel()
    images = F.conv2d(images, window.view(1, 1, size, 1))
    return F.conv2d(images, window.view(1, 1, 1, size))


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean structural similarity per example, over channels, frames and pixels: (B,).

    Computed in float64 (the variance terms subtract nearly equal numbers).
    """
    if pred.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    height, width = pred.shape[-2:]
    if min(height, width) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs frames of at least {2 * SSIM_RADIUS + 1} pixels, got {height}x{width}")
    batch = pred.shape[0]
    # A metric has no parameters, so every channel/frame can be filtered as its own image.
    x = pred.double().reshape(-1, 1, height, width)
    y = target.double().reshape(-1, 1, height, width)
    window = _gaussian_window(torch.float64, x.device)
    mu_x, mu_y = _blur_valid(x, window), _blur_valid(y, window)
    var_x = _blur_valid(x * x, window) - mu_x**2
    var_y = _blur_valid(y * y, window) - mu_y**2
    cov_xy = _blur_valid(x * y, window) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(batch, -1).mean(1).to(pred.dtype)
