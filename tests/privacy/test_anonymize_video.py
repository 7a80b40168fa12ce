"""`anonymize_file`: videos keep frame count, size and fps; images keep their format; the
preview is written; bad inputs give errors that name the file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from privacy.anonymize_video import VideoError, anonymize_file
from simulations.bench_anonymize import hidden, paste_face

SIZE, FPS, FRAMES = (320, 240), 12.0, 14


def decode(path: Path) -> tuple[list[np.ndarray], float]:
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames, fps


def write_face_video(path: Path, fourcc: str, real_faces) -> tuple[int, int, int, int]:
    """A short video of a drifting real face; returns the face box of the first frame."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, SIZE)
    background = cv2.resize(np.ascontiguousarray(data.rocket()[..., ::-1]), SIZE)
    first_box = None
    for t in range(FRAMES):
        frame = background.copy()
        box = paste_face(frame, real_faces[0], 60, 0, (120 + 2 * t, 110))
        first_box = first_box or box
        writer.write(frame)
    writer.release()
    return first_box


@pytest.mark.parametrize("suffix,fourcc", [(".mp4", "mp4v"), (".avi", "MJPG")])
def test_video_keeps_frame_count_size_and_fps_and_is_blurred(tmp_path, anon_settings, real_faces,
                                                             suffix, fourcc):
    src, dst = tmp_path / f"in{suffix}", tmp_path / "out.mp4"
    face = write_face_video(src, fourcc, real_faces)
    stats = anonymize_file(src, dst, anon_settings, progress=False)
    originals, _ = decode(src)
    frames, fps = decode(dst)
    assert len(frames) == len(originals) == FRAMES == stats.frames
    assert frames[0].shape[1::-1] == SIZE
    assert fps == pytest.approx(FPS)
    assert stats.frames_with_faces == FRAMES
    assert hidden(originals[0], frames[0], face)


def test_image_keeps_its_format_and_preview_is_written(tmp_path, anon_settings, real_faces):
    image = np.ascontiguousarray(real_faces[0].image[..., ::-1])
    for suffix in (".png", ".jpg"):
        src, dst = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
        preview = tmp_path / f"preview{suffix}.png"
        cv2.imwrite(str(src), image)
        stats = anonymize_file(src, dst, anon_settings, preview=preview, progress=False)
        out = cv2.imread(str(dst))
        assert out.shape == image.shape and stats.faces_blurred >= 1
        assert hidden(image, out, real_faces[0].box)
        shown = cv2.imread(str(preview))
        assert shown is not None and shown.shape[1] == 2 * image.shape[1]


def test_video_preview_shows_original_beside_anonymized(tmp_path, anon_settings, real_faces):
    src, preview = tmp_path / "in.mp4", tmp_path / "preview.png"
    write_face_video(src, "mp4v", real_faces)
    anonymize_file(src, tmp_path / "out.mp4", anon_settings, preview=preview, progress=True)
    shown = cv2.imread(str(preview))
    assert shown.shape[1] == 2 * SIZE[0] and shown.shape[0] == 4 * SIZE[1]


def test_undecodable_file_error_names_the_file(tmp_path, anon_settings):
    src = tmp_path / "broken.mp4"
    src.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(VideoError, match="broken.mp4.*cannot be decoded"):
        anonymize_file(src, tmp_path / "out.mp4", anon_settings, progress=False)
    assert not (tmp_path / "out.mp4").exists()


def test_zero_frame_video_error_names_the_file(tmp_path, anon_settings):
    src = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), FPS, SIZE)
    writer.release()
    with pytest.raises(VideoError, match="empty.avi"):
        anonymize_file(src, tmp_path / "out.mp4", anon_settings, progress=False)


def test_unsupported_extensions_are_rejected(tmp_path, anon_settings):
    src = tmp_path / "notes.txt"
    src.write_text("hello")
    with pytest.raises(VideoError, match="notes.txt.*unsupported"):
        anonymize_file(src, tmp_path / "out.mp4", anon_settings, progress=False)
    image = tmp_path / "in.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(VideoError, match="out.jpg"):
        anonymize_file(image, tmp_path / "out.jpg", anon_settings, progress=False)
    assert issubclass(VideoError, ValueError)


def test_an_encoding_error_stops_the_run_and_leaves_no_output(tmp_path, anon_settings, real_faces,
                                                              monkeypatch):
    # Frames are encoded in a thread of their own: its error must still surface.
    import privacy.anonymize_video as anonymize_video

    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    write_face_video(src, "mp4v", real_faces)
    written = []

    def failing_emit(writer, item, *rest):
        if len(written) == 5:
            raise OSError("disk full")
        written.append(item.index)

    monkeypatch.setattr(anonymize_video, "_emit", failing_emit)
    with pytest.raises(OSError, match="disk full"):
        anonymize_file(src, dst, anon_settings, progress=False)
    assert written == [0, 1, 2, 3, 4]  # in order, and none after the error
    assert not dst.exists() and not list(tmp_path.glob(".out*"))
