"""The built-in dataset: labelled synthetic videos written as real .mp4 files.

Each video shows a textured shape moving over a textured background; the class is the
motion (right, left, down, up, grow, shrink), never the look: shape, colours, texture and
start position are random, so one frame alone cannot tell the class. Some videos also carry
a real human face (NASA's public-domain astronaut portrait, shipped with scikit-image)
drifting across the scene, so the face anonymizer has work to do in the default run.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from client.video import write_video
from privacy.durable import atomic_write_json

CLASSES = ("move-right", "move-left", "move-down", "move-up", "grow", "shrink")
FRAME_SIZE = 64
NUM_FRAMES = 32
FPS = 12
DONE_FILE = "synth.json"


def _texture(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Smooth colour noise: a small random image blown up, so nothing is a flat colour."""
    small = rng.integers(0, 256, (max(2, size // scale),) * 2 + (3,), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _face_patch(size: int) -> np.ndarray:
    """The astronaut's face, BGR, `size` pixels square."""
    from skimage import data

    face = data.astronaut()[20:230, 140:330][:, :, ::-1]  # RGB -> BGR, head and shoulders
    return cv2.resize(np.ascontiguousarray(face), (size, size), interpolation=cv2.INTER_AREA)


def _object_mask(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A filled ellipse, rectangle or triangle, drawn at 4x and cut out later."""
    side = int(4 * radius) * 2 + 1
    mask = np.zeros((side, side), np.uint8)
    c, r = side // 2, int(4 * radius)
    kind = rng.integers(3)
    if kind == 0:
        cv2.ellipse(mask, (c, c), (r, int(r * rng.uniform(0.6, 1.0))), 0, 0, 360, 255, -1)
    elif kind == 1:
        h = int(r * rng.uniform(0.6, 1.0))
        cv2.rectangle(mask, (c - r, c - h), (c + r, c + h), 255, -1)
    else:
        pts = np.array([[c, c - r], [c - r, c + r], [c + r, c + r]], np.int32)
        cv2.fillPoly(mask, [pts], 255)
    return mask


def _trajectory(label: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) and radius per frame for one motion class."""
    t = np.arange(NUM_FRAMES, dtype=np.float64)
    speed = rng.uniform(1.0, 1.4)  # pixels per frame
    start = rng.uniform(22, 42, size=2)
    radius = np.full(NUM_FRAMES, rng.uniform(8, 12))
    x, y = np.full(NUM_FRAMES, start[0]), np.full(NUM_FRAMES, start[1])
    travel = speed * (t - NUM_FRAMES / 2)
    name = CLASSES[label]
    if name == "move-right":
        x = FRAME_SIZE / 2 + travel + rng.uniform(-6, 6)
    elif name == "move-left":
        x = FRAME_SIZE / 2 - travel + rng.uniform(-6, 6)
    elif name == "move-down":
        y = FRAME_SIZE / 2 + travel + rng.uniform(-6, 6)
    elif name == "move-up":
        y = FRAME_SIZE / 2 - travel + rng.uniform(-6, 6)
    else:
        growth = np.linspace(0.55, 1.6, NUM_FRAMES) * rng.uniform(9, 12)
        radius = growth if name == "grow" else growth[::-1]
    return np.stack([x, y], axis=1), radius


def _render_video(label: int, rng: np.random.Generator, with_face: bool) -> list[np.ndarray]:
    # A low-contrast background under a high-contrast shape: the motion is visible, but
    # colours and textures are random, so only the motion tells the class.
    background = _texture(rng, FRAME_SIZE, int(rng.integers(12, 24))) // 6 + rng.integers(50, 150)
    # The shape: a saturated random colour with a light texture, so it stands out.
    colour = rng.choice([20, 235], size=3).astype(np.float64)
    if colour.std() == 0:
        colour[rng.integers(3)] = 255 - colour[0]
    skin = 0.85 * colour + 0.15 * _texture(rng, FRAME_SIZE * 4, int(rng.integers(16, 32)))
    mask_full = _object_mask(rng, 16)
    centres, radii = _trajectory(label, rng)
    face = _face_patch(30) if with_face else None
    face_start = rng.uniform(0, FRAME_SIZE - 30, size=2)
    face_step = rng.uniform(-0.3, 0.3, size=2)
    frames = []
    for i in range(NUM_FRAMES):
        frame = background.copy()
        # Draw the shape at 4x resolution then shrink: smooth edges, sub-pixel motion.
        canvas = np.zeros((FRAME_SIZE * 4, FRAME_SIZE * 4), np.uint8)
        side = max(3, int(8 * radii[i]) | 1)
        mask = cv2.resize(mask_full, (side, side), interpolation=cv2.INTER_AREA)
        cx, cy = (centres[i] * 4).astype(int)
        x0, y0 = cx - side // 2, cy - side // 2
        xs, ys = slice(max(0, x0), min(canvas.shape[1], x0 + side)), slice(max(0, y0), min(canvas.shape[0], y0 + side))
        canvas[ys, xs] = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
        alpha = cv2.resize(canvas, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)[..., None] / 255.0
        shape = cv2.resize(skin, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)
        frame = (frame * (1 - alpha) + shape * alpha).astype(np.uint8)
        if face is not None:
            fx, fy = np.clip(face_start + face_step * i, 0, FRAME_SIZE - 30).astype(int)
            frame[fy : fy + 30, fx : fx + 30] = face
        frames.append(frame)
    return frames


def write_synthetic_dataset(
    out_dir: Path,
    seed: int = 0,
    videos_per_class: int = 300,
    face_fraction: float = 0.25,
    suffix: str = ".mp4",
    progress: bool = False,
) -> Path:
    """Write the built-in dataset (one sub-folder per class) into `out_dir`; return it.

    Deterministic from `seed`. A `synth.json` marker is written last, so a half-written
    dataset (crash, kill) is regenerated rather than used.
    """
    from rich.progress import track

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    jobs = [(label, i) for label in range(len(CLASSES)) for i in range(videos_per_class)]
    seeds = rng.integers(0, 2**63, size=len(jobs))
    for name in CLASSES:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    items = track(zip(jobs, seeds), total=len(jobs), description="synth videos") if progress else zip(jobs, seeds)
    for (label, i), video_seed in items:
        video_rng = np.random.default_rng(int(video_seed))
        with_face = video_rng.random() < face_fraction
        frames = _render_video(label, video_rng, with_face)
        write_video(out_dir / CLASSES[label] / f"{CLASSES[label]}_{i:03d}{suffix}", frames, FPS)
    meta = {"seed": seed, "videos_per_class": videos_per_class, "classes": list(CLASSES)}
    atomic_write_json(out_dir / DONE_FILE, meta)
    return out_dir


def is_complete(out_dir: Path) -> bool:
    """True when `out_dir` holds a fully written synthetic dataset."""
    return (Path(out_dir) / DONE_FILE).is_file()
