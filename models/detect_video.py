"""Draw a detector's boxes on a video (for ``fedvid detect``).

The video is read, face-anonymized FIRST, then cut into one clip per frame (the frame at the
clip's centre, index T // 2, as in training; the ends are padded by repeating the first and
last frame). Boxes are drawn on the anonymized, centre-cropped square at a readable size, never
on raw frames, and the result is written as an .mp4.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from client.dataset import FrameAnonymizer
from client.video import iter_frames, square_resize, write_video
from client.dataset import clips_to_tensor
from models.video_detector import decode_detections

COLOURS = ((0, 200, 255), (255, 120, 0), (80, 220, 80), (200, 80, 255), (0, 80, 255), (255, 255, 0))  # BGR


def window_indices(num_frames: int, clip_frames: int) -> np.ndarray:
    """(num_frames, clip_frames) frame indices: frame i sits at position clip_frames // 2, ends repeated."""
    offsets = np.arange(clip_frames) - clip_frames // 2
    return np.clip(np.arange(num_frames)[:, None] + offsets[None, :], 0, num_frames - 1)


def draw_detections(image: np.ndarray, detections: np.ndarray, classes: Sequence[str], scale: float) -> np.ndarray:
    """``image`` (BGR) with boxes (class0, score, x1, y1, x2, y2) scaled by ``scale``, labelled 'name 0.87'."""
    out = image.copy()
    for cls, score, *xyxy in detections:
        x1, y1, x2, y2 = (round(v * scale) for v in xyxy)
        colour = COLOURS[int(cls) % len(COLOURS)]
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, 2)
        label = f"{classes[int(cls)]} {score:.2f}"
        cv2.putText(out, label, (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    return out


@torch.no_grad()
def annotate_video(
    model: nn.Module,
    classes: Sequence[str],
    video_path: Path,
    out_path: Path,
    clip_frames: int,
    frame_stride: int,
    frame_size: int,
    anonymizer: FrameAnonymizer,
    score_threshold: float = 0.3,
    display_size: int | None = None,
    batch_size: int = 32,
) -> int:
    """Write ``out_path`` (.mp4): the anonymized video with the model's detections; return its frame count.

    Every ``frame_stride``-th frame is kept (fps divided accordingly). The display is the centre
    crop resized to ``display_size`` (default 4 x frame_size) px square.
    """
    display_size = display_size or 4 * frame_size
    # The model and the output only see anonymized frames, each kept at the two sizes they
    # need as soon as it is anonymized: a long video's frames are never all held.
    kept, _ = anonymizer.anonymize_frames(
        iter_frames(Path(video_path), frame_stride),
        keep=lambda frame: (square_resize(frame, frame_size), square_resize(frame, display_size)))
    small = np.stack([cv2.cvtColor(model_size, cv2.COLOR_BGR2RGB) for model_size, _ in kept])
    model.eval()
    device = next(model.parameters()).device
    windows = window_indices(len(small), clip_frames)
    annotated = []
    for start in range(0, len(small), batch_size):
        clips = clips_to_tensor(small[windows[start : start + batch_size]]).to(device)
        detections = decode_detections(model(clips), frame_size, score_threshold=score_threshold)
        for i, found in enumerate(detections, start=start):
            shown = kept[i][1]
            annotated.append(draw_detections(shown, found, classes, display_size / frame_size))
    write_video(Path(out_path), annotated, _fps(Path(video_path)) / frame_stride)
    return len(small)


def _fps(path: Path) -> float:
    """The video's frame rate from its header (25 when the header has none)."""
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return fps if fps and fps > 0 else 25.0
