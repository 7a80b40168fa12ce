"""Detection data: videos with MOTChallenge-style box annotations -> anonymized clips + boxes.

Folder layout (any depth)::

    data/
      classes.txt          one class name per line (optional: without it the single class "object")
      street/cam1.mp4      a video (any of client.video.VIDEO_SUFFIXES)
      street/cam1.gt.txt   its boxes: NAME.EXT -> NAME.gt.txt beside it (required)

Each line of a ``.gt.txt`` is ``frame,id,x,y,w,h[,conf[,class[,visibility]]]`` (the MOTChallenge
gt.txt layout): ``frame`` is 1-based, ``(x, y)`` is the box's top-left corner and ``(w, h)`` its
size, in pixels of the original video. ``conf`` 0 means "ignore this line" (MOT convention);
``class`` is 1-based into classes.txt (default 1); ``id`` and ``visibility`` are read but not
used. Empty lines and lines starting with ``#`` are skipped. Boxes may reach outside the frame.
A malformed line raises `BoxFormatError` with the message ``PATH:LINE: what is wrong``.

Training examples are clips (see client.dataset): a clip of T frames is labelled with the boxes
of its centre frame (index T // 2), mapped through the same centre crop and resize as the
frames. Boxes less than 30% visible after the crop, or under 2 px wide or high, are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from client.dataset import (
    ClipSet,
    ClipSpec,
    DataError,
    FrameAnonymizer,
    VideoItem,
    file_digest,
    fill_cache,
    video_clips,
)
from client.video import VIDEO_SUFFIXES, VideoError

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.txt"
DEFAULT_CLASSES = ("object",)
MIN_VISIBLE_FRACTION = 0.3  # a box mostly cut off by the centre crop is not a fair target
MIN_BOX_PIXELS = 2.0


class BoxFormatError(DataError):
    """A malformed annotation line; the message is ``PATH:LINE: what is wrong``."""


def annotation_path(video: Path) -> Path:
    """The annotation file of a video: NAME.EXT -> NAME.gt.txt in the same folder."""
    return video.with_name(video.stem + ".gt.txt")


def read_classes(root: Path) -> tuple[str, ...]:
    """Class names from ``root/classes.txt`` (blank lines skipped), or ("object",) without it."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        return DEFAULT_CLASSES
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise DataError(f"{path} lists no class")
    if len(set(names)) != len(names):
        raise DataError(f"{path} lists a class twice")
    return names


def _parse_line(text: str, num_classes: int | None) -> tuple[int, float, list[float]] | None:
    """(frame, conf, [class0, x1, y1, x2, y2]) of one line; raises ValueError saying what is wrong."""
    fields = [f.strip() for f in text.split(",")]
    if not 6 <= len(fields) <= 9:
        raise ValueError(
            f"expected 6 to 9 comma-separated fields (frame,id,x,y,w,h[,conf[,class[,visibility]]]), got {len(fields)}"
        )
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise ValueError(f"a field is not a number: {text.strip()!r}") from None
    if not all(np.isfinite(values)):
        raise ValueError(f"a field is not a finite number: {text.strip()!r}")
    frame, _, x, y, w, h = values[:6]
    conf = values[6] if len(values) > 6 else 1.0
    cls = values[7] if len(values) > 7 else 1.0
    if frame < 1 or frame != int(frame):
        raise ValueError(f"frame must be an integer >= 1 (1-based), got {fields[0]}")
    if w <= 0 or h <= 0:
        raise ValueError(f"box width and height must be > 0, got w={fields[4]} h={fields[5]}")
    if cls != int(cls) or cls < 1 or (num_classes is not None and cls > num_classes):
        top = num_classes or "N"
        raise ValueError(f"class must be an integer in 1..{top} (1-based into classes.txt), got {fields[7]}")
    return int(frame), conf, [cls - 1, x, y, x + w, y + h]


def read_mot_boxes(path: Path, num_classes: int | None) -> dict[int, np.ndarray]:
    """Boxes of a MOT gt.txt file: {frame (1-based): (n, 5) float32 rows (class0, x1, y1, x2, y2)}.

    Coordinates are pixels of the original video. Lines with conf 0 are left out.
    ``num_classes`` None skips the class range check (for files already checked).
    """
    path = Path(path)
    rows: dict[int, list[list[float]]] = {}
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            frame, conf, row = _parse_line(text, num_classes)
        except ValueError as exc:
            raise BoxFormatError(f"{path}:{number}: {exc}") from None
        if conf != 0:
            rows.setdefault(frame, []).append(row)
    return {frame: np.asarray(r, np.float32).reshape(-1, 5) for frame, r in sorted(rows.items())}


