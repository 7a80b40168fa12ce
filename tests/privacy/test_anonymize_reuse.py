"""Passes over unchanged pixels are skipped in a video, and skipping never costs a face: a face
that appears on a still background is found. Helper processes that scan tiles change speed,
not output, and a helper that dies fails detection closed."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from skimage import data

from privacy.anonymize import Box, FaceAnonymizer, PassMemory
from simulations.bench_anonymize import fine_detail, paste_face


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def still_scene() -> np.ndarray:
    return cv2.resize(bgr(data.rocket()), (640, 360), interpolation=cv2.INTER_AREA)


def counting(anonymizer: FaceAnonymizer) -> list[int]:
    """Count the detector passes run on each frame (wraps the real detector's _run)."""
    detector = anonymizer.detector
    calls: list[int] = []
    real_run = detector._run

    def run(model, rgb, x0, y0):
        calls[-1] += 1
        return real_run(model, rgb, x0, y0)

    detector._run = run
    original_detect = detector.detect

    def detect(rgb, tile_sizes, memory=None):
        calls.append(0)
        return original_detect(rgb, tile_sizes, memory=memory)

    detector.detect = detect
    return calls


def hidden(original, output, box) -> bool:
    return fine_detail(output, box) / max(fine_detail(original, box), 1e-6) <= 0.4


def test_passes_over_a_still_scene_run_once_then_are_reused(anon_settings, real_faces):
    scene = still_scene()
    face = paste_face(scene, real_faces[0], 64, 0, (320, 180))
    frames = [scene.copy() for _ in range(8)]
    with FaceAnonymizer(anon_settings) as anonymizer:
        calls = counting(anonymizer)
        out, _ = anonymizer.anonymize_frames(frames)
    # Frame 0 runs every level; later frames run no pass at all: nothing changed.
    assert calls[0] > 10 and calls[1:] == [0] * 7
    # ... and the reused boxes still hide the face on every frame.
    assert all(hidden(f, o, face) for f, o in zip(frames, out))
    # Without reuse every frame runs its scheduled passes (the count above can fail).
    no_reuse = dataclasses.replace(anon_settings, reuse_unchanged=False)
    with FaceAnonymizer(no_reuse) as anonymizer:
        calls = counting(anonymizer)
        anonymizer.anonymize_frames(frames)
    assert min(calls[1:]) >= 2


def test_a_face_that_appears_on_a_still_background_is_found(anon_settings, real_faces):
    scene = still_scene()
    frames, faces = [], []
    for t in range(14):
        frame = scene.copy()
        # Empty for 6 frames (every tile scanned and remembered as face-free), then a 20 px
        # face walks in: the tiles it enters have changed and run again.
        faces.append(paste_face(frame, real_faces[1], 20, 0, (200 + 3 * t, 150))
                     if t >= 6 else None)
        frames.append(scene.copy() if t < 6 else frame)
    with FaceAnonymizer(anon_settings) as anonymizer:
        out, _ = anonymizer.anonymize_frames(frames)
    for t in range(6, 14):
        assert hidden(frames[t], out[t], faces[t]), f"face on frame {t} not hidden"


def test_a_pass_is_run_again_when_its_pixels_change_or_it_grows_old():
    memory = PassMemory(threshold=6.0, max_frames=3)
    scene = bgr(data.rocket())[:256, :256].copy()
    key = ("tile", 0, 0, 256, 256)
    found = [Box(10, 10, 20, 20)]
    memory.next_frame(scene)
    assert memory.recall(key) is None  # never ran
    memory.store(key, found)
    memory.next_frame(scene)
    assert memory.recall(key) == found
    # One 16 px block brightened by 40 grey levels: the pass must run again.
    changed = scene.copy()
    changed[100:116, 100:116] = np.clip(changed[100:116, 100:116].astype(int) + 40, 0, 255)
    memory.next_frame(changed)
    assert memory.recall(key) is None
    # Sensor-like noise of +-2 levels everywhere is not a change.
    noisy = np.clip(scene.astype(int) + np.random.default_rng(0).integers(-2, 3, scene.shape),
                    0, 255).astype(np.uint8)
    memory.next_frame(noisy)
    assert memory.recall(key) == found
    # Unchanged but stored more than max_frames frames ago: run again.
    for _ in range(3):
        memory.next_frame(scene)
    assert memory.recall(key) is None


def test_helper_processes_change_speed_not_output(anon_settings, real_faces):
    frame = cv2.resize(bgr(data.rocket()), (1280, 720), interpolation=cv2.INTER_AREA)
    faces = [paste_face(frame, real_faces[i], size, 0, (200 + 400 * i, 360))
             for i, size in enumerate((20, 32, 64))]
    found = {}
    for processes in (1, 2):
        settings = dataclasses.replace(anon_settings, processes=processes)
        with FaceAnonymizer(settings) as anonymizer:
            found[processes] = anonymizer.detect(frame)
            assert (anonymizer.detector._helpers is not None) == (processes == 2)
    assert found[1] == found[2]
    assert all(any(b.x <= f[0] + f[2] / 2 <= b.x + b.w for b in found[2]) for f in faces)


def test_a_helper_that_dies_fails_detection_closed(anon_settings):
    frame = cv2.resize(bgr(data.rocket()), (1280, 720), interpolation=cv2.INTER_AREA)
    with FaceAnonymizer(dataclasses.replace(anon_settings, processes=2)) as anonymizer:
        anonymizer.detect(frame)
        helpers = anonymizer.detector._helpers
        helpers.procs[0].kill()
        helpers.procs[0].wait()
        with pytest.raises((RuntimeError, OSError)):
            anonymizer.detect(frame)
        # The broken helpers are dropped; the next frame starts new ones and works.
        assert anonymizer.detector._helpers is None
        assert isinstance(anonymizer.detect(frame), list)
