"""Face anonymization of video frames with MediaPipe's BlazeFace detectors.

BlazeFace sees its input at 128 px (short-range model) or 192 px (full-range model), so a
20 px face in a 1280x720 frame shrinks to 2-3 px and is missed by a whole-frame pass. The
detector therefore runs as a pyramid: the whole frame (both models), then the frame scaled
so that a window of 512, 256 or 64 px becomes the network's 128 px input, scanned densely
by the short-range network (`privacy.blazeface_dense`: every 128 px window at once, no
overlap scanned twice). A face is found best at 15-75% of a window, so each level finds
faces of about 0.15-0.75 of its size and the levels overlap; the 64 px level finds 14 px
faces in 1280x720 frames.

Which boxes count as faces is a confidence and size policy chosen on labelled negatives
(face-free photos, textures, video; `simulations/bench_anonymize.py`): false positives on
textures are small boxes at low scores or large boxes at scores up to ~0.6, while real
faces are either small (and then often scored 0.3-0.5) or large and scored above 0.7. A box
covering less than `small_face_area` of the frame is kept from `small_face_confidence`, a
larger one from `min_confidence`: small false positives cost little area, large ones much.
A box of the finest levels scored just under what it needs is shown to CenterFace, a
detector of another design (`second_opinion`): where it confirms a face, the box counts.

A face is hidden by a tight rectangle, in gray: the face's box scaled by `box_scale`, blurred
and stripped of colour. Against an ellipse with a margin it covers the corners of the face
(brows, jaw) with less margin, and a gray rectangle does not keep the skin-coloured, head-
shaped blob that face detectors still find after blurring; skin tone goes with it.

Video is processed as a stream. The fine levels run only every few frames (keyframes) and
the stream looks ahead twice `hold_frames` frames. A detection is tracked to the nearest
matching detection before and after it (a linear motion model between the two), so a moving
face found only on keyframes is covered where it is, not by a smear of held boxes; a box with
no match on one side (a face entering, leaving, or missed) is held still there, a face
missed on one keyframe is tracked across it, and one first found after it was in view is
carried back at its speed; the last
frame of a video is scanned by every level, and so is the last frame of a shot (where the
picture changes at once, or where faces found on one keyframe are found nowhere near on the
next): a face that came into view just before a cut has no detection after it to be tracked
to. No box is tracked, held or carried across a cut. A pass looks again only at the bands
of rows whose pixels changed since it last looked at them (`PassMemory`): on a still camera
most of the frame is background. Any detector error propagates: no frame is ever returned
unblurred because detection failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import cv2
import numpy as np

from privacy.anonymize_centerface import CenterFaceDetector
from privacy.anonymize_heads import HeadFinder, HeadSettings, hide_mask, median_background
from privacy.blazeface_dense import INPUT_SIZE, DenseBlazeFace, FullRangeBlazeFace, strips
from privacy.face_models import sha256_file, verified_face_models

# Bump when detection or blurring changes in a way that changes output for equal settings,
# so that caches keyed on `settings_key()` are invalidated.
ALGORITHM_VERSION = 27
# A video's changed bands are scanned in pieces of 1, 2 or SCAN_BANDS bands (one input shape
# per length: LiteRT replans for a new one), or the whole frame where that costs no more.
SCAN_BANDS = 4
BLUR_MODES = ("gaussian", "pixelate", "fill")
# The fastest face the edge stretch allows for, px per frame: one crossing a 1280 px frame
# in 1.3 s at 30 frames/s.
FAST_FACE_PX = 32
# A cut: over CUT_SHARE of the 16 px blocks of a frame differ from the frame before by more
# than CUT_LEVELS grey levels (mean absolute difference). Cuts between real videos change
# 71-93% of the blocks; a camera panning 4 px a frame over a photo 8%, Debian's tree.avi at
# most 32%.
CUT_LEVELS, CUT_SHARE = 20.0, 0.5
# A face found at this score on two keyframes in a row and on none near the next, away from
# the frame's edges, also marks the end of a shot (one cut to the same background). Small
# faces at the detector's threshold (0.3-0.5) come and go between keyframes by themselves.
LOST_FACE_SCORE = 0.5
# A face whose next box lies within this share of its width of where its speed takes it is
# tracked without doubt, however fast (0.25 and 0.5 gave the same cover and collateral).
PREDICTED_WITHIN = 0.25
# What a site can choose to hide (node-config key `anonymize-mode`): "faces" hides every face
# found; "faces+heads" also hides the head of every moving person (privacy.anonymize_heads),
# for footage whose faces are too small for a face detector.
ANONYMIZE_MODES = ("faces", "faces+heads")
# A video's pyramid levels (window_sizes, window_every) by the smallest face, in pixels of the
# frame, that a site needs found (node-config `anonymize-smallest-face`). Of the benchmark's
# held-out people in 720p video, still / panning camera (`bench_anonymize`, heldout): 20, the
# 96 px level: 66 / 92% of the face-frames of 14 px faces, 95-100% from 17 px; 14 (default),
# the 64 px level: 98 / 99% of 14 px ones; 12, both 64 and 48 px levels: 100 / 100% of 14 px
# and 97-98% of 12 px ones, at about half the frames/s.
SMALLEST_FACES = {20: ((512, 256, 96), (2, 4, 4)),
                  14: ((512, 256, 64), (2, 4, 4)),
                  12: ((512, 256, 64, 48), (2, 4, 4, 4))}


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
    box_scale / box_shift_up: the hidden rectangle is the detected box scaled by box_scale
        and moved up by box_shift_up of its height. BlazeFace's box is 0.97x a hand-drawn
        face box on average but varies (0.75-1.6x, centre +-5%): on the benchmark's 540
        faces 1.3 is the smallest scale that covers all of them (1.25 and 1.2: 99.4%); with
        the stripes the networks find none of them at either scale, but at 1.3 the Haar
        cascade finds 1.2% of the second set's (`bench_anonymize.check_stills`), 0.2% at 1.4.
        ellipse=True hides the ellipse inscribed in the scaled box instead.
    blur: "gaussian" (sigma = region width / 3), "pixelate" (pixel_blocks across) or "fill"
        (the region's mean); keep_colour=False turns the hidden region gray, which took
        BlazeFace full-range's re-detection of blurred faces from 7% to 2.6% at score 0.3.
    stripes: the height, in grey levels, of diagonal stripes laid over the region after
        blurring (+- stripes; 3.5 periods across the region, at 45 degrees; 0: none). What
        BlazeFace full-range still finds after blurring is a smooth gray blob inside a head's
        outline (2.4% of the benchmark's hidden faces at score 0.3, 7.5% on a second set of
        composites). Hard-edged stripes break the blob up for both networks (0.0% / 0.0%,
        CenterFace too) and give OpenCV's Haar cascade, which fires on texture, little to
        find (0.6% against 0.7% without; a grain of blocks took the networks to 0% too but
        the Haar cascade to 16%, smooth stripes or blotches raised BlazeFace's hits). The
        pattern is the same for every region, and moves with it: it carries nothing of the face.
    hold_frames: a detection also covers this many frames before and after its own; a
        confident face is tracked across twice as many (a keyframe that missed it).
    window_sizes / window_every: pyramid levels (the window of the frame that the network's
        128 px input sees) and, for each, on every how many frames of a video it runs. The
        64 px level finds faces of 14-48 px in 1280x720 frames, the 256 and 512 px levels
        32 px and larger; the whole-frame short-range pass runs on every frame. Levels whose
        window is not smaller than the frame are skipped: small training frames get the
        whole-frame passes only. A 96 px finest level is 1.5-1.7x faster but covered 66%
        of the face-frames of 14 px faces of people no other figure uses, with a still
        camera (`bench_anonymize`, heldout; an 80 px one 82%, 64 px 98%); a site chooses
        between them by SMALLEST_FACES. The recall and frames/s of other schedules:
        `bench_anonymize`, curve and heldout.
    full_range_every: in a video, the full-range pass runs on every how many frames (the
        last of each run of them), where the largest level runs too; on frames no level is
        smaller than, every frame. It finds the sizes the 512 px level finds (every face of
        the benchmark's videos is covered without it), and took 8 of 55 ms per 720p frame
        in MediaPipe's graph: with 2, on the frames the 512 px level skips, 19.0 -> 21.2
        frames/s. In LiteRT it takes 2.2 ms a frame (MediaPipe's graph 4.8-5.3 ms now).
    image_window_sizes: the levels a single image is scanned at, all at once: 96 and 48 px
        levels besides the video's, since an image has no keyframes and no hold to make up
        for a face one level misses. The 48 px level (a 14 px face seen at 37 px, where the
        network finds faces best) took the 14 px faces of other people covered in stills
        from 96.8% to 99.8%, for 2.2x the time and 0.4 pp more of face-free photos changed
        (`bench_anonymize`, heldout and negatives).
    fine_window_sizes / fine_window_confidence: the levels whose boxes need
        fine_window_confidence instead of small_face_confidence. Scaled up 2x, texture
        passes for small faces (a face-free photo, scikit-image's rocket, gave a 12 px box
        at 0.33-0.48); at 0.45 the 64 px level still covered 98% of the face-frames of other
        people's 14 px faces in video (`bench_anonymize`, heldout; 100% at 0.3, with 0.8-1.9
        pp more non-face pixels changed). The 48 px level scales an image up 2.7x. In a
        video, a box of these levels over a face found on the last two keyframes needs a
        step less (`PyramidFaceDetector._fine_face`).
    second_opinion: a fine level's box scored at least what a face found before needs there,
        but under what a new one needs (small: 0.3-0.45, larger: 0.45-0.7), is shown to
        CenterFace, a detector of another design (`privacy.anonymize_centerface`), on a crop
        three box widths wide; a box it scores this much counts as a face (0: no second
        opinion; it only adds faces). At 0.3 it confirmed 38.5% of 390 such boxes over the
        faces of the benchmark's held-out people and none of 6,296 over face-free photos,
        textures and background; it covers more of those people at 20-40 px in SD video and
        at 14 px in 720p (`bench_anonymize`, heldout). About 2 ms a box on two cores.
    nms_iou: boxes overlapping more than this (or lying 80% inside a kept box) are merged.
    reuse_unchanged / change_threshold / reuse_max_frames: in a video, a pass looks again
        only at the bands of rows (one window high) where some 16 px block (gray, mean
        absolute difference) moved by more than change_threshold grey levels since it last
        looked, or that it last looked at more than reuse_max_frames frames ago (in pieces
        of 1, 2 or 4 bands: SCAN_BANDS); elsewhere it keeps what it found. A face that
        appears, moves or turns changes its blocks by tens of levels; in Debian's vtest.avi
        (a still camera, encoded) 90% of the blocks differ by at most 4 levels between
        frames 16 apart.
    threads: LiteRT's threads for the dense network (0: one per core). Speed, not output.
    int8: the passes that scale the frame up for small faces (windows under 128 px: the 64 px
        level, most of a 720p video's time, and the whole-frame pass of frames under 128 px)
        run the short-range network in int8 (`privacy.blazeface_int8`,
        derived at setup from MediaPipe's file): 1.5x faster on two cores, the same faces
        found, their scores within ~0.06. The other passes keep the float network, whose
        large false positives stay under min_confidence (in int8 a 350 px one of the
        benchmark's background reached 0.70). False: MediaPipe's float network everywhere;
        with an own short_range_model, that file everywhere.
    model_dir / short_range_model / full_range_model: where the models come from; see
        `privacy.face_models.verified_face_models` (own files skip the pinned hash check).
    heads: also hide the heads of moving people in videos (None: faces only); see
        `for_mode` and `privacy.anonymize_heads`.
    """

    min_confidence: float = 0.7
    small_face_confidence: float = 0.3
    small_face_area: float = 0.001
    min_face_px: int = 8
    box_scale: float = 1.4
    box_shift_up: float = 0.05
    ellipse: bool = False
    blur: str = "gaussian"
    keep_colour: bool = False
    stripes: float = 20.0
    pixel_blocks: int = 4
    hold_frames: int = 4
    window_sizes: tuple[int, ...] = SMALLEST_FACES[14][0]
    window_every: tuple[int, ...] = SMALLEST_FACES[14][1]
    full_range_every: int = 2
    image_window_sizes: tuple[int, ...] = (512, 256, 96, 64, 48)
    fine_window_sizes: tuple[int, ...] = (64, 48)
    fine_window_confidence: float = 0.45
    second_opinion: float = 0.3
    nms_iou: float = 0.3
    reuse_unchanged: bool = True
    change_threshold: float = 6.0
    reuse_max_frames: int = 30
    threads: int = 0
    int8: bool = True
    model_dir: Path | None = None
    short_range_model: Path | None = None
    full_range_model: Path | None = None
    heads: HeadSettings | None = None

    @classmethod
    def for_mode(cls, mode: str, smallest_face: int = 14, **overrides) -> "AnonymizerSettings":
        """Default settings for one of ANONYMIZE_MODES, with a video's levels for one of
        SMALLEST_FACES."""
        if mode not in ANONYMIZE_MODES:
            raise ValueError(f"anonymize mode must be one of {', '.join(ANONYMIZE_MODES)}, "
                             f"got {mode!r}")
        if smallest_face not in SMALLEST_FACES:
            raise ValueError(f"smallest face must be one of {', '.join(map(str, SMALLEST_FACES))} px, "
                             f"got {smallest_face!r}")
        heads = HeadSettings() if mode == "faces+heads" else None
        window_sizes, window_every = SMALLEST_FACES[smallest_face]
        return cls(**{"heads": heads, "window_sizes": window_sizes, "window_every": window_every,
                      **overrides})

    def __post_init__(self) -> None:
        if self.blur not in BLUR_MODES:
            raise ValueError(f"blur must be one of {BLUR_MODES}, got {self.blur!r}")
        for name in ("min_confidence", "small_face_confidence", "fine_window_confidence"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.second_opinion < 1.0:
            raise ValueError(f"second_opinion must be in [0, 1) (0: none), got {self.second_opinion}")
        if not 0.0 <= self.small_face_area < 1.0:
            raise ValueError(f"small_face_area must be in [0, 1), got {self.small_face_area}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: one per core), got {self.threads}")
        if not 0.0 <= self.stripes <= 64.0:
            raise ValueError(f"stripes must be in [0, 64] grey levels, got {self.stripes}")
        if self.box_scale < 1.0:
            raise ValueError(f"box_scale must be >= 1, got {self.box_scale}")
        if len(self.window_sizes) != len(self.window_every) or min(self.window_every, default=1) < 1:
            raise ValueError("window_every needs one positive entry per window size")
        if self.full_range_every < 1:
            raise ValueError(f"full_range_every must be >= 1, got {self.full_range_every}")
        if min(self.window_sizes + self.image_window_sizes, default=32) < 32:
            raise ValueError("window sizes below 32 px (frames scaled up 4x) find nothing more")
        # A level that skips frames relies on the hold to cover the frames in between.
        if self.hold_frames < max((*self.window_every, self.full_range_every)) - 1:
            raise ValueError("hold_frames must be at least max(window_every, full_range_every)"
                             " - 1, or faces found only on keyframes would flicker unblurred")


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

    def detect(self, rgb: np.ndarray, window_sizes: Sequence[int],
               memory: "PassMemory | None" = None, full_range: bool = True,
               confirmed: Sequence[Box] = ()) -> list[Box]: ...


# ---------------------------------------------------------------------------- detection


def is_face(box: Box, frame_area: int, settings: AnonymizerSettings) -> bool:
    """The confidence and size policy: wide enough, and scored high enough for its size."""
    if box.w < settings.min_face_px:
        return False
    small = box.area < settings.small_face_area * frame_area
    return box.score >= (settings.small_face_confidence if small else settings.min_confidence)


def merge_boxes(boxes: Sequence[Box], iou_threshold: float) -> list[Box]:
    """Non-maximum suppression: keep the best-scoring box of each overlapping group. A box
    lying 80% inside a kept one is dropped too (a face found whole and in part)."""
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


class PyramidFaceDetector:
    """BlazeFace over a pyramid of each frame: the whole frame with the full-range network
    (`FullRangeBlazeFace`) and with the short-range one, then the short-range network run
    densely (`DenseBlazeFace`) over the frame scaled by 128 / size for each window size."""

    def __init__(self, settings: AnonymizerSettings):
        """Load the models once; raises FaceModelError if one is missing or unloadable."""
        self.settings = settings
        int8 = settings.int8 and settings.short_range_model is None
        second_opinion = settings.second_opinion > 0
        paths = verified_face_models(settings.model_dir, settings.short_range_model,
                                     settings.full_range_model,
                                     keys=("short_range", "full_range") + ("short_range_int8",) * int8
                                     + ("centerface",) * second_opinion)
        self.model_sha256 = {key: sha256_file(path) for key, path in paths.items()}
        self._threshold = min(settings.min_confidence, settings.small_face_confidence)
        self.short_range = DenseBlazeFace(paths["short_range"], threads=settings.threads)
        self.small_faces = (DenseBlazeFace(paths["short_range_int8"], threads=settings.threads)
                            if int8 else self.short_range)
        self.full_range = FullRangeBlazeFace(paths["full_range"], threads=settings.threads)
        self.centerface = (CenterFaceDetector(paths["centerface"], threads=settings.threads)
                           if second_opinion else None)

    def detect(self, rgb: np.ndarray, window_sizes: Sequence[int],
               memory: "PassMemory | None" = None, full_range: bool = True,
               confirmed: Sequence[Box] = ()) -> list[Box]:
        """Faces in an RGB uint8 frame: the whole frame with the short-range model and, if
        `full_range`, the full-range one, then, for each size in `window_sizes` smaller than
        the frame, every 128 px window of the frame scaled by 128 / size. `memory` (one per
        video, moved to this frame by the caller: `PassMemory.next_frame`): a pass looks again
        only at the bands of rows whose pixels changed since it last looked at them, and
        keeps what it found in the others. `confirmed`: faces found on the frames just before
        (a video's latest keyframes in the shot; see `_fine_face`)."""
        height, width = rgb.shape[:2]
        boxes = self._whole_frame("whole", rgb, memory)
        if full_range:
            boxes += self._whole_frame("full_range", rgb, memory)
        boxes = [box for box in boxes if is_face(box, width * height, self.settings)]
        for size in window_sizes:
            if size >= max(width, height):
                continue
            found = self._level(rgb, size, memory)
            if size in self.settings.fine_window_sizes:
                boxes += self._fine_faces(rgb, found, confirmed, memory, size)
            else:
                boxes += [box for box in found if is_face(box, width * height, self.settings)]
        return merge_boxes(boxes, self.settings.nms_iou)

    def _fine_faces(self, rgb: np.ndarray, found: list[Box], confirmed: Sequence[Box],
                    memory: "PassMemory | None", size: int) -> list[Box]:
        """The boxes of level `size` that count as faces (`_fine_face`), and of the others
        those scored what they would need over a face found before that CenterFace confirms
        (second_opinion). In a video a box the level kept from a band it did not look at
        again keeps the verdict it got then."""
        frame_area = rgb.shape[0] * rgb.shape[1]
        faces = [box for box in found if self._fine_face(box, frame_area, confirmed)]
        if self.centerface is None:
            return faces
        doubtful = [box for box in found if box not in faces and self._fine_face(box, frame_area, (box,))]
        known = memory.verdicts.get(size, {}) if memory is not None else {}
        new = [box for box in doubtful if box not in known]
        verdicts = {box: known[box] for box in doubtful if box in known}
        verdicts.update(zip(new, self.centerface.confirms(rgb, [(b.x, b.y, b.w, b.h) for b in new],
                                                          self.settings.second_opinion)))
        if memory is not None:
            memory.verdicts[size] = verdicts
        return faces + [box for box in doubtful if verdicts[box]]

    def _fine_face(self, box: Box, frame_area: int, confirmed: Sequence[Box]) -> bool:
        """Whether a box of a fine level counts as a face: `is_face` asking
        fine_window_confidence of a small box (a larger one min_confidence), or, where it
        overlaps a face in `confirmed`, a step less: small_face_confidence of a small box,
        fine_window_confidence of a larger one. A face once found is kept as its score
        wavers around the threshold and as its box grows past small_face_area (a camera
        zooming in); a new box still needs the full score."""
        settings = self.settings
        if box.w < settings.min_face_px:
            return False
        small = box.area < settings.small_face_area * frame_area
        if any(_overlaps(face, box, 0.2) for face in confirmed):
            return box.score >= (settings.small_face_confidence if small else settings.fine_window_confidence)
        return box.score >= max(settings.fine_window_confidence,
                                settings.small_face_confidence if small else settings.min_confidence)

    def _whole_frame(self, model: str, rgb: np.ndarray, memory: "PassMemory | None") -> list[Box]:
        """The whole frame with the "whole" (short-range) or "full_range" model."""
        height, width = rgb.shape[:2]
        if memory is not None and not memory.stale_bands(model, max(height, width)).any():
            return memory.boxes(model)
        if model == "whole":
            found = self._scan(rgb, max(height, width), 0, height)
        else:
            found = _boxes(self.full_range.detect(rgb, self._threshold), 0, 0, rgb.shape)
        if memory is not None:
            memory.update(model, 0, height, found)
        return found

    def _level(self, rgb: np.ndarray, size: int, memory: "PassMemory | None") -> list[Box]:
        height, width = rgb.shape[:2]
        if memory is None:
            return self._scan(rgb, size, 0, height)
        # Stale bands (rows `size` px high: one window) are scanned in pieces of 1, 2 or
        # SCAN_BANDS bands, each with half a window of rows around it, so that a face centred
        # in it is seen whole, in context, and moved inside the frame rather than cut at its
        # edge: pieces of a length share an input shape (LiteRT replans for each new one).
        # Where they would cost as much as the whole frame, the whole frame is scanned.
        stale = memory.stale_bands(size, size)
        boxes = memory.boxes(size) if memory.has(size) else []
        scans = []
        for first, last in _pieces(_runs(stale)):
            top, bottom = first * size, min((last + 1) * size, height)
            rows = min((last - first + 2) * size, height)
            start = min(max(top - size // 2, 0), height - rows)
            scans.append((top, bottom, start, start + rows))
        whole = self._input_rows(height, width, size)
        if sum(self._input_rows(end - start, width, size) for _, _, start, end in scans) >= whole:
            scans = [(0, height, 0, height)]
        for top, bottom, start, end in scans:
            boxes = memory.update(size, top, bottom, self._scan(rgb, size, start, end))
        return boxes

    def _input_rows(self, rows: int, width: int, size: int) -> int:
        """The network's input rows for a scan of `rows` frame rows at level `size`, its
        strips' context included: what the scan costs."""
        network, scaled = self._network_for(size, (rows, width))
        return sum(bottom - top for (top, bottom), _ in strips(scaled[::-1], network.max_input_pixels))

    def _network_for(self, size: int, shape: tuple[int, int]) -> tuple[DenseBlazeFace, tuple[int, int]]:
        """The network that scans at level `size`, and the size (width, height) that a
        region of `shape` (height, width) is scaled to for it."""
        scale = INPUT_SIZE / size
        network = self.small_faces if scale > 1.0 else self.short_range
        return network, (max(1, round(shape[1] * scale)), max(1, round(shape[0] * scale)))

    def _scan(self, rgb: np.ndarray, size: int, top: int, bottom: int) -> list[Box]:
        """Boxes in rows [top, bottom) of the frame, seen at scale 128 / size."""
        rows = rgb[top:bottom]
        network, scaled = self._network_for(size, rows.shape[:2])
        if size != INPUT_SIZE:
            rows = cv2.resize(rows, scaled, interpolation=cv2.INTER_AREA if size > INPUT_SIZE
                              else cv2.INTER_LINEAR)
        found = network.detect(rows, self._threshold)
        found[:, :4] /= INPUT_SIZE / size
        return _boxes(found, 0, top, rgb.shape)


def _pieces(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs of bands (first, last) as pieces of 1, 2 or 4 (SCAN_BANDS) bands: a run cut into
    pieces as long as the power of two it fits in (at most SCAN_BANDS), the last moved back
    to end with it."""
    pieces = []
    for start, end in runs:
        length = min(1 << (end - start).bit_length(), SCAN_BANDS)
        pieces += [(first, first + length - 1)
                   for first in [max(min(piece, end - length + 1), 0)
                                 for piece in range(start, end + 1, length)]]
    return pieces


def _runs(stale: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True values."""
    runs, start = [], None
    for index, value in enumerate(list(stale) + [False]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            runs.append((start, index - 1))
            start = None
    return runs


def _boxes(rows: np.ndarray, x0: int, y0: int, shape: tuple[int, ...]) -> list[Box]:
    """Boxes from (x, y, w, h, score) rows found at offset (x0, y0), clipped to the frame."""
    height, width = shape[:2]
    found = []
    for x, y, w, h, score in rows:
        left, top = max(int(round(x)) + x0, 0), max(int(round(y)) + y0, 0)
        right = min(int(round(x + w)) + x0, width)
        bottom = min(int(round(y + h)) + y0, height)
        if right > left and bottom > top:
            found.append(Box(left, top, right - left, bottom - top, float(score)))
    return found


class PassMemory:
    """What each pass over one video (the whole-frame pass, each pyramid level) saw and found
    when it last looked at each part of the frame, so that only the parts whose pixels
    changed since are scanned again.

    Pixels are compared in gray at a quarter of the frame's size (frames under 256 px at
    full size), in blocks of 4x4 of those (16 px blocks of a large frame): a block is stale
    for a pass when its mean absolute difference from what the pass last saw there exceeds
    `threshold` grey levels, or the pass last looked at it more than `max_frames` frames
    ago. A pass scans bands of whole rows; a band is stale when any block in it is."""

    def __init__(self, threshold: float, max_frames: int):
        self.threshold, self.max_frames = threshold, max_frames
        self._index = -1
        self._gray: np.ndarray | None = None
        self._scale = 1
        # Per pass: the gray it last saw, the frame index per block, the boxes it found.
        self._seen: dict[object, tuple[np.ndarray, np.ndarray, list[Box]]] = {}
        # Per fine level: CenterFace's verdicts on its last doubtful boxes (`second_opinion`).
        self.verdicts: dict[int, dict[Box, bool]] = {}

    def next_frame(self, rgb: np.ndarray) -> None:
        """Start a new frame (RGB uint8)."""
        self._index += 1
        self._gray = small_gray(rgb)
        self._scale = rgb.shape[0] // self._gray.shape[0]  # frame px per gray px: 4 or 1

    def gray_of(self, index: int) -> np.ndarray | None:
        """`small_gray` of frame `index` of the video if it is the current frame, else None."""
        return self._gray if self._index == index else None

    def has(self, key) -> bool:
        """Whether pass `key` has looked at this video before."""
        return key in self._seen

    def boxes(self, key) -> list[Box]:
        """The boxes pass `key` found when it last looked at each part of the frame."""
        return list(self._seen[key][2])

    def stale_bands(self, key, band: int) -> np.ndarray:
        """For bands of `band` frame rows from the top: whether pass `key` must look again."""
        stale_rows = self._stale(key).any(axis=1)
        per_band = max(1, band // (4 * self._scale))
        count = -(-len(stale_rows) // per_band)
        padded = np.zeros(count * per_band, bool)
        padded[:len(stale_rows)] = stale_rows
        return padded.reshape(count, per_band).any(axis=1)

    def update(self, key, top: int, bottom: int, found: list[Box]) -> list[Box]:
        """Pass `key` looked at frame rows [top, bottom) and found `found` (boxes centred
        elsewhere are ignored); return all the boxes it now holds for the frame."""
        inside = lambda box: top <= box.y + box.h / 2 < bottom
        block = 4 * self._scale
        rows = slice(top // block, -(-bottom // block))
        if key in self._seen and self._seen[key][0].shape == self._gray.shape:
            gray, indices, old = self._seen[key]
            gray, indices = gray.copy(), indices.copy()
        else:
            gray, indices, old = self._gray.copy(), np.full(self._grid(), -(1 << 30)), []
        gray[rows.start * 4:rows.stop * 4] = self._gray[rows.start * 4:rows.stop * 4]
        indices[rows] = self._index
        boxes = [box for box in old if not inside(box)] + [box for box in found if inside(box)]
        self._seen[key] = (gray, indices, boxes)
        return list(boxes)

    def _grid(self) -> tuple[int, int]:
        """Rows and columns of blocks."""
        return -(-self._gray.shape[0] // 4), -(-self._gray.shape[1] // 4)

    def _stale(self, key) -> np.ndarray:
        """Block mask of what pass `key` must look at again."""
        seen = self._seen.get(key)
        if seen is None or seen[0].shape != self._gray.shape:
            return np.ones(self._grid(), bool)
        return ((block_differences(self._gray, seen[0]) > self.threshold)
                | (self._index - seen[1] > self.max_frames))


def small_gray(rgb: np.ndarray) -> np.ndarray:
    """An RGB uint8 frame in gray, at a quarter of its size (frames under 256 px: full size)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if min(gray.shape) < 256:
        return gray
    return cv2.resize(gray, (gray.shape[1] // 4, gray.shape[0] // 4), interpolation=cv2.INTER_AREA)


def block_differences(gray: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Mean absolute difference of two `small_gray` frames in blocks of 4x4 (16 px blocks of
    a large frame; blocks at the edges padded with no difference)."""
    rows, cols = -(-gray.shape[0] // 4), -(-gray.shape[1] // 4)
    padded = np.zeros((rows * 4, cols * 4), np.float32)
    padded[:gray.shape[0], :gray.shape[1]] = cv2.absdiff(gray, other)
    return padded.reshape(rows, 4, cols, 4).mean(axis=(1, 3))



# ---------------------------------------------------------------------------- hiding


def region_of(box: Box, settings: AnonymizerSettings,
              shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The enlarged region (x0, y0, x1, y1) hidden for a face box, clipped to the frame:
    empty (x1 == x0 or y1 == y0) for a box carried out of it."""
    height, width = shape[:2]
    cx = box.x + box.w / 2
    cy = box.y + box.h / 2 - settings.box_shift_up * box.h
    half_w = box.w * settings.box_scale / 2
    half_h = box.h * settings.box_scale / 2
    x0, y0 = max(int(np.floor(cx - half_w)), 0), max(int(np.floor(cy - half_h)), 0)
    x1, y1 = min(int(np.ceil(cx + half_w)), width), min(int(np.ceil(cy + half_h)), height)
    # Past the top or left edge an end is negative, and a negative slice end counts from the
    # other edge: the region would be most of the frame.
    return x0, y0, max(x1, x0), max(y1, y0)


def hide_region(frame: np.ndarray, region: tuple[int, int, int, int], mode: str,
                pixel_blocks: int = 4, ellipse: bool = False, keep_colour: bool = False,
                stripes: float = 0.0) -> None:
    """Overwrite frame[region] (BGR, BGRA or gray) in place with a blurred, pixelated or
    filled version, in gray unless `keep_colour`, with `stripes` (see AnonymizerSettings)
    over it: all of it, or only the ellipse inscribed in it. An alpha channel is left as it is."""
    x0, y0, x1, y1 = region
    patch = frame[y0:y1, x0:x1]
    if patch.size == 0:
        return
    if patch.ndim == 3 and not keep_colour:
        patch = patch[..., :3]
        source = cv2.cvtColor(patch, cv2.COLOR_BGR2GRAY)
    else:
        source = patch
    if mode == "gaussian":
        hidden = _strong_gaussian(source)
    elif mode == "pixelate":
        blocks_w = max(1, min(pixel_blocks, source.shape[1]))
        blocks_h = max(1, round(blocks_w * source.shape[0] / source.shape[1]))
        small = cv2.resize(source, (blocks_w, blocks_h), interpolation=cv2.INTER_AREA)
        hidden = cv2.resize(small, (source.shape[1], source.shape[0]),
                            interpolation=cv2.INTER_NEAREST)
    elif mode == "fill":
        hidden = np.broadcast_to(source.reshape(-1, *source.shape[2:]).mean(axis=0)
                                 .astype(frame.dtype), source.shape)
    else:
        raise ValueError(f"unknown blur mode {mode!r}")
    if stripes:
        hidden = _with_stripes(hidden, stripes)
    hidden = hidden.reshape(source.shape + (1,) * (patch.ndim - source.ndim))  # gray over BGR
    if ellipse:
        inside = ellipse_mask(patch.shape[1], patch.shape[0])
        np.copyto(patch, hidden, where=inside.reshape(inside.shape + (1,) * (patch.ndim - 2)))
    else:
        patch[...] = hidden


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
        hide_region(out, region, settings.blur, settings.pixel_blocks, settings.ellipse,
                    settings.keep_colour, settings.stripes)
    return out


STRIPE_PERIODS = 3.5  # across the region: the fewest Haar cascade hits over phases (0.6-1.1%)


def _with_stripes(hidden: np.ndarray, height: float) -> np.ndarray:
    """`hidden` (uint8, gray or colour) plus diagonal stripes of +- `height` grey levels,
    STRIPE_PERIODS of them across its width, at 45 degrees."""
    rows, columns = hidden.shape[:2]
    diagonal = np.arange(rows + columns - 1) * (np.sqrt(0.5) * STRIPE_PERIODS / columns)
    line = np.where(diagonal % 1.0 < 0.5, height, -height).astype(np.float32)
    # pattern[y, x] = line[x + y]: a view, nothing copied
    pattern = np.lib.stride_tricks.as_strided(line, (rows, columns), (line.strides[0],) * 2)
    if hidden.ndim == 3:
        colour = (np.arange(hidden.shape[2]) < 3).astype(np.float32)  # not an alpha channel
        pattern = pattern[..., None] * colour
    return np.clip(hidden + pattern, 0, 255).astype(hidden.dtype)


def _strong_gaussian(patch: np.ndarray) -> np.ndarray:
    """Gaussian blur with sigma = patch width / 3: at /6 and /4 BlazeFace still finds the
    blurred head at score 0.56-0.59. Large patches are blurred at a 12 px wide working size
    and scaled back: the same at a fraction of the cost."""
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
        self.rebuildable = detector is None  # another process gets the same output from the settings
        self.detector = detector if detector is not None else PyramidFaceDetector(self.settings)

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
        for name in ("model_dir", "short_range_model", "full_range_model", "threads"):
            values.pop(name)  # where the models lie does not matter, their bytes do
        values["models"] = dict(sorted(self.detector.model_sha256.items()))
        values["algorithm_version"] = ALGORITHM_VERSION
        text = json.dumps(values, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()

    def detect(self, image: np.ndarray) -> list[Box]:
        """Face boxes (pixel coordinates, with score) in one BGR or gray uint8 image, using
        every level of image_window_sizes."""
        return self.detector.detect(_to_rgb(image), self.settings.image_window_sizes)

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

    def anonymize_frames(self, frames: Iterable[np.ndarray], keep: Callable | None = None,
                         background: np.ndarray | None = None) -> tuple[list, AnonymizeStats]:
        """Anonymize the BGR uint8 frames of one video, in order. Returns new arrays (the
        input is not modified) and stats. Detector errors propagate.

        `frames` may be a decoder: they are pulled as the stream needs them, so that with
        `keep` (applied to each frame once it is anonymized; what is returned for it, e.g.
        the frame shrunk for training) only the stream's look-ahead is held at full size.
        `background`: the scene without people, for `faces+heads` (`video_background`);
        without it the median of the frames, which must then all be held."""
        if self.settings.heads and background is None:
            frames = list(frames)
            background = median_background(frames) if frames else None
        keep = keep or (lambda frame: frame)
        stream = self.stream(background)
        done: list = []
        for frame in frames:
            done += [keep(item.frame) for item in stream.push(frame)]
        done += [keep(item.frame) for item in stream.finish()]
        return done, stream.stats

    def _passes_for(self, frame_index: int, shape: tuple[int, ...]) -> tuple[list[int], bool]:
        """The pyramid levels that run on a frame of a video, and whether the full-range pass
        does: on the frames given by full_range_every, or on every frame where no level is
        smaller than the frame (the whole-frame passes are then all there is)."""
        settings = self.settings
        sizes = [size for size, every in zip(settings.window_sizes, settings.window_every)
                 if frame_index % every == 0]
        every = settings.full_range_every
        full_range = (frame_index % every == every - 1
                      or max(shape[:2]) <= max(settings.window_sizes, default=0))
        return sizes, full_range


@dataclass
class _Pending:
    index: int
    frame: np.ndarray
    boxes: list[Box]
    heads: np.ndarray | None = None  # mask of head pixels to hide
    levels: frozenset[int] = frozenset()  # the pyramid levels that ran on it
    full_range: bool = True  # whether the full-range pass ran on it
    change: float = 0.0  # share of its blocks that differ from the frame before (CUT_LEVELS)
    # (its boxes, those of the hold_frames after it) once those are pushed: what it is tracked
    # by; later scans may add boxes, which only the look further ahead (`_bridged`) uses.
    settled: tuple[list[Box], list[tuple[int, list[Box]]]] | None = None


@dataclass
class VideoStream:
    """Push frames of one video in order; get anonymized frames back twice `hold_frames`
    later, once the detections after them are known (a face missed on one keyframe is
    tracked across it). Memory: 2 x hold_frames + 1 frames. A pushed frame is kept by
    reference until it comes back: do not modify it in the meantime."""

    anonymizer: FaceAnonymizer
    heads: HeadFinder | None = None
    stats: AnonymizeStats = field(default_factory=AnonymizeStats)
    _pending: deque = field(default_factory=deque)
    _recent: deque = field(default_factory=deque)  # (index, boxes, their velocities) of emitted frames
    _count: int = 0
    _memory: PassMemory | None = None
    _gray: np.ndarray | None = None  # the last frame pushed, as small_gray gives it
    _keyframes: list = field(default_factory=list)  # (index, boxes) of the last two keyframes
    _cuts: list = field(default_factory=list)  # the first frame of each recent shot after a cut

    def __post_init__(self) -> None:
        settings = self.anonymizer.settings
        if settings.reuse_unchanged:
            self._memory = PassMemory(settings.change_threshold, settings.reuse_max_frames)

    def push(self, frame: np.ndarray) -> list["AnonymizedFrame"]:
        """Detect faces in the next frame; return the frames that are now final."""
        index = self._count
        self._count += 1
        rgb = _to_rgb(frame)
        if self._memory is not None:
            self._memory.next_frame(rgb)
        change = self._change(rgb, index)
        if change > CUT_SHARE:  # known before detection: no face of the shot before confirms
            self._cuts.append(index)
        sizes, full_range = self.anonymizer._passes_for(index, frame.shape)
        boxes = self.anonymizer.detector.detect(rgb, sizes, memory=self._memory,
                                                full_range=full_range,
                                                confirmed=self._confirmed(index))
        heads = self.heads.head_mask(frame) if self.heads is not None else None
        entry = _Pending(index, frame, boxes, heads, frozenset(sizes), full_range, change)
        self._pending.append(entry)
        self._scan_end_of_shot(entry)
        hold = self.anonymizer.settings.hold_frames
        self._settle(index - hold)
        ready = []
        while self._pending and self._pending[0].index <= index - 2 * hold:
            ready.append(self._emit())
        return ready

    def finish(self) -> list["AnonymizedFrame"]:
        """Return the frames still waiting for look-ahead (end of the video). The last
        frame is scanned by every pass first, so that a face found only on keyframes is
        tracked to the end of the video rather than held where it was last seen."""
        if self._pending:
            self._scan_every_level(self._pending[-1])
            self._settle(self._pending[-1].index)
        return [self._emit() for _ in range(len(self._pending))]

    def _settle(self, last: int) -> None:
        """Fix what the pending frames up to `last` are tracked by (`_Pending.settled`)."""
        hold = self.anonymizer.settings.hold_frames
        for p in self._pending:
            if p.settled is None and p.index <= last:
                p.settled = (list(p.boxes), [(q.index, list(q.boxes)) for q in self._pending
                                             if 0 < q.index - p.index <= hold
                                             and self._same_shot(p.index, q.index)])

    def _confirmed(self, index: int) -> list[Box]:
        """The faces found on the last two keyframes (every level ran on them) before frame
        `index`, in its shot."""
        return [box for i, boxes in self._keyframes if self._same_shot(i, index) for box in boxes]

    def _same_shot(self, index: int, other: int) -> bool:
        """Whether no cut lies between frames `index` and `other`: a box is tracked, held and
        carried within its shot only (across a cut it covers another picture)."""
        return not any(min(index, other) < cut <= max(index, other) for cut in self._cuts)

    def _change(self, rgb: np.ndarray, index: int) -> float:
        """The share of frame `index`'s blocks that differ from the frame before by more
        than CUT_LEVELS (0 for the first frame)."""
        gray = self._memory.gray_of(index) if self._memory is not None else None
        gray = small_gray(rgb) if gray is None else gray
        before, self._gray = self._gray, gray
        if before is None or before.shape != gray.shape:
            return 0.0
        return float((block_differences(gray, before) > CUT_LEVELS).mean())

    def _scan_end_of_shot(self, entry: _Pending) -> None:
        """If a shot ended just before `entry`, scan its last frame by every level (and, at a
        cut, the next shot's first): a face that came into view there has no detection
        after it to be tracked to."""
        if entry.change > CUT_SHARE:
            self._scan_every_level(entry)
            self._scan_every_level(self._before(entry))
        elif self._every_level(entry) and self._faces_lost(entry):
            # The shot ended where the picture changed most since the last keyframe.
            first_of_next = max(self._since_keyframe(entry), key=lambda p: p.change)
            self._scan_every_level(self._before(first_of_next))
        if self._every_level(entry):
            self._keyframes = (self._keyframes + [(entry.index, entry.boxes)])[-2:]

    def _every_level(self, entry: _Pending) -> bool:
        return entry.levels >= set(self.anonymizer.settings.window_sizes)

    def _scan_every_level(self, entry: _Pending | None) -> None:
        """Run on a pending frame the passes that did not run on it."""
        settings = self.anonymizer.settings
        if entry is None or (entry.full_range and self._every_level(entry)):
            return
        sizes = [size for size in settings.window_sizes if size not in entry.levels]
        found = self.anonymizer.detector.detect(_to_rgb(entry.frame), sizes,
                                                full_range=not entry.full_range)
        entry.boxes = merge_boxes(entry.boxes + found, settings.nms_iou)
        entry.levels, entry.full_range = frozenset(settings.window_sizes), True

    def _before(self, entry: _Pending) -> _Pending | None:
        """The pending frame just before `entry`, if it is still pending."""
        return next((p for p in self._pending if p.index == entry.index - 1), None)

    def _since_keyframe(self, entry: _Pending) -> list[_Pending]:
        """The pending frames after the last keyframe (one every level ran on) before
        `entry`, up to `entry`."""
        frames = [entry]
        for p in reversed([p for p in self._pending if p.index < entry.index]):
            if self._every_level(p):
                break
            frames.append(p)
        return frames

    def _faces_lost(self, entry: _Pending) -> bool:
        """Whether a face tracked over the last two keyframes (found on both at a score of
        LOST_FACE_SCORE or more) is found nowhere near on `entry`, away from the frame's
        edges (where it may have left): the shot may have ended in between."""
        if len(self._keyframes) < 2:
            return False
        (first, first_boxes), (last, last_boxes) = self._keyframes
        frames, shape = entry.index - last, entry.frame.shape
        tracked = [a for a in last_boxes if a.score >= LOST_FACE_SCORE
                   and any(_same_face(b, a, last - first) for b in first_boxes
                           if b.score >= LOST_FACE_SCORE)]
        # Near: as far as a face goes at one width a frame. A faster one is taken for lost:
        # a scan too many costs time, a cut missed costs faces.
        return any(not _near_edge(a, frames, shape)
                   and not any(_same_face(a, b, frames, fastest=0) for b in entry.boxes)
                   for a in tracked)

    def _emit(self) -> "AnonymizedFrame":
        settings = self.anonymizer.settings
        current, hold = self._pending.popleft(), settings.hold_frames
        reached = [entry for entry in self._recent if current.index - entry[0] <= 2 * hold
                   and self._same_shot(entry[0], current.index)]
        past = [entry for entry in reached if current.index - entry[0] <= hold]
        ahead = [(p.index, p.boxes) for p in self._pending if p.index - current.index <= 2 * hold
                 and self._same_shot(current.index, p.index)]
        found, future = current.settled
        latest = _latest_boxes(reached)
        velocities = _velocities(current.index, found, past)
        velocities.update(_velocities_ahead(current.index, [b for b in found if b not in velocities], ahead))
        held = (_held_boxes(current.index, (found, velocities), past, future, current.frame.shape, hold)
                + _bridged(current.index, latest, ahead, current.frame.shape, hold)
                + _carried_back(current.index, latest, ahead, hold))
        boxes = list(dict.fromkeys(found + current.boxes + held))
        out = hide_faces(current.frame, boxes, settings)
        with_heads = current.heads is not None and bool(current.heads.any())
        if with_heads:
            hide_mask(out, current.heads)
        self._recent.append((current.index, found, velocities))
        while self._recent and current.index - self._recent[0][0] >= 2 * hold:
            self._recent.popleft()
        self._cuts = [cut for cut in self._cuts if current.index - cut < 2 * hold]
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


def _held_boxes(index: int, here: tuple[list[Box], dict], past: list[tuple[int, list[Box], dict]],
                future: list[tuple[int, list[Box]]], shape: tuple[int, ...], hold: int) -> list[Box]:
    """Boxes carried over `index` from neighbouring frames. A past box whose nearest match
    ahead (what can be the same face, given the frames between) has it as its own nearest
    match behind is tracked: the box interpolated between the two. A box with no match on the
    other side, and not overlapping a box found on this frame, is held still (a face entering,
    leaving or missed there) and, if it was moving, also carried on at its speed; so are both
    ends of a match farther apart than a slow face goes, or off the course the face behind was
    on, in case the pairing is wrong, and so is a face found at LOST_FACE_SCORE or more matched
    to a box at the detector's threshold (it may be a false positive beside a missed face).
    A box ahead that no box behind is tracked to is also stretched towards each frame edge
    near enough, as far as a face moves meanwhile (it may have come in from there), even where
    a box behind could have been it: that one may be another face, tracked to its own. Two
    faces moving fast side by side can be paired crosswise (each box nearer the other's next
    box than its own), so where faces found at LOST_FACE_SCORE or more moved farther than a
    slow face goes, every path that may be a face's is covered: a box behind whose nearest
    box ahead is taken by another box of its frame is also interpolated towards the box ahead
    it reaches at the lowest speed, and a box ahead that no box behind is tracked to, from its
    nearest box behind. None of this doubt is needed for a face whose next box, on this
    frame or ahead, lies where its speed takes it (`_predicted_track`): it is interpolated
    to that box alone, and a box ahead that a face found on this frame reaches at its speed
    is not held either. Only the latest box of a face looks ahead: one found again since is
    neither held where it was nor paired. Duplicates are dropped: a static face gives the
    same box each frame. `here`: the boxes found on this frame and their speeds."""
    past = _latest_boxes(past)
    past_boxes = [(i, a) for i, before, _ in past for a in before]
    held: set[Box] = set()
    tracked: set[Box] = set()  # future boxes whose face is carried without doubt
    paired: set[Box] = set()  # future boxes some box behind is tracked to, doubt or not
    current, speeds_here = here
    heading = [(i, a, _plausible(velocities.get(a))) for i, before, velocities in past for a in before]
    found_here = set()  # boxes behind whose face is found on this frame where its speed took it
    here_and_ahead = [(index, current)] + future
    for i, before, velocities in past:
        for a in before:
            sure = _predicted_track(i, a, velocities.get(a), here_and_ahead, heading)
            if sure is not None:
                j, b = sure
                held.add(_interpolate(a, b, (index - i) / (j - i), shape))
                paired.add(b)
                tracked.add(b)
                if j == index:
                    found_here.add(a)
                continue
            matches = [(j, b) for j, after in future for b in after if _same_face(a, b, j - i)]
            if matches:
                j, b = min(matches, key=lambda match: (match[0], _distance(a, match[1])))
                k, nearest = _nearest_behind(past_boxes, j, b)
                # Mutual nearest: two faces side by side are not swapped into one track.
                if a is nearest:
                    held.add(_interpolate(a, b, (index - i) / (j - i), shape))
                    paired.add(b)
                    if (_same_face(a, b, 0) and _on_course(a, velocities.get(a), b, j - i)
                            and (b.score >= LOST_FACE_SCORE or a.score < LOST_FACE_SCORE)):
                        tracked.add(b)
                        continue
                elif k == i:  # another face of this frame took it: maybe crosswise
                    j, b = min(matches, key=lambda match: (_distance(a, match[1]) / (match[0] - i),
                                                           match[0]))
                    if _confident_and_fast(a, b):
                        held.add(_interpolate(a, b, (index - i) / (j - i), shape))
            # No match, or one too far or off course to be sure of: held still, and carried
            # on if it moved.
            for kept in {a, _moved(a, velocities.get(a, (0.0, 0.0)), index - i)}:
                if not any(_overlaps(kept, c, 0.3) for c in current):
                    held.add(kept)
    # Nor do the boxes ahead that a face found on this frame reaches at its speed.
    onward = [(i, a, v) for i, a, v in heading if a not in found_here]
    onward += [(index, c, _plausible(speeds_here.get(c))) for c in current]
    for c in current:
        sure = _predicted_track(index, c, speeds_here.get(c), future, onward)
        if sure is not None:
            paired.add(sure[1])
            tracked.add(sure[1])
    for j, after in future:
        for b in after:
            behind = None if b in paired else _nearest_behind(past_boxes, j, b)
            if behind is not None and _confident_and_fast(behind[1], b):
                k, nearest = behind
                held.add(_interpolate(nearest, b, (index - k) / (j - k), shape))
            if (b not in tracked and not any(_same_face(a, b, 0) for _, a in past_boxes)
                    and not any(_overlaps(b, c, 0.3) for c in current)):
                held.add(b)
                if b not in paired:
                    held.update(_from_edge(b, j - index, hold, shape))
    return list(held)


def _predicted_track(i: int, a: Box, velocity: tuple[float, float] | None,
                     future: list[tuple[int, list[Box]]],
                     heading: list[tuple[int, Box, tuple[float, float]]]) -> tuple[int, Box] | None:
    """(frame, box) of the first box ahead that `a` (on frame `i`, found at LOST_FACE_SCORE
    or more, moving at a speed a face can have) reaches at its speed, within PREDICTED_WITHIN
    of a face width, if no box behind comes nearer it at its own speed (`heading`: every box
    behind with its frame and plausible speed). Three boxes in a row at one speed are one
    face, however fast: it needs no cover for a crosswise pairing."""
    if velocity is None or max(map(abs, velocity)) > FAST_FACE_PX or a.score < LOST_FACE_SCORE:
        return None
    match = _first_match(i, a, future, velocity)
    if match is None:
        return None
    j, b = match
    miss = _distance(_moved(a, velocity, j - i), b)
    if b.score < LOST_FACE_SCORE or miss > PREDICTED_WITHIN * max(a.w, a.h, b.w, b.h):
        return None
    return match if _nearest_at_speed(heading, j, b) == (i, a) else None


def _nearest_at_speed(heading: list[tuple[int, Box, tuple[float, float]]], j: int,
                      b: Box) -> tuple[int, Box] | None:
    """(frame, box) of the box behind (`heading`: frame, box and speed each) that can be the
    same face as `b` on frame `j` and that its speed takes nearest `b`."""
    candidates = [(i, a, v) for i, a, v in heading if _same_face(a, b, j - i)]
    i, a, _ = min(candidates, key=lambda c: _distance(_moved(c[1], c[2], j - c[0]), b),
                  default=(None, None, None))
    return None if a is None else (i, a)


def _bridged(index: int, latest: list[tuple[int, list[Box], dict]],
             future: list[tuple[int, list[Box]]], shape: tuple[int, ...], hold: int) -> list[Box]:
    """Boxes of faces missed on a keyframe, over frames `_held_boxes` sees no match across: a
    face's latest box behind and its first box ahead, at most 2 x `hold` frames apart, one
    of them beyond `hold` from `index`, both found at LOST_FACE_SCORE or more, and each the
    other's nearest, interpolated (a face found at the detector's threshold is not followed
    this far: such boxes come and go between neighbours). Over such a gap a face moving on
    is nearer where its speed takes it than where it was: distances are from there (speeds
    over FAST_FACE_PX, from a box paired with another face, are not taken). `latest`: the
    frames behind, each face's latest box only (`_latest_boxes`)."""
    behind = [(i, a, _plausible(velocities.get(a))) for i, before, velocities in latest
              for a in before if a.score >= LOST_FACE_SCORE]
    bridged = []
    for i, a, velocity in behind:
        match = _first_match(i, a, future, velocity)
        if match is None:
            continue
        j, b = match
        if (b.score >= LOST_FACE_SCORE and j - i <= 2 * hold and max(index - i, j - index) > hold
                and _nearest_at_speed(behind, j, b) == (i, a)):
            bridged.append(_interpolate(a, b, (index - i) / (j - i), shape))
    return bridged


def _plausible(velocity: tuple[float, float] | None) -> tuple[float, float]:
    """`velocity` if a face can move so fast, else standing still."""
    if velocity is None or max(map(abs, velocity)) > FAST_FACE_PX:
        return (0.0, 0.0)
    return velocity


def _carried_back(index: int, latest: list[tuple[int, list[Box], dict]],
                  future: list[tuple[int, list[Box]]], hold: int) -> list[Box]:
    """Boxes of faces first found within `hold` frames ahead and found again after that:
    carried back from the first box at the speed between the two (the face was there,
    moving, and missed on the keyframes before), as a face no longer found is carried on.
    A box ahead is a face first found where no box behind has it as its nearest match on
    its frame. Only faces found at LOST_FACE_SCORE or more, each box the other's nearest.
    `latest`: the frames behind, each face's latest box only (`_latest_boxes`)."""
    ahead = [(j, b) for j, after in future for b in after if b.score >= LOST_FACE_SCORE]
    claimed = _Claims(latest, future)
    carried = []
    for j, b in ahead:
        if j - index > hold or claimed(j, b):
            continue
        later = [(k, c) for k, c in ahead if k > j and _same_face(b, c, k - j)]
        if not later:
            continue
        k, c = min(later, key=lambda match: (match[0], _distance(b, match[1])))
        if _nearest_behind([(i, a) for i, a in ahead if i < k], k, c) == (j, b):
            speed = ((c.x - b.x) / (k - j), (c.y - b.y) / (k - j))
            carried.append(_moved(b, speed, index - j))
    return carried


class _Claims:
    """Whether a box ahead is the nearest match, on its frame, of a box behind (`latest`);
    each box behind's nearest match on a frame is found once (a crowd asks for many boxes)."""

    def __init__(self, latest: list[tuple[int, list[Box], dict]], future: list[tuple[int, list[Box]]]):
        self.behind = [(i, a) for i, before, _ in latest for a in before]
        self.future = dict(future)
        self.nearest: dict[tuple[int, int], Box] = {}

    def __call__(self, j: int, b: Box) -> bool:
        for number, (i, a) in enumerate(self.behind):
            if _same_face(a, b, j - i):
                if (number, j) not in self.nearest:
                    self.nearest[number, j] = min((c for c in self.future[j] if _same_face(a, c, j - i)),
                                                  key=lambda c: _distance(a, c))
                if self.nearest[number, j] == b:
                    return True
        return False


def _nearest_ahead(i: int, a: Box, future: list[tuple[int, list[Box]]],
                   velocity: tuple[float, float] = (0.0, 0.0)) -> Iterator[tuple[int, Box]]:
    """(frame, box) of the box nearest `a` (on frame `i`, moving at `velocity`) on each frame
    ahead, in order, where one can be the same face."""
    for j, after in future:
        matches = [b for b in after if _same_face(a, b, j - i)]
        if matches:
            there = _moved(a, velocity, j - i)
            yield j, min(matches, key=lambda b: _distance(there, b))


def _first_match(i: int, a: Box, future: list[tuple[int, list[Box]]],
                 velocity: tuple[float, float] = (0.0, 0.0)) -> tuple[int, Box] | None:
    """(frame, box) of the earliest box ahead that can be the same face as `a` on frame `i`,
    the nearest on that frame to where `velocity` takes `a`."""
    return next(_nearest_ahead(i, a, sorted(future, key=lambda entry: entry[0]), velocity), None)


def _nearest_behind(past_boxes: list[tuple[int, Box]], j: int, b: Box) -> tuple[int, Box] | None:
    """(frame, box) of the nearest past box that can be the same face as `b` on frame `j`."""
    return min(((k, p) for k, p in past_boxes if _same_face(p, b, j - k)),
               key=lambda kp: _distance(kp[1], b), default=None)


def _confident_and_fast(a: Box, b: Box) -> bool:
    """Whether `a` and a later `b` are both found at LOST_FACE_SCORE or more and farther apart
    than a slow face goes (boxes at the detector's threshold come and go between neighbours:
    covering each of their paths too changed 2.0% of Debian's `vtest.avi` instead of 1.74%)."""
    return min(a.score, b.score) >= LOST_FACE_SCORE and not _same_face(a, b, 0)


def _from_edge(box: Box, frames: int, hold: int, shape: tuple[int, ...]) -> list[Box]:
    """`box`, found `frames` frames later, stretched towards each frame edge near enough for
    it to have come in from there within the hold (one box per edge), by as far as a face
    moves in that time: `_same_face`'s one width a frame, at most FAST_FACE_PX (a large box
    near the middle of a small frame is not stretched over all of it)."""
    height, width = shape[:2]
    stretch = (2 + frames) * min(max(box.w, box.h), FAST_FACE_PX)
    x0, y0, x1, y1 = box.x, box.y, box.x + box.w, box.y + box.h
    towards = {"left": (max(x0 - stretch, 0), y0, x1, y1),
               "top": (x0, max(y0 - stretch, 0), x1, y1),
               "right": (x0, y0, min(x1 + stretch, width), y1),
               "bottom": (x0, y0, x1, min(y1 + stretch, height))}
    gaps, reach = _edge_gaps(box, shape), _reach(box, hold)
    return [dataclasses.replace(box, x=left, y=top, w=right - left, h=bottom - top)
            for edge, (left, top, right, bottom) in towards.items() if gaps[edge] < reach]


def _edge_gaps(box: Box, shape: tuple[int, ...]) -> dict[str, int]:
    height, width = shape[:2]
    return {"left": box.x, "top": box.y, "right": width - box.x - box.w,
            "bottom": height - box.y - box.h}


def _near_edge(box: Box, frames: int, shape: tuple[int, ...]) -> bool:
    """Whether a face at `box` can reach a frame edge within `frames` frames."""
    return min(_edge_gaps(box, shape).values()) < _reach(box, frames)


def _reach(box: Box, frames: int) -> int:
    """How far a face at `box` can go in `frames` frames (one width a frame, at most
    FAST_FACE_PX), plus two widths."""
    return (2 + frames) * min(max(box.w, box.h), FAST_FACE_PX)


def _velocities(index: int, boxes: list[Box],
                past: list[tuple[int, list[Box], dict]]) -> dict[Box, tuple[float, float]]:
    """Pixels per frame of each box since the latest earlier box that can be the same face."""
    speeds = {}
    for box in boxes:
        found = _found_before(past, index, box)
        if found is not None:
            i, p = found
            speeds[box] = ((box.x - p.x) / (index - i), (box.y - p.y) / (index - i))
    return speeds


def _velocities_ahead(index: int, boxes: list[Box],
                      future: list[tuple[int, list[Box]]]) -> dict[Box, tuple[float, float]]:
    """Speeds of faces with no box behind (the first keyframes of a video or a shot): from a
    box's first match ahead, the nearest, where that box's own next box lies where this speed
    takes it (three boxes in a row at one speed: `_predicted_track`'s rule). Only faces found
    at LOST_FACE_SCORE or more, each box of the first pair the other's nearest."""
    speeds = {}
    for a in boxes:
        first = _first_match(index, a, future) if a.score >= LOST_FACE_SCORE else None
        if first is None or _nearest_behind([(index, c) for c in boxes], *first) != (index, a):
            continue
        j, b = first
        speed = ((b.x - a.x) / (j - index), (b.y - a.y) / (j - index))
        if _predicted_track(j, b, speed, [entry for entry in future if entry[0] > j], [(j, b, speed)]):
            speeds[a] = speed
    return speeds


def _found_before(past: list[tuple[int, list[Box], dict]], index: int, box: Box) -> tuple[int, Box] | None:
    """(frame, box) of the latest box before frame `index` (of the frames `past`) that can be
    the same face as `box`: on that frame the nearest, a box found at LOST_FACE_SCORE or more
    preferring one found so too (boxes at the detector's threshold come and go beside faces,
    and a face's speed taken from one is off its course)."""
    confident = box.score >= LOST_FACE_SCORE
    for i, before, _ in sorted((entry for entry in past if entry[0] < index), key=lambda entry: -entry[0]):
        matches = [p for p in before if _same_face(p, box, index - i)]
        if matches:  # the latest frame with one: earlier frames need not be looked at
            return i, max(matches, key=lambda p: (confident and p.score >= LOST_FACE_SCORE,
                                                  -_distance(p, box)))
    return None


def _latest_boxes(past: list[tuple[int, list[Box], dict]]) -> list[tuple[int, list[Box], dict]]:
    """`past` without the boxes of faces found again on a later frame of it."""
    found_again = {_found_before(past, k, a) for k, before, _ in past for a in before}
    return [(i, [a for a in before if (i, a) not in found_again], velocities)
            for i, before, velocities in past]


def _on_course(a: Box, velocity: tuple[float, float] | None, b: Box, frames: int) -> bool:
    """Whether `b`, `frames` frames after `a`, lies within a face width of where `a` was
    heading: a face that seems to stop at once may be another one, standing where the first
    passed just before a cut. Only faces found at LOST_FACE_SCORE, at a speed a face can
    have, are checked: boxes at the detector's threshold come and go and jump between
    neighbours, and so do the speeds taken from them."""
    if (velocity is None or max(map(abs, velocity)) > FAST_FACE_PX
            or min(a.score, b.score) < LOST_FACE_SCORE):
        return True
    return _distance(_moved(a, velocity, frames), b) <= max(a.w, a.h, b.w, b.h)


def _moved(box: Box, velocity: tuple[float, float], frames: int) -> Box:
    return Box(int(round(box.x + velocity[0] * frames)), int(round(box.y + velocity[1] * frames)),
               box.w, box.h, box.score)


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


def _same_face(a: Box, b: Box, frames_apart: int, fastest: int = FAST_FACE_PX) -> bool:
    """Whether boxes `frames_apart` frames apart can be one face: sizes within 2x, centres
    within two face widths plus, per frame between them, one width or `fastest` px if more
    (a small face crossing a 1280 px frame in 1.3 s moves 32 px a frame)."""
    # Written out, without max, min or _distance (2x faster): tracking a crowd of 80 faces
    # calls it over 4 million times in 120 frames.
    small, large = (a.w, b.w) if a.w <= b.w else (b.w, a.w)
    if large >= 2.0 * (small if small > 1 else 1):
        return False
    tall = a.h if a.h >= b.h else b.h
    width = large if large >= tall else tall  # max(a.w, a.h, b.w, b.h)
    reach = 2.0 * width + abs(frames_apart) * (width if width >= fastest else fastest)
    dx = (a.x + a.w / 2) - (b.x + b.w / 2)
    dy = (a.y + a.h / 2) - (b.y + b.h / 2)
    return (dx * dx + dy * dy) ** 0.5 < reach


def _interpolate(a: Box, b: Box, t: float, shape: tuple[int, ...]) -> Box:
    """The box a fraction `t` of the way from `a` to `b`, each end first grown past the frame
    edge it is cut by (see `_past_edge`)."""
    a, b = _past_edge(a, b, shape), _past_edge(b, a, shape)

    def mix(u: float, v: float) -> int:
        return int(round(u + (v - u) * t))

    return Box(mix(a.x, b.x), mix(a.y, b.y), mix(a.w, b.w), mix(a.h, b.h), min(a.score, b.score))


def _past_edge(box: Box, other: Box, shape: tuple[int, ...]) -> Box:
    """`box`, where it touches one frame edge and is narrower (or shorter) than `other`, grown
    past that edge to `other`'s width (height): a face half in view is found as its visible
    half, and a face coming in or going out moves as a whole one, not shrunk at one end."""
    gaps = _edge_gaps(box, shape)
    x, w = _grown(box.x, box.w, other.w, gaps["left"], gaps["right"])
    y, h = _grown(box.y, box.h, other.h, gaps["top"], gaps["bottom"])
    return dataclasses.replace(box, x=x, y=y, w=w, h=h)


def _grown(start: int, size: int, other: int, before: int, after: int) -> tuple[int, int]:
    """(start, size) along one axis, grown to `other` past the edge it touches (gap <= 0)."""
    if other <= size or (before <= 0) == (after <= 0):
        return start, size
    return (start + size - other, other) if before <= 0 else (start, other)


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
