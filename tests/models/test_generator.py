"""The class-conditional frame predictor: shapes, baseline at init, learning, DP clipping, sampling."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dataset import ClipSet
from client.video import read_frames
from models.video_generator import (
    CONTEXT_FRAMES,
    FramePredictor,
    GenerationDataset,
    class_conditional_accuracy,
    copy_last_frame,
    evaluate_generator,
    generation_step_loss,
    prediction_loss,
    sample_clips,
    split_clip,
    write_samples,
)
from privacy.dp_training import (
    clipped_mean_bruteforce,
    gradient_rel_error,
    incompatible_layers,
    make_private,
)

TINY = (8, 16, 32)


def trained_looking(model: FramePredictor) -> FramePredictor:
    """Random output layer and class embedding, as after training (at init both are zero)."""
    torch.manual_seed(1)
    nn.init.normal_(model.out.weight, std=0.05)
    nn.init.normal_(model.film.weight, std=0.5)
    return model


def moving_clips(labels: torch.Tensor, size: int = 16, frames: int = 8) -> torch.Tensor:
    """Clips of a random smooth image moving 1 pixel a frame: right for label 0, down for 1."""
    base = torch.nn.functional.interpolate(torch.rand(len(labels), 3, size // 4, size // 4), size=(size, size),
                                           mode="bilinear", align_corners=False)
    clips = []
    for image, label in zip(base, labels.tolist()):
        dims = 2 if label == 0 else 1
        clips.append(torch.stack([torch.roll(image, t, dims=dims) for t in range(frames)], dim=1))
    return torch.stack(clips)


@pytest.mark.parametrize("size", [16, 32, 48])
def test_prediction_shape_and_range(size):
    model = trained_looking(FramePredictor(6, TINY, clip_frames=8))
    context, _ = split_clip(torch.rand(2, 3, 8, size, size))
    pred = model(context, torch.tensor([0, 5]))
    assert context.shape == (2, 3, CONTEXT_FRAMES, size, size)
    assert pred.shape == (2, 3, 8 - CONTEXT_FRAMES, size, size)
    assert pred.min() >= 0 and pred.max() <= 1
    assert sample_clips(model, context, torch.tensor([0, 5])).shape == (2, 3, 8, size, size)


def test_untrained_model_copies_the_last_context_frame():
    context, _ = split_clip(torch.rand(3, 3, 8, 32, 32))
    pred = FramePredictor(6, TINY)(context, torch.tensor([0, 1, 2]))
    assert torch.equal(pred, copy_last_frame(context, 8 - CONTEXT_FRAMES))
    assert torch.equal(pred[:, :, 3], context[:, :, -1])


def test_prediction_depends_on_the_label():
    model = trained_looking(FramePredictor(6, TINY))
    context = torch.rand(1, 3, CONTEXT_FRAMES, 16, 16).repeat(2, 1, 1, 1, 1)
    pred = model(context, torch.tensor([0, 1]))
    assert (pred[0] - pred[1]).abs().mean() > 1e-3


def test_a_trained_generator_moves_a_scene_the_way_its_class_says():
    # Trained on scenes moving right (class 0) or down (class 1), then asked to continue a scene
    # seen moving right as class 1: it must move it down. Where the context shows the motion
    # (two frames), training lets the model read the motion there and ignore the class.
    torch.manual_seed(0)
    model = FramePredictor(2, TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(250):
        labels = torch.randint(0, 2, (16,))
        optimizer.zero_grad()
        generation_step_loss(model, moving_clips(labels), labels).backward()
        optimizer.step()
    right = moving_clips(torch.zeros(8, dtype=torch.long))
    # The same first frames, moving down instead.
    down = torch.stack([torch.stack([torch.roll(clip[:, 0], t, dims=1) for t in range(8)], dim=1) for clip in right])
    context, _ = split_clip(right)
    with torch.no_grad():
        pred = model(context, torch.ones(8, dtype=torch.long))
    future_down, future_right = split_clip(down)[1], split_clip(right)[1]
    # Measured: 0.37 of the error to moving it right with one context frame, 1.24 with two.
    assert prediction_loss(pred, future_down) < 0.6 * prediction_loss(pred, future_right)


def test_prediction_loss_is_the_mean_of_per_example_summed_squared_error():
    pred, future = torch.rand(3, 3, 2, 16, 16), torch.rand(3, 3, 2, 16, 16)
    per_example = [((pred[i] - future[i]) ** 2).sum() for i in range(3)]
    assert prediction_loss(pred, future).item() == pytest.approx(torch.stack(per_example).mean().item(), rel=1e-6)


def test_a_few_steps_reduce_the_loss_on_a_learnable_batch():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1] * 4)
    clips = moving_clips(labels)
    model = FramePredictor(2, TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = generation_step_loss(model, clips, labels).item()
    for _ in range(40):
        optimizer.zero_grad()
        generation_step_loss(model, clips, labels).backward()
        optimizer.step()
    assert generation_step_loss(model, clips, labels).item() < 0.5 * first


def test_model_is_opacus_compatible():
    assert incompatible_layers(FramePredictor(6, (16, 32, 64))) == []


def clipping_error(grad_sample_mode: str) -> float:
    """Max relative error of one DP-SGD step (noise 0) against brute-force clip-and-average.

    check_per_sample_clipping for a model of two inputs (context, labels).
    """
    torch.manual_seed(0)
    # 4 examples and 4 frames: time folded into the batch would go unnoticed in shapes here.
    context, future = split_clip(torch.rand(4, 3, 4, 16, 16))
    labels = torch.tensor([0, 1, 2, 0])
    reference = trained_looking(FramePredictor(3, TINY, clip_frames=4)).train()
    params = list(reference.parameters())
    per_sample = []
    for i in range(len(labels)):
        loss = prediction_loss(reference(context[i : i + 1], labels[i : i + 1]), future[i : i + 1])
        per_sample.append([g.detach().clone() for g in torch.autograd.grad(loss, params)])
    norms = torch.stack([torch.sqrt(sum((g.double() ** 2).sum() for g in grads)) for grads in per_sample])
    max_grad_norm = float(norms.median())
    expected = clipped_mean_bruteforce(per_sample, max_grad_norm)

    model = copy.deepcopy(reference)
    loader = DataLoader(TensorDataset(context, labels, future), batch_size=len(labels))
    dp_model, dp_optimizer, _ = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.0), loader, noise_multiplier=0.0,
        max_grad_norm=max_grad_norm, grad_sample_mode=grad_sample_mode, poisson_sampling=False,
    )
    dp_optimizer.zero_grad()
    prediction_loss(dp_model(context, labels), future).backward()
    dp_optimizer.step()
    return gradient_rel_error([p.grad for p in dp_model.parameters()], expected)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_clipping_matches_brute_force(mode):
    assert clipping_error(mode) < 1e-4


def random_clipset(n: int = 5, size: int = 16) -> ClipSet:
    rng = np.random.default_rng(0)
    return ClipSet(rng.integers(0, 256, (n, 8, size, size, 3), dtype=np.uint8), np.arange(n) % 3)


def test_dataset_gives_float_clips_and_labels():
    clip, label = GenerationDataset(random_clipset())[4]
    assert clip.shape == (3, 8, 16, 16) and clip.dtype == torch.float32 and 0 <= clip.min() <= clip.max() <= 1
    assert label.item() == 1


def test_evaluation_of_an_untrained_model_equals_the_baseline():
    metrics = evaluate_generator(FramePredictor(3, TINY), random_clipset(), torch.device("cpu"), batch_size=2)
    assert set(metrics) == {"loss", "psnr", "ssim", "psnr-copy-last", "ssim-copy-last"}
    assert metrics["psnr"] == pytest.approx(metrics["psnr-copy-last"])
    assert metrics["ssim"] == pytest.approx(metrics["ssim-copy-last"])
    # Independent uniform pixels: E[(x - y)^2] = 1/6, summed over the future frames of 16 x 16 x 3.
    assert metrics["loss"] / ((8 - CONTEXT_FRAMES) * 16 * 16 * 3) == pytest.approx(1 / 6, rel=0.05)
    assert 0 < metrics["psnr"] < 12 and abs(metrics["ssim"]) < 0.1


def test_write_samples_writes_playable_mp4(tmp_path):
    clipset = random_clipset(n=2)
    model = trained_looking(FramePredictor(3, TINY))
    paths = write_samples(model, clipset.clips, clipset.labels, ["a", "b", "c"], tmp_path / "samples", scale=4)
    assert [p.name for p in paths] == ["a-0.mp4", "b-1.mp4"]
    for path in paths:
        frames = read_frames(path)
        assert len(frames) == 8
        assert frames[0].shape == (64, 64, 3)


class PaintLabel(nn.Module):
    """Stub generator: every predicted frame is grey at brightness label / (classes - 1)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, context: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, c, _, h, w = context.shape
        level = labels.float() / (self.num_classes - 1)
        return level.view(b, 1, 1, 1, 1).expand(b, c, 8 - CONTEXT_FRAMES, h, w)


class ReadBrightness(nn.Module):
    """Stub classifier: class = brightness of the last frame, but never the last class."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        level = clips[:, :, -1].mean(dim=(1, 2, 3)) * (self.num_classes - 1)
        predicted = level.round().long().clamp(max=self.num_classes - 2)
        return nn.functional.one_hot(predicted, self.num_classes).float()


class AlwaysClassZero(nn.Module):
    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(len(clips), 1)


def test_class_conditional_accuracy_of_a_constant_classifier_is_chance():
    seeds = random_clipset(n=3).clips
    assert class_conditional_accuracy(FramePredictor(4, TINY), AlwaysClassZero(), seeds, 4) == 0.25


def test_class_conditional_accuracy_hand_checked():
    # 3 seeds x 4 classes, small batches so generation runs in pieces: every class but the
    # last is read back right, so the score is 3/4.
    seeds = random_clipset(n=3).clips
    assert class_conditional_accuracy(PaintLabel(4), ReadBrightness(4), seeds, 4, batch_size=5) == 0.75
