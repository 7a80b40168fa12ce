"""PSNR and SSIM in torch agree with scikit-image, per example, for frames and clips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import resize

from models.image_quality import psnr, ssim


def skimage_ssim(pred: np.ndarray, target: np.ndarray) -> float:
    """Reference SSIM of two (H, W, C) images, the settings models.image_quality follows."""
    return structural_similarity(
        target, pred, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


def image_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """(pred, target) pairs (H, W, 3) in [0, 1]: random noise, and a real photo degraded."""
    rng = np.random.default_rng(0)
    noise = rng.random((24, 30, 3))
    photo = resize(data.astronaut(), (40, 40), anti_aliasing=True)
    blurred = resize(resize(photo, (20, 20), anti_aliasing=True), (40, 40))
    noisy = np.clip(photo + 0.05 * rng.standard_normal(photo.shape), 0, 1)
    return [(rng.random(noise.shape), noise), (blurred, photo), (noisy, photo), (0.8 * photo + 0.1, photo)]


def to_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None]


@pytest.mark.parametrize("pair", range(4))
def test_image_metrics_match_skimage(pair):
    pred, target = image_pairs()[pair]
    assert ssim(to_batch(pred), to_batch(target)).item() == pytest.approx(skimage_ssim(pred, target), abs=1e-6)
    expected_psnr = peak_signal_noise_ratio(target, pred, data_range=1.0)
    assert psnr(to_batch(pred), to_batch(target)).item() == pytest.approx(expected_psnr, abs=1e-6)


def test_clip_metrics_are_per_example_means_over_frames():
    pairs = image_pairs()[1:]  # three 40x40 pairs, used as the frames of one clip
    pred = torch.stack([to_batch(p)[0] for p, _ in pairs], dim=1)[None]  # (1, 3, T, H, W)
    target = torch.stack([to_batch(t)[0] for _, t in pairs], dim=1)[None]
    expected_ssim = np.mean([skimage_ssim(p, t) for p, t in pairs])
    all_pred = np.stack([p for p, _ in pairs])
    all_target = np.stack([t for _, t in pairs])
    expected_psnr = peak_signal_noise_ratio(all_target, all_pred, data_range=1.0)
    # Batch of two different examples: each gets its own number.
    batch_pred, batch_target = torch.cat([pred, target]), torch.cat([target, target])
    got_ssim, got_psnr = ssim(batch_pred, batch_target), psnr(batch_pred, batch_target)
    assert got_ssim.shape == got_psnr.shape == (2,)
    assert got_ssim[0].item() == pytest.approx(expected_ssim, abs=1e-6)
    assert got_psnr[0].item() == pytest.approx(expected_psnr, abs=1e-6)
    assert got_ssim[1].item() == pytest.approx(1.0) and math.isinf(got_psnr[1].item())


def test_data_range_scales_like_skimage():
    pred, target = image_pairs()[2]
    got = ssim(to_batch(pred * 255), to_batch(target * 255), data_range=255.0).item()
    assert got == pytest.approx(skimage_ssim(pred, target), abs=1e-6)
    assert psnr(to_batch(pred * 255), to_batch(target * 255), data_range=255.0).item() == pytest.approx(
        peak_signal_noise_ratio(target, pred, data_range=1.0), abs=1e-6
    )


def test_ssim_refuses_frames_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
