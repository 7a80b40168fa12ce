import cv2
import numpy as np
import pytest

from privacy.durable import atomic_write, atomic_write_bytes


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "budget.json"
    atomic_write_bytes(path, b"old")

    def half_then_crash(tmp):
        tmp.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["budget.json"]


def test_the_writer_gets_a_path_with_the_suffix_it_needs_and_its_result_is_returned(tmp_path):
    image = np.full((4, 6, 3), 7, np.uint8)
    path = tmp_path / "frame.png"
    assert atomic_write(path, lambda tmp: cv2.imwrite(str(tmp), image), suffix=".png") is True
    assert np.array_equal(cv2.imread(str(path)), image)
    # OpenCV picks the format by the suffix: the default one is refused, and nothing is written.
    with pytest.raises(cv2.error):
        atomic_write(tmp_path / "other.png", lambda tmp: cv2.imwrite(str(tmp), image))
    assert [p.name for p in tmp_path.iterdir()] == ["frame.png"]
