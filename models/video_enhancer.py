"""x2 video super-resolution: three half-size frames in, the centre frame at full size out.

`VideoEnhancer` sees the clip's centre frame and its two neighbours downsampled by 2 and
returns the centre frame at full resolution as bicubic upscaling plus a learned residual.
The neighbours help because a moving object shows its edges at different sub-pixel offsets
in each frame. Layers: a Conv3d that merges the three frames (batch first, time never
folded into the batch), Conv2d layers, then PixelShuffle(2). The last convolution starts
at zero, so an untrained model IS bicubic upscaling and training only has to improve on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from client.dataset import ClipSet
from models.image_quality import psnr, ssim

ENHANCE_FRAMES = 3


class VideoEnhancer(nn.Module):
    """low (B, 3, 3, S/2, S/2) in [0, 1] -> the centre frame (B, 3, S, S) in [0, 1].

    `num_classes` and `clip_frames` are unused; every fedvid model takes them.
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64), clip_frames: int = 8):
        super().__init__()
        self.merge_frames = nn.Conv3d(3, widths[0], (ENHANCE_FRAMES, 3, 3), padding=(0, 1, 1))
        layers: list[nn.Module] = []
        in_ch = widths[0]
        for width in widths[1:]:
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.GELU()]
            in_ch = width
        self.body = nn.Sequential(*layers)
        self.to_pixels = nn.Conv2d(in_ch, 3 * 4, 3, padding=1)  # 4 = 2x2 sub-pixels per low-res pixel
        nn.init.zeros_(self.to_pixels.weight)
        nn.init.zeros_(self.to_pixels.bias)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.merge_frames(low).squeeze(2))  # the 3 frames -> 1: (B, C, S/2, S/2)
        residual = self.shuffle(self.to_pixels(self.body(x)))
        return (bicubic_upscale(low) + residual).clamp(0, 1)


def bicubic_upscale(low: torch.Tensor) -> torch.Tensor:
    """Baseline: the centre low-res frame of (B, 3, 3, s, s) upscaled x2 bicubic, in [0, 1]."""
    centre = low[:, :, ENHANCE_FRAMES // 2]
    return F.interpolate(centre, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)


def enhancement_pair(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, T, S, S) -> (low (B, 3, 3, S/2, S/2), high (B, 3, S, S)).

    low: frames centre-1..centre+1 (centre = T // 2) area-downsampled by 2 (2x2 means);
    high: the centre frame at full size.
    """
    centre = clips.shape[2] // 2
    frames = clips[:, :, centre - ENHANCE_FRAMES // 2 : centre + ENHANCE_FRAMES // 2 + 1]
    return F.avg_pool3d(frames, (1, 2, 2)), clips[:, :, centre]


def enhancement_loss(pred: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each example's absolute error, summed over its pixels.

    L1 rather than MSE, as in most super-resolution work (EDSR): MSE rewards averaging the
    plausible sharp answers into a blur, L1 keeps edges sharper; PSNR (an MSE measure) is
    still what the evaluation reports. Summed, not averaged, over pixels for DP-SGD: averaged
    over ~7,000 pixels an example's gradient norm is ~0.02, far below the clipping norm (1),
    and the noise calibrated to that norm drowns it; summed, gradients reach the clipping
    norm, where DP-SGD's signal-to-noise ratio is best. Adam makes the scale moot elsewhere.
    """
    return (pred - high).abs().flatten(1).sum(1).mean()


def enhancement_step_loss(model: nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch of whole clips (B, 3, T, S, S)."""
    low, high = enhancement_pair(clips)
    return enhancement_loss(model(low), high)


@torch.no_grad()
def evaluate_enhancer(model: nn.Module, clipset: ClipSet, device: torch.device, batch_size: int = 64) -> dict:
    """Mean per-example loss, PSNR and SSIM of the enhanced centre frames, and bicubic's.

    Keys: "loss", "psnr", "ssim", "psnr-bicubic", "ssim-bicubic".
    """
    model.eval()
    totals = dict.fromkeys(["loss", "psnr", "ssim", "psnr-bicubic", "ssim-bicubic"], 0.0)
    for clips, _ in DataLoader(clipset.dataset(), batch_size=batch_size):
        low, high = enhancement_pair(clips.to(device))
        pred, bicubic = model(low), bicubic_upscale(low)
        totals["loss"] += (pred - high).abs().flatten(1).sum(1).sum().item()  # as enhancement_loss
        totals["psnr"] += psnr(pred, high).sum().item()
        totals["ssim"] += ssim(pred, high).sum().item()
        totals["psnr-bicubic"] += psnr(bicubic, high).sum().item()
        totals["ssim-bicubic"] += ssim(bicubic, high).sum().item()
    return {key: value / max(len(clipset), 1) for key, value in totals.items()}
