"""A CenterNet-style video object detector that Opacus can train, with its targets, loss,
decoding and evaluation.

The detector sees a clip (batch, 3, T, S, S) in [0, 1] and finds the objects of its centre
frame (index T // 2, the frame client.boxes labels). A Conv3d + GroupNorm backbone keeps time
until a learned temporal pooling (a Conv3d whose kernel spans the whole clip) collapses it to
one frame per scale; a small top-down path merges the scales at output stride 4. The output is
ONE tensor (B, C + 4, S/4, S/4): C centre-heatmap logits, then box width and height, then the
centre's sub-cell x and y offset, sizes and offsets in output cells (4 px).

Targets are one dense tensor per example (C heatmap channels, 2 size, 2 offset, 1 mask), so a
Dataset yields (clip, target) pairs that torch's default collate stacks. The loss of each
example is normalised by that example's own object count and the batch loss is the mean over
examples: per-example gradients, and so DP-SGD's clipping and accounting, stay per example.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from client.dataset import clips_to_tensor
from models.detection_metrics import box_iou, detection_metrics
from models.video_classifier import conv_block

STRIDE = 4
HEATMAP_PRIOR_BIAS = -2.19  # sigmoid = 0.1: CenterNet's start, keeps the focal loss stable early
SIZE_WEIGHT = 1.0  # sizes are in output cells (a few units here), so no down-weighting as in CenterNet
OFFSET_WEIGHT = 1.0


def _conv3d_block(in_ch: int, out_ch: int, spatial_stride: int) -> nn.Sequential:
    """3x3x3 convolution (time kept), GroupNorm, GELU."""
    return nn.Sequential(*conv_block(nn.Conv3d, in_ch, out_ch, (1, spatial_stride, spatial_stride)))


def _conv2d_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 convolution, GroupNorm, GELU."""
    return nn.Sequential(*conv_block(nn.Conv2d, in_ch, out_ch, 1))


