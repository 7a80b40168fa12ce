"""MediaPipe's short-range BlazeFace, run fully convolutionally over a whole frame.

MediaPipe's face detector sees a fixed 128 px input, so faces a few percent of a large
frame need a pyramid of 128 px tiles, each one a separate call (~2.6 ms of CPU whatever its
content) whose overlaps are scanned twice. BlazeFace itself is a plain convolutional network:
its anchors sit on 8 and 16 px grids of its input, its box offsets are in input pixels, and
its outputs are flattened with a free dimension. So the same `.tflite` file, given an input
of any size, gives the detections of a 128 px window at every 8 or 16 px step, with nothing
scanned twice and one call per scan (45 ms for a 1280x720 input on two cores, against
~240 ms for the 91 overlapping tiles covering it).

`DenseBlazeFace` runs MediaPipe's model file unchanged in LiteRT (TensorFlow Lite's runtime,
the one MediaPipe runs it in) with the input resized to each scan's size. Decoding follows
MediaPipe's face-detection graph for this model: sigmoid scores, box centre = anchor centre
+ offset, width and height in input pixels, then a score-weighted non-maximum suppression at
IoU 0.3. The tests hold it to MediaPipe's own detections on the same windows.

The same runner takes the int8 form of the network (`privacy.blazeface_int8`): its
input is the same [-1, 1] quantized (`input_table`), its outputs are float.

LiteRT's memory grows with the input (~100 bytes a pixel: a 720p frame scaled 2x for 14 px
faces, 2560x1440, takes ~370 MB; a 12 MP photo scaled 2x took 8.2 GB). An input of more than
`MAX_INPUT_PIXELS` is run in strips of rows instead, each with `REACH` rows of context above
and below its own rows: an anchor's outputs depend on the input within 144 rows of it (the
receptive field of the coarsest outputs is 265 rows; with less context the outputs near a
cut differ, and texture there passes for faces), so the strips give
the anchors exactly, bit for bit, what one run over the whole input gives, and the boxes are
merged once over all of them.

`FullRangeBlazeFace` runs the full-range model the same way. Its input is fixed at 192 px,
so a frame is letterboxed into it as MediaPipe's face detector does (scaled by an affine
warp that maps pixel corners, not centres, centred, black around; a plain resize moved its
boxes by up to a tenth of their size) and its boxes are mapped back: the same detections
as MediaPipe's, in half the time (2.2 against 4.8-5.3 ms a frame, most of that MediaPipe's
graph around the network).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from privacy.face_models import SETUP_HINT, FaceModelError

INPUT_SIZE = 128          # the window the model was trained on
GRID = 16                 # the coarsest anchor stride: inputs are padded to a multiple of it
NMS_IOU = 0.3             # MediaPipe's min_suppression_threshold for face detection
_SCORE_CLIP = 100.0       # MediaPipe's score_clipping_thresh
_STRIDES = ((8, 2), (16, 6))  # (anchor stride, anchors per cell) of the short-range model
FULL_RANGE_SIZE = 192     # the full-range model's fixed input
_FULL_RANGE_STRIDES = ((4, 1),)
# Interpreters are kept per input width (a pyramid level of a video: its bands change only
# the height), as many input shapes each as fit in _PLANNED_PIXELS_PER_WIDTH (LiteRT's plan
# takes ~100 bytes an input pixel): a shape that does not fit replans the least recently used
# (30-90 ms at a 720p frame's 64 px level, 0.6x the network's run; making a new interpreter
# took 0.1-1 s).
_CACHED_WIDTHS = 6
REACH = 144  # input rows on either side that an anchor's outputs depend on (a multiple of GRID)
# Larger inputs run in strips: a 720p frame scaled 2x (3.7 Mpx) runs whole, a 1080p one
# (8.3 Mpx) in three, which took 1.96 -> 1.08 GB and ran faster (6.2-6.4 -> 7.7-8.1 frames/s).
MAX_INPUT_PIXELS = 1 << 22
_PLANNED_PIXELS_PER_WIDTH = 2 * MAX_INPUT_PIXELS
_TO_INPUT = np.arange(256, dtype=np.float32) * (2.0 / 255.0) - 1.0  # MediaPipe's [-1, 1]


class DenseBlazeFace:
    """BlazeFace short-range over whole images in LiteRT; see the module docstring."""

    def __init__(self, path: Path, threads: int = 0, max_input_pixels: int = MAX_INPUT_PIXELS):
        """Load the model; raises FaceModelError naming the file if it does not load or is
        not BlazeFace short-range. `threads`: LiteRT's threads (0: one per core);
        `max_input_pixels`: larger inputs are run in strips (the same detections)."""
        self.path = Path(path)
        self.threads = threads or usable_cores()
        self.max_input_pixels = max_input_pixels
        self._interpreters: OrderedDict[int, list[tuple[object, tuple[int, int]]]] = OrderedDict()
        self._to_input = _TO_INPUT
        try:
            self._to_input = input_table(self._interpreter((INPUT_SIZE, INPUT_SIZE)))
            probe = self.run(np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
        except FaceModelError:
            raise
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError on a bad file
            raise FaceModelError(f"face model {path} does not load in LiteRT ({exc}); "
                                 f"{SETUP_HINT}") from exc
        if probe[0].shape != (896, 1) or probe[1].shape != (896, 16):
            raise FaceModelError(f"face model {path} is not BlazeFace short-range (outputs "
                                 f"{probe[0].shape}, {probe[1].shape}); {SETUP_HINT}")

    def detect(self, rgb: np.ndarray, threshold: float) -> np.ndarray:
        """Faces in an RGB uint8 image, as the model sees it (scale it first to choose the
        face sizes found: a face is found best at 15-75% of 128 px). Rows of
        (x, y, w, h, score) in the image's pixels, merged as MediaPipe merges them."""
        found = [self._strip(rgb, rows, own_rows, threshold)
                 for rows, own_rows in strips(rgb.shape[:2], self.max_input_pixels)]
        return weighted_nms(np.concatenate(found), NMS_IOU)

    def _strip(self, rgb: np.ndarray, rows: tuple[int, int], own_rows: tuple[int, int],
               threshold: float) -> np.ndarray:
        """Unmerged detections of the anchors centred in `own_rows`, from a run over `rows`."""
        top, bottom = rows
        scores, boxes = self.run(rgb[top:bottom])
        found = _decode(scores[:, 0], boxes, _padded((bottom - top, rgb.shape[1])), threshold,
                        rows=(own_rows[0] - top, own_rows[1] - top))
        found[:, 1] += top
        return found

    def run(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The raw outputs (classificators (A, 1), regressors (A, 16)) for one RGB uint8
        image, padded with black to multiples of 16 px. They are views of LiteRT's output
        buffers, valid until the next call (copying them cost more than the decoding)."""
        return _invoke(self._interpreter(_padded(rgb.shape[:2])), rgb, self._to_input)

    def _interpreter(self, shape: tuple[int, int]):
        """An interpreter planned for `shape`: one kept for it, else the width's least
        recently used ones make room (one of them replanned) until its kept inputs fit in
        _PLANNED_PIXELS_PER_WIDTH, else a new one."""
        height, width = shape
        kept = self._interpreters.pop(width, [])  # most recently used first
        planned = [entry[1] for entry in kept]
        if shape in planned:
            interpreter, _ = kept.pop(planned.index(shape))
        else:
            interpreter = None
            while kept and sum(h * w for _, (h, w) in kept) + height * width > _PLANNED_PIXELS_PER_WIDTH:
                interpreter, _ = kept.pop()
            if interpreter is None:
                from ai_edge_litert.interpreter import Interpreter

                interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
            interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"],
                                            [1, height, width, 3])
            interpreter.allocate_tensors()
        self._interpreters[width] = [(interpreter, shape)] + kept
        while len(self._interpreters) > _CACHED_WIDTHS:
            self._interpreters.popitem(last=False)
        return interpreter


class FullRangeBlazeFace:
    """BlazeFace full-range in LiteRT, letterboxed as MediaPipe does; see the module docstring."""

    def __init__(self, path: Path, threads: int = 0):
        """Load the model; raises FaceModelError naming the file if it does not load or is
        not BlazeFace full-range. `threads`: LiteRT's threads (0: one per core)."""
        self.path = Path(path)
        try:
            from ai_edge_litert.interpreter import Interpreter

            self._interpreter = Interpreter(model_path=str(path), num_threads=threads or usable_cores())
            self._interpreter.allocate_tensors()
            shape = tuple(self._interpreter.get_input_details()[0]["shape"])
            outputs = sorted(tuple(d["shape"]) for d in self._interpreter.get_output_details())
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError on a bad file
            raise FaceModelError(f"face model {path} does not load in LiteRT ({exc}); "
                                 f"{SETUP_HINT}") from exc
        if shape != (1, FULL_RANGE_SIZE, FULL_RANGE_SIZE, 3) or outputs != [(1, 2304, 1), (1, 2304, 16)]:
            raise FaceModelError(f"face model {path} is not BlazeFace full-range (input {shape}, "
                                 f"outputs {outputs}); {SETUP_HINT}")

    def detect(self, rgb: np.ndarray, threshold: float) -> np.ndarray:
        """Faces in a whole RGB uint8 image: rows of (x, y, w, h, score) in its pixels."""
        height, width = rgb.shape[:2]
        side = max(height, width)
        scale = FULL_RANGE_SIZE / side
        left, top = (side - width) / 2 * scale, (side - height) / 2 * scale
        square = cv2.warpAffine(rgb, np.float32([[scale, 0, left], [0, scale, top]]),
                                (FULL_RANGE_SIZE, FULL_RANGE_SIZE), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        scores, boxes = _invoke(self._interpreter, square, _TO_INPUT)
        found = weighted_nms(_decode(scores[:, 0], boxes, square.shape[:2], threshold,
                                     _FULL_RANGE_STRIDES), NMS_IOU)
        found[:, :2] -= (left, top)
        found[:, :4] /= scale
        return found


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def input_table(interpreter) -> np.ndarray:
    """The table from uint8 pixels to a BlazeFace network's input: MediaPipe's [-1, 1] in
    float32, or those values quantized as the input asks (an int8 network)."""
    details = interpreter.get_input_details()[0]
    if details["dtype"] == np.float32:
        return _TO_INPUT
    scale, zero_point = details["quantization"]
    info = np.iinfo(details["dtype"])
    return np.clip(np.round(_TO_INPUT / scale) + zero_point, info.min, info.max).astype(details["dtype"])


def _invoke(interpreter, rgb: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a BlazeFace interpreter planned for `rgb` padded to its input, `table` (see
    `input_table`) giving its input: the outputs (scores (A, 1), box and keypoint offsets
    (A, 16)) as views of LiteRT's buffers."""
    height, width = rgb.shape[:2]
    buffer = interpreter.tensor(interpreter.get_input_details()[0]["index"])()[0]
    view = buffer[:height, :width]
    written = cv2.LUT(rgb, table, dst=view)  # uint8 -> the network's input in place, one pass
    if written is not view:  # OpenCV allocated instead of writing into the buffer
        view[...] = written
    buffer[height:], buffer[:height, width:] = table[0], table[0]  # black
    del buffer, view, written  # LiteRT refuses to run while its buffers are referenced
    interpreter.invoke()
    # The short-range file names its outputs; the full-range one does not, but has the
    # same two, scores the narrower.
    scores, boxes = sorted((interpreter.tensor(d["index"])()[0] for d in interpreter.get_output_details()),
                           key=lambda output: output.shape[1])
    return scores, boxes


def strips(shape: tuple[int, int], max_pixels: int = MAX_INPUT_PIXELS
           ) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """How an image of `shape` (height, width) is run: ((top, bottom), (first, end)) per
    strip, the rows it runs and the rows whose anchors it answers for (the last one's
    include the black rows that pad the input). One strip if the padded input has at most
    `max_pixels`; else strips of equal height (the last one up to a grid row taller), each
    with REACH rows beyond its own unless at the image's edge."""
    height = shape[0]
    padded_height, padded_width = _padded(shape)
    if padded_height * padded_width <= max_pixels:
        return [((0, height), (0, padded_height))]
    size = max(max_pixels // padded_width // GRID * GRID, 2 * REACH + GRID)
    found, first = [], 0
    while True:
        top = max(first - REACH, 0)
        if top + size >= height:  # the last one: as tall as the others, to the image's edge
            found.append(((max(height - size, 0) // GRID * GRID, height), (first, padded_height)))
            return found
        found.append(((top, top + size), (first, top + size - REACH)))
        first = top + size - REACH


def _padded(shape: tuple[int, int]) -> tuple[int, int]:
    """An image shape rounded up to multiples of GRID."""
    return tuple(-(-side // GRID) * GRID for side in shape)


def _decode(scores: np.ndarray, boxes: np.ndarray, shape: tuple[int, int],
            threshold: float, strides=_STRIDES, rows: tuple[int, int] | None = None) -> np.ndarray:
    """Rows of (x, y, w, h, score) in input pixels from the flat anchor outputs (in the
    order of `_anchor_centres`); `rows`: only the anchors centred in rows [first, end)."""
    # score = sigmoid(logit) >= threshold, compared in logit space: only the few anchors
    # above it are decoded.
    picked = np.nonzero(scores >= np.log(threshold / (1.0 - threshold)))[0]
    if picked.size == 0:
        return np.zeros((0, 5), np.float32)
    centres = _anchor_centres(*shape, strides)
    if len(centres) != len(scores):
        raise FaceModelError(f"unexpected BlazeFace output: {len(scores)} anchors for an "
                             f"input of {shape[0]}x{shape[1]}")
    if rows is not None:
        picked = picked[(centres[picked, 1] >= rows[0]) & (centres[picked, 1] < rows[1])]
    centre = centres[picked]
    coords = boxes[picked, :4]
    logits = np.clip(scores[picked].astype(np.float64), -_SCORE_CLIP, _SCORE_CLIP)
    cx, cy = coords[:, 0] + centre[:, 0], coords[:, 1] + centre[:, 1]
    w, h = coords[:, 2], coords[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, w, h, 1.0 / (1.0 + np.exp(-logits))], 1)


@lru_cache(maxsize=16)
def _anchor_centres(height: int, width: int, strides=_STRIDES) -> np.ndarray:
    """(x, y) of every anchor of an input of height x width, grid by grid of `strides`
    ((stride, anchors per cell), each grid row-major): for the short-range model those of
    the 8 px grid (2 per cell), then those of the 16 px grid (6 per cell)."""
    centres = []
    for stride, per_cell in strides:
        rows, cols = height // stride, width // stride
        index = np.arange(rows * cols * per_cell) // per_cell
        centres.append(np.stack([(index % cols + 0.5) * stride, (index // cols + 0.5) * stride], 1))
    centres = np.concatenate(centres)
    centres.flags.writeable = False  # shared between calls
    return centres


def weighted_nms(found: np.ndarray, iou_threshold: float) -> np.ndarray:
    """MediaPipe's weighted non-maximum suppression: the best-scoring box and every box
    overlapping it by more than `iou_threshold` become one box, their score-weighted mean,
    with the best score."""
    found = found[np.argsort(-found[:, 4], kind="stable")]
    merged = []
    while len(found):
        iou = _iou(found[0], found)
        group = found[iou > iou_threshold]
        weights = group[:, 4:5]
        merged.append(np.append((group[:, :4] * weights).sum(0) / weights.sum(), found[0, 4]))
        found = found[iou <= iou_threshold]
    return np.array(merged, np.float32).reshape(-1, 5)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[0] + box[2], others[:, 0] + others[:, 2])
                 - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[1] + box[3], others[:, 1] + others[:, 3])
                 - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    return inter / (box[2] * box[3] + others[:, 2] * others[:, 3] - inter + 1e-9)
