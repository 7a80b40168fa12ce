"""What each anonymize mode hides and what it leaves alone: the confidence and size policy on
face-free images, hiding in a tight gray box (or an ellipse), tracking between keyframes, the faces+heads mode on
generated walkers, the node-config key, and the CenterFace model used by the benchmark."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from skimage import data

from client.node_config import NodeConfig
from privacy import anonymize
from privacy.anonymize import (ANONYMIZE_MODES, AnonymizerSettings, Box, FaceAnonymizer,
                               region_of)
from privacy.anonymize_centerface import CenterFaceDetector
from privacy.anonymize_heads import HeadFinder, HeadSettings, median_background
from simulations.bench_anonymize import hidden, walkers_video

FINEST = min(AnonymizerSettings().window_sizes)  # the pyramid level that finds the smallest faces


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


@pytest.mark.parametrize("name", ["chelsea", "brick", "coffee"])
def test_face_free_photos_and_textures_are_left_almost_untouched(face_anonymizer, name):
    # A cat, a brick wall and a coffee cup at 1280x720: each gave boxes scored 0.5-0.6 by the
    # pyramid, which the old single 0.5 threshold blurred (up to 25% of a frame).
    image = getattr(data, name)()
    image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
    frame = cv2.resize(bgr(image), (1280, 720), interpolation=cv2.INTER_AREA)
    out, _ = face_anonymizer.anonymize_image(frame)
    assert np.any(out != frame, axis=2).mean() <= 0.01


def test_small_low_scored_boxes_pass_and_large_ones_need_more(anon_settings):
    from privacy.anonymize import is_face

    area = 1280 * 720
    assert is_face(Box(0, 0, 20, 20, 0.35), area, anon_settings)       # 0.04% of the frame
    assert not is_face(Box(0, 0, 200, 200, 0.6), area, anon_settings)  # 4%: needs 0.7
    assert is_face(Box(0, 0, 200, 200, 0.75), area, anon_settings)
    assert not is_face(Box(0, 0, 6, 6, 0.99), area, anon_settings)     # under min_face_px


def test_the_face_is_hidden_in_gray_within_its_scaled_box_and_nothing_else_changes(
        face_anonymizer, real_faces):
    image, face = bgr(real_faces[0].image), real_faces[0].box
    out, boxes = face_anonymizer.anonymize_image(image)
    assert hidden(image, out, face)
    region = region_of(boxes[0], face_anonymizer.settings, image.shape)
    x0, y0, x1, y1 = region
    # A tight rectangle, in gray: the blurred face keeps no skin tone.
    patch = out[y0:y1, x0:x1].astype(int)
    assert np.array_equal(patch[..., 0], patch[..., 1]) and np.array_equal(patch[..., 1], patch[..., 2])
    outside = np.ones(image.shape[:2], bool)
    for box in boxes:
        rx0, ry0, rx1, ry1 = region_of(box, face_anonymizer.settings, image.shape)
        outside[ry0:ry1, rx0:rx1] = False
    assert np.array_equal(out[outside], image[outside])
    # Its area: the face box scaled by box_scale, not a block around the head.
    assert (x1 - x0) * (y1 - y0) <= (face_anonymizer.settings.box_scale * 1.1) ** 2 * boxes[0].area


def test_an_ellipse_leaves_the_corners_of_its_box(anon_settings, real_faces):
    image, face = bgr(real_faces[0].image), real_faces[0].box
    settings = dataclasses.replace(anon_settings, ellipse=True, box_scale=1.6, keep_colour=True)
    with FaceAnonymizer(settings) as anonymizer:
        out, boxes = anonymizer.anonymize_image(image)
    assert hidden(image, out, face)
    x0, y0, x1, y1 = region_of(boxes[0], settings, image.shape)
    corners = [(y0, x0), (y0, x1 - 1), (y1 - 1, x0), (y1 - 1, x1 - 1)]
    assert all(np.array_equal(out[y, x], image[y, x]) for y, x in corners)
    changed = np.any(out != image, axis=2)[y0:y1, x0:x1].mean()
    assert 0.7 < changed < 0.85  # pi/4 of the box, not all of it
    assert not np.array_equal(out[..., 0], out[..., 2])  # keep_colour: not turned gray


def still_video(frames: int, shape=(240, 320), seed: int = 0) -> list[np.ndarray]:
    """Frames of a still camera over a noise picture (every change shows), no cut."""
    picture = np.random.default_rng(seed).integers(0, 255, (*shape, 3), np.uint8)
    return [picture.copy() for _ in range(frames)]


class KeyframesOnly:
    """A detector that finds one face moving right, but only on frames 0 and 8."""

    model_sha256 = {}

    def __init__(self):
        self.calls = 0

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        index, self.calls = self.calls, self.calls + 1
        return {0: [Box(100, 100, 40, 40)], 8: [Box(170, 100, 40, 40)]}.get(index, [])


def test_a_face_found_on_keyframes_is_tracked_not_smeared(anon_settings):
    frames = still_video(9)
    # Keyframes 8 apart: a hold of 4 reaches both from frame 4.
    anonymizer = FaceAnonymizer(dataclasses.replace(anon_settings, hold_frames=4),
                                detector=KeyframesOnly())
    out, _ = anonymizer.anonymize_frames(frames)
    changed = np.any(out[4] != frames[4], axis=2)
    # Halfway, the box is interpolated to x = 135: its centre is hidden ...
    assert changed[115:125, 150:160].all()
    # ... and the old position, which a held box would also have covered, is not.
    assert not changed[115:125, 92:100].any()
    # Every frame in between has the face covered somewhere along its path.
    assert all(np.any(o != f) for o, f in zip(out, frames))


class FastSmallFace:
    """A detector that finds a 12 px face moving right 16 px a frame (a person crossing a
    1280 px frame in under 3 s), on every 4th frame only, as the finest pyramid level does."""

    model_sha256 = {}
    step, every = 16, 4

    def __init__(self):
        self.calls = 0

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        index, self.calls = self.calls, self.calls + 1
        return [self.box(index)] if index % self.every == 0 else []

    @classmethod
    def box(cls, index: int) -> Box:
        return Box(20 + cls.step * index, 100, 12, 12)


def assert_fast_face_hidden(anon_settings, detector: FastSmallFace, frames: int, checked) -> None:
    """Anonymize `frames` noise frames with `detector` (hold 4); on each `checked` frame at
    least 90% of the face where `detector.box` says it is must be changed."""
    video = still_video(frames)
    anonymizer = FaceAnonymizer(dataclasses.replace(anon_settings, hold_frames=4), detector=detector)
    out, _ = anonymizer.anonymize_frames(video)
    for index in checked:
        face = detector.box(index)
        changed = np.any(out[index] != video[index], axis=2)[face.y:face.y + face.h, face.x:face.x + face.w]
        assert changed.mean() > 0.9, f"frame {index}: {changed.mean():.0%} of the face hidden"


def test_a_small_fast_face_is_tracked_between_keyframes(anon_settings):
    """Between keyframes a small fast face moves several of its widths: it must still be
    matched to itself and its box carried along, not held where it was last seen."""
    assert_fast_face_hidden(anon_settings, FastSmallFace(), 13, range(13))


class LostAfterFrame8(FastSmallFace):
    """The same face, no longer found after frame 8 (it turns away, or a cut follows)."""

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        found = super().detect(rgb, window_sizes, memory)
        return found if self.calls <= 9 else []


def test_a_fast_face_no_longer_found_is_carried_on_at_its_speed(anon_settings):
    # 16, 32 and 48 px past where it was last found
    assert_fast_face_hidden(anon_settings, LostAfterFrame8(), 12, (9, 10, 11))


class EntersFromTheLeft(FastSmallFace):
    """The same face coming in from the left edge (x = -12 on frame 0), found from frame 4."""

    @classmethod
    def box(cls, index: int) -> Box:
        return Box(-12 + cls.step * index, 100, 12, 12)

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        found = super().detect(rgb, window_sizes, memory)
        return found if self.calls > 1 else []


def test_a_fast_face_coming_in_from_the_edge_is_covered_before_it_is_found(anon_settings):
    # wholly in view, 48, 32 and 16 px before where it is first found
    assert_fast_face_hidden(anon_settings, EntersFromTheLeft(), 9, (1, 2, 3))


class FineLevelOnly:
    """A detector that sees a face only where the finest pyramid level (64 px windows) runs,
    as with faces of 14-24 px in 720p frames; each frame's index is in its first pixel, and
    `faces` gives the face boxes by frame index."""

    model_sha256 = {}

    def __init__(self, faces: dict[int, Box]):
        self.faces, self.calls = faces, []

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        index = int(rgb[0, 0, 0])
        self.calls.append(index)
        face = self.faces.get(index)
        return [face] if face is not None and FINEST in window_sizes else []


def shot(seed: int, frames: range) -> list[np.ndarray]:
    """Frames of one still shot (a noise picture), each with its index in its first pixel."""
    video = still_video(len(frames), seed=seed)
    for index, frame in zip(frames, video):
        frame[0, 0] = index
    return video


def face_hidden(original: np.ndarray, output: np.ndarray, face: Box) -> float:
    return np.any(output != original, axis=2)[face.y:face.y + face.h, face.x:face.x + face.w].mean()


def test_the_last_frame_before_a_cut_is_scanned_by_every_level(anon_settings):
    # A face comes into view on frame 9, and the picture changes at once on frame 10. Frame 9
    # is no keyframe of the finest level (every 4th frame): only a scan at the cut finds it.
    video = shot(0, range(10)) + shot(1, range(10, 16))
    detector = FineLevelOnly({9: Box(150, 100, 16, 16)})
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    assert face_hidden(video[9], out[9], Box(150, 100, 16, 16)) == 1.0
    assert detector.calls.count(9) == 2 and detector.calls.count(10) == 2  # both sides of the cut
    # Without a cut, every frame is scanned once (the last one twice, by the levels it missed).
    detector = FineLevelOnly({9: Box(150, 100, 16, 16)})
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(shot(0, range(16)))
    assert detector.calls == list(range(16)) + [15]


def test_faces_that_vanish_between_keyframes_mark_a_cut_that_keeps_the_background(anon_settings):
    # The same background before and after (two cameras on one scene): a face tracked on
    # keyframes 0, 4 and 8 is gone on 12, where the other face stands elsewhere; that one came
    # in on frame 11, the last frame before the cut, and is seen there only.
    video = shot(0, range(16))
    tracked = {index: Box(130 + 2 * index, 110, 16, 16) for index in (0, 4, 8)}  # mid-frame
    newcomer = Box(20, 30, 16, 16)
    for index in range(9, 12):  # the tracked face moving on
        video[index][110:126, 130 + 2 * index:146 + 2 * index] = 255
    video[12][150:166, 250:266] = 255  # the cut: both faces elsewhere
    faces = {**tracked, 11: newcomer, 12: Box(250, 150, 16, 16)}
    detector = FineLevelOnly(faces)
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    assert face_hidden(video[11], out[11], newcomer) == 1.0
    assert detector.calls.count(11) == 2
    # A face found at the detector's threshold comes and goes by itself: no scan for it.
    faint = {index: dataclasses.replace(box, score=0.4) for index, box in tracked.items()}
    detector = FineLevelOnly({**faint, 11: newcomer, 12: Box(250, 150, 16, 16)})
    FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    assert detector.calls == list(range(16)) + [15]


class FineLevelFaces(FineLevelOnly):
    """FineLevelOnly with any number of faces a frame: `faces` gives a list by frame index."""

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        index = int(rgb[0, 0, 0])
        self.calls.append(index)
        return list(self.faces.get(index, [])) if FINEST in window_sizes else []


class ScriptedFineLevel(anonymize.PyramidFaceDetector):
    """The real detector's rules over scripted boxes: the whole-frame passes find nothing,
    each level finds `boxes`."""

    def __init__(self, settings, boxes):
        super().__init__(settings)
        self.boxes = boxes

    def _whole_frame(self, model, rgb, memory):
        return []

    def _level(self, rgb, size, memory):
        return list(self.boxes)


def test_a_face_once_found_needs_a_step_less_where_it_was(anon_settings):
    # On a 1280x720 frame a box under 0.1% of it (30 px) is small. A fine level's box needs
    # 0.45 if small, 0.7 if larger; over a face found on a recent keyframe, 0.3 and 0.45: a
    # face whose score wavers around the threshold, or whose box grows as a camera zooms in,
    # is kept, and a new box anywhere else still needs the full score.
    frame, face = np.zeros((720, 1280, 3), np.uint8), Box(500, 300, 28, 28, 0.6)
    cases = [(Box(502, 302, 26, 26, 0.40), False, True),   # small, between 0.3 and 0.45
             (Box(498, 296, 36, 36, 0.55), False, True),   # larger, between 0.45 and 0.7
             (Box(498, 296, 36, 36, 0.40), False, False),  # larger, under 0.45
             (Box(502, 302, 26, 26, 0.25), False, False),  # under 0.3
             (Box(502, 302, 26, 26, 0.50), True, True)]    # a small box at 0.45 needs nothing
    for box, alone, near_face in cases:
        detector = ScriptedFineLevel(anon_settings, [box])
        assert bool(detector.detect(frame, [FINEST])) is alone, box
        assert bool(detector.detect(frame, [FINEST], confirmed=[face])) is near_face, box
        elsewhere = dataclasses.replace(face, x=900)
        assert bool(detector.detect(frame, [FINEST], confirmed=[elsewhere])) is alone, box
    # Only the fine levels: a coarse level's larger box still needs 0.7.
    coarse = ScriptedFineLevel(anon_settings, [Box(498, 296, 36, 36, 0.55)])
    assert coarse.detect(frame, [256], confirmed=[face]) == []


class RecordsConfirmed(FineLevelFaces):
    """FineLevelFaces that records what the stream gives as confirmed when a frame is pushed
    (its first call; the scans at a cut give none)."""

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        self.confirmed.setdefault(int(rgb[0, 0, 0]), list(confirmed))
        return super().detect(rgb, window_sizes, memory, full_range, confirmed)


def test_a_video_confirms_the_faces_of_its_last_two_keyframes_in_the_shot(anon_settings):
    faces = {index: [Box(60 + index, 100, 24, 24, 0.9)] for index in range(16)}
    video = shot(0, range(10)) + shot(1, range(10, 16))  # a cut at frame 10
    detector = RecordsConfirmed(faces)
    detector.confirmed = {}
    FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    assert detector.confirmed[3] == faces[0]
    assert detector.confirmed[8] == faces[0] + faces[4]
    assert detector.confirmed[9] == faces[4] + faces[8]
    assert detector.confirmed[10] == []  # the cut is seen before its frame is scanned
    # Frames 9 and 10 are scanned by every level at the cut; after it, only frame 10 counts.
    assert detector.confirmed[11] == faces[10] and detector.confirmed[12] == faces[10]


def test_no_box_is_held_or_carried_across_a_cut(anon_settings):
    # Shot A shows a face at the left, shot B one at the right, each found on its keyframes
    # and on the frames either side of the cut (scanned by every level). Held across the cut,
    # each face's box would cover another picture: 4 frames of the other shot.
    left, right = Box(60, 100, 24, 24, 0.9), Box(300, 150, 24, 24, 0.9)
    video = shot(0, range(8)) + shot(1, range(8, 16))
    detector = FineLevelFaces({index: [left if index < 8 else right] for index in range(16)})
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    for index, (face, other) in enumerate([(left, right)] * 8 + [(right, left)] * 8):
        assert face_hidden(video[index], out[index], face) == 1.0, index
        assert face_hidden(video[index], out[index], other) == 0.0, index


def test_a_face_coming_in_beside_another_is_covered_before_it_is_found(anon_settings):
    # A face comes in from the left 8 px a frame, first found on keyframe 4. The face in the
    # lane below, found half in view on keyframe 0, could have been it, but is tracked to
    # its own box on keyframe 4: the newcomer is still stretched back to the edge.
    newcomer = {index: Box(-12 + 8 * index, 100, 14, 14, 0.8) for index in range(5)}
    below = {0: Box(0, 130, 10, 14, 0.35), 4: Box(26, 130, 14, 14, 0.8)}
    video = shot(0, range(9))
    detector = FineLevelFaces({0: [below[0]], 4: [newcomer[4], below[4]]})
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    for index in (2, 3):  # wholly in view, 16 and 8 px before where it is found
        assert face_hidden(video[index], out[index], newcomer[index]) == 1.0, index


def test_a_small_face_faster_than_its_width_a_frame_is_tracked_between_keyframes(anon_settings):
    # A 14 px face crossing 24 px a frame (1280 px in 1.8 s) moves 96 px, seven of its
    # widths, between keyframes: it is still matched to itself, and covered in between.
    face = {index: Box(20 + 24 * index, 100, 14, 14, 0.8) for index in range(9)}
    video = shot(0, range(9))
    detector = FineLevelFaces({index: [face[index]] for index in (0, 4, 8)})
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    for index in (1, 2, 3, 5, 6, 7):
        assert face_hidden(video[index], out[index], face[index]) == 1.0, index


def test_two_small_faces_side_by_side_moving_fast_are_both_tracked_between_keyframes(
        anon_settings):
    # Two 14 px faces 31 px apart cross 32 px a frame, found on keyframes 0 and 4 only. The
    # lower one on frame 0 is nearer the upper one's box on frame 4 (127.8 px) than its own
    # (128.0 px): paired crosswise, one face would be interpolated across the lanes and the
    # other held still. Each path that can be a face's is covered.
    upper = {index: Box(20 + 32 * index, 60, 14, 14, 0.8) for index in range(5)}
    lower = {index: Box(24 + 32 * index, 91 - (index == 4), 14, 14, 0.8) for index in range(5)}
    video = shot(0, range(9))
    detector = FineLevelFaces({index: [upper[index], lower[index]] for index in (0, 4)})
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    for index in (1, 2, 3):
        for face in (upper[index], lower[index]):
            assert face_hidden(video[index], out[index], face) == 1.0, (index, face)


@pytest.mark.parametrize("checked,stale", [((8, 9, 10, 11), (4, 8, 12)), ((0, 1, 2, 3), (0, 4))],
                         ids=["on-their-course", "with-no-past"])
def test_fast_faces_tracked_for_sure_are_not_also_hidden_where_they_were_and_will_be(
        anon_settings, checked, stale):
    # Two 14 px faces 31 px apart cross 16 px a frame, found on keyframes 0, 4, 8 and 12.
    # From keyframe 8 on, each face's box ahead lies where its speed takes it and no other
    # face's speed takes it there: the pairing is sure. Before, with no box behind, a face's
    # speed is taken from its next box (keyframe 4) and confirmed by the one after (keyframe
    # 8): three boxes in a row at one speed. On the checked frames each face is hidden where
    # it is, not also where it was or will be on the stale keyframes, the cover for a
    # pairing in doubt.
    upper = {index: Box(20 + 16 * index, 60, 14, 14, 0.8) for index in range(13)}
    lower = {index: Box(24 + 16 * index, 91, 14, 14, 0.8) for index in range(13)}
    video = shot(0, range(13))
    detector = FineLevelFaces({index: [upper[index], lower[index]] for index in (0, 4, 8, 12)})
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    for index in checked:
        changed = np.any(out[index] != video[index], axis=2)
        for face in (upper, lower):
            assert face_hidden(video[index], out[index], face[index]) == 1.0, index
            for box in {face[key] for key in stale} - {face[index]}:
                x, y = box.x + box.w // 2, box.y + box.h // 2
                assert not changed[y - 2:y + 3, x - 2:x + 3].any(), (index, box)


def test_a_face_coming_in_fast_is_tracked_as_a_whole_face_from_its_half_in_view(anon_settings):
    # A 22 px face comes in from the left 32 px a frame. On keyframe 0 a third of it is in
    # view and found as a 12 px box at the edge; on keyframe 4 it is found whole. In between
    # it moves as a whole face: the path is not one of a face growing from 12 px.
    face = {index: Box(-14 + 32 * index, 100, 22, 22, 0.9) for index in range(5)}
    assert_hidden(anon_settings, {0: [Box(0, 102, 12, 18, 0.41)], 4: [face[4]]}, 9, face, (1, 2, 3))


def assert_hidden(anon_settings, found: dict[int, list[Box]], frames: int, face: dict[int, Box],
                  checked) -> None:
    """Anonymize `frames` frames of one shot where the detector finds `found`; on each
    `checked` frame the whole of `face` there must be changed."""
    video = shot(0, range(frames))
    out, _ = FaceAnonymizer(anon_settings, detector=FineLevelFaces(found)).anonymize_frames(video)
    for index in checked:
        assert face_hidden(video[index], out[index], face[index]) == 1.0, index


def test_a_moving_face_missed_on_one_keyframe_is_tracked_across_it(anon_settings):
    # A 16 px face moving 8 px a frame is found on keyframes 0, 8 and 12, missed on 4: held
    # where it was found, it would leave frames 2-3 and 5-7 open (the box ahead and the box
    # behind are 8 frames apart, twice the hold).
    face = {index: Box(40 + 8 * index, 100, 16, 16, 0.8) for index in range(13)}
    assert_hidden(anon_settings, {index: [face[index]] for index in (0, 8, 12)}, 13, face, range(1, 8))


def test_a_face_missed_on_a_keyframe_is_told_from_a_neighbour_by_where_it_was_heading(
        anon_settings):
    # A face moving right 12 px a frame is found on keyframes 0, 4, 8 and 16, missed on 12.
    # A face in the lane above, moving 24 px a frame, is found on keyframes 0, 4 and 8, then
    # no more (it turned away): its box of frame 8 is nearer the first face's box of frame
    # 16 (42 px) than that face's own box of frame 8 (96 px), but far from where its speed
    # took it. The first face is tracked across keyframe 12 from its own box. (On frames 9-11
    # it is not yet: its speed is taken from the nearest box of frame 4, the other face's.)
    face = {index: Box(20 + 12 * index, 150, 16, 16, 0.8) for index in range(17)}
    above = {index: Box(8 + 24 * index, 110, 16, 16, 0.8) for index in (0, 4, 8)}
    found = {index: [face[index]] + ([above[index]] if index in above else []) for index in (0, 4, 8, 16)}
    assert_hidden(anon_settings, found, 17, face, (13, 14, 15))


class FoundOn(FineLevelFaces):
    """`faces` by frame index, whatever passes ran (a detector's output, replayed)."""

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        return list(self.faces.get(int(rgb[0, 0, 0]), [])) if memory is not None else []


def test_a_confident_face_takes_its_speed_from_its_own_box_not_a_faint_one_nearer(anon_settings):
    # Detections of a 48 px face crossing a 720p frame at 24 px a frame (the benchmark's
    # crossing video, the int8 network's boxes, reduced to those that matter): found at
    # 0.94-0.96 on keyframes 4-16, with a box at the detector's threshold (0.33) on keyframe
    # 8 nearer its box of keyframe 12 than its own box of 8, and another face far away on
    # frame 15. Its speed taken from the faint box pointed up-left, off its course to its box
    # of 16, and frames 13-14 were left partly open; a face found at 0.5 or more now takes
    # its speed from a box found so too.
    face = {index: Box(450 + 24 * index, 366, 48, 48) for index in range(21)}
    found = {4: [Box(547, 365, 48, 48, 0.96)],
             8: [Box(643, 365, 48, 48, 0.95), Box(791, 416, 30, 29, 0.33)],
             12: [Box(735, 363, 55, 54, 0.94), Box(798, 418, 26, 26, 0.36)],
             15: [Box(269, 493, 94, 94, 0.89)],
             16: [Box(835, 364, 49, 49, 0.95)]}
    video = still_video(21, shape=(720, 1280))
    for index, frame in enumerate(video):
        frame[0, 0] = index
    out, _ = FaceAnonymizer(anon_settings, detector=FoundOn(found)).anonymize_frames(video)
    for index in range(5, 16):
        assert face_hidden(video[index], out[index], face[index]) == 1.0, index


def test_a_face_is_not_tracked_without_doubt_to_a_faint_box_beside_it(anon_settings):
    # A face found at 0.9, drifting 2 px a frame, is missed on keyframe 8, where a box at the
    # detector's threshold (0.41) is found 54 px beside it. That box may be the face, or not:
    # the face's box is also held where it was, not only drawn towards the faint box.
    face = {index: Box(150 + 2 * index, 100, 20, 20, 0.9) for index in range(13)}
    found = {0: [face[0]], 4: [face[4]], 8: [Box(100, 96, 28, 28, 0.41)], 12: [face[12]]}
    assert_hidden(anon_settings, found, 13, face, (5, 6, 7))


def test_a_moving_face_missed_on_the_first_keyframe_is_carried_back(anon_settings):
    # A 16 px face moving 8 px a frame, in view from frame 0 but first found on keyframe 4,
    # then on 8, too far from the edges to be stretched to them: frames 0-3 are covered by
    # its box of frame 4 carried back at its speed, not held still.
    face = {index: Box(140 + 8 * index, 100, 16, 16, 0.8) for index in range(13)}
    assert_hidden(anon_settings, {index: [face[index]] for index in (4, 8, 12)}, 13, face, range(4))


def test_a_crowd_s_lookups_give_what_their_definitions_give():
    # `_found_before` looks at frames latest first and stops at the first with a match, and
    # `_Claims` finds each box behind's nearest match on a frame once: both are shortcuts
    # for a crowd. Held here to their definitions, over a crowd of boxes of every size and
    # score on 8 frames behind and 4 ahead, neighbours close enough to be taken for each other.
    rng = np.random.default_rng(0)

    def frame_of(count):
        boxes = []
        for _ in range(count):
            w = int(rng.integers(8, 60))
            boxes.append(Box(int(rng.integers(0, 640)), int(rng.integers(0, 360)), w,
                             w + int(rng.integers(-3, 4)), float(rng.choice([0.35, 0.5, 0.8]))))
        return boxes

    past = [(i, frame_of(40), {}) for i in range(8)]
    future = [(j, frame_of(40)) for j in range(9, 13)]
    past_boxes = [(i, a) for i, before, _ in past for a in before]
    defined = lambda index, box: max(
        ((i, p) for i, p in past_boxes if i < index and anonymize._same_face(p, box, index - i)),
        key=lambda m: (m[0], box.score >= anonymize.LOST_FACE_SCORE
                       and m[1].score >= anonymize.LOST_FACE_SCORE, -anonymize._distance(m[1], box)),
        default=None)
    queries = past_boxes + [(9, b) for b in future[0][1]]
    found = [anonymize._found_before(past, k, box) for k, box in queries]
    assert found == [defined(k, box) for k, box in queries]
    assert sum(match is not None for match in found) > len(queries) // 2

    claimed = {match for i, before, _ in past for a in before
               for match in anonymize._nearest_ahead(i, a, future)}
    claims = anonymize._Claims(past, future)
    answers = [claims(j, b) for j, after in future for b in after]
    assert answers == [(j, b) in claimed for j, after in future for b in after]
    assert 0 < sum(answers) < len(answers)


class EveryOtherFrame:
    """A detector that finds `faces[index]` on even frames, at every level."""

    model_sha256 = {}

    def __init__(self, faces: dict[int, Box]):
        self.faces = faces

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        index = int(rgb[0, 0, 0])
        return [self.faces[index]] if index % 2 == 0 and index in self.faces else []


def test_a_face_found_again_is_tracked_from_where_it_was_found_last(anon_settings):
    # A face crossing 8 px a frame is found on every even frame. On frame 7 its boxes of
    # frames 4 and 6 are both behind; the one of frame 4, found again on frame 6, is not held
    # where the face was three frames before: nothing behind the face is hidden (boxes found
    # ahead of it are held, as for any face that may be entering).
    face = {index: Box(40 + 8 * index, 100, 16, 16, 0.8) for index in range(13)}
    video = shot(0, range(13))
    out, _ = FaceAnonymizer(anon_settings, detector=EveryOtherFrame(face)).anonymize_frames(video)
    assert face_hidden(video[7], out[7], face[7]) == 1.0
    columns = np.flatnonzero(np.any(out[7] != video[7], axis=2).any(axis=0))
    assert columns.min() > face[7].x - 8  # the 1.4x box of the face itself starts 3 px before


def test_a_face_coming_in_near_a_corner_is_stretched_to_both_edges(anon_settings):
    # A face comes in from the left 16 px a frame, 20 px below the top; first found on
    # keyframe 4, nearer the top edge than the left one. It came in from the left.
    face = {index: Box(-12 + 16 * index, 20, 12, 12, 0.8) for index in range(9)}
    video = shot(0, range(9))
    detector = FineLevelFaces({4: [face[4]], 8: [face[8]]})
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    for index in (1, 2, 3):
        assert face_hidden(video[index], out[index], face[index]) == 1.0, index


def test_a_face_that_seems_to_stop_at_once_is_also_carried_on(anon_settings):
    # A face crossing 8 px a frame is found on keyframes 0, 4 and 8; on keyframe 12 a face
    # stands where it was on frame 8 (another face, after a cut to the same background).
    # Tracked to that one, it would be held still on frames 9-11, while it moved on.
    moving = {index: Box(100 + 8 * index, 100, 16, 16, 0.8) for index in range(13)}
    standing = Box(162, 100, 16, 16, 0.8)
    video = shot(0, range(13))
    detector = FineLevelFaces({0: [moving[0]], 4: [moving[4]], 8: [moving[8]], 12: [standing]})
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    for index in (9, 10, 11):
        assert face_hidden(video[index], out[index], moving[index]) == 1.0, index
    # A face that keeps its course (4 px a frame) is tracked alone: on frame 10 only its
    # interpolated box at x = 140 is hidden, nothing held behind or carried ahead.
    slow = {index: Box(100 + 4 * index, 100, 16, 16, 0.8) for index in (0, 4, 8, 12)}
    detector = FineLevelFaces({index: [box] for index, box in slow.items()})
    out, _ = FaceAnonymizer(anon_settings, detector=detector).anonymize_frames(video)
    columns = np.flatnonzero(np.any(out[10] != video[10], axis=2).any(axis=0))
    assert 130 < columns.min() and columns.max() < 165


class LargeBoxFromFrame6:
    """A 180 px box near the middle of a 768x576 frame, found from frame 6 on (a face
    stepping close to the camera, or a false positive)."""

    model_sha256 = {}

    def __init__(self):
        self.calls = 0

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        self.calls += 1
        return [Box(300, 200, 180, 180)] if self.calls > 6 else []


def test_a_large_new_box_is_not_stretched_over_the_frame(anon_settings):
    video = still_video(10, (576, 768))
    anonymizer = FaceAnonymizer(dataclasses.replace(anon_settings, hold_frames=4),
                                detector=LargeBoxFromFrame6())
    out, _ = anonymizer.anonymize_frames(video)
    changed = [np.any(o != v, axis=2).mean() for o, v in zip(out, video)]
    # Held on the frames before it (a face missed there), stretched towards the nearest edge
    # (the top, 200 px away) by at most 32 px a frame, never the whole frame.
    assert changed[0] == changed[1] == 0.0
    assert all(0.12 < c < 0.3 for c in changed[2:]), changed


def test_heads_mode_hides_small_heads_that_faces_mode_leaves(anon_settings):
    walkers, truth = walkers_video(frames=12, size=(384, 288))
    found = {}
    for mode in ANONYMIZE_MODES:
        settings = dataclasses.replace(AnonymizerSettings.for_mode(mode), model_dir=anon_settings.model_dir)
        # No face detector: what is hidden here is hidden by the head finder alone.
        anonymizer = FaceAnonymizer(settings, detector=NoFaces())
        out, stats = anonymizer.anonymize_frames(walkers)
        heads_hidden = [hidden(f, o, box) for f, o, boxes in zip(walkers, out, truth)
                        for box in boxes]
        found[mode] = (np.mean(heads_hidden), stats.frames_with_heads)
    assert found["faces"] == (0.0, 0)
    assert found["faces+heads"][0] >= 0.6 and found["faces+heads"][1] == len(walkers)


class NoFaces:
    model_sha256 = {}

    def detect(self, rgb, window_sizes, memory=None, full_range=True, confirmed=()):
        return []


def test_heads_mode_changes_nothing_when_nothing_moves():
    scene = cv2.resize(bgr(data.coffee()), (320, 240))
    finder = HeadFinder(HeadSettings(), median_background([scene] * 5))
    assert not any(finder.head_mask(scene.copy()).any() for _ in range(5))


def test_settings_key_tells_the_modes_apart(anon_settings):
    keys = {FaceAnonymizer(dataclasses.replace(AnonymizerSettings.for_mode(mode),
                                               model_dir=anon_settings.model_dir),
                           detector=NoFaces()).settings_key() for mode in ANONYMIZE_MODES}
    assert len(keys) == len(ANONYMIZE_MODES)


def test_anonymize_mode_is_a_node_config_key_and_unknown_values_are_refused():
    assert NodeConfig.from_mapping({"data-dir": "/videos"}).anonymize_mode == "faces"
    heads = NodeConfig.from_mapping({"data-dir": "/videos", "anonymize-mode": "faces+heads"})
    assert heads.anonymize_mode == "faces+heads"
    with pytest.raises(ValueError, match="anonymize-mode"):
        NodeConfig.from_mapping({"data-dir": "/videos", "anonymize-mode": "heads"})
    with pytest.raises(ValueError, match="anonymize mode"):
        AnonymizerSettings.for_mode("everything")


def test_centerface_loads_and_finds_a_real_face(face_models, real_faces):
    detector = CenterFaceDetector(face_models["centerface"])
    x, y, w, h = real_faces[0].box
    found = detector.detect(real_faces[0].image, 0.5)
    assert any(bx <= x + w / 2 <= bx + bw and by <= y + h / 2 <= by + bh
               for bx, by, bw, bh, _ in found)
    assert len(detector.detect(data.rocket(), 0.5)) == 0


def test_a_centerface_file_that_does_not_load_is_named(tmp_path, face_models):
    from privacy.face_models import FaceModelError

    broken = tmp_path / "centerface.onnx"
    broken.write_bytes(face_models["centerface"].read_bytes()[:4000])
    with pytest.raises(FaceModelError, match="centerface.onnx.*does not load"):
        CenterFaceDetector(broken)
