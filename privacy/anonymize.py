"""Face anonymization of video frames with MediaPipe's BlazeFace detectors.

BlazeFace sees its input at 128 px (short-range model) or 192 px (full-range model), so a
20 px face in a 1280x720 frame shrinks to 2-3 px and is missed by a whole-frame pass. The
detector therefore runs as a pyramid: the whole frame (both models) plus overlapping tiles
of 512, 256 and 128 px (short-range model, which finds faces down to ~10% of its input,
smaller relative to its input than the full-range model does, at 40% of its cost). A tile
overlap of 25% is wider than the smallest face the next coarser level finds, so a face cut
by one level's tile border is whole inside some tile of the next level.

Which boxes count as faces is a confidence and size policy chosen on labelled negatives
(face-free photos, textures, video; `simulations/bench_anonymize.py`): false positives on
textures are small boxes at low scores or large boxes at scores up to ~0.6, while real
faces are either small (and then often scored 0.3-0.5 by the 128 px tiles) or large and
scored above 0.7. A box covering less than `small_face_area` of the frame is kept from
`small_face_confidence`, a larger one from `min_confidence`: small false positives cost
little area, large ones cost much.

A face is hidden by an ellipse, not the rectangle around it: the ellipse of a box scaled by
`box_scale` covers hair and chin while changing ~80% of the pixels its bounding box would.

Video is processed as a stream. The fine tile levels run only every few frames (keyframes)
and the stream looks ahead `hold_frames` frames. A detection is tracked to the nearest
matching detection before and after it (a linear motion model between the two), so a moving
face found only on keyframes is covered where it is, not by a smear of held boxes; a box
with no match on one side (a face entering, leaving, or missed) is held still there.
A pass (the whole frame or one tile) over pixels that have not changed since it last ran
keeps that run's boxes (`PassMemory`): on a still camera most tiles are background. MediaPipe
runs every call of a process on one thread, so a helper process scans part of the tiles.
Any detector error propagates: no frame is ever returned unblurred because detection failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import struct
import tempfile
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import cv2
import numpy as np

from privacy.anonymize_heads import HeadFinder, HeadSettings, hide_mask, median_background
from privacy.face_models import FaceModelError, SETUP_HINT, sha256_file, verified_face_models

# Bump when detection or blurring changes in a way that changes output for equal settings,
# so that caches keyed on `settings_key()` are invalidated.
ALGORITHM_VERSION = 3
BLUR_MODES = ("gaussian", "pixelate", "fill")
# What a site can choose to hide (node-config key `anonymize-mode`): "faces" hides every face
# found; "faces+heads" also hides the head of every moving person (privacy.anonymize_heads),
# for footage whose faces are too small for a face detector.
ANONYMIZE_MODES = ("faces", "faces+heads")


@dataclass(frozen=True)
class Box:
    """A face box in pixel coordinates of the frame it was found in."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0

    @property
    def area(self) -> int:
        return self.w * self.h


