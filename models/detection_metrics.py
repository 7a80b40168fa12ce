"""Detection quality: average precision and mAP at one or several IoU thresholds.

Predictions of one image are rows (class0, score, x1, y1, x2, y2); its ground truth is rows
(class0, x1, y1, x2, y2), all in the same pixel grid. Matching follows COCO: detections of a
class are taken by descending score over all images; each takes the unmatched ground-truth box
of its image and class with the highest IoU, if that IoU is >= the threshold (a true
positive), else it is a false positive. So a second detection of an already found object is a
false positive. AP is the all-point interpolated area under the precision envelope
(PASCAL VOC 2010+; COCO samples the same envelope at 101 recall points instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

COCO_IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of boxes given as rows (x1, y1, x2, y2)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    left_top = np.maximum(a[:, None, :2], b[None, :, :2])
    right_bottom = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(right_bottom - left_top, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (VOC 2010+): area under the monotone precision envelope.

    `recall` (non-decreasing) and `precision` are the curve over the ranked detections.
    """
    r = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    p = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # precision at recall r = best precision at recall >= r
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _class_ap(
    predictions: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray], cls: int, threshold: float
) -> float:
    """AP of one class at one IoU threshold (greedy matching by score, see the module docstring)."""
    gts = [g[g[:, 0] == cls, 1:5] for g in ground_truths]
    num_gt = sum(len(g) for g in gts)
    dets = [(float(row[1]), image, row[2:6]) for image, p in enumerate(predictions) for row in p if row[0] == cls]
    if not dets:
        return 0.0
    dets.sort(key=lambda d: -d[0])  # stable: ties keep image order
    matched = [np.zeros(len(g), bool) for g in gts]
    hits = np.zeros(len(dets))
    for k, (_, image, box) in enumerate(dets):
        if not len(gts[image]):
            continue
        ious = np.where(matched[image], -1.0, box_iou(box, gts[image])[0])
        best = int(np.argmax(ious))
        if ious[best] >= threshold:
            matched[image][best] = True
            hits[k] = 1
    tp = np.cumsum(hits)
    fp = np.cumsum(1 - hits)
    return average_precision(tp / num_gt, tp / (tp + fp))


def mean_average_precision(
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    num_classes: int,
    iou_thresholds: Sequence[float] = (0.5,),
) -> float:
    """AP averaged over the classes that have ground truth and over `iou_thresholds`.

    `predictions[i]`: (k, 6) rows (class0, score, x1, y1, x2, y2) of image i;
    `ground_truths[i]`: (n, 5) rows (class0, x1, y1, x2, y2). NaN when no image has any box.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} prediction lists vs {len(ground_truths)} ground truths")
    preds = [np.asarray(p, np.float64).reshape(-1, 6) for p in predictions]
    gts = [np.asarray(g, np.float64).reshape(-1, 5) for g in ground_truths]
    present = [c for c in range(num_classes) if any((g[:, 0] == c).any() for g in gts)]
    if not present:
        return float("nan")
    return float(np.mean([_class_ap(preds, gts, c, t) for t in iou_thresholds for c in present]))


def detection_metrics(
    predictions: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray], num_classes: int
) -> dict[str, float]:
    """{"map50": mAP at IoU 0.5, "map": mAP averaged over IoU 0.50:0.05:0.95 (COCO's mAP)}."""
    return {
        "map50": mean_average_precision(predictions, ground_truths, num_classes, (0.5,)),
        "map": mean_average_precision(predictions, ground_truths, num_classes, COCO_IOU_THRESHOLDS),
    }
