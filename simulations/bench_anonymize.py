"""Benchmark of face anonymization: speed against the decode+encode floor, and against deface.

    python -m simulations.bench_anonymize [--video PATH] [--deface PATH] [--frames N]

Without --video, it composites real faces (scikit-image's astronaut and LFW subset,
matplotlib's Grace Hopper, the cameraman) at sizes 20-200 px, rotated by up to 30 degrees
and drifting, into a 1280x720 video and a 112x112 one, and reports coverage: the fraction
of ground-truth faces (per frame) whose fine detail drops to 40% or less. deface, when found
(--deface, or `deface` on PATH, or /tmp/deface-venv/bin/deface), runs on the same 1280x720
video. Install it in a separate venv: it pulls opencv-python, which would overwrite the cv2
that mediapipe brings.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from client.video import read_frames
from privacy.anonymize import AnonymizerSettings
from privacy.anonymize_video import anonymize_file
from privacy.face_models import provision_face_models

# (width of the face box, source) per face in the large video.
LARGE_FACES = [(20, 0), (20, 3), (24, 1), (24, 4), (32, 2), (32, 5), (48, 0), (48, 6),
               (96, 1), (96, 7), (200, 0)]
SMALL_FACES = [(14, 1), (24, 0)]


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
    lfw = (data.lfw_subset()[:100] * 255).astype(np.uint8)
    for index in (0, 3, 10, 25, 40, 60, 80):  # tight 25x25 face crops on a plain surround
        crop = gray(lfw[index])
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
                    frames: int, fps: float = 30.0) -> list[list[tuple[int, int, int, int]]]:
    """Write an mp4 of drifting, rotating real faces; return the face boxes of each frame."""
    sources = face_sources()
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
        canvas = base.copy()
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


def fine_detail(image: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Energy of the Laplacian of the box, resized to 32 px wide, in gray."""
    x, y, w, h = box
    crop = image[max(y, 0):y + h, max(x, 0):x + w]
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32)
    gray = cv2.resize(gray, (32, max(1, round(32 * gray.shape[0] / gray.shape[1]))),
                      interpolation=cv2.INTER_AREA)
    return float(np.mean(cv2.Laplacian(gray, cv2.CV_32F) ** 2))


def coverage(originals: list[np.ndarray], outputs: list[np.ndarray],
             truth: list[list[tuple[int, int, int, int]]]) -> dict[int, float]:
    """Fraction of ground-truth faces, per face size, with at most 40% of fine detail left."""
    hits: dict[int, list[bool]] = {}
    for original, output, boxes in zip(originals, outputs, truth):
        for box in boxes:
            kept = fine_detail(output, box) / max(fine_detail(original, box), 1e-6)
            hits.setdefault(box[2], []).append(kept <= 0.4)
    return {size: float(np.mean(values)) for size, values in sorted(hits.items())}


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


def deface_fps(deface: str, src: Path, dst: Path, frames: int) -> float:
    """Frames/s of the deface CLI with its defaults (start-up included)."""
    start = time.perf_counter()
    subprocess.run([deface, str(src), "-o", str(dst)], check=True, capture_output=True)
    return frames / (time.perf_counter() - start)


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


def report(label: str, src: Path, work: Path, settings: AnonymizerSettings,
           truth=None, deface: str | None = None) -> None:
    """Print floor, fedvid (and deface) frames/s and coverage for one video."""
    frames = read_frames(src)
    height, width = frames[0].shape[:2]
    floor = floor_fps(src, work / f"{label}-floor.mp4")
    fedvid_out = work / f"{label}-fedvid.mp4"
    fedvid = fedvid_fps(src, fedvid_out, settings)
    print(f"\n{label}: {width}x{height}, {len(frames)} frames")
    print(f"  floor (decode+encode): {floor:7.1f} frames/s")
    print(f"  fedvid anonymize:      {fedvid:7.1f} frames/s  ({fedvid / floor:.2f} of floor)")
    if truth is not None:
        print(f"  fedvid coverage by face size: {_coverage_line(frames, fedvid_out, truth)}")
    if deface is not None:
        deface_out = work / f"{label}-deface.mp4"
        speed = deface_fps(deface, src, deface_out, len(frames))
        print(f"  deface:                {speed:7.1f} frames/s  "
              f"(fedvid is {fedvid / speed:.1f}x faster)")
        if truth is not None:
            print(f"  deface coverage by face size: {_coverage_line(frames, deface_out, truth)}")


def _coverage_line(originals: list[np.ndarray], output: Path, truth) -> str:
    by_size = coverage(originals, read_frames(output), truth)
    return " ".join(f"{size}px:{value:.0%}" for size, value in by_size.items())


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--video", type=Path,
                        help="a video to measure instead of the generated ones")
    parser.add_argument("--deface", help="path to the deface executable")
    parser.add_argument("--frames", type=int, default=120, help="frames of generated videos")
    args = parser.parse_args()
    models = provision_face_models()
    settings = AnonymizerSettings(model_dir=models["short_range"].parent)
    deface = find_deface(args.deface)
    if deface is None:
        print("deface not found: pass --deface PATH (install it in a separate venv)")
    with tempfile.TemporaryDirectory(prefix="fedvid-bench-") as tmp:
        work = Path(tmp)
        if args.video is not None:
            report("given", args.video, work, settings)
            large = work / "given-1280x720.mp4"
            resized_copy(args.video, large, 1280, 720)
            report("given@1280x720", large, work, settings, deface=deface)
            return
        large, small = work / "faces-1280x720.mp4", work / "faces-112x112.mp4"
        large_truth = synthetic_video(large, 1280, 720, LARGE_FACES, args.frames)
        small_truth = synthetic_video(small, 112, 112, SMALL_FACES, args.frames)
        report("small", small, work, settings, small_truth)
        report("large", large, work, settings, large_truth, deface)


if __name__ == "__main__":
    main()
