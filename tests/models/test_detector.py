"""The video detector: shapes, targets, a per-example loss, decoding, learning, DP-SGD clipping,
and the annotated video."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.boxes import DetectionClipSet
from client.video import read_frames, write_video
from models.detect_video import annotate_video, window_indices
from models.detection_metrics import detection_metrics
from models.video_detector import (
    HEATMAP_PRIOR_BIAS,
    VideoDetector,
    decode_detections,
    detection_loss,
    detection_loss_per_example,
    detection_targets,
    evaluate_detector,
    mean_box_baseline,
)
from privacy.dp_training import check_per_sample_clipping, incompatible_layers

SIZES = {"tiny": (8, 16, 32), "small": (16, 32, 64), "base": (32, 64, 128)}
BOXES = [
    np.zeros((0, 5), np.float32),
    np.array([[0, 2, 3, 12, 11]], np.float32),
    np.array([[1, 1, 1, 9, 9], [0, 16, 18, 28, 30]], np.float32),
    np.array([[0, 0, 0, 8, 8], [1, 20, 2, 30, 10], [1, 4, 20, 14, 31]], np.float32),
]


def coloured_squares(n: int, seed: int, size: int = 32, frames: int = 4) -> DetectionClipSet:
    """Clips of 0-2 red (class 0) or green (class 1) squares, 6-11 px, on dark noise."""
    rng = np.random.default_rng(seed)
    clips = (rng.random((n, frames, size, size, 3)) * 60).astype(np.uint8)
    boxes = []
    for clip in clips:
        rows = []
        for _ in range(rng.integers(0, 3)):
            cls, side = int(rng.integers(2)), int(rng.integers(6, 12))
            x, y = rng.integers(0, size - side, 2)
            clip[:, y : y + side, x : x + side] = (230, 40, 40) if cls == 0 else (40, 230, 40)
            rows.append([cls, x, y, x + side, y + side])
        boxes.append(np.array(rows, np.float32).reshape(-1, 5))
    return DetectionClipSet(clips, np.zeros(n, np.int64), boxes=boxes, num_classes=2)


def perfect_output(boxes: list[np.ndarray], num_classes: int, frame_size: int) -> torch.Tensor:
    """The output a perfect detector would give: logits peaking at the centres, exact sizes and offsets."""
    targets = torch.stack([detection_targets(b, num_classes, frame_size) for b in boxes])
    heat = targets[:, :num_classes].clamp(1e-4, 1 - 1e-4)
    return torch.cat([torch.logit(heat), targets[:, num_classes : num_classes + 4]], dim=1)


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("frame_size", [32, 48])
def test_output_is_heatmaps_plus_four_box_channels_at_stride_4(size, frame_size):
    model = VideoDetector(3, SIZES[size], clip_frames=6)
    assert model(torch.rand(2, 3, 6, frame_size, frame_size)).shape == (2, 3 + 4, frame_size // 4, frame_size // 4)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_detector_is_opacus_compatible(size):
    assert incompatible_layers(VideoDetector(3, SIZES[size], clip_frames=8)) == []


def test_heatmaps_start_at_the_centernet_prior():
    torch.manual_seed(0)
    model = VideoDetector(2, SIZES["tiny"], clip_frames=4)
    heat = model(torch.rand(2, 3, 4, 32, 32))[:, :2].sigmoid()
    assert model.heatmap[-1].bias.detach().tolist() == pytest.approx([HEATMAP_PRIOR_BIAS] * 2)
    assert 0.03 < heat.mean().item() < 0.3


def test_targets_put_a_unit_peak_size_offset_and_mask_at_each_centre():
    target = detection_targets(np.array([[1, 6, 10, 18, 22], [0, 20, 0, 28, 4]], np.float32), 2, 32)
    assert target.shape == (2 + 5, 8, 8)
    # Box 1: centre (12, 16) px = cell (3, 4) exactly; box 2: centre (24, 2) px = (6, 0.5) cells.
    assert target[1, 4, 3] == 1 and target[1].eq(1).sum() == 1 and target[1, 4, 4] < 1
    assert target[2:, 4, 3].tolist() == [3.0, 3.0, 0.0, 0.0, 1.0]
    assert target[0, 0, 6] == 1
    assert target[2:, 0, 6].tolist() == [2.0, 1.0, 0.0, 0.5, 1.0]
    assert target[6].sum() == 2
    assert detection_targets(np.zeros((0, 5), np.float32), 2, 32).abs().sum() == 0


def test_loss_is_the_mean_of_losses_each_normalised_by_its_own_object_count():
    torch.manual_seed(0)
    output = torch.randn(4, 2 + 4, 8, 8)
    targets = torch.stack([detection_targets(b, 2, 32) for b in BOXES])
    alone = [detection_loss(output[i : i + 1], targets[i : i + 1]) for i in range(4)]
    assert detection_loss(output, targets).item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-6)
    # Doubling every object of an example (same errors, twice) leaves its loss unchanged only
    # if it is divided by its own count; compare the size/offset part, where that is exact.
    one = perfect_output([BOXES[1]], 2, 32)
    one[:, 2:4] += 0.5
    two_boxes = np.concatenate([BOXES[1], BOXES[1] + np.array([0, 16, 16, 16, 16], np.float32)])
    two = perfect_output([two_boxes], 2, 32)
    two[:, 2:4] += 0.5
    size_one = detection_loss_per_example(one, detection_targets(BOXES[1], 2, 32)[None]) - detection_loss_per_example(
        perfect_output([BOXES[1]], 2, 32), detection_targets(BOXES[1], 2, 32)[None])
    size_two = detection_loss_per_example(two, detection_targets(two_boxes, 2, 32)[None]) - detection_loss_per_example(
        perfect_output([two_boxes], 2, 32), detection_targets(two_boxes, 2, 32)[None])
    assert size_one.item() == pytest.approx(1.0, rel=1e-5) and size_two.item() == pytest.approx(1.0, rel=1e-5)


def test_decoding_a_perfect_output_gives_back_the_boxes():
    found = decode_detections(perfect_output(BOXES, 2, 32), 32)
    for got, want in zip(found, BOXES):
        assert got.shape == (len(want), 6)
        got, want = got[np.lexsort(got[:, 2:4].T)], want[np.lexsort(want[:, 1:3].T)]
        assert np.array_equal(got[:, 0], want[:, 0])
        assert np.allclose(got[:, 2:], want[:, 1:], atol=1e-3)
        assert (got[:, 1] > 0.99).all()
    assert detection_metrics(found, BOXES, 2) == {"map50": 1.0, "map": 1.0}


def test_per_class_nms_keeps_the_best_of_overlapping_boxes_of_one_class():
    output = torch.full((1, 2 + 4, 8, 8), -10.0)
    output[0, 2:4], output[0, 4:6] = 4.0, 0.5  # every box 16x16 px, centred on its cell
    output[0, 0, 3, 3], output[0, 0, 3, 5] = 3.0, 2.0  # class 0: two peaks 8 px apart, IoU 1/3
    output[0, 1, 3, 4] = 1.0  # class 1 between them: overlaps both, different class
    rows = decode_detections(output, 32, nms_iou=0.5)[0]
    assert rows[:, 0].tolist() == [0, 0, 1]
    rows = decode_detections(output, 32, nms_iou=0.3)[0]
    assert rows[:, 0].tolist() == [0, 1] and rows[0, 2] == pytest.approx(6.0)
    assert len(decode_detections(output, 32, max_detections=1)[0]) == 1
    assert len(decode_detections(output, 32, score_threshold=0.8)[0]) == 2


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_clipping_matches_brute_force(mode):
    # Examples with 0..3 objects: a loss normalised over the batch would couple them.
    torch.manual_seed(0)
    x = torch.rand(4, 3, 4, 16, 16)
    y = torch.stack([detection_targets(b * np.array([1, 0.5, 0.5, 0.5, 0.5], np.float32), 2, 16) for b in BOXES])
    error = check_per_sample_clipping(lambda: VideoDetector(2, SIZES["tiny"], clip_frames=4), x, y, mode,
                                      criterion=detection_loss)
    assert error < 1e-4


def test_dataset_items_collate_into_clips_and_targets():
    clipset = coloured_squares(5, seed=0)
    batch = next(iter(torch.utils.data.DataLoader(clipset.dataset(), batch_size=5)))
    assert batch[0].shape == (5, 3, 4, 32, 32) and 0 <= batch[0].min() and batch[0].max() <= 1
    assert batch[1].shape == (5, 2 + 5, 8, 8)
    assert batch[1][:, -1].flatten(1).sum(1).tolist() == [len(b) for b in clipset.boxes]


def test_training_beats_the_mean_box_baseline():
    train, held_out = coloured_squares(96, seed=0), coloured_squares(48, seed=1)
    torch.manual_seed(0)
    model = VideoDetector(2, SIZES["tiny"], clip_frames=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train.dataset(), batch_size=32, shuffle=True)
    before = evaluate_detector(model, held_out, "cpu")
    for _ in range(10):
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            detection_loss(model(x), y).backward()
            optimizer.step()
    after = evaluate_detector(model, held_out, "cpu")
    baseline = mean_box_baseline(train, held_out)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["map50"] > 0.4 > baseline["map50"] + 0.3
    assert after["map"] > baseline["map"]


def test_mean_box_baseline_is_perfect_when_every_object_sits_in_the_same_place():
    boxes = [np.array([[0, 4, 4, 12, 12]], np.float32), np.array([[0, 4, 4, 12, 12]], np.float32)]
    same = DetectionClipSet(np.zeros((2, 4, 16, 16, 3), np.uint8), np.zeros(2, np.int64), boxes=boxes, num_classes=1)
    assert mean_box_baseline(same, same) == {"map50": 1.0, "map": 1.0}


class BlackoutAnonymizer:
    """An anonymizer that blacks out every frame: anything that reaches the model or the file
    without passing through it would not be black."""

    def __init__(self):
        self.calls = 0

    def anonymize_frames(self, frames, keep=None, background=None):
        self.calls += 1
        return [(keep or np.asarray)(np.zeros_like(f)) for f in frames], None

    def settings_key(self) -> str:
        return "blackout"


class RecordingDetector(torch.nn.Module):
    """Detector outputs one confident class-0 box in the middle; remembers its inputs."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.inputs: list[torch.Tensor] = []

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        self.inputs.append(clips)
        grid = clips.shape[-1] // 4
        out = torch.zeros(len(clips), 1 + 4, grid, grid)
        out[:, 0] = -10.0
        out[:, 0, grid // 2, grid // 2] = 5.0
        out[:, 1:3] = grid / 2  # a box half the frame wide, centred: display pixels 16..48
        return out + self.weight


def test_window_indices_centre_each_frame_and_repeat_the_ends():
    assert window_indices(5, 4).tolist() == [[0, 0, 0, 1], [0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 4]]


def test_annotated_video_is_drawn_on_anonymized_frames_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    video = tmp_path / "in.mp4"
    write_video(video, [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(14)])
    model, anonymizer, out = RecordingDetector(), BlackoutAnonymizer(), tmp_path / "out.mp4"
    written = annotate_video(model, ["thing"], video, out, clip_frames=4, frame_stride=2, frame_size=16,
                             anonymizer=anonymizer)
    assert written == 7 and anonymizer.calls == 1
    seen = torch.cat(model.inputs)
    assert seen.shape == (7, 3, 4, 16, 16) and seen.abs().sum() == 0  # the model saw only anonymized frames
    frames = read_frames(out)
    assert len(frames) == 7 and frames[0].shape == (64, 64, 3)
    # Black anonymized frames with a box drawn in the middle: colour only where the box is.
    coloured = np.nonzero(frames[3][24:40].max(axis=2) > 60)[1]
    assert 14 <= coloured.min() <= 18 and 46 <= coloured.max() <= 50
    assert frames[3][22:42, 22:42].max() < 60  # inside the box stays black
