"""Decoding video files with OpenCV into frames and fixed-length clips."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


class VideoError(ValueError):
    """A video file that cannot be used; the message names the file."""


def read_frames(path: Path, stride: int = 1) -> list[np.ndarray]:
    """Every `stride`-th frame of a video, BGR uint8 at the file's own size.

    Raises VideoError naming the file when it cannot be opened or holds no frame.
    """
    return list(iter_frames(path, stride))


def iter_frames(path: Path, stride: int = 1) -> Iterator[np.ndarray]:
    """`read_frames` one frame at a time, decoded as it is asked for: a long video's frames
    need not all be held at once. The VideoError comes when iteration starts or ends."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise VideoError(f"{path}: cannot be opened as a video")
    decoded, index = 0, 0
    try:
        while True:
            if index % stride == 0:
                ok, frame = capture.read()
                if ok:
                    decoded += 1
                    yield frame
            else:
                ok = capture.grab()  # skips decoding into an image
            if not ok:
                break
            index += 1
    finally:
        capture.release()
    if not decoded:
        raise VideoError(f"{path}: no frame could be decoded (empty or corrupt video)")


def square_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, then resize to size x size (area filter: no aliasing)."""
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = frame[top : top + side, left : left + side]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def frames_to_clips(frames: list[np.ndarray], clip_frames: int, frame_size: int) -> np.ndarray:
    """Cut frames into non-overlapping clips, RGB uint8 shaped (clips, T, size, size, 3).

    A video shorter than one clip gives one clip padded by repeating its last frame.
    """
    small = [cv2.cvtColor(square_resize(f, frame_size), cv2.COLOR_BGR2RGB) for f in frames]
    if len(small) < clip_frames:
        small += [small[-1]] * (clip_frames - len(small))
    count = len(small) // clip_frames
    return np.stack(small[: count * clip_frames]).reshape(count, clip_frames, frame_size, frame_size, 3)


def write_video(path: Path, frames: list[np.ndarray], fps: float = 12.0) -> None:
    """Write BGR uint8 frames as an .mp4 (MPEG-4 part 2) or .avi (MJPG) file."""
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix == ".avi" else "mp4v"))
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), fourcc, fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {path}")
    for frame in frames:
        writer.write(frame)
    writer.release()
