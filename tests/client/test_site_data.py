"""The site data pipeline: finding, decoding, clipping, splitting, partitioning, caching."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from client.dataset import ClipSpec, DataError, load_clips, partition_items, scan_video_folder, split_items, video_clips
from client.node_config import NodeConfig
from client.run_config import RunConfig
from client.site import node_anonymizer, site_anonymizer
from client.synth import CLASSES, write_synthetic_dataset, write_video
from client.video import VideoError, read_frames
from privacy.anonymize import AnonymizerSettings, FaceAnonymizer
from privacy.face_models import FaceModelError, provision_face_models


class IdentityAnonymizer:
    """Stands in for the face anonymizer where faces are not the point; counts its calls."""

    def __init__(self, key: str = "identity"):
        self.key, self.calls = key, 0

    def anonymize_frames(self, frames, keep=None, background=None):
        self.calls += 1
        return [keep(frame) if keep else frame for frame in frames], None

    def settings_key(self) -> str:
        return self.key


class ExplodingAnonymizer(IdentityAnonymizer):
    def anonymize_frames(self, frames, keep=None, background=None):
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


class CountingFaceAnonymizer(FaceAnonymizer):
    """The real anonymizer, counting the videos it anonymizes in this process."""

    calls = 0

    def anonymize_frames(self, frames, **options):
        self.calls += 1
        return super().anonymize_frames(frames, **options)


def face_anonymizer(model_dir: Path | None = None) -> CountingFaceAnonymizer:
    return CountingFaceAnonymizer(AnonymizerSettings(model_dir=model_dir or provision_face_models()["short_range"].parent))


def test_worker_processes_anonymize_a_site_s_videos_as_one_process_does(tmp_path, dataset):
    _, items = scan_video_folder(dataset)
    alone, shared = face_anonymizer(), face_anonymizer()
    one = load_clips(items, ClipSpec(8, 2, 24), alone, tmp_path / "one", workers=1)
    many = load_clips(items, ClipSpec(8, 2, 24), shared, tmp_path / "many", workers=2)
    assert alone.calls == len(items) and shared.calls == 0  # the workers did it all
    assert one.faces_blurred > 0 and many.faces_blurred == one.faces_blurred
    assert np.array_equal(many.clips, one.clips) and np.array_equal(many.labels, one.labels)
    assert many.sources == one.sources


def test_a_corrupt_video_among_worker_processes_is_reported_and_skipped(tmp_path, dataset, caplog):
    _, items = scan_video_folder(dataset)
    bad = tmp_path / CLASSES[0]
    bad.mkdir()
    (bad / "broken.mp4").write_bytes(b"\x00" * 2048)
    _, with_bad = scan_video_folder(tmp_path, CLASSES)
    clips = load_clips(items[:3] + with_bad, ClipSpec(8, 2, 24), face_anonymizer(), tmp_path / "cache", workers=2)
    assert clips.skipped == ["broken.mp4"] and "broken.mp4" in caplog.text
    assert len(clips) == 6


def test_a_worker_whose_face_model_does_not_load_stops_the_loading(tmp_path, dataset):
    _, items = scan_video_folder(dataset)
    models = tmp_path / "models"
    shutil.copytree(provision_face_models()["short_range"].parent, models)
    anonymizer = face_anonymizer(models)
    (models / "face_detection_short_range.tflite").write_bytes(b"not a model")  # after the site loaded it
    with pytest.raises(FaceModelError, match="face_detection_short_range.tflite"):
        load_clips(items[:4], ClipSpec(8, 2, 24), anonymizer, tmp_path / "cache", workers=2)
    assert anonymizer.calls == 0 and not list((tmp_path / "cache").rglob("*.npz"))


UNGUARDED_SCRIPT = """
import sys
import tracemalloc
from pathlib import Path
from client.dataset import ClipSpec, load_clips, scan_video_folder
from privacy.anonymize import AnonymizerSettings, FaceAnonymizer
_, items = scan_video_folder(Path(sys.argv[1]))
anonymizer = FaceAnonymizer(AnonymizerSettings(model_dir=Path(sys.argv[2])))
print("clips", len(load_clips(items[:3], ClipSpec(8, 2, 24), anonymizer, Path(sys.argv[3]), workers=2)))
"""


def test_a_script_whose_workers_cannot_start_anonymizes_in_its_own_process(tmp_path, dataset):
    # Without `if __name__ == "__main__":` every spawned worker runs the script again and dies.
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    models = provision_face_models()["short_range"].parent
    done = subprocess.run([sys.executable, str(script), str(dataset), str(models), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "clips 6" in done.stdout and "going on in this one" in done.stderr
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 3


def test_anonymize_smallest_face_chooses_a_sites_video_levels(monkeypatch):
    monkeypatch.setenv("FEDVID_FACE_MODELS", str(provision_face_models()["short_range"].parent))
    assert NodeConfig.from_mapping({"data-dir": "/videos"}).anonymize_smallest_face == 14
    node = NodeConfig.from_mapping({"data-dir": "/videos", "anonymize-smallest-face": 12,
                                    "anonymize-int8": False})
    with pytest.raises(ValueError, match="unknown run-config key.*anonymize-smallest-face"):
        RunConfig.from_mapping({"anonymize-smallest-face": 20})
    with pytest.raises(ValueError, match="anonymize-smallest-face = 10 must be one of 20, 14, 12"):
        NodeConfig.from_mapping({"data-dir": "/videos", "anonymize-smallest-face": 10})
    site_anonymizer.cache_clear()
    try:
        settings = node_anonymizer(node).settings
        assert settings.window_sizes == (512, 256, 64, 48) and not settings.int8
    finally:
        site_anonymizer.cache_clear()


def test_anonymize_int8_chooses_the_network_that_finds_small_faces(monkeypatch):
    monkeypatch.setenv("FEDVID_FACE_MODELS", str(provision_face_models()["short_range"].parent))
    assert NodeConfig.from_mapping({"data-dir": "/videos"}).anonymize_int8
    node = NodeConfig.from_mapping({"data-dir": "/videos", "anonymize-int8": False})
    # The site's choice alone: a coordinator's run config cannot make it.
    with pytest.raises(ValueError, match="unknown run-config key.*anonymize-int8"):
        RunConfig.from_mapping({"anonymize-int8": False})
    with pytest.raises(ValueError, match="anonymize-int8"):
        NodeConfig.from_mapping({"data-dir": "/videos", "anonymize-int8": "no"})
    site_anonymizer.cache_clear()
    try:
        as_shipped = site_anonymizer(node.anonymize_mode, node.anonymize_int8).detector
        assert as_shipped.small_faces is as_shipped.short_range  # MediaPipe's float network only
        assert site_anonymizer().detector.small_faces.path.name == "face_detection_short_range_int8.tflite"
    finally:
        site_anonymizer.cache_clear()


def test_a_site_always_asks_centerface_s_second_opinion(monkeypatch):
    # CenterFace can only add faces a site's BlazeFace doubts; no config switches it off: a
    # coordinator's run config is refused, and the node config has no such key either.
    monkeypatch.setenv("FEDVID_FACE_MODELS", str(provision_face_models()["short_range"].parent))
    with pytest.raises(ValueError, match="unknown run-config key.*anonymize-second-opinion"):
        RunConfig.from_mapping({"anonymize-second-opinion": 0})
    with pytest.raises(ValueError, match="unknown node-config key.*anonymize-second-opinion"):
        NodeConfig.from_mapping({"data-dir": "/videos", "anonymize-second-opinion": 0})
    site_anonymizer.cache_clear()
    try:
        for mode in ("faces", "faces+heads"):
            node = NodeConfig.from_mapping({"data-dir": "/videos", "anonymize-mode": mode})
            detector = node_anonymizer(node).detector
            assert detector.settings.second_opinion == 0.3 and detector.centerface is not None
    finally:
        site_anonymizer.cache_clear()


def test_anonymize_workers_is_a_count_of_processes():
    assert NodeConfig.from_mapping({"data-dir": "/videos", "anonymize-workers": 3}).anonymize_workers == 3
    with pytest.raises(ValueError, match="anonymize-workers = -1"):
        NodeConfig.from_mapping({"data-dir": "/videos", "anonymize-workers": -1})


def test_a_long_video_is_anonymized_without_holding_all_its_frames(tmp_path):
    # 240 frames of 640x360 are 166 MB decoded; a site shrinks each frame to its clip size
    # as soon as it is anonymized, so that only the stream's look-ahead is held at full size.
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 255, (360, 1280, 3), np.uint8)
    path = tmp_path / "long.mp4"
    write_video(path, [np.ascontiguousarray(texture[:, 2 * i:2 * i + 640]) for i in range(240)])
    anonymizer = face_anonymizer()  # models loaded before measuring
    frame_bytes = 640 * 360 * 3
    tracemalloc.start()
    try:
        clips, _ = video_clips(path, ClipSpec(8, 1, 48), anonymizer, cache_dir=None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert clips.shape == (30, 8, 48, 48, 3)
    assert peak < 40 * frame_bytes, f"{peak / frame_bytes:.0f} frames' worth held at once"
