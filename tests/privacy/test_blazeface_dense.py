"""BlazeFace in LiteRT gives MediaPipe's own detections. The short-range model run densely:
on 128 px windows the same boxes and scores as MediaPipe's face detector, and on a whole
frame the faces MediaPipe finds window by window. The full-range model, letterboxed: on
whole frames of any shape the same boxes and scores. An input too large for one run runs in
strips that give the same detections. A file that is not the model fails closed, naming the
file."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from privacy import blazeface_dense
from privacy.blazeface_dense import GRID, INPUT_SIZE, DenseBlazeFace, FullRangeBlazeFace, strips
from privacy.face_models import FaceModelError
from simulations.bench_anonymize import close_quietly, mediapipe_face_detector, mediapipe_rows, paste_face


@pytest.fixture(scope="module")
def models(face_models):
    dense = DenseBlazeFace(face_models["short_range"], threads=1)
    reference = mediapipe_face_detector(face_models["short_range"], 0.3)
    yield dense, reference
    close_quietly(reference)


def frame_with_faces(real_faces) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A 768x512 RGB frame with real faces of 20-60 px, each in its own 128 px cell."""
    frame = cv2.resize(data.coffee(), (768, 512), interpolation=cv2.INTER_AREA)
    bgr = np.ascontiguousarray(frame[..., ::-1])
    faces = []
    for i, source in enumerate(real_faces[:9]):
        size = (20, 28, 36, 44, 52, 60)[i % 6]
        cell = (64 + 128 * (i % 6), 64 + 128 * (i // 6) + 64 * (i % 2))
        faces.append(paste_face(bgr, source, size, (-20, 0, 20)[i % 3], cell))
    return np.ascontiguousarray(bgr[..., ::-1]), faces


def clipped(rows: np.ndarray) -> np.ndarray:
    """MediaPipe's pixel boxes: origin clipped to the image, width kept, rounded."""
    out = rows.copy()
    out[:, :2] = np.maximum(np.round(out[:, :2]), 0)
    out[:, 2:4] = np.round(out[:, 2:4])
    return out[np.argsort(-out[:, 4])]


def test_on_a_window_the_dense_network_gives_mediapipes_detections(models, real_faces):
    dense, reference = models
    frame, _ = frame_with_faces(real_faces)
    compared = 0
    for y in range(0, frame.shape[0] - INPUT_SIZE + 1, 64):
        for x in range(0, frame.shape[1] - INPUT_SIZE + 1, 64):
            window = frame[y:y + INPUT_SIZE, x:x + INPUT_SIZE]
            ours, theirs = clipped(dense.detect(window, 0.3)), clipped(mediapipe_rows(reference, window))
            assert len(ours) == len(theirs), (x, y)
            np.testing.assert_allclose(ours[:, 4], theirs[:, 4], atol=1e-4)
            np.testing.assert_allclose(ours[:, :4], theirs[:, :4], atol=1.5)
            compared += len(ours)
    assert compared >= 20  # the windows hold faces: the comparison is not vacuous


def test_on_a_whole_frame_it_finds_the_faces_mediapipe_finds_window_by_window(models, real_faces):
    dense, reference = models
    frame, faces = frame_with_faces(real_faces)
    whole = dense.detect(frame, 0.3)
    for x, y, w, h in faces:
        cx, cy = x + w / 2, y + h / 2
        wx = int(np.clip(cx - INPUT_SIZE / 2, 0, frame.shape[1] - INPUT_SIZE))
        wy = int(np.clip(cy - INPUT_SIZE / 2, 0, frame.shape[0] - INPUT_SIZE))
        windowed = mediapipe_rows(reference, frame[wy:wy + INPUT_SIZE, wx:wx + INPUT_SIZE])
        windowed[:, :2] += (wx, wy)
        near = lambda rows: rows[(np.abs(rows[:, 0] + rows[:, 2] / 2 - cx) < w / 2)
                                 & (np.abs(rows[:, 1] + rows[:, 3] / 2 - cy) < h / 2)]
        assert len(near(windowed)) == 1, "MediaPipe should find each pasted face"
        found = near(whole)
        assert len(found) == 1, f"{w} px face at {(x, y)} not found on the whole frame"
        # Same face, same box within a few pixels; the score differs a little, as the
        # network now sees the face's surroundings beyond the window.
        np.testing.assert_allclose(found[0, :4], near(windowed)[0, :4], atol=0.15 * w + 2)


def test_interpreters_are_replanned_within_a_budget_per_width_and_give_what_a_fresh_one_gives(
        face_models, real_faces, monkeypatch):
    frame, faces = frame_with_faces(real_faces)
    # Bands of one frame, as a pyramid level scans them: the same width, other heights,
    # the sides no multiple of 16 (padded with black inside the network's input). The
    # budget holds the plans of the first two bands (512 + 208 rows of 768), not a third.
    budget = 720 * 768
    monkeypatch.setattr(blazeface_dense, "_PLANNED_PIXELS_PER_WIDTH", budget)
    bands = [frame[:500, :760], frame[100:300, :760], frame[:500, :760], frame[200:460, :760],
             frame[100:300, :760], frame[:, :]]
    dense = DenseBlazeFace(face_models["short_range"], threads=1)
    kept_at_width = []
    for band in bands:
        found = dense.detect(band, 0.3)
        fresh = DenseBlazeFace(face_models["short_range"], threads=1).detect(band, 0.3)
        padded = cv2.copyMakeBorder(band, 0, -band.shape[0] % 16, 0, -band.shape[1] % 16,
                                    cv2.BORDER_CONSTANT, value=(0, 0, 0))
        np.testing.assert_array_equal(found, fresh)
        np.testing.assert_array_equal(found, dense.detect(padded, 0.3))
        kept_at_width.append(sorted(shape for entries in dense._interpreters.values()
                                    for _, shape in entries if shape[1] == 768))
        assert sum(h * w for h, w in kept_at_width[-1]) <= budget, kept_at_width[-1]
    assert kept_at_width[2] == [(208, 768), (512, 768)]  # both kept: the third band reused one
    # 272 rows fit beside neither: the least recently used (208) went, then 512, replanned.
    assert kept_at_width[3] == [(272, 768)]
    assert kept_at_width[4] == [(208, 768), (272, 768)]
    assert len(dense.detect(frame, 0.3)) >= len(faces) - 1  # the bands hold faces: not vacuous


@pytest.mark.parametrize("model", ["short_range", "short_range_int8"])
def test_a_large_input_runs_in_strips_that_give_the_detections_of_one_run(
        face_models, real_faces, model, monkeypatch):
    frame, faces = frame_with_faces(real_faces)
    # A frame scaled 2x, as the 64 px level scales it, with a height no multiple of 16.
    scaled = cv2.resize(frame[:507], None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    budget = 3 << 18
    runs = strips(scaled.shape[:2], budget)
    width = -(-scaled.shape[1] // GRID) * GRID
    input_shape = lambda rows: (-(-(rows[1] - rows[0]) // GRID) * GRID, width)
    assert len(runs) >= 3
    assert all(np.prod(input_shape(rows)) <= budget + GRID * width for rows, _ in runs)
    assert len({input_shape(rows) for rows, _ in runs}) <= 2  # two interpreters, none replanned
    own = [rows for _, rows in runs]  # every anchor row answered for once
    assert own[0][0] == 0 and own[-1][1] == input_shape((0, scaled.shape[0]))[0]
    assert all(a[1] == b[0] for a, b in zip(own, own[1:]))
    one_run = DenseBlazeFace(face_models[model], threads=1, max_input_pixels=1 << 30).detect(scaled, 0.1)
    in_strips = lambda: DenseBlazeFace(face_models[model], threads=1, max_input_pixels=budget).detect(scaled, 0.1)
    ordered = lambda rows: rows[np.lexsort(rows.T)]
    found = in_strips()
    assert len(one_run) >= len(faces)  # faces and texture near the cuts: not vacuous
    assert found.shape == one_run.shape
    np.testing.assert_allclose(ordered(found), ordered(one_run), atol=1e-4)
    # With less context at the cuts than the network's reach, the strips see other things.
    monkeypatch.setattr(blazeface_dense, "REACH", 64)
    short = in_strips()
    assert short.shape != one_run.shape or not np.allclose(ordered(short), ordered(one_run), atol=1e-4)


def frames_of_every_shape(real_faces) -> list[np.ndarray]:
    """RGB frames with faces of 30-300 px: square, wide, tall, 720p and 64 px."""
    frames = []
    for (width, height), sizes in (((512, 512), (120, 60)), ((1280, 720), (300, 160, 90)),
                                   ((360, 640), (140, 70)), ((64, 64), (30,))):
        bgr = cv2.resize(data.coffee()[..., ::-1], (width, height), interpolation=cv2.INTER_AREA)
        for i, size in enumerate(sizes):
            centre = (int(width * (i + 1) / (len(sizes) + 1)), height // 2)
            paste_face(bgr, real_faces[i], size, (-20, 0, 20)[i % 3], centre)
        frames.append(np.ascontiguousarray(bgr[..., ::-1]))
    return frames


def test_full_range_on_whole_frames_gives_mediapipes_detections(face_models, real_faces):
    full_range = FullRangeBlazeFace(face_models["full_range"], threads=1)
    reference = mediapipe_face_detector(face_models["full_range"], 0.3)
    try:
        compared = 0
        for frame in frames_of_every_shape(real_faces):
            ours, theirs = clipped(full_range.detect(frame, 0.3)), clipped(mediapipe_rows(reference, frame))
            assert len(ours) == len(theirs), frame.shape
            # MediaPipe's warp differs in the last bits (scores within 0.003 here), and it
            # truncates its pixel boxes where these are rounded.
            np.testing.assert_allclose(ours[:, 4], theirs[:, 4], atol=0.01)
            np.testing.assert_allclose(ours[:, :4], theirs[:, :4], atol=1.5)
            compared += len(ours)
        assert compared >= 6  # the frames hold faces it finds: the comparison is not vacuous
    finally:
        close_quietly(reference)


@pytest.mark.parametrize("runner,model,other", [(DenseBlazeFace, "short_range", "full_range"),
                                                (FullRangeBlazeFace, "full_range", "short_range")])
def test_a_file_that_is_not_the_model_is_refused_by_name(tmp_path, face_models, runner, model, other):
    truncated = tmp_path / "cut.tflite"
    truncated.write_bytes(face_models[model].read_bytes()[:40_000])
    with pytest.raises(FaceModelError, match="cut.tflite"):
        runner(truncated)
    # The other BlazeFace network (another input size, other anchors) is refused too.
    with pytest.raises(FaceModelError, match=face_models[other].name):
        runner(face_models[other])
