"""Class-conditional video generation as frame prediction: first frame + class -> future.

Given the first `CONTEXT_FRAMES` frames of a clip and a motion class, `FramePredictor`
predicts the remaining frames. A generated clip is the context followed by the prediction,
so a trained model animates any starting scene with the motion asked for.

One context frame, because a second one shows the motion: trained on real clips, whose class
always agrees with the motion between their first two frames, a two-frame model learns to
continue that motion and ignores its class. Asked to continue a scene under another class it
did not (central training without DP: samples classified as their class 0.24 of the time
after 6 epochs, against 0.85 after 8 with one frame; chance 1/6).

Why a frame predictor and not a GAN: a GAN is a two-player game whose balance is fragile
even without privacy; under DP-SGD the discriminator (the network that sees private data)
learns from clipped, noised gradients, so the generator trains against a noisy critic and
the balance is lost more easily still (mode collapse, divergence). A deterministic
regression objective — the mean over examples of each example's own squared error — is
exactly what per-example clipping and the DP analysis assume, and it trains as steadily as
a classifier. What is given up:
samples are not diverse (one context and class give one future, not a distribution of
them), an MSE-trained model blurs what it cannot predict (e.g. speed varies within a class),
and it needs a real starting frame: it continues scenes rather than inventing new ones.

The network is a small 2-D U-Net over the context frames stacked as channels (batch first,
time never folded into the batch), with the class applied by FiLM from an `nn.Embedding`
at every block. It predicts a residual on the last context frame and its output layer
starts at zero, so an untrained model is the copy-last-frame baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from client.dataset import ClipDataset, ClipSet, clips_to_tensor
from client.video import write_video
from models.image_quality import psnr, ssim
from models.video_classifier import norm_groups

CONTEXT_FRAMES = 1


class FilmBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm; the class scales and shifts the features (FiLM)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm1 = nn.GroupNorm(norm_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups(out_ch), out_ch)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        return F.gelu(x * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


class FramePredictor(nn.Module):
    """U-Net frame predictor: (context (B,3,K,S,S), labels (B,)) -> future (B,3,T-K,S,S) in [0, 1].

    S must be divisible by 2 ** (len(widths) - 1) (48, 32 and 16 all work with 3 widths).
    """

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64), clip_frames: int = 8):
        super().__init__()
        if clip_frames <= CONTEXT_FRAMES:
            raise ValueError(f"clip_frames = {clip_frames} leaves nothing to predict after {CONTEXT_FRAMES}")
        self.future_frames = clip_frames - CONTEXT_FRAMES
        in_ch = 3 * CONTEXT_FRAMES
        self.down = nn.ModuleList()
        for width in widths:
            self.down.append(FilmBlock(in_ch, width))
            in_ch = width
        self.up = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(FilmBlock(in_ch + width, width))  # upsampled features + the skip
            in_ch = width
        self.film_sizes = [b.conv2.out_channels for b in [*self.down, *self.up]]
        # Zero init: FiLM starts as the identity, and training learns what each class changes.
        self.film = nn.Embedding(num_classes, 2 * sum(self.film_sizes))
        nn.init.zeros_(self.film.weight)
        self.out = nn.Conv2d(in_ch, 3 * self.future_frames, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # untrained model == copy the last context frame
        nn.init.zeros_(self.out.bias)

    def forward(self, context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, c, k, h, w = context.shape
        films = self.film(labels).split([2 * n for n in self.film_sizes], dim=1)
        x = context.reshape(b, c * k, h, w)  # frames as channels: the batch stays first
        skips = []
        for i, block in enumerate(self.down):
            if i > 0:
                x = F.avg_pool2d(x, 2)
            x = block(x, *films[i].chunk(2, dim=1))
            skips.append(x)
        for i, block in enumerate(self.up):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, skips[-2 - i]], dim=1), *films[len(self.down) + i].chunk(2, dim=1))
        residual = self.out(x).view(b, 3, self.future_frames, h, w)
        return (context[:, :, -1:] + residual).clamp(0, 1)


# --- Data, loss and baseline ---------------------------------------------------------


def split_clip(clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, T, S, S) -> (context: the first CONTEXT_FRAMES frames, future: the rest)."""
    return clips[:, :, :CONTEXT_FRAMES], clips[:, :, CONTEXT_FRAMES:]


