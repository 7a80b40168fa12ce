"""Local training and evaluation: plain torch, no Flower, so it runs anywhere."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader


def pick_device(requested: str = "") -> torch.device:
    """`requested` if given (node config `device`), else the GPU when there is one."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for the next step instead of handing it back to the
    kernel. A training step frees and allocates the same large tensors every time; by default
    glibc maps those above 32 MB afresh each time and trims the heap back, so every step
    page-faults through them again (cnn3d, 32 clips of 8x48x48: ~18,000 faults, a third of a
    CPU step). Once per process; no-op off glibc. Returns whether it applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 30))


@dataclass
class EpochStats:
    loss: float
    examples: int


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: torch.device,
    step_loss: Callable[..., torch.Tensor],
) -> EpochStats:
    """Train `epochs` passes over `loader` with the task's `step_loss(model, *batch)`;
    return the mean training loss seen."""
    keep_freed_memory()
    model.train()
    total_loss, seen = 0.0, 0
    for _ in range(epochs):
        for batch in loader:
            if len(batch[0]) == 0:  # Poisson sampling can draw an empty batch
                continue
            batch = [t.to(device) for t in batch]
            optimizer.zero_grad(set_to_none=True)
            loss = step_loss(model, *batch)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch[0])
            seen += len(batch[0])
    return EpochStats(total_loss / max(seen, 1), seen)


def make_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """The optimizer every site uses (Adam: robust to the noise DP-SGD adds)."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate)
