"""The site data pipeline: finding, decoding, clipping, splitting, partitioning, caching."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from client.dataset import ClipSpec, DataError, load_clips, partition_items, scan_video_folder, split_items, video_clips
from client.synth import CLASSES, write_synthetic_dataset, write_video
from client.video import VideoError, read_frames


class IdentityAnonymizer:
    """Stands in for the face anonymizer where faces are not the point; counts its calls."""

    def __init__(self, key: str = "identity"):
        self.key, self.calls = key, 0

    def anonymize_frames(self, frames):
        self.calls += 1
        return list(frames), None

    def settings_key(self) -> str:
        return self.key


class ExplodingAnonymizer(IdentityAnonymizer):
    def anonymize_frames(self, frames):
        raise RuntimeError("face detector failed")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), seed=3, videos_per_class=5)


def test_synthetic_dataset_is_deterministic_and_real_mp4(tmp_path, dataset):
    again = write_synthetic_dataset(tmp_path / "again", seed=3, videos_per_class=5)
    first = sorted(dataset.rglob("*.mp4"))
    assert len(first) == 5 * len(CLASSES)
    for a in first[:3]:
        b = again / a.parent.name / a.name
        assert np.array_equal(np.stack(read_frames(a)), np.stack(read_frames(b)))
    assert len(read_frames(first[0])) == 32


def test_scan_finds_classes_and_reads_avi(tmp_path, dataset):
    frames = read_frames(next(dataset.rglob("*.mp4")))
    for name in ("walk", "run"):
        (tmp_path / name).mkdir()
        write_video(tmp_path / name / f"{name}.avi", frames)
    classes, items = scan_video_folder(tmp_path)
    assert classes == ("run", "walk")
    assert [i.label for i in items] == [0, 1]
    assert len(read_frames(items[0].path, stride=2)) == 16


def test_empty_missing_and_single_class_folders_are_refused(tmp_path, dataset):
    with pytest.raises(DataError, match="does not exist"):
        scan_video_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="holds no videos"):
        scan_video_folder(tmp_path)
    (tmp_path / "only").mkdir()
    write_video(tmp_path / "only" / "a.mp4", read_frames(next(dataset.rglob("*.mp4"))))
    with pytest.raises(DataError, match="single class"):
        scan_video_folder(tmp_path)


def test_clips_have_the_configured_shape(dataset):
    _, items = scan_video_folder(dataset)
    clips, _ = video_clips(items[0].path, ClipSpec(8, 2, 24), IdentityAnonymizer(), None)
    assert clips.shape == (2, 8, 24, 24, 3) and clips.dtype == np.uint8
    short, _ = video_clips(items[0].path, ClipSpec(20, 2, 24), IdentityAnonymizer(), None)
    assert short.shape == (1, 20, 24, 24, 3)  # 16 frames padded up to one clip


def test_corrupt_video_is_reported_by_name_and_skipped(tmp_path, dataset, caplog):
    _, items = scan_video_folder(dataset)
    bad = tmp_path / CLASSES[0]
    bad.mkdir()
    (bad / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match="broken.mp4"):
        read_frames(bad / "broken.mp4")
    _, with_bad = scan_video_folder(tmp_path, CLASSES)
    clips = load_clips(items[:2] + with_bad, ClipSpec(8, 2, 24), IdentityAnonymizer(), None)
    assert clips.skipped == ["broken.mp4"]
    assert "broken.mp4" in caplog.text
    assert len(clips) == 4


def test_every_video_lands_in_exactly_one_site(dataset):
    _, items = scan_video_folder(dataset)
    for scheme in ("iid", "dirichlet"):
        parts = partition_items(items, 4, scheme, alpha=0.3, seed=1)
        flat = [i.path for p in parts for i in p]
        assert sorted(flat) == sorted(i.path for i in items)
        assert all(parts)
        assert parts == partition_items(items, 4, scheme, alpha=0.3, seed=1)


def test_dirichlet_partition_skews_labels(tmp_path):
    from client.dataset import VideoItem

    items = [VideoItem(Path(f"{c}/{i}.mp4"), c) for c in range(6) for i in range(50)]

    def mean_site_entropy(parts):
        ent = []
        for part in parts:
            p = np.bincount([i.label for i in part], minlength=6) / len(part)
            ent.append(-(p[p > 0] * np.log(p[p > 0])).sum())
        return float(np.mean(ent))

    iid = mean_site_entropy(partition_items(items, 5, "iid", seed=0))
    skewed = mean_site_entropy(partition_items(items, 5, "dirichlet", alpha=0.1, seed=0))
    assert iid > 0.95 * np.log(6)
    assert skewed < 0.6 * iid


def test_split_is_per_class_and_disjoint(dataset):
    _, items = scan_video_folder(dataset)
    kept, held = split_items(items, 0.2, seed=0)
    assert not set(i.path for i in kept) & set(i.path for i in held)
    assert Counter(i.label for i in held) == {label: 1 for label in range(len(CLASSES))}


def test_cache_decodes_once_and_follows_content_and_settings(tmp_path, dataset):
    _, items = scan_video_folder(dataset)
    video = tmp_path / "v.mp4"
    video.write_bytes(items[0].path.read_bytes())
    spec, anonymizer = ClipSpec(8, 2, 24), IdentityAnonymizer()
    first, _ = video_clips(video, spec, anonymizer, tmp_path / "cache")
    second, _ = video_clips(video, spec, anonymizer, tmp_path / "cache")
    assert anonymizer.calls == 1 and np.array_equal(first, second)
    video_clips(video, spec, IdentityAnonymizer("stronger blur"), tmp_path / "cache")
    video.write_bytes(items[1].path.read_bytes())  # new content, same name
    changed, _ = video_clips(video, spec, anonymizer, tmp_path / "cache")
    assert anonymizer.calls == 2 and not np.array_equal(first, changed)


def test_failing_anonymizer_stops_the_pipeline(tmp_path, dataset):
    _, items = scan_video_folder(dataset)
    with pytest.raises(RuntimeError, match="face detector failed"):
        load_clips(items[:1], ClipSpec(8, 2, 24), ExplodingAnonymizer(), tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npz")) if (tmp_path / "cache").exists() else True


def test_privacy_units_are_named_by_content_and_stay_put_when_videos_are_added():
    from client.dataset import ClipSet
    from client.site import privacy_units

    def clips(sources):
        out = ClipSet(np.zeros((len(sources), 1, 1, 1, 3), np.uint8), np.zeros(len(sources), np.int64))
        out.sources = sources
        return out

    before = privacy_units(clips(["b", "b"]), "clip", {"b": "b"})
    after = privacy_units(clips(["a", "b", "b"]), "clip", {"a": "a", "b": "b"})  # a video added in front
    assert set(before.ids) <= set(after.ids)
    videos = privacy_units(clips(["a", "b", "b"]), "video", {"a": "a", "b": "b"})
    assert videos.ids == ["a", "b"] and videos.members == [[0], [1, 2]]