def prediction_loss(pred: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each example's squared error summed over its pixels (nothing
    couples examples).

    Summed, not averaged, over pixels for DP-SGD: averaged over ~40,000 values an example's
    gradient norm is ~0.03, far below the clipping norm (1), and the noise calibrated to that
    norm drowns it; summed, gradients reach the clipping norm, where DP-SGD's signal-to-noise
    ratio is best. Adam makes the scale moot elsewhere.
    """
    return (pred - future).pow(2).flatten(1).sum(1).mean()


def copy_last_frame(context: torch.Tensor, n_future: int) -> torch.Tensor:
    """Baseline: the last context frame repeated `n_future` times, (B, 3, n_future, S, S)."""
    return context[:, :, -1:].repeat(1, 1, n_future, 1, 1)


class GenerationDataset(ClipDataset):
    """(clip float (3, T, S, S) in [0, 1], label) items of a ClipSet: the label is the condition."""

    def __init__(self, clipset: ClipSet):
        super().__init__(clipset.clips, clipset.labels)


def generation_step_loss(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch of whole clips: predict the future from the context."""
    context, future = split_clip(clips)
    return prediction_loss(model(context, labels), future)


@torch.no_grad()
def evaluate_generator(model: nn.Module, clipset: ClipSet, device: torch.device, batch_size: int = 64) -> dict:
    """Mean per-example loss, PSNR and SSIM of the predicted future frames, and the baseline's.

    Keys: "loss", "psnr", "ssim", "psnr-copy-last", "ssim-copy-last".
    """
    model.eval()
    totals = dict.fromkeys(["loss", "psnr", "ssim", "psnr-copy-last", "ssim-copy-last"], 0.0)
    for clips, labels in DataLoader(GenerationDataset(clipset), batch_size=batch_size):
        context, future = split_clip(clips.to(device))
        pred = model(context, labels.to(device))
        copied = copy_last_frame(context, future.shape[2])
        totals["loss"] += (pred - future).pow(2).flatten(1).sum(1).sum().item()  # as prediction_loss
        totals["psnr"] += psnr(pred, future).sum().item()
        totals["ssim"] += ssim(pred, future).sum().item()
        totals["psnr-copy-last"] += psnr(copied, future).sum().item()
        totals["ssim-copy-last"] += ssim(copied, future).sum().item()
    return {key: value / max(len(clipset), 1) for key, value in totals.items()}


# --- Sampling --------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    """Where `model`'s parameters live (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def _as_clips(seeds: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, T, S, S, 3) RGB clips or float (N, 3, T, S, S) -> float (N, 3, T, S, S)."""
    return clips_to_tensor(seeds) if isinstance(seeds, np.ndarray) else seeds.float()


@torch.no_grad()
def sample_clips(model: nn.Module, context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Generated clips (B, 3, T, S, S): the context followed by the model's prediction."""
    model.eval()
    return torch.cat([context, model(context, labels)], dim=2)


def write_samples(
    model: nn.Module,
    seeds: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    out_dir: Path,
    fps: int = 12,
    scale: int = 4,
) -> list[Path]:
    """Write one CLASS-INDEX.mp4 per seed clip, generated from its context under its label.

    Frames are enlarged `scale` times with nearest neighbour so small clips are viewable.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _device_of(model)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    context, _ = split_clip(_as_clips(seeds))
    generated = sample_clips(model, context.to(device), labels.to(device)).cpu()
    frames = (generated.permute(0, 2, 3, 4, 1) * 255).round().to(torch.uint8).numpy()  # (N, T, S, S, 3)
    paths = []
    for index, (clip, label) in enumerate(zip(frames, labels.tolist())):
        path = out_dir / f"{classes[label]}-{index}.mp4"
        size = clip.shape[1] * scale
        big = [cv2.cvtColor(cv2.resize(f, (size, size), interpolation=cv2.INTER_NEAREST), cv2.COLOR_RGB2BGR) for f in clip]
        write_video(path, big, fps)
        paths.append(path)
    return paths


@torch.no_grad()
def class_conditional_accuracy(
    generator: nn.Module,
    classifier: nn.Module,
    seeds: np.ndarray | torch.Tensor,
    num_classes: int,
    batch_size: int = 64,
) -> float:
    """Share of generated clips that `classifier` assigns to the class they were generated for.

    Every seed's context is continued under EVERY class, so a generator that ignores the
    label scores about 1/num_classes whatever the classifier's accuracy on real clips.
    """
    generator.eval()
    classifier.eval()
    device = _device_of(generator)
    context, _ = split_clip(_as_clips(seeds))
    context = context.repeat_interleave(num_classes, dim=0)  # seed 0 x every class, seed 1 x ...
    wanted = torch.arange(num_classes).repeat(len(context) // num_classes)
    hits = 0
    for start in range(0, len(context), batch_size):
        batch, labels = context[start : start + batch_size].to(device), wanted[start : start + batch_size].to(device)
        logits = classifier(sample_clips(generator, batch, labels))
        hits += (logits.argmax(1) == labels).sum().item()
    return hits / max(len(context), 1)
