"""Anonymize a video or image file: the body of `fedvid anonymize IN OUT [--preview PNG]`.

Videos are streamed: frames are decoded one at a time, pushed through a `VideoStream` (which
keeps only 2 x hold_frames + 1 frames for its look-ahead) and written as they become final, so
memory stays bounded for any length while the temporal hold spans the whole video.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from privacy.anonymize import AnonymizedFrame, AnonymizerSettings, AnonymizeStats, FaceAnonymizer
from privacy.anonymize_heads import median_background
from privacy.durable import atomic_write

VIDEO_INPUTS = (".mp4", ".avi", ".mov", ".mkv")
VIDEO_OUTPUTS = (".mp4",)
IMAGE_FORMATS = {".png": ".png", ".jpg": ".jpg", ".jpeg": ".jpg"}
PREVIEW_FRAMES = 4
PREVIEW_PANEL_WIDTH = 640


class VideoError(ValueError):
    """A file that cannot be anonymized: undecodable, empty, or of an unsupported type."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path


def anonymize_file(src: Path, dst: Path, settings: AnonymizerSettings | None = None,
                   preview: Path | None = None, progress: bool = True) -> AnonymizeStats:
    """Anonymize the faces in a video (mp4/avi/mov/mkv in, mp4 out, same frame count, size
    and fps) or an image (png/jpg in, the same format out) and write it to `dst`.

    `preview`: also write a PNG with a few frames side by side, the original with the hidden
    regions drawn | the anonymized frame. `progress`: show a rich progress bar.
    Raises VideoError (a ValueError) naming the file for an unsupported extension, a file
    that cannot be decoded or a video without frames; FaceModelError when models are missing.
    """
    src, dst = Path(src), Path(dst)
    kind = _kind_of(src, dst)
    if not src.is_file():
        raise VideoError(src, "no such file")
    with FaceAnonymizer(settings) as anonymizer:
        if kind == "image":
            return _anonymize_image_file(anonymizer, src, dst, preview)
        return _anonymize_video_file(anonymizer, src, dst, preview, progress)


def _kind_of(src: Path, dst: Path) -> str:
    src_ext, dst_ext = src.suffix.lower(), dst.suffix.lower()
    if src_ext in IMAGE_FORMATS:
        if IMAGE_FORMATS.get(dst_ext) != IMAGE_FORMATS[src_ext]:
            raise VideoError(dst, f"an image output must have the input's format ({src_ext})")
        return "image"
    if src_ext in VIDEO_INPUTS:
        if dst_ext not in VIDEO_OUTPUTS:
            raise VideoError(dst, f"video output must be one of {', '.join(VIDEO_OUTPUTS)}")
        return "video"
    supported = ", ".join(VIDEO_INPUTS + tuple(IMAGE_FORMATS))
    raise VideoError(src, f"unsupported file type {src_ext or '(none)'}; supported: {supported}")


def _anonymize_image_file(anonymizer: FaceAnonymizer, src: Path, dst: Path,
                          preview: Path | None) -> AnonymizeStats:
    image = cv2.imread(str(src), cv2.IMREAD_COLOR)
    if image is None:
        raise VideoError(src, "cannot be decoded as an image")
    out, boxes = anonymizer.anonymize_image(image)
    _write_atomically(dst, lambda tmp: _write_image(tmp, out))
    if preview is not None:
        _write_preview(preview, [AnonymizedFrame(0, image, out, boxes, boxes)])
    return AnonymizeStats(frames=1, faces_blurred=len(boxes), regions_blurred=len(boxes),
                          frames_with_faces=int(bool(boxes)))


def _anonymize_video_file(anonymizer: FaceAnonymizer, src: Path, dst: Path,
                          preview: Path | None, progress: bool) -> AnonymizeStats:
    capture = cv2.VideoCapture(str(src))
    try:
        if not capture.isOpened():
            raise VideoError(src, "cannot be decoded as a video")
        ok, first = capture.read()
        if not ok or first is None:
            raise VideoError(src, "video has no frames (or its first frame cannot be decoded)")
        previews: list[AnonymizedFrame] = []
        background = video_background(src) if anonymizer.settings.heads else None
        stats = _write_atomically(dst, lambda tmp: _encode_video(
            anonymizer, capture, first, tmp, previews, progress, src.name, background))
    finally:
        capture.release()
    if preview is not None:
        _write_preview(preview, previews)
    return stats