def output_size(frame_size: int, stride: int = STRIDE) -> int:
    """Side of the output grid for square frames of ``frame_size`` px (stride-2 convs round up)."""
    return -(-frame_size // stride)


class VideoDetector(nn.Module):
    """Conv3d backbone -> per-scale temporal pooling -> top-down merge -> centre/size/offset heads."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64), clip_frames: int = 8):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"widths needs at least two levels (stride 2 and stride 4), got {widths}")
        self.num_classes = num_classes
        # Level i >= 1 has stride 2 ** (i + 1); the stem (stride 2) only feeds level 1.
        self.levels = nn.ModuleList(
            [_conv3d_block(3, widths[0], 2)] + [_conv3d_block(a, b, 2) for a, b in pairwise(widths)]
        )
        # Learned pooling over the whole clip: it can weight the centre frame, where the boxes are.
        self.time_pools = nn.ModuleList([nn.Conv3d(w, w, (clip_frames, 1, 1)) for w in widths[1:]])
        self.merges = nn.ModuleList([_conv2d_block(a + b, a) for a, b in pairwise(widths[1:])])
        self.context = _conv2d_block(widths[-1], widths[-1])
        head_ch = widths[1]
        self.heatmap = nn.Sequential(_conv2d_block(head_ch, head_ch), nn.Conv2d(head_ch, num_classes, 1))
        self.box = nn.Sequential(_conv2d_block(head_ch, head_ch), nn.Conv2d(head_ch, 4, 1))
        nn.init.constant_(self.heatmap[-1].bias, HEATMAP_PRIOR_BIAS)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, S, S) -> (B, num_classes + 4, S/4, S/4): heatmap logits, size (w, h), offset (x, y)."""
        x = self.levels[0](clips)
        frames = []
        for level, pool in zip(self.levels[1:], self.time_pools):
            x = level(x)
            frames.append(pool(x).squeeze(2))  # (B, C, 1, H, W) -> (B, C, H, W)
        y = self.context(frames[-1])
        for merge, skip in zip(reversed(self.merges), reversed(frames[:-1])):
            y = F.interpolate(y, size=skip.shape[-2:], mode="nearest")
            y = merge(torch.cat([skip, y], dim=1))
        return torch.cat([self.heatmap(y), self.box(y)], dim=1)


# --- Targets and loss ------------------------------------------------------------------


def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's radius: the largest centre shift that keeps IoU >= min_overlap (3 cases)."""
    b1, c1 = height + width, width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * c1)) / 2
    b2, c2 = 2 * (height + width), (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 16 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def detection_targets(boxes: np.ndarray, num_classes: int, frame_size: int, stride: int = STRIDE) -> torch.Tensor:
    """Dense target (num_classes + 5, G, G), G = output grid side, for (n, 5) boxes (class0, x1, y1, x2, y2) in px.

    Channels: per-class gaussian heatmaps (exactly 1 at each object's centre cell), size (w, h)
    and offset (x, y) in output cells at the centre cells, and a mask (1 at centre cells).
    Two objects of one cell: the later one's size and offset win.
    """
    grid = output_size(frame_size, stride)
    target = torch.zeros(num_classes + 5, grid, grid)
    cells = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(cells, cells, indexing="ij")
    for cls, x1, y1, x2, y2 in np.asarray(boxes, np.float32).reshape(-1, 5):
        w, h = (x2 - x1) / stride, (y2 - y1) / stride
        cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
        col, row = min(max(int(cx), 0), grid - 1), min(max(int(cy), 0), grid - 1)
        sigma = (2 * max(0, int(gaussian_radius(h, w))) + 1) / 6
        blob = torch.exp(-((xs - col) ** 2 + (ys - row) ** 2) / (2 * sigma**2))
        target[int(cls)] = torch.maximum(target[int(cls)], blob)
        target[num_classes:, row, col] = torch.tensor([w, h, cx - col, cy - row, 1.0])
    return target


def _focal_loss(logits: torch.Tensor, heatmap: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss summed per example: (B,)."""
    positive = heatmap.eq(1).float()
    p = logits.sigmoid()
    pos = F.logsigmoid(logits) * (1 - p) ** 2 * positive
    neg = F.logsigmoid(-logits) * p**2 * (1 - heatmap) ** 4 * (1 - positive)
    return -(pos + neg).flatten(1).sum(1)


def detection_loss_per_example(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example loss (B,): focal + L1 size + L1 offset, each divided by that example's object count."""
    c = output.shape[1] - 4
    mask = targets[:, c + 4 : c + 5]
    count = mask.flatten(1).sum(1).clamp(min=1)
    size_l1 = ((output[:, c : c + 2] - targets[:, c : c + 2]).abs() * mask).flatten(1).sum(1)
    offset_l1 = ((output[:, c + 2 : c + 4] - targets[:, c + 2 : c + 4]).abs() * mask).flatten(1).sum(1)
    total = _focal_loss(output[:, :c], targets[:, :c]) + SIZE_WEIGHT * size_l1 + OFFSET_WEIGHT * offset_l1
    return total / count


def detection_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of per-example losses (nothing couples examples: DP-SGD needs that)."""
    return detection_loss_per_example(output, targets).mean()


class DetectionDataset(torch.utils.data.Dataset):
    """(clip float (3, T, S, S) in [0, 1], dense target) pairs of a DetectionClipSet."""

    def __init__(self, clipset):
        self.clips = torch.from_numpy(clipset.clips)
        frame_size = clipset.clips.shape[2]
        self.targets = torch.stack([detection_targets(b, clipset.num_classes, frame_size) for b in clipset.boxes])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clips[i].permute(3, 0, 1, 2).float().div_(255), self.targets[i]


# --- Decoding ---------------------------------------------------------------------------


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        best, order = order[0], order[1:]
        keep.append(best)
        order = order[box_iou(boxes[best], boxes[order])[0] <= iou_threshold]
    return np.asarray(keep, np.int64)


def _decode_one(heat: torch.Tensor, box: torch.Tensor, frame_size: int, score_threshold: float,
                max_detections: int, nms_iou: float) -> np.ndarray:
    """(k, 6) rows (class0, score, x1, y1, x2, y2) of one example's output."""
    c, grid, _ = heat.shape
    peaks = heat * (F.max_pool2d(heat[None], 3, stride=1, padding=1)[0] == heat)
    scores, index = peaks.flatten().topk(min(peaks.numel(), 4 * max_detections))
    chosen = scores >= score_threshold
    scores, index = scores[chosen], index[chosen]
    cls, cell = index // (grid * grid), index % (grid * grid)
    row, col = cell // grid, cell % grid
    w, h, dx, dy = box.flatten(1)[:, cell]
    cx, cy = (col + dx) * STRIDE, (row + dy) * STRIDE
    half_w, half_h = w.clamp(min=0) * STRIDE / 2, h.clamp(min=0) * STRIDE / 2
    xyxy = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], 1).clamp(0, frame_size)
    rows = torch.cat([cls[:, None].float(), scores[:, None], xyxy], 1).numpy().astype(np.float32)
    keep = []
    for k in range(c):  # per-class NMS
        members = np.nonzero(rows[:, 0] == k)[0]
        keep += list(members[nms(rows[members, 2:6], rows[members, 1], nms_iou)])
    rows = rows[np.asarray(keep, np.int64)]
    return rows[np.argsort(-rows[:, 1], kind="stable")][:max_detections]