@dataclass(frozen=True)
class AnonymizerSettings:
    """How faces are found and hidden. Every field goes into `FaceAnonymizer.settings_key()`.

    min_face_px: boxes narrower than this are dropped: no one is recognisable from a face a
        few pixels wide, and on small frames such boxes are mostly texture mistaken for faces.
    min_confidence / small_face_confidence / small_face_area: the score a box needs, by its
        area as a fraction of the frame: from small_face_area up, min_confidence (0.7: face-
        free photos and textures give large boxes at up to 0.6-0.72, real faces of 48 px and
        more score above 0.7); below it, small_face_confidence (0.3: 20 px faces in 720p
        frames score 0.3-0.5, and a small false positive changes little of the frame).
    box_scale / box_shift_up: BlazeFace's box spans brows to mouth; the hidden ellipse is
        inscribed in the box scaled by box_scale and moved up by box_shift_up of its height
        (hair). ellipse=False hides the whole scaled rectangle instead.
    blur: "gaussian" (sigma = region width / 3), "pixelate" (pixel_blocks across) or "fill"
        (the region's mean colour).
    hold_frames: a detection also covers this many frames before and after its own.
    tile_sizes / tile_every: pyramid tile edges in pixels and, for each, on every how many
        frames of a video it runs. The 128 px level finds faces of 14-40 px in 1280x720
        frames; the 256 and 512 px levels find 48 px and larger, which the whole-frame
        passes (every frame) and the tracker also carry, so they can run less often. On the
        benchmark's 1280x720 video of drifting, turning faces of 14-200 px (`bench_anonymize`,
        curve), (2, 4, 4) with hold 4 covers as many face-frames as (1, 2, 4) (97.0%, 14 px:
        88%, over 120 frames) with fewer passes; running the 128 px level every 2nd frame
        (2, 4, 2) covered 97.3% at ~0.8x the frames/s. Levels whose tile is not smaller
        than the frame are skipped: small training frames get one whole-frame pass, which
        BlazeFace upsamples to its input size by itself.
    image_tile_sizes: further, finer levels run on single images only (with every level of
        tile_sizes): 80 px tiles find 97% of 14 px faces in 1280x720 stills (the 128 px
        level alone 34%) at 2.6x the time per image; in a video the frequent 128 px scans
        and the hold cover small faces instead (93%), at a cost a video can pay.
    tile_overlap: overlap of neighbouring tiles as a fraction of the tile edge.
    nms_iou: boxes overlapping more than this (or lying 80% inside a kept box) are merged.
    reuse_unchanged / change_threshold / reuse_max_frames: in a video, a pass (the whole
        frame or one tile) whose pixels have not changed since it last ran keeps what that
        run found instead of running again: no 16 px block of it (gray, mean absolute
        difference) moved by more than change_threshold grey levels, and it ran at most
        reuse_max_frames frames ago. A face that appears, moves or turns changes its blocks
        by tens of levels; in Debian's vtest.avi (a still camera, encoded) 90% of the blocks
        differ by at most 4 levels between frames 16 apart. On a still camera most tiles
        are background, so most of the pyramid is skipped; on a moving camera nothing is.
    processes: how many processes run the short-range model on tiles (this one and
        processes - 1 helpers, started on the first frame that has more than a few tiles to
        scan, never for small training frames). MediaPipe serialises every call of a
        process on one thread, so a second process is what uses a second core. It changes
        speed, not output; 1 runs everything here.
    model_dir / short_range_model / full_range_model: where the models come from; see
        `privacy.face_models.verified_face_models` (own files skip the pinned hash check).
    heads: also hide the heads of moving people in videos (None: faces only); see
        `for_mode` and `privacy.anonymize_heads`.
    """

    min_confidence: float = 0.7
    small_face_confidence: float = 0.3
    small_face_area: float = 0.001
    min_face_px: int = 8
    box_scale: float = 1.6
    box_shift_up: float = 0.1
    ellipse: bool = True
    blur: str = "gaussian"
    pixel_blocks: int = 6
    hold_frames: int = 4
    tile_sizes: tuple[int, ...] = (512, 256, 128)
    tile_every: tuple[int, ...] = (2, 4, 4)
    image_tile_sizes: tuple[int, ...] = (80,)
    image_tile_confidence: float = 0.45
    tile_overlap: float = 0.25
    nms_iou: float = 0.3
    reuse_unchanged: bool = True
    change_threshold: float = 6.0
    reuse_max_frames: int = 30
    processes: int = 2
    model_dir: Path | None = None
    short_range_model: Path | None = None
    full_range_model: Path | None = None
    heads: HeadSettings | None = None

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> "AnonymizerSettings":
        """Default settings for one of ANONYMIZE_MODES."""
        if mode not in ANONYMIZE_MODES:
            raise ValueError(f"anonymize mode must be one of {', '.join(ANONYMIZE_MODES)}, "
                             f"got {mode!r}")
        heads = HeadSettings() if mode == "faces+heads" else None
        return cls(heads=heads, **overrides)

    def __post_init__(self) -> None:
        if self.blur not in BLUR_MODES:
            raise ValueError(f"blur must be one of {BLUR_MODES}, got {self.blur!r}")
        for name in ("min_confidence", "small_face_confidence", "image_tile_confidence"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.small_face_area < 1.0:
            raise ValueError(f"small_face_area must be in [0, 1), got {self.small_face_area}")
        if self.processes < 1:
            raise ValueError(f"processes must be at least 1, got {self.processes}")
        if self.box_scale < 1.0:
            raise ValueError(f"box_scale must be >= 1, got {self.box_scale}")
        if len(self.tile_sizes) != len(self.tile_every) or min(self.tile_every, default=1) < 1:
            raise ValueError("tile_every needs one positive entry per tile size")
        if min(self.tile_sizes + self.image_tile_sizes, default=64) < 64:
            raise ValueError("tile sizes below 64 px cost much and find nothing more")
        if not 0.0 <= self.tile_overlap < 0.5:
            raise ValueError(f"tile_overlap must be in [0, 0.5), got {self.tile_overlap}")
        # A level that skips frames relies on the hold to cover the frames in between.
        if self.hold_frames < max(self.tile_every, default=1) - 1:
            raise ValueError("hold_frames must be at least max(tile_every) - 1, or faces "
                             "found only on keyframes would flicker unblurred")


@dataclass
class AnonymizeStats:
    """Counts for one video or image: frames seen, detector boxes (after merging) summed
    over frames, regions blurred (detections plus held/interpolated ones), and frames in
    which at least one region was blurred."""

    frames: int = 0
    faces_blurred: int = 0
    regions_blurred: int = 0
    frames_with_faces: int = 0
    frames_with_heads: int = 0

    def add(self, other: "AnonymizeStats") -> None:
        """Accumulate another stats object into this one."""
        for item in dataclasses.fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


class FaceDetectorLike(Protocol):
    """What `FaceAnonymizer` needs from a detector (tests wrap the real one)."""

    model_sha256: dict[str, str]

    def detect(self, rgb: np.ndarray, tile_sizes: Sequence[int],
               memory: "PassMemory | None" = None) -> list[Box]: ...


# ---------------------------------------------------------------------------- detection


@contextlib.contextmanager
def _captured_native_stderr() -> Iterator[list[str]]:
    """Capture what native code writes to fd 2 (TFLite prints dozens of harmless lines per
    model load); the text is handed back so errors can still show it."""
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def _load_blazeface(path: Path, min_confidence: float):
    from mediapipe.tasks.python import BaseOptions, vision

    options = vision.FaceDetectorOptions(
        base_options=BaseOptions(model_asset_path=str(path)),
        min_detection_confidence=min_confidence)
    with _captured_native_stderr() as log:
        try:
            detector = vision.FaceDetector.create_from_options(options)
        except Exception as exc:  # MediaPipe raises ValueError/RuntimeError
            error = exc
        else:
            error = None
    if error is not None:
        tail = " ".join(log[0].split()[-30:]) if log and log[0].strip() else ""
        raise FaceModelError(f"face model {path} does not load in MediaPipe ({error}); "
                             f"{SETUP_HINT}. {tail}".rstrip()) from error
    return detector


def _close_quietly(model) -> None:
    """Close a MediaPipe task; at interpreter exit MediaPipe's executor may already be
    shut down, then drop the handle so its __del__ does not raise during teardown."""
    try:
        model.close()
    except RuntimeError:
        model._handle = None


def is_face(box: Box, frame_area: int, settings: AnonymizerSettings) -> bool:
    """The confidence and size policy: wide enough, and scored high enough for its size."""
    if box.w < settings.min_face_px:
        return False
    small = box.area < settings.small_face_area * frame_area
    return box.score >= (settings.small_face_confidence if small else settings.min_confidence)


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of edge `tile` covering [0, length) with at least the given
    fractional overlap, spread evenly so the last tile ends at the border."""
    if length <= tile:
        return [0]
    step = tile * (1.0 - overlap)
    count = int(np.ceil((length - tile) / step)) + 1
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def merge_boxes(boxes: Sequence[Box], iou_threshold: float) -> list[Box]:
    """Non-maximum suppression: keep the best-scoring box of each overlapping group. A box
    lying 80% inside a kept one is dropped too (a face cut by a tile border)."""
    kept: list[Box] = []
    for box in sorted(boxes, key=lambda b: -b.score):
        if all(not _overlaps(box, other, iou_threshold) for other in kept):
            kept.append(box)
    return kept


def _overlaps(box: Box, other: Box, iou_threshold: float) -> bool:
    ix = max(0, min(box.x + box.w, other.x + other.w) - max(box.x, other.x))
    iy = max(0, min(box.y + box.h, other.y + other.h) - max(box.y, other.y))
    inter = ix * iy
    if inter == 0:
        return False
    iou = inter / (box.area + other.area - inter)
    return iou > iou_threshold or inter > 0.8 * min(box.area, other.area)


class TiledFaceDetector:
    """BlazeFace short- and full-range models run over a tile pyramid of each frame."""

    def __init__(self, settings: AnonymizerSettings):
        """Load both models once; raises FaceModelError if one is missing or unloadable."""
        self.settings = settings
        paths = verified_face_models(settings.model_dir, settings.short_range_model,
                                     settings.full_range_model, keys=("short_range", "full_range"))
        self.model_sha256 = {key: sha256_file(path) for key, path in paths.items()}
        threshold = min(settings.min_confidence, settings.small_face_confidence)
        self._short_range_path, self._threshold = paths["short_range"], threshold
        self._helpers: _TileHelpers | None = None
        self.short_range = _load_blazeface(paths["short_range"], threshold)
        try:
            self.full_range = _load_blazeface(paths["full_range"], threshold)
        except FaceModelError:
            self.short_range.close()
            raise
        # Close at interpreter exit while MediaPipe still works (its __del__ fails later).
        self._finalizers = [weakref.finalize(self, _close_quietly, model)
                            for model in (self.short_range, self.full_range)]

    def close(self) -> None:
        """Release the MediaPipe tasks and stop the helper processes."""
        if self._helpers is not None:
            self._helpers.close()
            self._helpers = None
        for finalizer in self._finalizers:
            finalizer()

    def detect(self, rgb: np.ndarray, tile_sizes: Sequence[int],
               memory: "PassMemory | None" = None) -> list[Box]:
        """Faces in an RGB uint8 frame: whole frame with both models, then tiles of each
        size in `tile_sizes` (that is smaller than the frame) with the short-range model.
        `memory` (one per video): passes over unchanged pixels reuse their last result."""
        height, width = rgb.shape[:2]
        if memory is not None:
            memory.next_frame(rgb)
        passes = [("whole-short", 0, 0, width, height), ("whole-full", 0, 0, width, height)]
        for tile in tile_sizes:
            if tile >= max(width, height):
                continue
            for y in tile_origins(height, tile, self.settings.tile_overlap):
                for x in tile_origins(width, tile, self.settings.tile_overlap):
                    passes.append(("tile", x, y, tile, tile))
        results: list[list[Box] | None] = [
            memory.recall(key) if memory is not None else None for key in passes]
        todo = [i for i, found in enumerate(results) if found is None]
        # Tiles for the helper processes: all but every n-th short-range tile still to scan.
        tiles = [i for i in todo if passes[i][0] == "tile"]
        helpers = self._helpers_for(len(tiles))
        # This process also runs the whole-frame passes (~5 tiles' worth at 720p).
        n = self.settings.processes
        share = min(len(tiles), (len(tiles) + 5 * (len(todo) - len(tiles))) * (n - 1) // n)
        sent = tiles[len(tiles) - share:] if helpers is not None else []
        try:
            pending = helpers.detect(rgb, [passes[i] for i in sent]) if sent else []
            remote = set(sent)
            for i in todo:
                if i in remote:
                    continue
                model, x, y, w, h = passes[i]
                results[i] = self._run(self.full_range if model == "whole-full"
                                       else self.short_range, rgb[y:y + h, x:x + w], x, y)
            for helper, chunk in pending:
                for i, found in zip(chunk, helpers.collect(helper)):  # raises its error
                    results[sent[i]] = found
        except BaseException:
            # Replies still in a pipe would be read as the next frame's: start afresh.
            if self._helpers is not None:
                self._helpers.close()
                self._helpers = None
            raise
        boxes: list[Box] = []
        scanned = set(todo)
        for i, (key, found) in enumerate(zip(passes, results)):
            if i in scanned:
                if key[0] == "tile" and key[3] in self.settings.image_tile_sizes:
                    found = [box for box in found
                             if box.score >= self.settings.image_tile_confidence]
                if memory is not None:
                    memory.store(key, found)
            boxes += found
        boxes = [box for box in boxes if is_face(box, width * height, self.settings)]
        return merge_boxes(boxes, self.settings.nms_iou)

    def _helpers_for(self, tiles: int) -> "_TileHelpers | None":
        """The helper processes, started when a frame has enough tiles to share."""
        if self.settings.processes < 2 or tiles < 4:
            return None
        if self._helpers is None:
            self._helpers = _TileHelpers(self._short_range_path, self._threshold,
                                         self.settings.processes - 1)
        return self._helpers

    @staticmethod
    def _run(model, rgb: np.ndarray, x0: int, y0: int) -> list[Box]:
        import mediapipe as mp

        image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        height, width = rgb.shape[:2]
        found = []
        for detection in model.detect(image).detections:
            bb = detection.bounding_box
            x, y = max(bb.origin_x, 0), max(bb.origin_y, 0)
            w = min(bb.origin_x + bb.width, width) - x
            h = min(bb.origin_y + bb.height, height) - y
            if w > 0 and h > 0:
                found.append(Box(x + x0, y + y0, w, h, float(detection.categories[0].score)))
        return found



def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError("the other end closed the pipe")
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other end closed the pipe")
    return pickle.loads(data)


def helper_main() -> None:
    """Body of a tile helper process (see `_TileHelpers`): reads the model path and
    threshold, then lists of (tile, x, y) on stdin; writes ("ok", boxes per tile) or
    ("error", text) for each to its original stdout. Native libraries' output goes to
    stderr, so that it cannot corrupt the replies."""
    import sys

    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    path, threshold = _receive(requests)
    try:
        model = _load_blazeface(Path(path), threshold)
    except FaceModelError as exc:
        _send(replies, ("error", str(exc)))
        return
    _send(replies, ("ok", None))
    while True:
        try:
            tiles = _receive(requests)
        except EOFError:
            return
        try:
            _send(replies, ("ok", [TiledFaceDetector._run(model, t, x, y) for t, x, y in tiles]))
        except Exception as exc:  # reported to the parent, which raises it
            _send(replies, ("error", f"{type(exc).__name__}: {exc}"))


class _TileHelpers:
    """Processes, each with its own short-range model, that scan tiles for the detector.
    Plain subprocesses on pipes (not multiprocessing: its "spawn" re-runs the caller's main
    script, and MediaPipe's threads do not survive a fork). A helper's error, or a helper
    that dies, raises in `collect`: detection fails closed."""

    def __init__(self, path: Path, threshold: float, count: int):
        import subprocess
        import sys

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        command = [sys.executable, "-c", "from privacy.anonymize import helper_main; helper_main()"]
        self.procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, env=env)
                      for _ in range(count)]
        self._started = [False] * count
        self._finalizer = weakref.finalize(self, _stop_helpers, self.procs)
        for proc in self.procs:
            _send(proc.stdin, (str(path), threshold))

    def detect(self, rgb: np.ndarray, passes: list[tuple]) -> list[tuple[int, list[int]]]:
        """Send the tile passes, split over the helpers: [(helper, indices into passes)]."""
        sent = []
        for k, proc in enumerate(self.procs):
            chunk = list(range(k, len(passes), len(self.procs)))
            if chunk:
                tiles = [(np.ascontiguousarray(rgb[y:y + h, x:x + w]), x, y)
                         for _, x, y, w, h in (passes[i] for i in chunk)]
                _send(proc.stdin, tiles)
                sent.append((k, chunk))
        return sent

    def collect(self, helper: int) -> list[list[Box]]:
        """The boxes of each tile sent to one helper, in order."""
        proc = self.procs[helper]
        try:
            if not self._started[helper]:
                self._check(_receive(proc.stdout))
                self._started[helper] = True
            return self._check(_receive(proc.stdout))
        except EOFError as exc:
            raise RuntimeError(f"face detector helper process exited ({proc.poll()})") from exc

    @staticmethod
    def _check(reply):
        status, value = reply
        if status != "ok":
            raise FaceModelError(value) if "face model" in value else RuntimeError(value)
        return value

    def close(self) -> None:
        """Stop the helper processes."""
        self._finalizer()


def _stop_helpers(procs) -> None:
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except Exception:
            proc.kill()
        with contextlib.suppress(OSError):
            proc.stdout.close()


class PassMemory:
    """What each detector pass (the whole frame, or one tile) of one video saw and found the
    last time it ran, so that a pass over pixels that have not changed since is skipped.

    Pixels are compared in gray at a quarter of the frame's size (frames under 256 px at
    full size), by 4x4 blocks of that (16 px blocks of a large frame): a pass is unchanged
    when no block's mean absolute difference exceeds `threshold` grey levels against the
    frame it last ran on, and it ran at most `max_frames` frames ago."""

    def __init__(self, threshold: float, max_frames: int):
        self.threshold, self.max_frames = threshold, max_frames
        self._passes: dict[tuple, tuple[int, np.ndarray, list[Box]]] = {}
        self._index = -1
        self._gray: np.ndarray | None = None
        self._scale = 1

    def next_frame(self, rgb: np.ndarray) -> None:
        """Start a new frame (RGB uint8)."""
        self._index += 1
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        self._scale = 4 if min(gray.shape) >= 256 else 1
        if self._scale > 1:
            gray = cv2.resize(gray, (gray.shape[1] // 4, gray.shape[0] // 4),
                              interpolation=cv2.INTER_AREA)
        self._gray = gray

    def _crop(self, key: tuple) -> np.ndarray:
        _, x, y, w, h = key
        k = self._scale
        return self._gray[y // k:(y + h) // k, x // k:(x + w) // k]

    def recall(self, key: tuple) -> list[Box] | None:
        """The boxes this pass found when it last ran, if its pixels have not changed."""
        seen = self._passes.get(key)
        if seen is None or self._index - seen[0] > self.max_frames:
            return None
        crop = self._crop(key)
        if crop.shape != seen[1].shape:
            return None
        diff = cv2.absdiff(crop, seen[1])
        if diff.shape[0] >= 4 and diff.shape[1] >= 4:
            diff = cv2.resize(diff, (diff.shape[1] // 4, diff.shape[0] // 4),
                              interpolation=cv2.INTER_AREA)
        return seen[2] if float(diff.max(initial=0)) <= self.threshold else None

    def store(self, key: tuple, boxes: list[Box]) -> None:
        """Record what a pass found on the current frame."""
        self._passes[key] = (self._index, self._crop(key).copy(), boxes)


# ---------------------------------------------------------------------------- hiding


def region_of(box: Box, settings: AnonymizerSettings,
              shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The enlarged region (x0, y0, x1, y1) hidden for a face box, clipped to the frame."""
    height, width = shape[:2]
    cx = box.x + box.w / 2
    cy = box.y + box.h / 2 - settings.box_shift_up * box.h
    half_w = box.w * settings.box_scale / 2
    half_h = box.h * settings.box_scale / 2
    x0, y0 = max(int(np.floor(cx - half_w)), 0), max(int(np.floor(cy - half_h)), 0)
    x1, y1 = min(int(np.ceil(cx + half_w)), width), min(int(np.ceil(cy + half_h)), height)
    return x0, y0, x1, y1


def hide_region(frame: np.ndarray, region: tuple[int, int, int, int], mode: str,
                pixel_blocks: int = 6, ellipse: bool = False) -> None:
    """Overwrite frame[region] in place with a blurred, pixelated or filled version: all of
    it, or only the ellipse inscribed in it."""
    x0, y0, x1, y1 = region
    patch = frame[y0:y1, x0:x1]
    if patch.size == 0:
        return
    if mode == "gaussian":
        hidden = _strong_gaussian(patch)
    elif mode == "pixelate":
        blocks_w = max(1, min(pixel_blocks, patch.shape[1]))
        blocks_h = max(1, round(blocks_w * patch.shape[0] / patch.shape[1]))
        small = cv2.resize(patch, (blocks_w, blocks_h), interpolation=cv2.INTER_AREA)
        hidden = cv2.resize(small, (patch.shape[1], patch.shape[0]),
                            interpolation=cv2.INTER_NEAREST)
    elif mode == "fill":
        hidden = np.broadcast_to(patch.reshape(-1, *patch.shape[2:]).mean(axis=0)
                                 .astype(frame.dtype), patch.shape)
    else:
        raise ValueError(f"unknown blur mode {mode!r}")
    if ellipse:
        inside = ellipse_mask(patch.shape[1], patch.shape[0])
        np.copyto(patch, hidden.reshape(patch.shape),
                  where=inside.reshape(inside.shape + (1,) * (patch.ndim - 2)))
    else:
        patch[...] = hidden.reshape(patch.shape)


def ellipse_mask(width: int, height: int) -> np.ndarray:
    """Boolean mask of the ellipse inscribed in a width x height rectangle."""
    ys = (np.arange(height) + 0.5 - height / 2) / (height / 2)
    xs = (np.arange(width) + 0.5 - width / 2) / (width / 2)
    return ys[:, None] ** 2 + xs[None, :] ** 2 <= 1.0


def hide_faces(image: np.ndarray, boxes: Sequence[Box], settings: AnonymizerSettings) -> np.ndarray:
    """A copy of `image` with the enlarged region (ellipse) of every box hidden."""
    out = image.copy()
    regions = [region_of(box, settings, out.shape) for box in boxes]
    # A rectangle inside another is hidden by it; an ellipse need not be.
    regions = sorted(set(regions)) if settings.ellipse else _drop_contained(regions)
    for region in regions:
        hide_region(out, region, settings.blur, settings.pixel_blocks, settings.ellipse)
    return out


def _strong_gaussian(patch: np.ndarray) -> np.ndarray:
    """Gaussian blur with sigma = patch width / 3: at /6 and /4 BlazeFace still finds the
    blurred head (a skin-coloured blob under hair) at score 0.56-0.59. Large patches are
    blurred at a 12 px wide working size and scaled back: the same at a fraction of the cost."""
    height, width = patch.shape[:2]
    work_w = min(width, 12)
    work_h = max(1, round(height * work_w / width))
    small = cv2.resize(patch, (work_w, work_h), interpolation=cv2.INTER_AREA)
    sigma = work_w / 3.0
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=sigma, sigmaY=sigma,
                             borderType=cv2.BORDER_REPLICATE)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------- anonymizer


