"""Detection data: the MOT annotation format, folder checks, box mapping onto clips, synthetic data."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from client.boxes import (
    BoxFormatError,
    boxes_to_clip_grid,
    load_detection_clips,
    read_mot_boxes,
    scan_detection_folder,
)
from client.dataset import ClipSpec, DataError, VideoItem
from client.video import write_video
from client.synth_detect import (
    DETECTION_CLASSES,
    NUM_FRAMES,
    is_complete,
    object_alpha,
    write_synthetic_detection_dataset,
)
from client.video import read_frames


class IdentityAnonymizer:
    """Stands in for the face anonymizer where faces are not the point."""

    def anonymize_frames(self, frames, keep=None, background=None):
        return [keep(frame) if keep else frame for frame in frames], None

    def settings_key(self) -> str:
        return "identity"


def moving_rectangle_video(path: Path, frames: int = 16, width: int = 80, height: int = 64) -> None:
    """A white 16x12 rectangle on black whose left edge is at x = 10 + 4 * frame (0-based)."""
    images = []
    for f in range(frames):
        image = np.zeros((height, width, 3), np.uint8)
        cv2.rectangle(image, (10 + 4 * f, 20), (10 + 4 * f + 15, 31), (255, 255, 255), -1)
        images.append(image)
    write_video(path, images)


def test_read_mot_boxes_converts_corners_and_skips_ignored_lines(tmp_path):
    gt = tmp_path / "a.gt.txt"
    lines = ["# frame,id,x,y,w,h,conf,class,vis", "", "1,1,10,20,5,6", "1,2,0,0,4,4,1,2,1", "2,1,3,3,2,2,0,1,1",
             "3,7,1.5,2.5,3,4,1,3"]
    gt.write_text("\n".join(lines) + "\n")
    boxes = read_mot_boxes(gt, 3)
    assert sorted(boxes) == [1, 3]  # frame 2's only line has conf 0
    assert np.allclose(boxes[1], [[0, 10, 20, 15, 26], [1, 0, 0, 4, 4]])
    assert np.allclose(boxes[3], [[2, 1.5, 2.5, 4.5, 6.5]])
    assert boxes[1].dtype == np.float32


@pytest.mark.parametrize(
    "line, complaint",
    [
        ("1,1,10,20,5", "6 to 9"),
        ("1,1,ten,20,5,6", "not a number"),
        ("1,1,10,20,0,6", "width and height"),
        ("1,1,10,20,5,-1", "width and height"),
        ("0,1,10,20,5,6", "frame"),
        ("1,1,10,20,5,6,1,3,1", "class"),
        ("1,1,10,20,5,6,1,0,1", "class"),
    ],
)
def test_a_malformed_line_names_file_and_line(tmp_path, line, complaint):
    gt = tmp_path / "a.gt.txt"
    gt.write_text(f"# header\n1,1,0,0,2,2\n{line}\n")
    with pytest.raises(BoxFormatError, match=complaint) as caught:
        read_mot_boxes(gt, 2)
    assert str(caught.value).startswith(f"{gt}:3: ")
    assert isinstance(caught.value, ValueError)


def test_scan_reads_classes_and_finds_videos_at_any_depth(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for video in (tmp_path / "top.mp4", tmp_path / "a" / "b" / "deep.avi"):
        video.touch()
        video.with_name(video.stem + ".gt.txt").write_text("1,1,0,0,2,2,1,2,1\n")
    (tmp_path / "classes.txt").write_text("car\nperson\n")
    classes, items = scan_detection_folder(tmp_path)
    assert classes == ("car", "person")
    assert items == sorted(items, key=lambda item: str(item.path))
    assert {item.path.name for item in items} == {"top.mp4", "deep.avi"}
    assert {item.label for item in items} == {0}
    with pytest.raises(DataError, match="expected"):
        scan_detection_folder(tmp_path, classes=("person", "car"))


def test_a_folder_without_classes_txt_has_one_class_and_checks_its_range(tmp_path):
    (tmp_path / "v.mp4").touch()
    (tmp_path / "v.gt.txt").write_text("1,1,0,0,2,2,1,1,1\n")
    assert scan_detection_folder(tmp_path)[0] == ("object",)
    (tmp_path / "v.gt.txt").write_text("1,1,0,0,2,2,1,1,1\n2,1,0,0,2,2,1,2,1\n")
    with pytest.raises(BoxFormatError, match=r"v\.gt\.txt:2: class"):
        scan_detection_folder(tmp_path)


def test_a_video_without_annotations_is_refused_by_name(tmp_path):
    (tmp_path / "has.mp4").touch()
    (tmp_path / "has.gt.txt").write_text("1,1,0,0,2,2\n")
    (tmp_path / "lacks.mp4").touch()
    with pytest.raises(DataError, match="lacks.mp4"):
        scan_detection_folder(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        scan_detection_folder(tmp_path / "nowhere")


def test_boxes_follow_the_centre_frame_through_crop_and_resize(tmp_path):
    # 80x64 video: the centre crop drops 8 px left and right, then 64 -> 32 px halves everything.
    video = tmp_path / "wide.mp4"
    moving_rectangle_video(video)
    lines = [f"{f + 1},1,{10 + 4 * f},20,16,12,1,1,1" for f in range(16)]
    video.with_name("wide.gt.txt").write_text("\n".join(lines) + "\n")
    spec = ClipSpec(clip_frames=4, frame_stride=2, frame_size=32)
    clipset = load_detection_clips([VideoItem(video, 0)], spec, IdentityAnonymizer(), None, num_classes=1)
    assert len(clipset) == 2 and list(clipset.labels) == [0, 0]  # 8 decoded frames, 2 clips
    for clip, boxes in zip(clipset.clips, clipset.boxes):
        centre = clip[spec.clip_frames // 2].max(axis=2)  # the target frame, RGB -> brightest channel
        ys, xs = np.nonzero(centre > 128)
        drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert boxes.shape == (1, 5) and boxes[0, 0] == 0
        assert np.abs(boxes[0, 1:] - drawn).max() <= 1.0, (boxes, drawn)
    # Clip 0's centre is decoded frame 2 = original frame 4; clip 1's is original frame 12.
    assert clipset.boxes[0][0, 1] == pytest.approx((10 + 4 * 4 - 8) / 2)
    assert clipset.boxes[1][0, 1] == pytest.approx((10 + 4 * 12 - 8) / 2)


def test_boxes_cut_off_by_the_crop_or_too_small_are_dropped():
    boxes = np.array([
        [0, 0, 10, 8, 20],     # entirely in the 8 px band the crop removes
        [1, 4, 10, 14, 20],    # 60% visible: kept, clipped at the crop's left edge
        [2, 2, 10, 12, 20],    # 40% visible: kept
        [0, 0, 10, 10, 20],    # 20% visible: dropped
        [1, 30, 30, 33, 40],   # 3 px wide -> 1.5 px after halving: dropped
    ], np.float32)
    mapped = boxes_to_clip_grid(boxes, width=80, height=64, frame_size=32)
    assert np.allclose(mapped, [[1, 0, 5, 3, 10], [2, 0, 5, 2, 10]])


def test_a_corrupt_video_is_skipped_with_a_warning(tmp_path, caplog):
    good, bad = tmp_path / "good.mp4", tmp_path / "bad.mp4"
    moving_rectangle_video(good, frames=8)
    bad.write_bytes(b"not a video at all")
    for video in (good, bad):
        video.with_name(video.stem + ".gt.txt").write_text("1,1,0,0,4,4\n")
    spec = ClipSpec(clip_frames=4, frame_stride=1, frame_size=32)
    with caplog.at_level(logging.WARNING):
        clipset = load_detection_clips([VideoItem(good, 0), VideoItem(bad, 0)], spec, IdentityAnonymizer(), None)
    assert clipset.skipped == ["bad.mp4"] and "bad.mp4" in caplog.text
    assert len(clipset) == 2 and len(clipset.boxes) == 2 and clipset.num_classes == 1


@pytest.mark.parametrize("kind", range(len(DETECTION_CLASSES)))
def test_synthetic_shapes_fill_their_annotated_box(kind):
    centre, size = np.array([30.3, 20.7]), 13.0
    ys, xs = np.nonzero(object_alpha(kind, centre, size) > 0.5)
    drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert np.abs(drawn - np.r_[centre - size / 2, centre + size / 2]).max() <= 1.0


def test_synthetic_dataset_is_complete_deterministic_and_has_objects_coming_and_going(tmp_path):
    root = write_synthetic_detection_dataset(tmp_path / "a", seed=5, videos=6)
    again = write_synthetic_detection_dataset(tmp_path / "b", seed=5, videos=6)
    assert is_complete(root) and not is_complete(tmp_path)
    classes, items = scan_detection_folder(root)
    assert classes == DETECTION_CLASSES and len(items) == 6
    assert len(read_frames(items[0].path)) == NUM_FRAMES
    assert (root / "shapes_0003.gt.txt").read_text() == (again / "shapes_0003.gt.txt").read_text()
    tracks: dict[tuple[str, int], set[int]] = {}
    for item in items:
        for line in item.path.with_name(item.path.stem + ".gt.txt").read_text().split():
            frame, track = (int(v) for v in line.split(",")[:2])
            tracks.setdefault((item.path.name, track), set()).add(frame)
    assert len(tracks) >= 6  # at least one object a video
    assert any(len(frames) < NUM_FRAMES for frames in tracks.values())  # some enter or leave
