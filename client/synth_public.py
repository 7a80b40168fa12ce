"""Public pretraining data: synthetic videos that no site holds, disjoint from the sites' data.

Disjoint in labels: the classes are diagonal drifts and rotations about the frame's centre,
none of the sites' six motions (right, left, down, up, grow, shrink). Disjoint in content: the
objects are rings, crosses and stars over striped backgrounds, where the sites' data has filled
ellipses, rectangles and triangles over smooth colour noise; and there are no faces. What it
shares with the sites' data is what public data shares with private data in practice: natural
motion over clutter, the same frame size and rate.

The public detection set (`write_public_detection_dataset`) is disjoint from the sites' in the
same way: rings, crosses and stars over stripes, where the sites' detection data has filled
squares, discs and triangles over smooth noise. Each shape moves on a straight line as the
sites' do, and its box is the tight box of its drawn pixels.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from client.synth import FPS, FRAME_SIZE, NUM_FRAMES, _texture
from client.video import write_video
from privacy.durable import atomic_write_json

PUBLIC_CLASSES = ("drift-up-right", "drift-up-left", "drift-down-right", "drift-down-left", "orbit-cw", "orbit-ccw")
PUBLIC_DETECTION_CLASSES = ("ring", "cross", "star")  # the kinds drawn by _outline_mask, in its order
DONE_FILE = "synth-public.json"
DETECTION_DONE_FILE = "synth-public-detect.json"
SUPERSAMPLE = 4


def _stripes(rng: np.random.Generator) -> np.ndarray:
    """A low-contrast striped background at a random angle, period and pair of colours."""
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
    y, x = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE]
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
    low, high = rng.uniform(60, 120, 3), rng.uniform(120, 180, 3)
    return low + wave[..., None] * (high - low)


def _outline_mask(rng: np.random.Generator, radius: float, kind: int | None = None) -> np.ndarray:
    """A ring, a cross or a star (`kind` 0, 1, 2; random if None), `radius` px, drawn at 4x for smooth edges."""
    side = int(2 * SUPERSAMPLE * radius) | 1
    mask = np.zeros((side, side), np.uint8)
    c, r = side // 2, int(SUPERSAMPLE * radius) - 1
    kind = rng.integers(3) if kind is None else kind
    if kind == 0:
        cv2.circle(mask, (c, c), r - SUPERSAMPLE, 255, thickness=2 * SUPERSAMPLE + 1)
    elif kind == 1:
        arm = max(SUPERSAMPLE, r // 3)
        cv2.rectangle(mask, (c - r, c - arm), (c + r, c + arm), 255, -1)
        cv2.rectangle(mask, (c - arm, c - r), (c + arm, c + r), 255, -1)
    else:
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        points = np.stack([c + radii * np.cos(angles), c - radii * np.sin(angles)], axis=1).astype(np.int32)
        cv2.fillPoly(mask, [points], 255)
    return mask


def _path(label: int, rng: np.random.Generator) -> np.ndarray:
    """Centre (x, y) per frame for one public class."""
    t = np.arange(NUM_FRAMES, dtype=np.float64) - NUM_FRAMES / 2
    name = PUBLIC_CLASSES[label]
    centre = FRAME_SIZE / 2 + rng.uniform(-5, 5, size=2)
    if name.startswith("drift"):
        step = rng.uniform(0.8, 1.1)  # px per frame on each axis
        dx = step if name.endswith("right") else -step
        dy = -step if "-up-" in name else step
        return centre + t[:, None] * np.array([dx, dy])
    radius, speed = rng.uniform(10, 16), rng.uniform(0.12, 0.2)  # px, radians per frame
    phase = rng.uniform(0, 2 * np.pi) + (speed if name == "orbit-ccw" else -speed) * t
    return centre + radius * np.stack([np.cos(phase), -np.sin(phase)], axis=1)


def _look(rng: np.random.Generator) -> np.ndarray:
    """A saturated, lightly textured colour for one object."""
    colour = rng.choice([20, 235], size=3).astype(np.float64)
    if colour.std() == 0:
        colour[rng.integers(3)] = 255 - colour[0]
    return cv2.resize(0.85 * colour + 0.15 * _texture(rng, FRAME_SIZE, int(rng.integers(8, 16))), (FRAME_SIZE, FRAME_SIZE))


def _alpha(mask: np.ndarray, cx: int, cy: int) -> np.ndarray | None:
    """Coverage (FRAME_SIZE, FRAME_SIZE, 1) of `mask` centred at (cx, cy) in 4x pixels; None if off screen."""
    side, big = mask.shape[0], FRAME_SIZE * SUPERSAMPLE
    canvas = np.zeros((big + 2 * side, big + 2 * side), np.uint8)  # a margin: the object may leave
    x0, y0 = cx - side // 2 + side, cy - side // 2 + side
    if not (0 <= x0 <= canvas.shape[1] - side and 0 <= y0 <= canvas.shape[0] - side):
        return None
    canvas[y0:y0 + side, x0:x0 + side] = mask
    alpha = cv2.resize(canvas[side:side + big, side:side + big], (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)
    return alpha[..., None] / 255.0


def _render(label: int, rng: np.random.Generator) -> list[np.ndarray]:
    background = _stripes(rng)
    look = _look(rng)
    mask = _outline_mask(rng, rng.uniform(7, 11))
    frames = []
    for cx, cy in (_path(label, rng) * SUPERSAMPLE).astype(int):
        alpha = _alpha(mask, cx, cy)
        frames.append(background.astype(np.uint8) if alpha is None else (background * (1 - alpha) + look * alpha).astype(np.uint8))
    return frames


def _tight_box(mask: np.ndarray, cx: int, cy: int) -> tuple[float, float, float, float]:
    """(x, y, w, h) in frame pixels of the drawn pixels of `mask` centred at (cx, cy) in 4x pixels."""
    rows, cols = np.nonzero(mask)
    x0, y0 = cx - mask.shape[1] // 2, cy - mask.shape[0] // 2
    x1, y1 = (x0 + cols.min()) / SUPERSAMPLE, (y0 + rows.min()) / SUPERSAMPLE
    return x1, y1, (x0 + cols.max() + 1) / SUPERSAMPLE - x1, (y0 + rows.max() + 1) / SUPERSAMPLE - y1


def render_public_detection_video(rng: np.random.Generator) -> tuple[list[np.ndarray], list[str]]:
    """BGR frames of one public detection video and its gt.txt lines (the layout of client.synth_detect)."""
    from client.synth_detect import _path as straight_path

    background = _stripes(rng)
    frames = [background.copy() for _ in range(NUM_FRAMES)]
    lines = []
    for track in range(1, int(rng.integers(1, 5)) + 1):
        kind = int(rng.integers(len(PUBLIC_DETECTION_CLASSES)))
        mask, look = _outline_mask(rng, rng.uniform(4, 10), kind), _look(rng)
        for t, (cx, cy) in enumerate((straight_path(rng) * SUPERSAMPLE).astype(int)):
            x, y, w, h = _tight_box(mask, cx, cy)
            alpha = _alpha(mask, cx, cy)
            if alpha is None or x + w <= 0 or y + h <= 0 or x >= FRAME_SIZE or y >= FRAME_SIZE:
                continue  # off screen: no pixel, no line
            frames[t] = frames[t] * (1 - alpha) + look * alpha
            lines.append(f"{t + 1},{track},{x:.2f},{y:.2f},{w:.2f},{h:.2f},1,{kind + 1},1")
    lines.sort(key=lambda line: int(line.split(",")[0]))
    return [np.clip(f, 0, 255).astype(np.uint8) for f in frames], lines


def write_public_dataset(out_dir: Path, seed: int = 1, videos_per_class: int = 100, progress: bool = False) -> Path:
    """Write the public pretraining set (one sub-folder per public class) into `out_dir`.

    Deterministic from `seed`; a marker written last means a half-written set is rewritten.
    """
    from rich.progress import track

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    jobs = [(label, i) for label in range(len(PUBLIC_CLASSES)) for i in range(videos_per_class)]
    seeds = rng.integers(0, 2**63, size=len(jobs))
    for name in PUBLIC_CLASSES:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    items = track(zip(jobs, seeds), total=len(jobs), description="public videos") if progress else zip(jobs, seeds)
    for (label, i), video_seed in items:
        frames = _render(label, np.random.default_rng(int(video_seed)))
        write_video(out_dir / PUBLIC_CLASSES[label] / f"{PUBLIC_CLASSES[label]}_{i:03d}.mp4", frames, FPS)
    atomic_write_json(out_dir / DONE_FILE, {"seed": seed, "videos_per_class": videos_per_class,
                                            "classes": list(PUBLIC_CLASSES)})
    return out_dir


def write_public_detection_dataset(out_dir: Path, seed: int = 1, videos: int = 600, progress: bool = False) -> Path:
    """Write the public detection set (NAME.mp4 + NAME.gt.txt, classes.txt) into `out_dir`.

    Deterministic from `seed`; a marker written last means a half-written set is rewritten.
    """
    from rich.progress import track

    from client.boxes import CLASSES_FILE

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CLASSES_FILE).write_text("\n".join(PUBLIC_DETECTION_CLASSES) + "\n")
    seeds = np.random.default_rng(seed).integers(0, 2**63, size=videos)
    numbered = track(enumerate(seeds), total=videos, description="public videos") if progress else enumerate(seeds)
    for i, video_seed in numbered:
        frames, lines = render_public_detection_video(np.random.default_rng(int(video_seed)))
        write_video(out_dir / f"outlines_{i:04d}.mp4", frames, FPS)
        (out_dir / f"outlines_{i:04d}.gt.txt").write_text("\n".join(lines) + "\n")
    atomic_write_json(out_dir / DETECTION_DONE_FILE, {"seed": seed, "videos": videos, "classes": list(PUBLIC_DETECTION_CLASSES)})
    return out_dir


def is_complete(out_dir: Path, done_file: str = DONE_FILE) -> bool:
    return (Path(out_dir) / done_file).is_file()
