"""Local training and evaluation: plain torch, no Flower, so it runs anywhere."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


def pick_device(requested: str = "") -> torch.device:
    """`requested` if given (node config `device`), else the GPU when there is one."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    examples: int


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
) -> EpochStats:
    """Train `epochs` passes over `loader`; return the mean loss and accuracy seen."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        for clips, labels in loader:
            if len(labels) == 0:  # Poisson sampling can draw an empty batch
                continue
            clips, labels = clips.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(clips)
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 64) -> EpochStats:
    """Mean cross-entropy and accuracy of `model` on `dataset`."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for clips, labels in DataLoader(dataset, batch_size=batch_size):
        clips, labels = clips.to(device), labels.to(device)
        logits = model(clips)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen)


def make_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """The optimizer every site uses (Adam: robust to the noise DP-SGD adds)."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate)
