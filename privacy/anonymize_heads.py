"""Hiding the heads of moving people, for footage whose faces are too small to detect.

Surveillance cameras film people from far and above: heads of 6-12 px, too small for any
face detector. This finds people by what they do rather than by their face: pixels that
differ from a background model (OpenCV's MOG2, no model file) are grouped into blobs, and
in each blob the band from its top contour down `head_fraction` of its height is hidden
(column by column, so each person of a group walking side by side gets their own band).

What it guarantees: the head of every person who moved in the last `history` frames and
whose silhouette stands out from the background is hidden, whether or not a face shows.
What it does not: a person who stays still long enough becomes background and is no
longer hidden; a person whose colours match the background may be missed in part. The
background model starts from the median of frames sampled over the whole video when they
are known (files, clip lists), so people are found from the first frame on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np


@dataclass(frozen=True)
class HeadSettings:
    """How moving people are found and their heads hidden (all part of the settings key).

    head_fraction: the band hidden below a blob's top contour, as a fraction of the blob's
        height (a standing person's head is ~1/7 of their height; 0.25 also covers a person
        whose feet are occluded or who bends).
    margin: extra band above and to the sides of the contour, as a fraction of blob height.
    min_person_px: blobs shorter than this are noise (leaves, compression), not people.
    history / var_threshold: MOG2's memory in frames and its squared-distance threshold.
    """

    head_fraction: float = 0.25
    margin: float = 0.06
    min_person_px: int = 12
    history: int = 300
    var_threshold: float = 16.0

    def __post_init__(self) -> None:
        if not 0.0 < self.head_fraction <= 1.0:
            raise ValueError(f"head_fraction must be in (0, 1], got {self.head_fraction}")
        if self.min_person_px < 2 or self.history < 1 or self.margin < 0:
            raise ValueError("min_person_px >= 2, history >= 1 and margin >= 0 are required")


def median_background(frames: Sequence[np.ndarray], samples: int = 25) -> np.ndarray:
    """The per-pixel median of up to `samples` frames spread over the video: the scene
    without the people who move through it."""
    picks = np.linspace(0, len(frames) - 1, min(samples, len(frames))).round().astype(int)
    return np.median(np.stack([frames[i] for i in picks]), axis=0).astype(np.uint8)


class HeadFinder:
    """Stateful over one video: push frames in order, get the mask of head pixels to hide."""

    def __init__(self, settings: HeadSettings, background: np.ndarray | None = None):
        """`background`: the scene without people (see `median_background`); without it
        the model learns from the frames themselves, and people in the first frames are
        found only once they move."""
        self.settings = settings
        self.model = cv2.createBackgroundSubtractorMOG2(
            history=settings.history, varThreshold=settings.var_threshold, detectShadows=True)
        # MOG2's own rate is 1/(2 * frames seen) at first: it would take a person in the
        # second frame for background. Started from the background, it learns at 1/history.
        self.rate = -1.0
        if background is not None:
            self.model.apply(background, learningRate=1.0)
            self.rate = 1.0 / settings.history

    def head_mask(self, frame: np.ndarray) -> np.ndarray:
        """Boolean mask of the head band of every moving person in `frame` (BGR uint8)."""
        foreground = self.model.apply(frame, learningRate=self.rate) == 255  # 127: shadows
        foreground = cv2.morphologyEx(foreground.astype(np.uint8), cv2.MORPH_OPEN,
                                      np.ones((3, 3), np.uint8))
        # Join the parts of one person (legs, arms, a torso split by a bag).
        foreground = cv2.morphologyEx(foreground, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
        count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
        mask = np.zeros(frame.shape[:2], bool)
        for label in range(1, count):
            x, y, w, h, _ = stats[label]
            if h >= self.settings.min_person_px:
                self._add_head_band(mask, labels[y:y + h, x:x + w] == label, x, y)
        return mask

    def _add_head_band(self, mask: np.ndarray, blob: np.ndarray, x: int, y: int) -> None:
        height = blob.shape[0]
        band_h = int(np.ceil(self.settings.head_fraction * height))
        pad = int(np.ceil(self.settings.margin * height))
        columns = blob.any(axis=0)
        top = np.where(columns, blob.argmax(axis=0), height)  # first foreground row
        # Only columns near a local top (a head) carry a band, not an arm or a bag held out
        # at hip height beside the body.
        window = np.ones((1, 2 * band_h + 1), np.uint8)
        local_top = cv2.erode(top[None, :].astype(np.float32), window,
                              borderType=cv2.BORDER_REPLICATE)[0]
        columns &= top <= local_top + band_h
        rows = np.arange(-pad, height)[:, None]
        band = (rows >= top[None, :] - pad) & (rows <= top[None, :] + band_h) & columns[None, :]
        # Widen by `pad` to each side; the band starts `pad` rows above the blob.
        band = np.pad(band, ((0, 0), (pad, pad))).astype(np.uint8)
        band = cv2.dilate(band, np.ones((1, 2 * pad + 1), np.uint8)).astype(bool)
        y0, x0 = y - pad, x - pad
        ys, xs = slice(max(y0, 0), min(y0 + band.shape[0], mask.shape[0])), \
            slice(max(x0, 0), min(x0 + band.shape[1], mask.shape[1]))
        mask[ys, xs] |= band[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]


def hide_mask(frame: np.ndarray, mask: np.ndarray) -> None:
    """Blur the pixels of `mask` in place, each connected part strongly (sigma a third of
    its width, as for faces), so a head is a smooth blob, not a face."""
    from privacy.anonymize import _strong_gaussian

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
    for label in range(1, count):
        x, y, w, h, _ = stats[label]
        patch = frame[y:y + h, x:x + w]
        inside = labels[y:y + h, x:x + w] == label
        patch[inside] = _strong_gaussian(patch)[inside]
