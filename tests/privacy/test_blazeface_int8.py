"""The int8 short-range network derived at setup. Its float32 graph is MediaPipe's network
bit for bit and has nothing XNNPACK's int8 kernels would run outside their graph; quantized,
it finds the faces of real people the float network finds, at the scales it runs at, with
nearly the same boxes and scores; deriving it again gives the same bytes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from privacy.blazeface_dense import DenseBlazeFace, _iou
from privacy.blazeface_int8 import derive_int8_model, float32_graph
from privacy.face_models import sha256_file
from test_blazeface_dense import frame_with_faces


def operators(path) -> set[str]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return {op["op_name"] for op in interpreter._get_ops_details()}


def test_the_float32_graph_is_mediapipes_network(face_models, real_faces, tmp_path):
    from ai_edge_litert.tools import flatbuffer_utils

    model = float32_graph(flatbuffer_utils.read_model(str(face_models["short_range"])))
    path = tmp_path / "float32.tflite"
    path.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    assert not operators(path) & {"DEQUANTIZE", "RELU"}
    assert {"DEQUANTIZE", "RELU"} <= operators(face_models["short_range"])  # what was folded
    frame, _ = frame_with_faces(real_faces)
    theirs = DenseBlazeFace(face_models["short_range"], threads=1).run(frame)
    theirs = [output.copy() for output in theirs]
    ours = DenseBlazeFace(path, threads=1).run(frame)
    for mine, reference in zip(ours, theirs):
        np.testing.assert_array_equal(mine, reference)


def best_inside(rows: np.ndarray, box, scale: float) -> np.ndarray | None:
    """The best-scoring detection centred in the face's box (scaled)."""
    x, y, w, h = (v * scale for v in box)
    inside = [row for row in rows if x <= row[0] + row[2] / 2 <= x + w and y <= row[1] + row[3] / 2 <= y + h]
    return max(inside, key=lambda row: row[4]) if inside else None


# It runs where frames are scaled up: the 64 px level, a 64 px frame's whole-frame pass.
@pytest.mark.parametrize("scale", [1.0, 128 / 96, 2.0])
def test_the_int8_network_finds_the_float_networks_faces(face_models, real_faces, scale):
    frame, faces = frame_with_faces(real_faces)
    image = cv2.resize(frame, None, fx=scale, fy=scale,
                       interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
    float_rows = DenseBlazeFace(face_models["short_range"], threads=1).detect(image, 0.3)
    int8_rows = DenseBlazeFace(face_models["short_range_int8"], threads=1).detect(image, 0.3)
    found = 0
    for box in faces:
        expected, actual = best_inside(float_rows, box, scale), best_inside(int8_rows, box, scale)
        if expected is None:
            continue
        assert actual is not None, (box, expected)
        assert abs(actual[4] - expected[4]) <= 0.1, (box, expected, actual)
        assert _iou(expected, actual[None])[0] >= 0.8, (box, expected, actual)
        found += 1
    assert found >= 7  # the float network finds most of the nine faces: not vacuous


def test_deriving_again_gives_the_same_model(face_models, tmp_path):
    derive_int8_model(face_models["short_range"], tmp_path / "again.tflite")
    assert sha256_file(tmp_path / "again.tflite") == sha256_file(face_models["short_range_int8"])
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(tmp_path / "again.tflite"))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8  # int8 inside, not a float copy
    assert {output["dtype"] for output in interpreter.get_output_details()} == {np.float32}