def scan_detection_folder(root: Path, classes: Sequence[str] | None = None) -> tuple[tuple[str, ...], list[VideoItem]]:
    """(class names, sorted videos with label 0) of a detection folder, every annotation checked.

    ``classes`` fixes the class order that all sites share; the folder's classes.txt must then
    list the same names in the same order. Raises DataError (BoxFormatError for a bad line)
    before any training when the folder is missing or has no video, a video has no .gt.txt, or
    an annotation line is malformed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    names = read_classes(root)
    if classes is not None and tuple(classes) != names:
        raise DataError(f"data folder {root} has classes {list(names)} (from {CLASSES_FILE}), expected {list(classes)}")
    videos = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not videos:
        raise DataError(f"data folder {root} holds no videos ({', '.join(VIDEO_SUFFIXES)}) with .gt.txt annotations")
    for video in videos:
        gt = annotation_path(video)
        if not gt.is_file():
            raise DataError(f"video {video} has no annotation file {gt.name} beside it")
        read_mot_boxes(gt, len(names))
    return names, [VideoItem(video, 0) for video in videos]


@dataclass
class DetectionClipSet(ClipSet):
    """Anonymized clips plus, per clip, the boxes of its centre frame in the clip's pixel grid."""

    boxes: list[np.ndarray] = field(default_factory=list)  # per clip: (n, 5) float32 (class0, x1, y1, x2, y2)
    num_classes: int = 1

    def dataset(self):  # type: ignore[override]
        """(clip, dense detection target) pairs for a DataLoader."""
        # Imported here: models builds on client, not the reverse.
        from models.video_detector import DetectionDataset

        return DetectionDataset(self)


def _video_geometry(path: Path) -> tuple[int, int, int]:
    """(width, height, frame count) of a video from its header."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise VideoError(f"{path}: cannot be opened as a video")
        width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        return width, height, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()


def boxes_to_clip_grid(boxes: np.ndarray, width: int, height: int, frame_size: int) -> np.ndarray:
    """Map original-pixel boxes through client.video.square_resize's centre crop and resize.

    Boxes are clipped to the frame; those under MIN_VISIBLE_FRACTION visible or under
    MIN_BOX_PIXELS wide or high afterwards are dropped.
    """
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    shifted = boxes[:, 1:5] - np.array([left, top, left, top], np.float32)
    clipped = np.clip(shifted, 0, side)
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    scaled = clipped * (frame_size / side)
    keep = (visible >= MIN_VISIBLE_FRACTION * area) & (scaled[:, 2] - scaled[:, 0] >= MIN_BOX_PIXELS)
    keep &= scaled[:, 3] - scaled[:, 1] >= MIN_BOX_PIXELS
    return np.concatenate([boxes[keep, :1], scaled[keep]], axis=1).astype(np.float32)


def clip_target_boxes(
    frames: dict[int, np.ndarray], num_clips: int, spec: ClipSpec, width: int, height: int, frame_count: int
) -> list[np.ndarray]:
    """Boxes of each clip's centre frame, in the clip's pixel grid.

    Clip k holds decoded frames k*T .. k*T+T-1, decoded frame j is original frame j*stride
    (0-based), MOT frame j*stride + 1. A short video's one clip repeats its last frame.
    """
    decoded = max(1, -(-frame_count // spec.frame_stride)) if frame_count > 0 else None
    out = []
    for k in range(num_clips):
        j = k * spec.clip_frames + spec.clip_frames // 2
        if decoded is not None and num_clips == 1:  # only a padded clip can point past the end
            j = min(j, decoded - 1)
        rows = frames.get(j * spec.frame_stride + 1, np.zeros((0, 5), np.float32))
        out.append(boxes_to_clip_grid(rows, width, height, spec.frame_size))
    return out


def _classes_near(video: Path) -> int:
    """Number of classes of the folder a video belongs to: the nearest classes.txt above it."""
    for folder in video.resolve().parents:
        if (folder / CLASSES_FILE).is_file():
            return len(read_classes(folder))
    return len(DEFAULT_CLASSES)


def load_detection_clips(
    items: Sequence[VideoItem],
    spec: ClipSpec,
    anonymizer: FrameAnonymizer,
    cache_dir: Path | None,
    progress: bool = False,
    num_classes: int | None = None,
    workers: int = 0,
) -> DetectionClipSet:
    """Anonymized clips of ``items`` with the boxes of each clip's centre frame.

    Clips come from client.dataset.video_clips (decoded, face-anonymized, cached). A video that
    cannot be decoded is reported and skipped. ``num_classes`` (from scan_detection_folder's
    classes) defaults to the length of the nearest classes.txt above the first video.
    ``workers``: processes that anonymize videos not yet cached (client.dataset.fill_cache).
    """
    from rich.progress import track

    if not items:
        raise DataError("no detection videos to load")
    num_classes = num_classes or _classes_near(Path(items[0].path))
    fill_cache(items, spec, anonymizer, cache_dir, workers, progress)
    clips, boxes, skipped, faces, sources = [], [], [], 0, []
    iterator = track(items, description="preparing clips") if progress else items
    for item in iterator:
        try:
            video, n_faces = video_clips(item.path, spec, anonymizer, cache_dir)
            width, height, frame_count = _video_geometry(item.path)
        except VideoError as exc:
            log.warning("skipping video: %s", exc)
            skipped.append(item.path.name)
            continue
        annotations = read_mot_boxes(annotation_path(item.path), num_classes)
        clips.append(video)
        sources += [file_digest(item.path)] * len(video)
        boxes += clip_target_boxes(annotations, len(video), spec, width, height, frame_count)
        faces += n_faces
    if not clips:
        raise DataError(f"none of the {len(items)} videos could be decoded")
    labels = np.zeros(len(boxes), np.int64)
    return DetectionClipSet(np.concatenate(clips), labels, faces, skipped, sources, boxes=boxes, num_classes=num_classes)
