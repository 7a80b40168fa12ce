"""Face anonymization: real faces lose their detail and are not found again, small and turned
faces in 1280x720 frames are found, the temporal hold covers missed frames, and every
failure to detect fails closed."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from skimage import data

from privacy.anonymize import (AnonymizerSettings, Box, FaceAnonymizer, _to_rgb, hide_faces,
                               region_of)
from privacy.face_models import FaceModelError
from simulations.bench_anonymize import (Redetector, detail_left, face_stills, heldout_sources,
                                         hidden, paste_face)

MAX_DETAIL_KEPT = 0.4


def found_at(boxes, face) -> bool:
    """Whether a detected Box contains the centre of the (x, y, w, h) `face`."""
    cx, cy = face[0] + face[2] / 2, face[1] + face[3] / 2
    return any(b.x <= cx <= b.x + b.w and b.y <= cy <= b.y + b.h for b in boxes)


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


def lfw_sheet(real_faces) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The LFW faces of `sources`, 64 px wide, on a grey 640x360 image."""
    canvas = np.full((360, 640, 3), 110, np.uint8)
    faces = [paste_face(canvas, source, 64, 0, (90 + 150 * (i % 4), 90 + 180 * (i // 4)))
             for i, source in enumerate(real_faces[3:])]
    return canvas, faces


def real_face_images(real_faces):
    """(name, BGR image, face boxes) for each real face image."""
    yield "astronaut", bgr(real_faces[0].image), [real_faces[0].box]
    yield "grace_hopper", bgr(real_faces[1].image), [real_faces[1].box]
    yield "cameraman", bgr(real_faces[2].image), [real_faces[2].box]
    yield ("lfw", *lfw_sheet(real_faces))


def test_real_faces_lose_their_detail_and_are_not_found_again(face_anonymizer, real_faces):
    for name, image, faces in real_face_images(real_faces):
        out, boxes = face_anonymizer.anonymize_image(image)
        found_again = face_anonymizer.detect(out)
        for face in faces:
            assert found_at(boxes, face), f"{name}: face {face} not detected"
            kept = detail_left(image, out, face)
            assert kept <= MAX_DETAIL_KEPT, f"{name}: {kept:.0%} of the detail of {face} kept"
            assert not found_at(found_again, face), f"{name}: face {face} found after blurring"


def test_hidden_faces_are_not_found_by_two_other_detectors(face_anonymizer, face_models,
                                                          real_faces):
    # CenterFace and BlazeFace full-range, each given a crop in which the face is ~40 px.
    redetector = Redetector(face_models)
    before, after = [], []
    for name, image, faces in real_face_images(real_faces):
        out, _ = face_anonymizer.anonymize_image(image)
        before += [max(redetector.scores(image, face)) for face in faces]
        after += [(name, face, redetector.scores(out, face)) for face in faces]
    assert min(before) >= 0.3  # both would find them: the check below can fail
    assert all(max(scores) < 0.3 for _, _, scores in after), after


def test_stripes_break_up_the_gray_blob_without_feeding_the_haar_cascade(anon_settings, face_models):
    # Benchmark stills (faces of 20, 32 and 96 px) where BlazeFace full-range, given a crop
    # in which the face is ~40 px, still scores a face hidden by the gray blur alone at
    # >= 0.3 (a gray blob inside the outline of a head). The default's stripes break the blob
    # up; the Haar cascade, which fires on texture (a grain of blocks: 4 of these 30 faces),
    # finds at most one.
    stills = [face_stills()[i] for i in (14, 28, 45)]
    redetector = Redetector(face_models)
    best, haar = {}, {}
    for stripes in (0.0, anon_settings.stripes):
        with FaceAnonymizer(dataclasses.replace(anon_settings, stripes=stripes)) as anonymizer:
            outs = [anonymizer.anonymize_image(frame)[0] for frame, _ in stills]
        hidden_faces = [(out, box) for out, (_, boxes) in zip(outs, stills) for box in boxes]
        best[stripes] = max(max(redetector.scores(out, box)) for out, box in hidden_faces)
        haar[stripes] = sum(redetector.haar_finds(out, box) for out, box in hidden_faces)
        assert all(detail_left(frame, out, box) <= MAX_DETAIL_KEPT
                   for out, (frame, boxes) in zip(outs, stills) for box in boxes)
    assert anon_settings.stripes > 0
    assert best[0.0] >= 0.4 and best[anon_settings.stripes] < 0.3, best
    assert haar[anon_settings.stripes] <= 1, haar


def test_a_box_carried_out_of_the_frame_hides_nothing(anon_settings):
    """A box carried on at its speed can leave the frame: past its top or left edge its
    region ends at a negative row or column, which, sliced as is, counts from the other edge
    and hid 85% of a face-free 768x576 frame. A box partly in view is hidden where it is."""
    frame = np.random.default_rng(0).integers(0, 256, (576, 768, 3), np.uint8)
    for box in (Box(-49, -84, 15, 15), Box(-60, 200, 20, 20), Box(300, -70, 20, 20),
                Box(800, 200, 20, 20), Box(300, 600, 20, 20)):
        assert np.array_equal(hide_faces(frame, [box], anon_settings), frame), box
    changed = np.any(hide_faces(frame, [Box(-10, -10, 30, 30)], anon_settings) != frame, axis=2)
    rows, columns = np.nonzero(changed)
    assert rows.min() == 0 and columns.min() == 0 and rows.max() < 30 and columns.max() < 30


def test_the_stripes_move_with_the_face_and_carry_nothing_of_it(anon_settings):
    frame = np.full((200, 300, 3), 128, np.uint8)
    first, second = Box(20, 30, 50, 50), Box(180, 110, 50, 50)
    out = hide_faces(frame, [first, second], anon_settings)
    patches = [out[y0:y1, x0:x1] for x0, y0, x1, y1 in
               (region_of(box, anon_settings, frame.shape) for box in (first, second))]
    # The same pattern wherever the face is, over the blur of a flat patch: nothing else.
    assert np.array_equal(patches[0], patches[1])
    values = np.unique(patches[0])
    assert set(values) == {128 - anon_settings.stripes, 128 + anon_settings.stripes}
    plain = hide_faces(frame, [first], dataclasses.replace(anon_settings, stripes=0.0))
    assert np.unique(plain[30:80, 20:70]).tolist() == [128]
    # In colour, over BGRA: the same stripes on the colour channels, the alpha left alone.
    bgra = np.full((200, 300, 4), 128, np.uint8)
    coloured = hide_faces(bgra, [first], dataclasses.replace(anon_settings, keep_colour=True))
    assert (coloured[..., 3] == 128).all()
    gray = hide_faces(frame, [first], anon_settings)
    assert all(np.array_equal(coloured[..., c], gray[..., c]) for c in range(3))


def test_detail_left_counts_the_face_s_own_detail_only(real_faces):
    image, face = bgr(real_faces[0].image), real_faces[0].box
    x, y, w, h = face
    def changed(edit):
        out = image.copy()
        edit(out[y:y + h, x:x + w])
        return detail_left(image, out, face)
    blurred = lambda patch: patch.__setitem__(..., cv2.GaussianBlur(patch, (0, 0), w / 6))
    noise = np.random.default_rng(0).normal(0, 25, (h, w, 1))
    noisy = lambda patch: patch.__setitem__(..., np.clip(patch + noise, 0, 255))
    assert detail_left(image, image, face) == pytest.approx(1.0)
    assert changed(blurred) < 0.1
    assert changed(noisy) > 0.8  # noise over a face leaves the face
    assert changed(lambda p: (blurred(p), noisy(p))) < 0.1  # noise over a blur adds none of it
    assert 0.3 < changed(lambda p: blurred(p[:, : w // 2])) < 0.7  # half the face left
    assert changed(lambda p: p.__setitem__(..., (p * 0.5 + 64).astype(np.uint8))) == \
        pytest.approx(0.5, abs=0.05)  # half the contrast: half the detail


@pytest.mark.parametrize("blur", ["pixelate", "fill"])
def test_other_blur_modes_also_hide_faces(anon_settings, real_faces, blur):
    image, face = bgr(real_faces[0].image), real_faces[0].box
    with FaceAnonymizer(dataclasses.replace(anon_settings, blur=blur)) as anonymizer:
        out, _ = anonymizer.anonymize_image(image)
        assert detail_left(image, out, face) <= MAX_DETAIL_KEPT
        assert not found_at(anonymizer.detect(out), face)


def test_regions_far_from_faces_are_unchanged(face_anonymizer, real_faces):
    image = bgr(real_faces[0].image)
    out, boxes = face_anonymizer.anonymize_image(image)
    changed = np.any(out != image, axis=2)
    hidden = np.zeros_like(changed)
    for box in boxes:
        x0, y0, x1, y1 = region_of(box, face_anonymizer.settings, image.shape)
        hidden[y0:y1, x0:x1] = True
    assert not changed[~hidden].any()
    assert changed.mean() < 0.15
    assert np.array_equal(out[0:250, 380:512], image[0:250, 380:512])  # the rocket


def test_image_without_face_comes_back_bit_identical(face_anonymizer):
    # (Not the rocket photo: an image's 48 px level finds two 9 px boxes in its sky, at 0.45-0.49.)
    image = bgr(data.chelsea())
    out, boxes = face_anonymizer.anonymize_image(image)
    assert boxes == []
    assert out is not image and np.array_equal(out, image)


@pytest.mark.parametrize("size", [14, 20, 32, 48, 96, 200])
def test_small_and_turned_faces_in_720p_frames_are_found_and_blurred(face_anonymizer, real_faces,
                                                                     size):
    rng = np.random.default_rng(size)
    for angle in (-30, 0, 30):
        frame = cv2.resize(bgr(data.rocket()), (1280, 720))
        # Frontal faces (astronaut, Hopper) from 14 px, the three-quarter view from 20 px.
        picks = [0, 1] + ([2] if size >= 20 else [])
        faces = []
        for i in picks:
            center = (rng.uniform(size * 1.2 + 420 * i, 400 + 420 * i),
                      rng.uniform(size * 1.2, 720 - size * 1.2))
            faces.append(paste_face(frame, real_faces[i], size, angle, center))
        out, boxes = face_anonymizer.anonymize_image(frame)
        for face in faces:
            assert found_at(boxes, face), f"{size}px face at {angle} degrees not found"
            assert detail_left(frame, out, face) <= MAX_DETAIL_KEPT


def test_a_14px_face_moving_in_a_720p_video_is_hidden_on_every_frame(face_anonymizer, real_faces):
    clip, faces = [], []
    for t in range(10):
        frame = cv2.resize(bgr(data.rocket()), (1280, 720))
        faces.append(paste_face(frame, real_faces[1], 14, 3 * t, (500 + 5 * t, 300 + 2 * t)))
        clip.append(frame)
    out, _ = face_anonymizer.anonymize_frames(clip)
    for t, (frame, anonymized, face) in enumerate(zip(clip, out, faces)):
        assert detail_left(frame, anonymized, face) <= MAX_DETAIL_KEPT, f"frame {t}"


@pytest.mark.parametrize("person", [2, 20])
def test_a_14px_face_of_a_person_no_other_test_uses_is_hidden_in_a_720p_video(face_anonymizer,
                                                                             person):
    # Two of the benchmark's held-out people (LFW faces that no other figure, test or
    # calibration uses), 14 px wide and drifting in a 720p shot: the 96 px level, the finest
    # a video had, found neither on any frame.
    source = heldout_sources()[person]
    scene = cv2.resize(bgr(data.coffee()), (1280, 720), interpolation=cv2.INTER_AREA)
    clip, faces = [], []
    for t in range(5):
        frame = scene.copy()
        faces.append(paste_face(frame, source, 14, 0, (400 + 2 * t, 300)))
        clip.append(frame)
    out, _ = face_anonymizer.anonymize_frames(clip)
    assert all(hidden(f, o, face) for f, o, face in zip(clip, out, faces))
    coarser = dataclasses.replace(face_anonymizer.settings, window_sizes=(512, 256, 96))
    with FaceAnonymizer(coarser) as anonymizer:
        out, _ = anonymizer.anonymize_frames(clip)
    assert not any(hidden(f, o, face) for f, o, face in zip(clip, out, faces))


@pytest.mark.parametrize("person, centres", [
    (10, [(640, 180), (896, 180), (1152, 180), (128, 540)]),
    (54, [(128, 180), (1152, 180), (128, 540)])])
def test_a_14px_face_of_a_person_no_other_test_uses_is_hidden_in_a_720p_image(face_anonymizer,
                                                                             person, centres):
    # A single image has no next keyframe: two held-out people, 14 px wide and turned, where
    # the image's levels down to 64 px left them without a second opinion (the 48 px level
    # finds them at 10 of 10 places).
    source = heldout_sources()[person]
    scene = cv2.resize(bgr(data.coffee()), (1280, 720), interpolation=cv2.INTER_AREA)
    images, faces = [], []
    for centre in centres:
        images.append(scene.copy())
        faces.append(paste_face(images[-1], source, 14, 20, centre))
    outs = [face_anonymizer.anonymize_image(image)[0] for image in images]
    assert all(hidden(i, o, face) for i, o, face in zip(images, outs, faces))
    coarser = dataclasses.replace(face_anonymizer.settings, image_window_sizes=(512, 256, 96, 64),
                                  second_opinion=0.0)
    with FaceAnonymizer(coarser) as anonymizer:
        outs = [anonymizer.anonymize_image(image)[0] for image in images]
    assert not any(hidden(i, o, face) for i, o, face in zip(images, outs, faces))


@pytest.mark.parametrize("person, centre", [(10, (640, 180)), (54, (128, 180))])
def test_a_site_that_needs_faces_from_12px_hides_a_14px_face_the_64px_level_misses(
        face_anonymizer, person, centre):
    # The held-out people of the test above, in a shot where they drift: BlazeFace at the
    # default video levels (down to 64 px) finds neither on any frame (CenterFace's second
    # opinion confirms one of them on a keyframe); `anonymize-smallest-face = 12` adds the
    # 48 px level.
    source = heldout_sources()[person]
    scene = cv2.resize(bgr(data.coffee()), (1280, 720), interpolation=cv2.INTER_AREA)
    clip, faces = [], []
    for t in range(5):
        clip.append(scene.copy())
        faces.append(paste_face(clip[-1], source, 14, 20, (centre[0] + 2 * t, centre[1])))
    alone = dataclasses.replace(face_anonymizer.settings, second_opinion=0.0)
    with FaceAnonymizer(alone) as anonymizer:
        out, _ = anonymizer.anonymize_frames(clip)
    assert not any(hidden(f, o, face) for f, o, face in zip(clip, out, faces))
    finer = AnonymizerSettings.for_mode("faces", smallest_face=12,
                                        model_dir=face_anonymizer.settings.model_dir)
    assert finer.window_sizes == (512, 256, 64, 48)
    with FaceAnonymizer(finer) as anonymizer:
        out, _ = anonymizer.anonymize_frames(clip)
    assert all(hidden(f, o, face) for f, o, face in zip(clip, out, faces))


@pytest.mark.parametrize("person, size", [(8, 24), (22, 28)])
def test_centerface_s_second_opinion_adds_a_face_blazeface_scores_under_a_new_face_s_threshold(
        face_anonymizer, person, size):
    # A held-out person in SD video: the 64 px level scores the face 0.58 / 0.64, and its box,
    # over 0.1% of a 640x360 frame, needs 0.7 as a new face; no other level finds it.
    # CenterFace, shown a crop around the box, scores it over 0.6.
    scene = cv2.resize(bgr(data.coffee()), (640, 360), interpolation=cv2.INTER_AREA)
    face = paste_face(scene, heldout_sources()[person], size, 0, (320, 180))
    clip = [scene.copy() for _ in range(5)]
    out, _ = face_anonymizer.anonymize_frames(clip)
    assert all(hidden(f, o, face) for f, o in zip(clip, out))
    alone = dataclasses.replace(face_anonymizer.settings, second_opinion=0.0)
    with FaceAnonymizer(alone) as anonymizer:
        out, _ = anonymizer.anonymize_frames(clip)
        assert anonymizer.detector.centerface is None
    assert not any(hidden(f, o, face) for f, o in zip(clip, out))


def test_centerface_confirms_no_doubtful_box_of_a_texture(face_anonymizer):
    # Gravel, the texture whose boxes change most of a face-free 720p frame: the 64 px level
    # finds boxes in the doubtful band on it; the second opinion adds none of them.
    detector = face_anonymizer.detector
    rgb = cv2.resize(data.gravel(), (1280, 720), interpolation=cv2.INTER_AREA)
    rgb = np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB))
    found = detector._level(rgb, 64, None)
    doubtful = [b for b in found if not detector._fine_face(b, rgb.shape[0] * rgb.shape[1], ())
                and b.score >= 0.3]
    assert len(doubtful) >= 5
    assert detector.centerface.confirms(rgb, [(b.x, b.y, b.w, b.h) for b in doubtful], 0.3) \
        == [False] * len(doubtful)
    assert detector._fine_faces(rgb, found, (), None, 64) == [
        b for b in found if detector._fine_face(b, rgb.shape[0] * rgb.shape[1], ())]


def test_a_still_camera_s_doubtful_boxes_are_shown_to_centerface_once(anon_settings):
    # The 64 px level keeps its boxes of bands that did not change, and their verdicts too:
    # keyframes 4 and 8 of a still shot ask nothing (the last frame, scanned by every level
    # outside the stream's memory, asks again).
    gravel = cv2.resize(data.gravel(), (1280, 720), interpolation=cv2.INTER_AREA)
    frames = [cv2.cvtColor(gravel, cv2.COLOR_GRAY2BGR)] * 10
    with FaceAnonymizer(anon_settings) as anonymizer:
        centerface, asked = anonymizer.detector.centerface, []
        confirms = centerface.confirms
        centerface.confirms = lambda rgb, boxes, threshold: (asked.append(len(boxes))
                                                              or confirms(rgb, boxes, threshold))
        out, _ = anonymizer.anonymize_frames(frames)
    assert asked[0] >= 5 and asked[1:3] == [0, 0] and asked[3] == asked[0]
    # And it confirmed none of them: the output is BlazeFace's alone.
    with FaceAnonymizer(dataclasses.replace(anon_settings, second_opinion=0.0)) as anonymizer:
        alone, _ = anonymizer.anonymize_frames(frames)
    assert all(np.array_equal(a, b) for a, b in zip(out, alone))


def test_the_smallest_face_is_one_the_levels_are_measured_for():
    with pytest.raises(ValueError, match="smallest face must be one of 20, 14, 12 px, got 10"):
        AnonymizerSettings.for_mode("faces", smallest_face=10)
    assert AnonymizerSettings.for_mode("faces", smallest_face=20).window_sizes == (512, 256, 96)
    assert AnonymizerSettings.for_mode("faces").window_sizes == AnonymizerSettings().window_sizes
    # A caller's own levels win over the smallest face's.
    own = AnonymizerSettings.for_mode("faces", 12, window_sizes=(512, 96), window_every=(2, 4))
    assert own.window_sizes == (512, 96)


def test_tiny_training_frames_are_anonymized(face_anonymizer, real_faces):
    clip = []
    for t in range(6):
        frame = np.full((64, 64, 3), 90, np.uint8)
        face = paste_face(frame, real_faces[1], 22, 5 * t, (30 + t, 32))
        clip.append(frame)
    out, stats = face_anonymizer.anonymize_frames(clip)
    assert stats.frames == 6 and stats.frames_with_faces == 6
    for original, anonymized in zip(clip, out):
        assert detail_left(original, anonymized, face) <= MAX_DETAIL_KEPT


class DropOnFrame:
    """Wraps a detector and finds nothing on one frame (recognised by its pixels, however
    often it is scanned), like a missed detection."""

    def __init__(self, inner, clip, frame: int):
        self.inner, self.missed = inner, _to_rgb(clip[frame])
        self.model_sha256 = inner.model_sha256

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        if np.array_equal(rgb, self.missed):
            return []
        return self.inner.detect(rgb, window_sizes)


def video_of_one_face(real_faces, frames: int = 7):
    clip = []
    for t in range(frames):
        frame = cv2.resize(bgr(data.rocket()), (640, 360))
        face = paste_face(frame, real_faces[0], 80, 0, (300 + 3 * t, 180))
        clip.append(frame)
    return clip, face


@pytest.mark.parametrize("missed", [0, 3, 6])
def test_temporal_hold_blurs_a_frame_the_detector_missed(face_anonymizer, real_faces, missed):
    clip, face = video_of_one_face(real_faces)
    detector = face_anonymizer.detector
    held = FaceAnonymizer(face_anonymizer.settings, detector=DropOnFrame(detector, clip, missed))
    out, stats = held.anonymize_frames(clip)
    # The face on every other frame (and on keyframes a 12 px box at the rocket's top, 0.48).
    assert stats.faces_blurred >= len(clip) - 1
    assert detail_left(clip[missed], out[missed], face) <= MAX_DETAIL_KEPT
    # Without the hold the same miss leaves the face visible: the check above can fail.
    no_hold = dataclasses.replace(face_anonymizer.settings, hold_frames=0, window_every=(1, 1, 1),
                                  full_range_every=1)
    bare = FaceAnonymizer(no_hold, detector=DropOnFrame(detector, clip, missed))
    unheld, _ = bare.anonymize_frames(clip)
    assert detail_left(clip[missed], unheld[missed], face) > 0.8
    # ... while the face is found and hidden on every other frame.
    faces = [paste_face(np.zeros_like(clip[0]), real_faces[0], 80, 0, (300 + 3 * t, 180))
             for t in range(len(clip))]
    assert all(detail_left(clip[t], unheld[t], faces[t]) <= MAX_DETAIL_KEPT
               for t in range(len(clip)) if t != missed)


def test_anonymize_frames_returns_new_arrays_and_leaves_input_alone(face_anonymizer,
                                                                   real_faces):
    clip, face = video_of_one_face(real_faces, frames=3)
    before = [frame.copy() for frame in clip]
    out, stats = face_anonymizer.anonymize_frames(clip)
    assert len(out) == 3 and stats.frames == 3 and stats.frames_with_faces == 3
    assert all(np.array_equal(a, b) for a, b in zip(clip, before))
    assert all(o is not f and not np.shares_memory(o, f) for o, f in zip(out, clip))


class BrokenDetector:
    model_sha256 = {}

    def __init__(self, fail_on: int):
        self.fail_on, self.calls = fail_on, 0

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        self.calls += 1
        if self.calls > self.fail_on:
            raise RuntimeError("detector crashed")
        return []


def test_a_detector_error_propagates_out_of_anonymize_frames(anon_settings, real_faces):
    clip, _ = video_of_one_face(real_faces, frames=5)
    anonymizer = FaceAnonymizer(anon_settings, detector=BrokenDetector(fail_on=2))
    with pytest.raises(RuntimeError, match="detector crashed"):
        anonymizer.anonymize_frames(clip)


def test_a_site_anonymizes_without_mediapipes_native_library(face_models):
    # Both BlazeFace models run in LiteRT: a site needs neither MediaPipe's library nor the
    # GL libraries it links (libEGL, libGLESv2), which headless GPU images often lack.
    script = (
        "import sys, numpy as np\n"
        "from privacy.anonymize import AnonymizerSettings, FaceAnonymizer\n"
        "from simulations.bench_anonymize import face_sources, paste_face\n"
        "frame = np.full((720, 1280, 3), 90, np.uint8)\n"
        "paste_face(frame, face_sources()[0], 300, 0, (640, 360))\n"
        f"anonymizer = FaceAnonymizer(AnonymizerSettings(model_dir={str(face_models['full_range'].parent)!r}))\n"
        "_, boxes = anonymizer.anonymize_image(frame)\n"
        "print(len(boxes), 'mediapipe' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found, imported = done.stdout.split()[-2:]
    assert int(found) >= 1 and imported == "False"


def test_missing_model_fails_construction(tmp_path, face_models):
    shutil.copy(face_models["full_range"], tmp_path / face_models["full_range"].name)
    with pytest.raises(FaceModelError, match="face_detection_short_range.tflite.*fedvid setup"):
        FaceAnonymizer(AnonymizerSettings(model_dir=tmp_path))


def test_the_second_opinion_fails_closed_without_the_centerface_model(tmp_path, face_models):
    for key in ("short_range", "full_range", "short_range_int8"):
        shutil.copy(face_models[key], tmp_path / face_models[key].name)
    shutil.copy(face_models["short_range_int8"].with_suffix(".json"), tmp_path)
    with pytest.raises(FaceModelError, match="centerface.onnx.*fedvid setup"):
        FaceAnonymizer(AnonymizerSettings(model_dir=tmp_path))
    # Without a second opinion the BlazeFace files are all it needs.
    with FaceAnonymizer(AnonymizerSettings(model_dir=tmp_path, second_opinion=0.0)) as anonymizer:
        assert anonymizer.detector.centerface is None


def test_own_model_that_does_not_load_fails_construction(tmp_path, face_models):
    own = tmp_path / "mine.tflite"
    own.write_bytes(face_models["short_range"].read_bytes()[:50_000])
    with pytest.raises(FaceModelError, match="mine.tflite.*does not load"):
        FaceAnonymizer(AnonymizerSettings(model_dir=face_models["short_range"].parent,
                                          short_range_model=own))


def test_settings_key_changes_with_settings_and_models(face_anonymizer, anon_settings,
                                                       face_models, tmp_path):
    key = face_anonymizer.settings_key()
    assert len(key) == 64 and key == FaceAnonymizer(anon_settings).settings_key()
    other_settings = FaceAnonymizer(dataclasses.replace(anon_settings, box_scale=1.7))
    assert other_settings.settings_key() != key
    # The user's own short-range file: the same network with other bytes.
    own = tmp_path / "own.tflite"
    own.write_bytes(face_models["short_range"].read_bytes() + b"\0" * 16)
    other_model = FaceAnonymizer(dataclasses.replace(anon_settings, short_range_model=own))
    assert other_model.settings_key() != key
    # MediaPipe's float network instead of the int8 one derived from it.
    as_shipped = FaceAnonymizer(dataclasses.replace(anon_settings, int8=False))
    assert as_shipped.settings_key() not in (key, other_model.settings_key())
    assert as_shipped.detector.short_range.path == face_models["short_range"]
    assert face_anonymizer.detector.small_faces.path == face_models["short_range_int8"]
    assert as_shipped.detector.small_faces is as_shipped.detector.short_range
    # Threads change speed, not output: not part of the key.
    assert FaceAnonymizer(dataclasses.replace(anon_settings, threads=1)).settings_key() == key


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="blur"):
        AnonymizerSettings(blur="smudge")
    with pytest.raises(ValueError, match="hold_frames"):
        AnonymizerSettings(hold_frames=1, window_every=(1, 2, 4))
    with pytest.raises(ValueError, match="window_every"):
        AnonymizerSettings(window_sizes=(512, 96), window_every=(2, 4, 4))
    with pytest.raises(ValueError, match="threads"):
        AnonymizerSettings(threads=-1)
    with pytest.raises(ValueError, match="full_range_every"):
        AnonymizerSettings(full_range_every=0)
    with pytest.raises(ValueError, match="hold_frames"):
        # the full-range pass skips every other frame
        AnonymizerSettings(hold_frames=0, window_every=(1, 1, 1))
    with pytest.raises(ValueError, match="stripes"):
        AnonymizerSettings(stripes=-1.0)
    with pytest.raises(ValueError, match="second_opinion"):
        AnonymizerSettings(second_opinion=1.0)
