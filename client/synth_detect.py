"""The built-in detection dataset: synthetic videos of moving shapes with MOT box annotations.

Each 64 px, 32-frame video shows 1 to 4 textured shapes (square, disc, triangle; 8-20 px) over
a textured background. Every shape moves on its own straight line at its own speed and enters
or leaves the frame, so some frames miss some shapes. Colours and textures are random: only the
outline tells the class. Written in the layout client.boxes reads: NAME.mp4 + NAME.gt.txt
(``frame,id,x,y,w,h,1,class,1``, boxes unclipped, lines only while a shape overlaps the frame)
and classes.txt.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from client.boxes import CLASSES_FILE
from client.synth import _texture
from client.video import write_video
from privacy.durable import atomic_write_json

DETECTION_CLASSES = ("square", "disc", "triangle")
FRAME_SIZE = 64
NUM_FRAMES = 32
FPS = 12
SUPERSAMPLE = 4  # shapes are drawn at 4x then shrunk: smooth edges, sub-pixel motion
DONE_FILE = "synth-detect.json"


def object_alpha(kind: int, centre: np.ndarray, size: float) -> np.ndarray:
    """Coverage in [0, 1] of a shape of class ``kind``, ``size`` px across, centred at ``centre``.

    Every shape fills the box (cx - size/2, cy - size/2) .. (cx + size/2, cy + size/2).
    """
    big = FRAME_SIZE * SUPERSAMPLE
    canvas = np.zeros((big, big), np.uint8)
    cx, cy = centre * SUPERSAMPLE
    half = size * SUPERSAMPLE / 2
    # Pixel centres sit at +0.5: the last filled pixel of [x1, x2) is x2 - 1.
    x1, y1, x2, y2 = (round(v) for v in (cx - half, cy - half, cx + half - 1, cy + half - 1))
    if DETECTION_CLASSES[kind] == "square":
        cv2.rectangle(canvas, (x1, y1), (x2, y2), 255, -1)
    elif DETECTION_CLASSES[kind] == "disc":
        cv2.ellipse(canvas, ((cx - 0.5, cy - 0.5), (2 * half, 2 * half), 0), 255, -1, lineType=cv2.LINE_AA)
    else:
        cv2.fillPoly(canvas, [np.array([[(x1 + x2) // 2, y1], [x1, y2], [x2, y2]], np.int32)], 255)
    return cv2.resize(canvas, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA) / 255.0


def _path(rng: np.random.Generator) -> np.ndarray:
    """Centre (x, y) per frame on a straight line through a random point of the frame."""
    through = rng.uniform(8, FRAME_SIZE - 8, size=2)
    when = rng.uniform(0, NUM_FRAMES - 1)
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(1.0, 3.0)  # px per frame: 32 to 96 px over the video
    t = np.arange(NUM_FRAMES, dtype=np.float64)[:, None]
    return through + speed * (t - when) * np.array([np.cos(angle), np.sin(angle)])


def render_detection_video(rng: np.random.Generator) -> tuple[list[np.ndarray], list[str]]:
    """BGR frames of one video and its gt.txt lines."""
    background = _texture(rng, FRAME_SIZE, int(rng.integers(8, 24))) // 5 + rng.integers(50, 150)
    frames = [background.astype(np.float64) for _ in range(NUM_FRAMES)]
    lines = []
    for track in range(1, int(rng.integers(1, 5)) + 1):
        kind = int(rng.integers(len(DETECTION_CLASSES)))
        size = rng.uniform(8, 20)
        colour = rng.choice([25, 230], size=3).astype(np.float64)
        if colour.std() == 0:  # keep it saturated: never grey on a grey background
            colour[rng.integers(3)] = 255 - colour[0]
        skin = 0.8 * colour + 0.2 * _texture(rng, FRAME_SIZE, int(rng.integers(4, 12)))
        for t, centre in enumerate(_path(rng)):
            x, y = centre - size / 2
            if x + size <= 0 or y + size <= 0 or x >= FRAME_SIZE or y >= FRAME_SIZE:
                continue  # off screen: no pixel, no line
            alpha = object_alpha(kind, centre, size)[..., None]
            frames[t] = frames[t] * (1 - alpha) + skin * alpha
            lines.append(f"{t + 1},{track},{x:.2f},{y:.2f},{size:.2f},{size:.2f},1,{kind + 1},1")
    lines.sort(key=lambda line: int(line.split(",")[0]))
    return [np.clip(f, 0, 255).astype(np.uint8) for f in frames], lines


def write_synthetic_detection_dataset(out_dir: Path, seed: int = 0, videos: int = 1200, progress: bool = False) -> Path:
    """Write ``videos`` annotated synthetic videos and classes.txt into ``out_dir``; return it.

    Deterministic from ``seed``. The marker file is written last, so a half-written dataset
    (crash, kill) is regenerated rather than used (see `is_complete`).
    """
    from rich.progress import track

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CLASSES_FILE).write_text("\n".join(DETECTION_CLASSES) + "\n")
    seeds = np.random.default_rng(seed).integers(0, 2**63, size=videos)
    numbered = track(enumerate(seeds), total=videos, description="synth videos") if progress else enumerate(seeds)
    for i, video_seed in numbered:
        frames, lines = render_detection_video(np.random.default_rng(int(video_seed)))
        write_video(out_dir / f"shapes_{i:04d}.mp4", frames, FPS)
        (out_dir / f"shapes_{i:04d}.gt.txt").write_text("\n".join(lines) + "\n")
    meta = {"seed": seed, "videos": videos, "classes": list(DETECTION_CLASSES)}
    atomic_write_json(out_dir / DONE_FILE, meta)
    return out_dir


def is_complete(out_dir: Path) -> bool:
    """True when ``out_dir`` holds a fully written synthetic detection dataset."""
    return (Path(out_dir) / DONE_FILE).is_file()
