"""The x2 video enhancer: pairs, shapes, bicubic at init, learning, DP clipping, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client.dataset import ClipSet
from models.video_enhancer import (
    ENHANCE_FRAMES,
    VideoEnhancer,
    bicubic_upscale,
    enhancement_loss,
    enhancement_pair,
    enhancement_step_loss,
    evaluate_enhancer,
)
from privacy.dp_training import check_per_sample_clipping, incompatible_layers

TINY = (8, 16, 32)


def trained_looking(model: VideoEnhancer) -> VideoEnhancer:
    """A random last layer, as after training (at init it is zero, so nothing else gets gradients)."""
    nn.init.normal_(model.to_pixels.weight, std=0.05)
    return model


def test_pair_is_downsampled_neighbours_and_the_full_centre_frame():
    clips = torch.rand(2, 3, 8, 32, 32)
    low, high = enhancement_pair(clips)
    assert low.shape == (2, 3, ENHANCE_FRAMES, 16, 16) and high.shape == (2, 3, 32, 32)
    assert torch.equal(high, clips[:, :, 4])
    assert torch.allclose(low[:, :, 0, 3, 5], clips[:, :, 3, 6:8, 10:12].mean(dim=(2, 3)))
    assert torch.allclose(low[:, :, 2], F.interpolate(clips[:, :, 5], scale_factor=0.5, mode="area"))


@pytest.mark.parametrize("size", [16, 32, 48])
def test_enhanced_shape_and_range(size):
    low, _ = enhancement_pair(torch.rand(2, 3, 8, size, size))
    out = trained_looking(VideoEnhancer(6, TINY))(low)
    assert out.shape == (2, 3, size, size)
    assert out.min() >= 0 and out.max() <= 1


def test_untrained_model_is_bicubic():
    low, _ = enhancement_pair(torch.rand(3, 3, 8, 32, 32))
    assert torch.equal(VideoEnhancer(6, TINY)(low), bicubic_upscale(low))
    assert torch.allclose(bicubic_upscale(low), F.interpolate(low[:, :, 1], scale_factor=2, mode="bicubic").clamp(0, 1))


def test_loss_is_the_mean_of_per_example_summed_l1():
    pred, high = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    per_example = torch.stack([(pred[i] - high[i]).abs().sum() for i in range(3)])
    assert enhancement_loss(pred, high).item() == pytest.approx(per_example.mean().item(), rel=1e-6)


def smooth_clips(n: int, size: int = 16) -> torch.Tensor:
    """Clips of smooth random images drifting a pixel a frame: detail bicubic cannot restore."""
    base = F.interpolate(torch.rand(n, 3, size // 2, size // 2), size=(size, size), mode="nearest")
    return torch.stack([torch.roll(base, t, dims=3) for t in range(8)], dim=2)


def test_a_few_steps_reduce_the_loss_on_a_learnable_batch():
    torch.manual_seed(0)
    clips = smooth_clips(8)
    model = VideoEnhancer(6, TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = enhancement_step_loss(model, clips).item()
    for _ in range(40):
        optimizer.zero_grad()
        enhancement_step_loss(model, clips).backward()
        optimizer.step()
    assert enhancement_step_loss(model, clips).item() < 0.7 * first


def test_model_is_opacus_compatible():
    assert incompatible_layers(VideoEnhancer(6, (16, 32, 64))) == []


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_clipping_matches_brute_force(mode):
    torch.manual_seed(0)
    low, high = enhancement_pair(torch.rand(4, 3, 4, 16, 16))
    error = check_per_sample_clipping(
        lambda: trained_looking(VideoEnhancer(3, TINY)), low, high, mode, criterion=enhancement_loss
    )
    assert error < 1e-4


def test_evaluation_of_an_untrained_model_equals_bicubic():
    rng = np.random.default_rng(0)
    clipset = ClipSet(rng.integers(0, 256, (5, 8, 16, 16, 3), dtype=np.uint8), np.zeros(5, dtype=np.int64))
    metrics = evaluate_enhancer(VideoEnhancer(3, TINY), clipset, torch.device("cpu"), batch_size=2)
    assert set(metrics) == {"loss", "psnr", "ssim", "psnr-bicubic", "ssim-bicubic"}
    assert metrics["psnr"] == pytest.approx(metrics["psnr-bicubic"])
    assert metrics["ssim"] == pytest.approx(metrics["ssim-bicubic"])
    assert 0.1 < metrics["loss"] / (16 * 16 * 3) < 0.4 and 0 < metrics["psnr"] < 15  # loss: summed L1 per pixel
