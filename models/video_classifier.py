"""Video classifiers that Opacus can train: a per-frame CNN + temporal transformer, a 3D CNN,
and an early-fusion 2D CNN (the fast student for deployment).

Both take clips shaped (batch, 3, frames, height, width), values in [0, 1], and return logits.
Every layer keeps the batch dimension first and has an Opacus per-sample-gradient sampler
(Conv3d, GroupNorm, LayerNorm, Linear, Embedding): folding time into the batch, the usual
per-frame trick, silently breaks per-sample clipping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm_groups(channels: int) -> int:
    """GroupNorm groups: 8 channels a group, at least one group."""
    return max(1, channels // 8)


def conv_block(conv: type[nn.Module], in_ch: int, out_ch: int, stride) -> list[nn.Module]:
    """Convolution (3-wide kernel), GroupNorm, GELU: the building block of the CNNs here."""
    return [conv(in_ch, out_ch, 3, stride=stride, padding=1), nn.GroupNorm(norm_groups(out_ch), out_ch), nn.GELU()]


def mean_max(features: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> (B, 2C): mean and max over every position. After GroupNorm the mean alone
    carries little; the max keeps where a motion detector fired hardest."""
    x = features.flatten(2)
    return torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)


def with_motion(clips: torch.Tensor) -> torch.Tensor:
    """Append frame differences as 3 more channels: motion made explicit for a per-frame CNN."""
    motion = torch.diff(clips, dim=2, prepend=clips[:, :, :1])
    return torch.cat([clips, motion], dim=1)


class FrameEncoder(nn.Module):
    """Shared per-frame 2D CNN written as Conv3d with (1, k, k) kernels: time never mixes."""

    def __init__(self, widths: tuple[int, ...], grid: int = 2, in_channels: int = 6):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = in_channels
        for out_ch in widths:
            layers += [
                nn.Conv3d(in_ch, out_ch, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
                nn.GroupNorm(norm_groups(out_ch), out_ch),
                nn.GELU(),
            ]
            in_ch = out_ch
        self.body = nn.Sequential(*layers)
        self.grid = grid
        self.out_dim = in_ch * grid * grid

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> per-frame features (B, T, D).

        Features are pooled to a coarse grid, not averaged away: where things are in each
        frame is what motion is made of.
        """
        x = self.body(clips)
        b, c, t = x.shape[:3]
        x = F.adaptive_avg_pool3d(x, (t, self.grid, self.grid))
        return x.permute(0, 2, 1, 3, 4).reshape(b, t, c * self.grid * self.grid)


class TemporalBlock(nn.Module):
    """Pre-norm transformer block over the frame axis, built from Linear layers.

    Written with Linear + scaled_dot_product_attention instead of nn.MultiheadAttention:
    Opacus's DPMultiheadAttention(batch_first=True) computes the wrong thing in opacus 1.6.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CnnTransformerClassifier(nn.Module):
    """Per-frame CNN -> temporal transformer -> mean+max fusion over time -> linear head."""

    def __init__(
        self,
        num_classes: int,
        clip_frames: int,
        widths: tuple[int, ...] = (16, 32, 64),
        dim: int = 64,
        depth: int = 1,
        heads: int = 2,
    ):
        super().__init__()
        self.encoder = FrameEncoder(widths)
        self.embed = nn.Linear(self.encoder.out_dim, dim)
        self.position = nn.Embedding(clip_frames, dim)
        nn.init.normal_(self.position.weight, std=0.02)  # N(0, 1) would drown the features
        self.blocks = nn.Sequential(*[TemporalBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.encoder(with_motion(clips)))
        b, t, _ = x.shape
        # The index tensor carries the batch dimension so Opacus sees one row per example.
        positions = torch.arange(t, device=x.device).repeat(b, 1)
        x = self.blocks(x + self.position(positions))
        fused = torch.cat([x.mean(dim=1), x.amax(dim=1)], dim=-1)
        return self.head(self.norm(fused))


class Cnn3dClassifier(nn.Module):
    """Small 3D CNN: spatio-temporal 3x3x3 convolutions, mean+max pooling, linear head."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        channels = (3, *widths)
        strides = [(1, 2, 2)] + [(2, 2, 2)] * (len(widths) - 1)
        self.body = nn.Sequential(*[
            m for i, stride in enumerate(strides) for m in conv_block(nn.Conv3d, channels[i], channels[i + 1], stride)
        ])
        self.head = nn.Linear(2 * widths[-1], num_classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(mean_max(self.body(clips)))


class EarlyFusionClassifier(nn.Module):
    """2D CNN over the clip's frames stacked as channels: motion is read by the first layer.

    Measured as the deployment student: 2D convolutions run ~7x faster than the 3D CNN's in
    ONNX Runtime on a CPU, and ONNX Runtime's int8 2D convolution is faster again, where its
    int8 3D convolution is slower than fp32.
    """

    def __init__(self, num_classes: int, clip_frames: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        channels = (3 * clip_frames, *widths)
        self.body = nn.Sequential(*[
            m for i in range(len(widths)) for m in conv_block(nn.Conv2d, channels[i], channels[i + 1], 2)
        ])
        self.head = nn.Linear(2 * widths[-1], num_classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = clips.shape
        return self.head(mean_max(self.body(clips.reshape(b, c * t, h, w))))  # channels x time: the batch stays put
