"""One place that maps (task, model name, size) to an architecture.

The ServerApp and every ClientApp build their model here from the same run config, so the
weights they exchange always fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import inspect
from typing import Callable

from torch import nn

from models.video_classifier import Cnn3dClassifier, CnnTransformerClassifier, EarlyFusionClassifier
from models.video_detector import VideoDetector
from models.video_enhancer import VideoEnhancer
from models.video_generator import FramePredictor
from models.video_resnet import r2plus1d_18, r3d_18

SIZES: dict[str, dict[str, dict]] = {
    "cnn-transformer": {
        "tiny": dict(widths=(8, 16, 32), dim=32, depth=1, heads=2),
        "small": dict(widths=(16, 32, 64), dim=64, depth=1, heads=2),
        "base": dict(widths=(32, 64, 128), dim=128, depth=2, heads=4),
    },
    "cnn2d": {
        "tiny": dict(widths=(8, 16, 32)),
        "small": dict(widths=(16, 32, 64)),
        "base": dict(widths=(32, 64, 128)),
    },
    "cnn3d": {
        "tiny": dict(widths=(8, 16, 32)),
        "small": dict(widths=(16, 32, 64)),
        "base": dict(widths=(32, 64, 128)),
    },
    # `base` is the published network (torchvision's Kinetics-400 checkpoints load into it);
    # the narrower sizes keep its layout and key names for machines without a GPU.
    "r3d-18": {"tiny": dict(width=0.125), "small": dict(width=0.25), "base": dict(width=1.0)},
    "r2plus1d-18": {"tiny": dict(width=0.125), "small": dict(width=0.25), "base": dict(width=1.0)},
}

MODELS: dict[str, dict[str, Callable[..., nn.Module]]] = {
    "classify": {"cnn-transformer": CnnTransformerClassifier, "cnn3d": Cnn3dClassifier, "cnn2d": EarlyFusionClassifier,
                 "r3d-18": r3d_18, "r2plus1d-18": r2plus1d_18},
    # Each task's model is registered under the default name `cnn3d`, so the one key `task`
    # switches the task; `model-size` picks its widths. (The generator's U-Net reads the
    # context frames as channels: the name is the default's, not a promise of 3D kernels.)
    "detect": {"cnn3d": VideoDetector},
    "generate": {"cnn3d": FramePredictor},
    "enhance": {"cnn3d": VideoEnhancer},
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the same model anywhere."""

    task: str
    name: str
    size: str
    num_classes: int
    clip_frames: int
    frame_size: int


def check_model_choice(task: str, name: str, size: str) -> None:
    """Raise ValueError naming the run-config key when a model choice does not exist."""
    if task not in MODELS:
        raise ValueError(f"task = {task!r} is not one of {sorted(MODELS)}")
    if name not in MODELS[task]:
        raise ValueError(f"model = {name!r} is not a {task} model: {sorted(MODELS[task])}")
    if size not in SIZES[name]:
        raise ValueError(f"model-size = {size!r} is not one of {sorted(SIZES[name])}")


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the architecture named by `spec` with freshly initialised weights."""
    check_model_choice(spec.task, spec.name, spec.size)
    architecture = MODELS[spec.task][spec.name]
    kwargs = dict(SIZES[spec.name][spec.size], num_classes=spec.num_classes)
    if "clip_frames" in inspect.signature(architecture).parameters:
        kwargs["clip_frames"] = spec.clip_frames
    return architecture(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def class_dependent_keys(spec: ModelSpec) -> set[str]:
    """The state-dict keys whose tensors depend on the class list (a classifier's head, a
    generator's class embedding): found by building the model for one more class."""
    import dataclasses

    import torch

    with torch.random.fork_rng():
        own = build_model(spec).state_dict()
        other = build_model(dataclasses.replace(spec, num_classes=spec.num_classes + 1)).state_dict()
    return {key for key, tensor in own.items() if other[key].shape != tensor.shape}
