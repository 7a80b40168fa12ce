"""R3D-18 and R(2+1)D-18 (Tran et al., CVPR 2018) with the module names of torchvision's
`torchvision.models.video.r3d_18` / `r2plus1d_18`, so their published Kinetics-400 state dicts
load as they are (`models.pretrained.load_initial_weights`; torchvision itself is not needed).

DP-SGD needs per-example gradients, which BatchNorm mixes across the batch: the networks are
built with BatchNorm in the published layout and then converted by Opacus's
`ModuleValidator.fix` to GroupNorm under the same names. A checkpoint's BatchNorm scale and
shift load into the GroupNorm's; its running statistics have no place and are dropped.

ReLUs are not in place (Opacus's hooks forbid it); that changes no key and no result.

`width` scales every layer (1.0 is the published network); narrower ones keep the layout and
the key names, for machines without a GPU.
"""

from __future__ import annotations

import torch
from opacus.validators import ModuleValidator
from torch import nn

# Kinetics-400 statistics of torchvision's video checkpoints; clips arrive in [0, 1].
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
PLANES = (64, 128, 256, 512)


def conv3d_simple(in_planes: int, out_planes: int, mid_planes: int, stride: int = 1) -> nn.Module:
    """R3D's full 3x3x3 convolution (torchvision's Conv3DSimple is this Conv3d)."""
    return nn.Conv3d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv2plus1d(in_planes: int, out_planes: int, mid_planes: int, stride: int = 1) -> nn.Module:
    """R(2+1)D's factorised convolution: 1x3x3 in space, then 3x1x1 in time."""
    return nn.Sequential(
        nn.Conv3d(in_planes, mid_planes, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(mid_planes),
        nn.ReLU(),
        nn.Conv3d(mid_planes, out_planes, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False),
    )


class BasicBlock(nn.Module):
    """Two convolutions and a residual connection (torchvision's video BasicBlock)."""

    def __init__(self, in_planes: int, planes: int, conv, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        # R(2+1)D's middle width: about the parameter count of the first 3x3x3 convolution it
        # replaces; the published network uses the same width in both convolutions.
        mid_planes = (in_planes * planes * 27) // (in_planes * 9 + 3 * planes)
        self.conv1 = nn.Sequential(conv(in_planes, planes, mid_planes, stride), nn.BatchNorm3d(planes), nn.ReLU())
        self.conv2 = nn.Sequential(conv(planes, planes, mid_planes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


def r3d_stem(planes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(3, planes, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(planes), nn.ReLU(),
    )


def r2plus1d_stem(planes: int) -> nn.Sequential:
    mid = max(1, round(45 * planes / 64))  # 45 in the published network
    return nn.Sequential(
        nn.Conv3d(3, mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(mid), nn.ReLU(),
        nn.Conv3d(mid, planes, (3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(planes), nn.ReLU(),
    )


class VideoResNet18(nn.Module):
    """An 18-layer video ResNet, (B, 3, T, H, W) in [0, 1] -> logits; GroupNorm, not BatchNorm."""

    def __init__(self, num_classes: int, factorised: bool, width: float = 1.0):
        super().__init__()
        planes = [max(8, int(p * width)) for p in PLANES]
        conv = conv2plus1d if factorised else conv3d_simple
        self.stem = (r2plus1d_stem if factorised else r3d_stem)(planes[0])
        in_planes = planes[0]
        for index, (out_planes, stride) in enumerate(zip(planes, (1, 2, 2, 2)), start=1):
            downsample = None
            if stride != 1 or in_planes != out_planes:
                downsample = nn.Sequential(nn.Conv3d(in_planes, out_planes, 1, stride=stride, bias=False),
                                           nn.BatchNorm3d(out_planes))
            blocks = [BasicBlock(in_planes, out_planes, conv, stride, downsample), BasicBlock(out_planes, out_planes, conv)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_planes = out_planes
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()
        # Not in the state dict: a published checkpoint has no such keys.
        self.register_buffer("mean", torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1), persistent=False)

    def _init_weights(self) -> None:
        """torchvision's initialisation, so a model trained from scratch matches theirs."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.stem((clips - self.mean) / self.std)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def video_resnet18(num_classes: int, factorised: bool, width: float = 1.0) -> nn.Module:
    """The network with BatchNorm replaced by GroupNorm (Opacus's fix: gcd(32, channels) groups)."""
    model = ModuleValidator.fix(VideoResNet18(num_classes, factorised, width))
    assert not ModuleValidator.validate(model, strict=False), "not trainable under DP-SGD"
    return model


def r3d_18(num_classes: int, width: float = 1.0) -> nn.Module:
    """R3D-18; `width` 1.0 is torchvision's r3d_18."""
    return video_resnet18(num_classes, factorised=False, width=width)


def r2plus1d_18(num_classes: int, width: float = 1.0) -> nn.Module:
    """R(2+1)D-18; `width` 1.0 is torchvision's r2plus1d_18."""
    return video_resnet18(num_classes, factorised=True, width=width)
