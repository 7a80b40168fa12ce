"""Knowledge distillation: the global model (teacher) teaches a smaller student.

The student learns the teacher's soft outputs on a transfer set that holds no site's raw
data: by default freshly generated synthetic videos (the built-in generator with a seed of
its own, so not one video is shared with the run's sites or its central test split), or a
public folder the user names. Transfer videos go through the same face anonymizer as site
data. Distillation only post-processes the (DP) teacher's outputs on public data, so it has
no extra privacy cost: the teacher's (epsilon, delta) carries over to the student.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + (1 - alpha) * cross-entropy(student, label)     (clips with a label only)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from client.dataset import ClipSet, ClipSpec, FrameAnonymizer, VideoItem, clips_to_tensor, load_clips
from client.video import VIDEO_SUFFIXES
from models.registry import SIZES, ModelSpec, build_model

UNLABELLED = -1
TEMPERATURE = 4.0
ALPHA = 0.7
EPOCHS = 12
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
TRANSFER_SEED = 1  # the built-in dataset uses seed 0: a different seed, different videos
TRANSFER_VIDEOS_PER_CLASS = 120  # 1,440 clips: 40 a class left the student 3.5 points behind a strong teacher


@dataclass
class DistillStats:
    """What one distillation did, for the report."""

    student: dict
    temperature: float
    alpha: float
    epochs: int
    transfer_clips: int
    labelled_clips: int
    loss_per_epoch: list[float] = field(default_factory=list)
    teacher_agreement: float = 0.0  # share of transfer clips where student and teacher argmax agree


DEFAULT_STUDENT = "cnn2d"  # measured fastest in ONNX Runtime on a CPU, fp32 and int8 (models/export.py)


def student_spec(teacher: ModelSpec, student: str | None = None) -> ModelSpec:
    """The student's spec: `student` is "NAME-SIZE", "NAME:SIZE", a registry family (at the
    teacher's size) or a size of the teacher's family; by default `DEFAULT_STUDENT` at the
    teacher's size.

    The student keeps the teacher's task, classes and clip geometry, so it reads the same
    clips. Raises ValueError naming the choice when it does not exist.
    """
    student = student or DEFAULT_STUDENT
    if student in SIZES.get(teacher.name, {}):
        name, size = teacher.name, student
    elif student in SIZES:
        name, size = student, teacher.size
    else:
        name, sep, size = student.replace(":", "-").rpartition("-")
        if not sep or name not in SIZES or size not in SIZES[name]:
            choices = [f"{n}-{s}" for n in SIZES for s in SIZES[n]]
            raise ValueError(f"student = {student!r} is not a registry model: one of {choices} or a size")
    return ModelSpec(teacher.task, name, size, teacher.num_classes, teacher.clip_frames, teacher.frame_size)


def synthetic_transfer_dir(home: Path, videos_per_class: int = TRANSFER_VIDEOS_PER_CLASS) -> Path:
    """Labelled synthetic videos of the sites' classes from a seed of their own, written once under
    `home`/data/: the first frames `fedvid generate` starts from (export distils on public data)."""
    from client.synth import is_complete, write_synthetic_dataset

    target = Path(home) / "data" / f"synth-transfer-{TRANSFER_SEED}-{videos_per_class}"
    if not is_complete(target):
        write_synthetic_dataset(target, seed=TRANSFER_SEED, videos_per_class=videos_per_class)
    return target


def scan_transfer_folder(root: Path, classes: Sequence[str]) -> list[VideoItem]:
    """Videos of a public transfer folder: one sub-folder per class, or flat.

    A video in a sub-folder named like one of the teacher's `classes` gets that label; any
    other video (flat folder, unknown sub-folder) is unlabelled and taught by the teacher's
    soft outputs alone. Raises FileNotFoundError / ValueError naming the folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"transfer folder {root} does not exist")
    items = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        parent = path.parent.name if path.parent != root else None
        items.append(VideoItem(path, classes.index(parent) if parent in classes else UNLABELLED))
    if not items:
        raise ValueError(f"transfer folder {root} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    return items


def load_transfer_set(
    root: Path, classes: Sequence[str], spec: ClipSpec, anonymizer: FrameAnonymizer, cache_dir: Path | None,
    progress: bool = False,
) -> ClipSet:
    """Anonymized clips of a transfer folder, labelled where the folder says so (else -1)."""
    return load_clips(scan_transfer_folder(root, classes), spec, anonymizer, cache_dir, progress=progress)


@torch.no_grad()
def predict_logits(model: nn.Module, clips: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Logits of `model` (eval mode) for uint8 clips, batch by batch."""
    model.eval()
    return torch.cat([model(clips_to_tensor(clips[i : i + batch_size])) for i in range(0, len(clips), batch_size)])


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    temperature: float = TEMPERATURE, alpha: float = ALPHA,
) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE on labelled clips.

    T^2 keeps the soft term's gradient on the scale of the hard term's (Hinton et al.).
    Clips labelled -1 contribute the soft term only; a batch with no label is taught by the
    soft term alone, at full weight.
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        log_target=True, reduction="batchmean",
    ) * temperature**2
    labelled = labels >= 0
    if alpha >= 1 or not labelled.any():
        return soft  # nothing to mix: the soft term alone, at full weight
    hard = F.cross_entropy(student_logits[labelled], labels[labelled])
    return alpha * soft + (1 - alpha) * hard


def distill(
    teacher: nn.Module,
    teacher_spec: ModelSpec,
    transfer: ClipSet,
    student: str | None = None,
    epochs: int = EPOCHS,
    temperature: float = TEMPERATURE,
    alpha: float = ALPHA,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
    progress: bool = False,
) -> tuple[nn.Module, ModelSpec, DistillStats]:
    """Train a student from `teacher`'s soft outputs on `transfer`; return (student, spec, stats).

    The teacher's logits are computed once (eval mode, the transfer clips never change), then
    the student trains with Adam and a cosine learning-rate schedule for `epochs` passes.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha = {alpha} must be in [0, 1]")
    if not temperature > 0:
        raise ValueError(f"temperature = {temperature} must be > 0")
    spec = student_spec(teacher_spec, student)
    torch.manual_seed(seed)
    model = build_model(spec)
    teacher_logits = predict_logits(teacher, transfer.clips)
    labels = torch.from_numpy(transfer.labels.astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    steps = max(1, epochs * -(-len(labels) // batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    stats = DistillStats(
        student=dict(spec.__dict__), temperature=temperature, alpha=alpha, epochs=epochs,
        transfer_clips=len(labels), labelled_clips=int((labels >= 0).sum()),
    )
    epoch_iter = range(epochs)
    if progress:
        from rich.progress import track

        epoch_iter = track(epoch_iter, description=f"distilling into {spec.name}-{spec.size}")
    for _ in epoch_iter:
        model.train()
        total, seen = 0.0, 0
        for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
            logits = model(clips_to_tensor(transfer.clips[batch.numpy()]))
            loss = distillation_loss(logits, teacher_logits[batch], labels[batch], temperature, alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
            seen += len(batch)
        stats.loss_per_epoch.append(total / max(seen, 1))
    student_logits = predict_logits(model, transfer.clips)
    stats.teacher_agreement = float((student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean())
    return model.eval(), spec, stats
