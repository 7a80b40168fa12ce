"""In a video, a pass looks again only at the bands of rows whose pixels changed, and skipping
never costs a face: a face that appears on a still background is found, and a reused band
keeps its boxes. Threads change speed, not output."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from skimage import data

from privacy.anonymize import Box, FaceAnonymizer, PassMemory, _pieces
from simulations.bench_anonymize import hidden, paste_face


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def still_scene() -> np.ndarray:
    return cv2.resize(bgr(data.rocket()), (640, 360), interpolation=cv2.INTER_AREA)


def counting(anonymizer: FaceAnonymizer) -> list[int]:
    """Rows of the frame scanned by the short-range network on each frame (wraps the real
    detector's dense scan)."""
    detector = anonymizer.detector
    rows: list[int] = []
    real_scan, real_detect = detector._scan, detector.detect

    def scan(rgb, size, top, bottom):
        rows[-1] += bottom - top
        return real_scan(rgb, size, top, bottom)

    def detect(rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        rows.append(0)
        return real_detect(rgb, window_sizes, memory=memory, full_range=full_range,
                           confirmed=confirmed)

    detector._scan, detector.detect = scan, detect
    return rows


def test_passes_over_a_still_scene_run_once_then_are_reused(anon_settings, real_faces):
    scene = still_scene()
    face = paste_face(scene, real_faces[0], 64, 0, (320, 180))
    frames = [scene.copy() for _ in range(8)]
    with FaceAnonymizer(anon_settings) as anonymizer:
        rows = counting(anonymizer)
        out, _ = anonymizer.anonymize_frames(frames)
    # Frame 0 scans every level over the whole frame; later frames scan nothing: nothing
    # changed. (The last frame is scanned once more by every level: the end of the video.)
    assert rows[0] >= 360 * 3 and rows[1:-1] == [0] * 7
    # ... and the reused boxes still hide the face on every frame.
    assert all(hidden(f, o, face) for f, o in zip(frames, out))
    # Without reuse every frame runs its scheduled passes (the count above can fail).
    no_reuse = dataclasses.replace(anon_settings, reuse_unchanged=False)
    with FaceAnonymizer(no_reuse) as anonymizer:
        rows = counting(anonymizer)
        anonymizer.anonymize_frames(frames)
    assert min(rows[1:]) >= 360


def test_only_the_rows_where_a_face_moves_are_scanned_again(anon_settings, real_faces):
    scene = cv2.resize(bgr(data.rocket()), (1280, 720), interpolation=cv2.INTER_AREA)
    frames, faces = [], []
    for t in range(9):
        frame = scene.copy()
        faces.append(paste_face(frame, real_faces[1], 24, 0, (300 + 4 * t, 600)))
        frames.append(frame)
    settings = dataclasses.replace(anon_settings, window_sizes=(96,), window_every=(1,))
    with FaceAnonymizer(settings) as anonymizer:
        rows = counting(anonymizer)
        out, _ = anonymizer.anonymize_frames(frames)
    # Frame 0: the whole frame. Then the face's band of 96 rows with half a window around
    # it, and the whole-frame pass (its one band changed).
    assert rows[0] == 720 * 2
    assert all(720 + 96 <= r <= 720 + 2 * 96 + 96 for r in rows[1:-1]), rows
    for t in range(9):
        assert hidden(frames[t], out[t], faces[t]), f"face on frame {t} not hidden"


def test_changed_bands_are_scanned_in_pieces_of_three_lengths(anon_settings, real_faces):
    # LiteRT replans its network for every new input shape (0.6x a run's time): runs of
    # stale bands are cut into pieces of 1, 2 or 4 bands, the last moved back to end with
    # its run.
    assert _pieces([(0, 0), (3, 5), (7, 15)]) == [(0, 0), (2, 5), (7, 10), (11, 14), (12, 15)]
    scene = cv2.resize(bgr(data.rocket()), (1280, 720), interpolation=cv2.INTER_AREA)
    frames, faces = [], []
    for t in range(8):  # one face at the top edge, one falling across bands, one drifting
        frame = scene.copy()
        faces.append([paste_face(frame, real_faces[1], 24, 0, (200 + 4 * t, 20)),
                      paste_face(frame, real_faces[0], 40, 0, (640, 200 + 30 * t)),
                      paste_face(frame, real_faces[1], 20, 0, (1000 - 6 * t, 500))])
        frames.append(frame)
    settings = dataclasses.replace(anon_settings, window_sizes=(64,), window_every=(1,))
    with FaceAnonymizer(settings) as anonymizer:
        heights = set()
        real_scan = anonymizer.detector._scan
        def scan(rgb, size, top, bottom):
            heights.add(bottom - top) if size == 64 else None
            return real_scan(rgb, size, top, bottom)
        anonymizer.detector._scan = scan
        out, _ = anonymizer.anonymize_frames(frames)
    # (length + 1) * 64 rows (half a window either side), or the whole frame.
    assert heights <= {128, 192, 320, 720} and len(heights) >= 2, heights
    for frame, anonymized, boxes in zip(frames, out, faces):
        assert all(hidden(frame, anonymized, box) for box in boxes)


def test_a_face_that_appears_on_a_still_background_is_found(anon_settings, real_faces):
    scene = still_scene()
    frames, faces = [], []
    for t in range(14):
        frame = scene.copy()
        # Empty for 6 frames (every band scanned and remembered as face-free), then a 20 px
        # face walks in: the bands it enters have changed and are scanned again.
        faces.append(paste_face(frame, real_faces[1], 20, 0, (200 + 3 * t, 150))
                     if t >= 6 else None)
        frames.append(scene.copy() if t < 6 else frame)
    with FaceAnonymizer(anon_settings) as anonymizer:
        out, _ = anonymizer.anonymize_frames(frames)
    for t in range(6, 14):
        assert hidden(frames[t], out[t], faces[t]), f"face on frame {t} not hidden"


def test_a_band_is_scanned_again_when_its_pixels_change_or_it_grows_old():
    memory = PassMemory(threshold=6.0, max_frames=3)
    scene = bgr(data.rocket())[:256, :256].copy()
    found = [Box(10, 10, 20, 20), Box(10, 200, 20, 20)]
    memory.next_frame(scene)
    assert memory.stale_bands("level", 64).all()  # never looked
    memory.update("level", 0, 256, found)
    memory.next_frame(scene)
    assert not memory.stale_bands("level", 64).any() and memory.boxes("level") == found
    # One 16 px block brightened by 40 grey levels: its band (rows 64-127) must be scanned.
    changed = scene.copy()
    changed[100:116, 100:116] = np.clip(changed[100:116, 100:116].astype(int) + 40, 0, 255)
    memory.next_frame(changed)
    assert memory.stale_bands("level", 64).tolist() == [False, True, False, False]
    # Scanning rows 64-127 replaces only the boxes centred there.
    new = [Box(100, 100, 16, 16)]
    assert memory.update("level", 64, 128, new + [Box(0, 0, 5, 5)]) == found + new
    # Sensor-like noise of +-2 levels everywhere is not a change.
    noisy = np.clip(changed.astype(int) + np.random.default_rng(0).integers(-2, 3, scene.shape),
                    0, 255).astype(np.uint8)
    memory.next_frame(noisy)
    assert not memory.stale_bands("level", 64).any()
    # Unchanged, but looked at more than max_frames frames ago: stale again (band 1 was
    # looked at two frames after the others).
    for _ in range(2):
        memory.next_frame(changed)
    assert memory.stale_bands("level", 64).tolist() == [True, False, True, True]


def test_threads_change_speed_not_output(anon_settings, real_faces):
    frame = cv2.resize(bgr(data.rocket()), (1280, 720), interpolation=cv2.INTER_AREA)
    faces = [paste_face(frame, real_faces[i], size, 0, (200 + 400 * i, 360))
             for i, size in enumerate((14, 32, 64))]
    found = {}
    for threads in (1, 2):
        with FaceAnonymizer(dataclasses.replace(anon_settings, threads=threads)) as anonymizer:
            found[threads] = anonymizer.detect(frame)
    assert found[1] == found[2]
    assert all(any(b.x <= f[0] + f[2] / 2 <= b.x + b.w for b in found[2]) for f in faces)


@pytest.mark.parametrize("size,most", [((1280, 720), 3), ((64, 64), None)])
def test_the_full_range_pass_runs_every_other_frame_where_the_pyramid_runs(
        anon_settings, monkeypatch, size, most):
    from privacy.blazeface_dense import FullRangeBlazeFace

    calls = []
    real = FullRangeBlazeFace.detect
    monkeypatch.setattr(FullRangeBlazeFace, "detect", lambda *a: calls.append(1) or real(*a))
    # Every block changes between frames (10 levels brighter each), none at once (no cut).
    picture = np.random.default_rng(0).integers(0, 180, (size[1], size[0], 3), np.uint8)
    frames = [picture + np.uint8(10 * i) for i in range(6)]
    with FaceAnonymizer(anon_settings) as anonymizer:
        anonymizer.anonymize_frames(frames)
    if most:  # frames 1, 3 and 5 (the last frame gets the other passes at the end)
        assert len(calls) == most
    else:  # no level runs on 64 px frames: the whole-frame passes run on every one
        assert len(calls) >= len(frames)

