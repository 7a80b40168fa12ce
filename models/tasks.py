"""What differs between fedvid's tasks: the examples a clip set gives, the loss, the metrics.

Everything else is shared by every task: the federation, face anonymization, DP-SGD with the
site's budget and ledger, the run directory. A task's loss is the mean over the batch of
per-example losses, with nothing coupling examples, so per-example clipping holds for each.

    classify   clip -> class                       accuracy
    detect     clip -> boxes of its centre frame   mAP@0.5 (and mAP@[.5:.95])
    generate   first frame + class -> the rest     PSNR / SSIM vs copying the last frame
    enhance    3 half-size frames -> centre frame  PSNR / SSIM vs bicubic up-scaling
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.dataset import ClipSet
from models.video_detector import detection_loss, evaluate_detector, mean_box_baseline
from models.video_enhancer import enhancement_step_loss, evaluate_enhancer
from models.video_generator import evaluate_generator, generation_step_loss


@dataclass(frozen=True)
class Task:
    """One task family: how its examples, loss and metrics are made."""

    name: str
    headline: str  # the metric a round is summarised by (higher is better)
    baseline: str | None  # the same metric for a trivial baseline, reported beside it
    examples: Callable[[ClipSet], Dataset]  # items are flat tuples of tensors
    step_loss: Callable[..., torch.Tensor]  # (model, *batch) -> mean loss over the batch
    evaluate: Callable[[nn.Module, ClipSet, torch.device], dict[str, float]]  # keys without prefix


# --- classify --------------------------------------------------------------------------------


def classification_loss(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(clips), labels)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, clipset: ClipSet, device: torch.device, batch_size: int = 64) -> dict[str, float]:
    """Mean cross-entropy and accuracy of `model` on `clipset`."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for clips, labels in DataLoader(clipset.dataset(), batch_size=batch_size):
        clips, labels = clips.to(device), labels.to(device)
        logits = model(clips)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1)}


# --- detect, generate, enhance (their models' modules hold the details) ---------------------


def _detection_loss(model: nn.Module, clips: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return detection_loss(model(clips), targets)


def _evaluate_detector(model: nn.Module, clipset: ClipSet, device: torch.device) -> dict[str, float]:
    """mAP, and beside it a trivial baseline: each class's mean box on every frame (the mean of
    the evaluated clips' own boxes, so the baseline is if anything flattered)."""
    baseline = {f"{key}-mean-box": value for key, value in mean_box_baseline(clipset, clipset).items()}
    return {**evaluate_detector(model, clipset, device), **baseline}


def _enhancement_loss(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return enhancement_step_loss(model, clips)  # the class plays no part in up-scaling


def _examples(clipset: ClipSet) -> Dataset:
    return clipset.dataset()  # a DetectionClipSet gives (clip, dense box target) pairs


TASKS: dict[str, Task] = {
    "classify": Task("classify", "accuracy", None, _examples, classification_loss, evaluate_classifier),
    "detect": Task("detect", "map50", "map50-mean-box", _examples, _detection_loss, _evaluate_detector),
    "generate": Task("generate", "psnr", "psnr-copy-last", _examples, generation_step_loss, evaluate_generator),
    "enhance": Task("enhance", "psnr", "psnr-bicubic", _examples, _enhancement_loss, evaluate_enhancer),
}


def get_task(name: str) -> Task:
    """The task called `name`; ValueError naming the run-config key otherwise."""
    if name not in TASKS:
        raise ValueError(f"task = {name!r} is not one of {sorted(TASKS)}")
    return TASKS[name]