class FaceAnonymizer:
    """Finds and hides faces in images and in the frames of a video."""

    def __init__(self, settings: AnonymizerSettings | None = None,
                 detector: FaceDetectorLike | None = None):
        """Load the detectors once. Fails closed: raises FaceModelError when a model is
        missing, corrupt or does not load. `detector` replaces the BlazeFace pyramid (tests)."""
        self.settings = settings or AnonymizerSettings()
        self.detector = detector if detector is not None else TiledFaceDetector(self.settings)

    def close(self) -> None:
        """Release the detector's native resources."""
        close = getattr(self.detector, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "FaceAnonymizer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def settings_key(self) -> str:
        """Hex digest of the settings, the models' SHA-256 and the algorithm version: equal
        keys mean equal output, so caches of anonymized clips can be keyed on it."""
        values = dataclasses.asdict(self.settings)
        for name in ("model_dir", "short_range_model", "full_range_model", "processes"):
            values.pop(name)  # where the models lie does not matter, their bytes do
        values["models"] = dict(sorted(self.detector.model_sha256.items()))
        values["algorithm_version"] = ALGORITHM_VERSION
        text = json.dumps(values, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()

    def detect(self, image: np.ndarray) -> list[Box]:
        """Face boxes (pixel coordinates, with score) in one BGR or gray uint8 image, using
        every pyramid level, the image-only ones too."""
        sizes = tuple(self.settings.tile_sizes) + tuple(self.settings.image_tile_sizes)
        return self.detector.detect(_to_rgb(image), sizes)

    def anonymize_image(self, image: np.ndarray) -> tuple[np.ndarray, list[Box]]:
        """A copy of a BGR uint8 image with every detected face hidden, and the boxes found.
        An image without faces comes back bit-identical. Heads are found by their motion,
        so in "faces+heads" mode an image still has only its faces hidden."""
        boxes = self.detect(image)
        return hide_faces(image, boxes, self.settings), boxes

    def stream(self, background: np.ndarray | None = None) -> "VideoStream":
        """A stateful stream for the frames of one video, pushed in order. `background`:
        the scene without people, for hiding heads (see `median_background`)."""
        heads = self.settings.heads
        return VideoStream(self, heads=HeadFinder(heads, background) if heads else None)

    def anonymize_frames(
            self, frames: Sequence[np.ndarray]) -> tuple[list[np.ndarray], AnonymizeStats]:
        """Anonymize the BGR uint8 frames of one video, in order. Returns new arrays (the
        input is not modified) and stats. Detector errors propagate."""
        background = median_background(frames) if self.settings.heads and frames else None
        stream = self.stream(background)
        done: list[AnonymizedFrame] = []
        for frame in frames:
            done += stream.push(frame)
        done += stream.finish()
        return [item.frame for item in done], stream.stats

    def _tile_sizes_for(self, frame_index: int) -> list[int]:
        return [size for size, every in zip(self.settings.tile_sizes, self.settings.tile_every)
                if frame_index % every == 0]


@dataclass
class _Pending:
    index: int
    frame: np.ndarray
    boxes: list[Box]
    heads: np.ndarray | None = None  # mask of head pixels to hide


@dataclass
class VideoStream:
    """Push frames of one video in order; get anonymized frames back `hold_frames` later,
    once the detections after them are known. Memory: hold_frames + 1 frames. A pushed
    frame is kept by reference until it comes back: do not modify it in the meantime."""

    anonymizer: FaceAnonymizer
    heads: HeadFinder | None = None
    stats: AnonymizeStats = field(default_factory=AnonymizeStats)
    _pending: deque = field(default_factory=deque)
    _recent: deque = field(default_factory=deque)  # (index, boxes) of emitted frames
    _count: int = 0
    _memory: PassMemory | None = None

    def __post_init__(self) -> None:
        settings = self.anonymizer.settings
        if settings.reuse_unchanged:
            self._memory = PassMemory(settings.change_threshold, settings.reuse_max_frames)

    def push(self, frame: np.ndarray) -> list["AnonymizedFrame"]:
        """Detect faces in the next frame; return the frames that are now final."""
        index = self._count
        self._count += 1
        boxes = self.anonymizer.detector.detect(
            _to_rgb(frame), self.anonymizer._tile_sizes_for(index), memory=self._memory)
        heads = self.heads.head_mask(frame) if self.heads is not None else None
        self._pending.append(_Pending(index, frame, boxes, heads))
        hold = self.anonymizer.settings.hold_frames
        ready = []
        while self._pending and self._pending[0].index <= index - hold:
            ready.append(self._emit())
        return ready

    def finish(self) -> list["AnonymizedFrame"]:
        """Return the frames still waiting for look-ahead (end of the video)."""
        return [self._emit() for _ in range(len(self._pending))]

    def _emit(self) -> "AnonymizedFrame":
        settings = self.anonymizer.settings
        current = self._pending.popleft()
        past = [(i, b) for i, b in self._recent if current.index - i <= settings.hold_frames]
        future = [(p.index, p.boxes) for p in self._pending
                  if p.index - current.index <= settings.hold_frames]
        boxes = list(dict.fromkeys(current.boxes + _held_boxes(current.index, current.boxes, past, future)))
        out = hide_faces(current.frame, boxes, settings)
        with_heads = current.heads is not None and bool(current.heads.any())
        if with_heads:
            hide_mask(out, current.heads)
        self._recent.append((current.index, current.boxes))
        while self._recent and current.index - self._recent[0][0] >= settings.hold_frames:
            self._recent.popleft()
        self.stats.add(AnonymizeStats(frames=1, faces_blurred=len(current.boxes),
                                      regions_blurred=len(boxes),
                                      frames_with_faces=int(bool(boxes)),
                                      frames_with_heads=int(with_heads)))
        return AnonymizedFrame(current.index, current.frame, out, current.boxes, boxes)


@dataclass(frozen=True)
class AnonymizedFrame:
    """One output of `VideoStream`: the input frame, its anonymized copy, the boxes detected
    on it and all boxes hidden on it (detected, held and interpolated)."""

    index: int
    original: np.ndarray
    frame: np.ndarray
    detected: list[Box]
    hidden: list[Box]


def _held_boxes(index: int, current: list[Box], past: list[tuple[int, list[Box]]],
                future: list[tuple[int, list[Box]]]) -> list[Box]:
    """Boxes carried over `index` from neighbouring frames. A past box whose nearest match
    ahead (what looks like the same face) has it as its own nearest match behind is tracked:
    the box interpolated between the two. A box with no match on the other side, and not
    overlapping a box found on this frame, is held still (a face entering, leaving or
    missed there). Duplicates are dropped: a static face gives the same box each frame."""
    past_boxes = [a for _, before in past for a in before]
    future_boxes = [b for _, after in future for b in after]
    held: set[Box] = set()
    tracked: set[Box] = set()
    for i, before in past:
        for a in before:
            matches = [(j, b) for j, after in future for b in after if _same_face(a, b)]
            if matches:
                j, b = min(matches, key=lambda match: (match[0], _distance(a, match[1])))
                # Mutual nearest: two faces side by side are not swapped into one track.
                if a is min((p for p in past_boxes if _same_face(p, b)),
                            key=lambda p: _distance(p, b)):
                    held.add(_interpolate(a, b, (index - i) / (j - i)))
                    tracked.add(b)
                    continue
            if not any(_overlaps(a, c, 0.3) for c in current):
                held.add(a)
    for b in future_boxes:
        if (b not in tracked and not any(_same_face(a, b) for a in past_boxes)
                and not any(_overlaps(b, c, 0.3) for c in current)):
            held.add(b)
    return list(held)


def _distance(a: Box, b: Box) -> float:
    dx = (a.x + a.w / 2) - (b.x + b.w / 2)
    dy = (a.y + a.h / 2) - (b.y + b.h / 2)
    return (dx * dx + dy * dy) ** 0.5


def _drop_contained(regions: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Regions not lying inside another one (hiding those twice changes nothing)."""
    unique = sorted(set(regions), key=lambda r: -(r[2] - r[0]) * (r[3] - r[1]))
    kept: list[tuple[int, int, int, int]] = []
    for r in unique:
        if not any(k[0] <= r[0] and k[1] <= r[1] and k[2] >= r[2] and k[3] >= r[3] for k in kept):
            kept.append(r)
    return kept


def _same_face(a: Box, b: Box) -> bool:
    ratio = max(a.w, b.w) / max(1, min(a.w, b.w))
    return ratio < 2.0 and _distance(a, b) < 2.0 * max(a.w, a.h, b.w, b.h)


def _interpolate(a: Box, b: Box, t: float) -> Box:
    def mix(u: float, v: float) -> int:
        return int(round(u + (v - u) * t))

    return Box(mix(a.x, b.x), mix(a.y, b.y), mix(a.w, b.w), mix(a.h, b.h), min(a.score, b.score))


def _to_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ValueError(f"expected an HxW or HxWx3/4 image, got shape {image.shape}")