def video_background(src: Path, samples: int = 25) -> np.ndarray:
    """The median of frames sampled over the whole video (a first decoding pass), from
    which the head finder starts: people are found from the first frame on."""
    capture = cv2.VideoCapture(str(src))
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or 1
        step = max(1, count // samples)
        picks, index = [], 0
        while True:
            ok = capture.grab()
            if not ok:
                break
            if index % step == 0:
                ok, frame = capture.retrieve()
                if ok:
                    picks.append(frame)
            index += 1
    finally:
        capture.release()
    if not picks:
        raise VideoError(src, "video has no frames (or its first frame cannot be decoded)")
    return median_background(picks, samples)


def _encode_video(anonymizer: FaceAnonymizer, capture, first: np.ndarray, tmp: Path,
                  previews: list[AnonymizedFrame], progress: bool, name: str,
                  background: np.ndarray | None = None) -> AnonymizeStats:
    """Stream the frames of `capture` (whose first frame is already read) into an mp4. The
    next frame is decoded and finished ones are encoded in threads of their own (OpenCV
    lets go of the GIL) while the detector works on the current one."""
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and np.isfinite(fps) and fps > 0 else 30.0
    expected = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    picks = _preview_indices(expected)
    height, width = first.shape[:2]
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise VideoError(tmp, "cannot open an mp4 encoder for it")
    stream = anonymizer.stream(background)
    writes: deque[Future] = deque()
    try:
        with (_progress_bar(progress, name, expected) as advance,
              ThreadPoolExecutor(1) as decoder, ThreadPoolExecutor(1) as encoder):
            def encode(items: list[AnonymizedFrame]) -> None:
                writes.extend(encoder.submit(_emit, writer, item, picks, previews, advance)
                              for item in items)
                while writes and writes[0].done():
                    writes.popleft().result()  # an encoding error stops the run

            frame = first
            while frame is not None:
                decoded = decoder.submit(capture.read)
                encode(stream.push(frame))
                ok, frame = decoded.result()
                frame = frame if ok else None
            encode(stream.finish())
            while writes:
                writes.popleft().result()
    finally:
        writer.release()
    return stream.stats


def _emit(writer, item: AnonymizedFrame, picks: set[int], previews: list, advance) -> None:
    writer.write(item.frame)
    # Without a frame count the first frames are previewed.
    if item.index in picks or (not picks and len(previews) < PREVIEW_FRAMES):
        previews.append(item)
    advance()


def _preview_indices(frame_count: int | None) -> set[int]:
    if not frame_count:
        return set()
    return {int(i) for i in np.linspace(0, frame_count - 1, min(PREVIEW_FRAMES, frame_count))}


class _progress_bar:
    """A rich progress bar that is a no-op when disabled; yields an `advance()` callable."""

    def __init__(self, enabled: bool, name: str, total: int | None):
        self.enabled, self.name, self.total = enabled, name, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("anonymizing {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.speed} fps"),
                            TimeRemainingColumn(), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task(self.name, total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc_info):
        if self.enabled:
            self.bar.__exit__(*exc_info)


def _write_image(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise VideoError(path, "could not be written")


def _write_atomically(dst: Path, write):
    """Return write(tmp_path) for a temporary file beside dst, renamed to dst afterwards, so
    a failure never leaves a half-written (possibly partly unblurred) output behind."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(dst, write, suffix=dst.suffix)  # OpenCV picks the format by it


def _write_preview(path: Path, items: list[AnonymizedFrame]) -> None:
    """Rows of [original with hidden regions drawn | anonymized], one row per frame."""
    rows = []
    for item in items:
        marked = item.original.copy()
        for box in item.hidden:
            cv2.rectangle(marked, (box.x, box.y), (box.x + box.w, box.y + box.h), (0, 0, 255),
                          max(1, marked.shape[1] // 400))
        pair = np.hstack([marked, item.frame])
        scale = min(1.0, 2 * PREVIEW_PANEL_WIDTH / pair.shape[1])
        rows.append(cv2.resize(pair, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows]
    _write_atomically(Path(path), lambda tmp: _write_image(tmp, np.vstack(rows)))
