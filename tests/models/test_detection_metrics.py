"""mAP on hand-computed cases: ranking, misses, duplicates, classes and the IoU threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.detection_metrics import (
    average_precision,
    box_iou,
    detection_metrics,
    mean_average_precision,
)

GT = [np.array([[0, 0, 0, 10, 10]], np.float32), np.array([[0, 20, 20, 30, 30]], np.float32)]


def det(cls: int, score: float, box: tuple[float, float, float, float]) -> list[float]:
    return [cls, score, *box]


def test_box_iou_hand_values():
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    assert np.allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_average_precision_uses_the_precision_envelope():
    # Ranked hits: TP, FP, TP over 2 ground truths. Envelope: p=1 up to r=0.5, then 2/3 up to r=1.
    assert average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_perfect_predictions_score_one():
    preds = [np.array([det(0, 0.9, (0, 0, 10, 10))]), np.array([det(0, 0.8, (20, 20, 30, 30))])]
    assert detection_metrics(preds, GT, 1) == {"map50": 1.0, "map": 1.0}


def test_a_false_positive_ranked_first_halves_the_first_step():
    preds = [np.array([det(0, 0.9, (0, 0, 10, 10))]),
             np.array([det(0, 0.95, (50, 50, 60, 60)), det(0, 0.8, (20, 20, 30, 30))])]
    # Ranked: FP (p=0), TP (r=.5, p=.5), TP (r=1, p=2/3): envelope 2/3 over the whole recall range.
    assert mean_average_precision(preds, GT, 1) == pytest.approx(2 / 3)


def test_a_false_positive_ranked_last_costs_nothing():
    preds = [np.array([det(0, 0.9, (0, 0, 10, 10))]),
             np.array([det(0, 0.1, (50, 50, 60, 60)), det(0, 0.8, (20, 20, 30, 30))])]
    assert mean_average_precision(preds, GT, 1) == pytest.approx(1.0)


def test_a_missed_box_caps_recall():
    preds = [np.array([det(0, 0.9, (0, 0, 10, 10))]), np.zeros((0, 6))]
    assert mean_average_precision(preds, GT, 1) == pytest.approx(0.5)


def test_a_duplicate_detection_is_a_false_positive():
    preds = [np.array([det(0, 0.9, (0, 0, 10, 10)), det(0, 0.85, (0, 0, 10, 11))]),
             np.array([det(0, 0.8, (20, 20, 30, 30))])]
    # Ranked: TP (r=.5, p=1), duplicate FP (p=.5), TP (r=1, p=2/3).
    assert mean_average_precision(preds, GT, 1) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_two_classes_are_averaged_and_a_wrong_class_does_not_match():
    gts = [np.array([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30]], np.float32)]
    right = [np.array([det(0, 0.9, (0, 0, 10, 10)), det(1, 0.9, (20, 20, 30, 30))])]
    class_swapped = [np.array([det(1, 0.9, (0, 0, 10, 10)), det(1, 0.8, (20, 20, 30, 30))])]
    assert mean_average_precision(right, gts, 2) == pytest.approx(1.0)
    # Class 0: nothing found (0). Class 1: FP then TP -> envelope 1/2 over recall 0..1.
    assert mean_average_precision(class_swapped, gts, 2) == pytest.approx((0.0 + 0.5) / 2)


def test_classes_without_ground_truth_are_left_out():
    preds = [np.array([det(0, 0.9, (0, 0, 10, 10)), det(2, 0.9, (40, 40, 50, 50))]),
             np.array([det(0, 0.8, (20, 20, 30, 30))])]
    assert mean_average_precision(preds, GT, 3) == pytest.approx(1.0)


@pytest.mark.parametrize("width, hit", [(10.0 / 0.51, True), (10.0 / 0.49, False)])
def test_iou_just_above_or_below_the_threshold(width, hit):
    # A box sharing the ground truth's left part: IoU = 10 / width.
    preds = [np.array([det(0, 0.9, (0, 0, width, 10))]), np.zeros((0, 6))]
    gts = [GT[0], np.zeros((0, 5))]
    assert mean_average_precision(preds, gts, 1) == (1.0 if hit else 0.0)


def test_map_over_thresholds_rewards_tight_boxes():
    loose = [np.array([det(0, 0.9, (0, 0, 10, 16))])]  # IoU 0.625: found at .5, .55, .6 only
    metrics = detection_metrics(loose, [GT[0]], 1)
    assert metrics["map50"] == 1.0
    assert metrics["map"] == pytest.approx(3 / 10)


def test_no_ground_truth_at_all_is_nan():
    assert math.isnan(mean_average_precision([np.array([det(0, 0.9, (0, 0, 1, 1))])], [np.zeros((0, 5))], 1))