@torch.no_grad()
def decode_detections(output: torch.Tensor, frame_size: int, score_threshold: float = 0.05,
                      max_detections: int = 50, nms_iou: float = 0.5) -> list[np.ndarray]:
    """Per example, (k, 6) float32 rows (class0, score, x1, y1, x2, y2) in the clip's pixels.

    Heatmap peaks (3x3 local maxima) scoring >= ``score_threshold`` become boxes; per-class
    NMS at ``nms_iou`` removes duplicates; at most ``max_detections``, best first.
    """
    output = output.detach().float().cpu()
    c = output.shape[1] - 4
    heat = output[:, :c].sigmoid()
    return [_decode_one(heat[i], output[i, c:], frame_size, score_threshold, max_detections, nms_iou)
            for i in range(len(output))]


# --- Evaluation -------------------------------------------------------------------------


@torch.no_grad()
def evaluate_detector(model: nn.Module, clipset, device: torch.device | str, batch_size: int = 64) -> dict[str, float]:
    """{"loss", "map50", "map"} of ``model`` on a DetectionClipSet (model left in eval mode)."""
    model.eval()
    frame_size = clipset.clips.shape[2]
    total, predictions = 0.0, []
    for start in range(0, len(clipset), batch_size):
        clips = clips_to_tensor(clipset.clips[start : start + batch_size]).to(device)
        boxes = clipset.boxes[start : start + batch_size]
        targets = torch.stack([detection_targets(b, clipset.num_classes, frame_size) for b in boxes]).to(device)
        output = model(clips)
        total += float(detection_loss_per_example(output, targets).sum())
        predictions += decode_detections(output, frame_size)
    metrics = detection_metrics(predictions, clipset.boxes, clipset.num_classes)
    return {"loss": total / max(1, len(clipset)), **metrics}


def mean_box_baseline(train_clipset, eval_clipset) -> dict[str, float]:
    """{"map50", "map"} of a predictor that outputs, on every frame, each class's mean training box (score 1)."""
    rows = np.concatenate([b.reshape(-1, 5) for b in train_clipset.boxes])
    seen = [c for c in range(eval_clipset.num_classes) if (rows[:, 0] == c).any()]
    guesses = np.asarray([[c, 1.0, *rows[rows[:, 0] == c, 1:5].mean(axis=0)] for c in seen], np.float32).reshape(-1, 6)
    return detection_metrics([guesses] * len(eval_clipset), eval_clipset.boxes, eval_clipset.num_classes)
