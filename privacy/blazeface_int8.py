"""BlazeFace short-range in int8, derived at setup from MediaPipe's file.

Most of an anonymized 720p frame's time is the short-range network run densely over the
frame scaled up for small faces. Its int8 form runs 1.5x faster in LiteRT on two cores
(XNNPACK's int8 kernels) and scores the same faces within ~0.02. `derive_int8_model`
makes it from the verified float file with Google's `ai-edge-quantizer`, in two steps:

1. MediaPipe's file stores its weights in float16, each behind a DEQUANTIZE op, names every
   op in the old opcode field and keeps each RELU as an op of its own; the quantizer skips
   float16 weights and reads only the new opcode field, and XNNPACK runs a standalone int8
   RELU outside its graph (17 partitions, 3x slower than float). `float32_graph` folds the
   weights to float32, copies the opcodes, fuses each RELU into the op before it and drops
   the tensors left unused: the same network (outputs bit-identical in LiteRT).
2. Static int8 quantization (weights per channel, activations per tensor) with ranges
   taken as the min and max over `calibration_windows` (the quantizer's default, a moving
   average of per-window ranges, clipped the largest activations and lowered face scores
   by ~0.12), leaving the two output heads in float, where the scores are decided.

The calibration windows are real faces (scikit-image's LFW crops 85-99, which the
benchmark does not use) pasted at the sizes the network finds onto face-free photos that
neither the benchmark nor the tests use, a few of those photos alone, and a gradient that
holds every grey level (the input range). Derivation is deterministic on one machine; the
bytes may differ between CPUs (the float calibration's last bits), so the file is verified
against the SHA-256 recorded when it was derived (`privacy.face_models`).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import cv2
import numpy as np

from privacy.blazeface_dense import INPUT_SIZE, _TO_INPUT
from privacy.durable import atomic_write_bytes

OUTPUT_HEADS = r".*(classificator|regressor|reshape).*"  # the ops from the heads to the outputs
CALIBRATION_FACES = range(85, 100)  # of lfw_subset's 100 faces; the benchmark's are among 0-80
CALIBRATION_PHOTOS = ("gravel", "moon", "coins", "retina", "page", "text", "clock", "cell")
CALIBRATION_FACE_PX = (18, 24, 32, 48, 64)  # 14-50% of the input: where faces are found
_DEQUANTIZE, _RELU = 6, 19  # TFLite builtin operator codes
_NO_ACTIVATION, _FUSED_RELU = 0, 1  # TFLite fused activation functions
SIGNATURE = "serving_default"


def derive_int8_model(source: Path, target: Path) -> None:
    """Write the int8 form of the BlazeFace short-range file `source` to `target` (atomically)."""
    from ai_edge_quantizer import calibrator, qtyping, quantizer, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.utils import qsv_utils
    from ai_edge_litert.tools import flatbuffer_utils

    float32 = bytes(flatbuffer_utils.convert_object_to_bytearray(
        float32_graph(flatbuffer_utils.read_model(str(source)))))
    recipe = recipe_manager.RecipeManager()
    recipe.add_static_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED,
                             activation_num_bits=8, weight_num_bits=8)
    recipe.add_quantization_config(OUTPUT_HEADS, qtyping.TFLOperationName.ALL_SUPPORTED,
                                   algorithm_key=AlgorithmName.NO_QUANTIZE)
    windows = [{"input": _TO_INPUT[window][None]} for window in calibration_windows()]
    # (the calibrator warns that it keeps every tensor, and prints a progress bar and sizes)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ranges = calibrator.Calibrator(float32, num_threads=1, qsv_update_func=qsv_utils.min_max_update)
        ranges.calibrate({SIGNATURE: windows}, recipe)
        quantized = quantizer.Quantizer(float32, recipe.get_quantization_recipe())
        model = quantized.quantize(ranges.get_model_qsvs()).quantized_model
    atomic_write_bytes(target, bytes(model))


def float32_graph(model):
    """MediaPipe's BlazeFace model object (`flatbuffer_utils.read_model`) as a plain float32
    graph the quantizer and XNNPACK's int8 kernels take whole; modified in place."""
    from ai_edge_litert import schema_py_generated as schema

    graph = model.subgraphs[0]
    for code in model.operatorCodes:  # old files name ops in the deprecated field only
        code.builtinCode = max(code.builtinCode, code.deprecatedBuiltinCode)
    kind = lambda op: model.operatorCodes[op.opcodeIndex].builtinCode
    kept = []
    for op in graph.operators:
        if kind(op) == _DEQUANTIZE:  # a float16 weight: give its output float32 data
            weight = np.frombuffer(bytes(model.buffers[graph.tensors[op.inputs[0]].buffer].data),
                                   np.float16).astype(np.float32)
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(weight.tobytes(), np.uint8)
            model.buffers.append(buffer)
            graph.tensors[op.outputs[0]].buffer = len(model.buffers) - 1
        else:
            kept.append(op)
    graph.operators = _relus_fused(kept, kind)
    _drop_unused_tensors(graph)
    _drop_unused_buffers(model)
    model.signatureDefs = [_signature(graph, schema)]
    return model


def _relus_fused(operators: list, kind) -> list:
    """The operators with each RELU folded into the op that feeds only it."""
    readers: dict[int, int] = {}
    for op in operators:
        for tensor in op.inputs:
            readers[tensor] = readers.get(tensor, 0) + 1
    writer = {tensor: op for op in operators for tensor in op.outputs}
    fused = []
    for op in operators:
        source = writer.get(op.inputs[0]) if kind(op) == _RELU else None
        if (source is not None and readers[op.inputs[0]] == 1
                and getattr(source.builtinOptions, "fusedActivationFunction", None) == _NO_ACTIVATION):
            source.builtinOptions.fusedActivationFunction = _FUSED_RELU
            source.outputs = [op.outputs[0]]
        else:
            fused.append(op)
    return fused


def _drop_unused_tensors(graph) -> None:
    """Remove tensors no op reads or writes (the quantizer's calibration reads every tensor)."""
    used = sorted({t for op in graph.operators for t in [*op.inputs, *op.outputs] if t >= 0}
                  | set(graph.inputs) | set(graph.outputs))
    index = {old: new for new, old in enumerate(used)}
    graph.tensors = [graph.tensors[old] for old in used]
    for op in graph.operators:
        op.inputs = [index[t] if t >= 0 else t for t in op.inputs]
        op.outputs = [index[t] for t in op.outputs]
    graph.inputs = [index[t] for t in graph.inputs]
    graph.outputs = [index[t] for t in graph.outputs]


def _drop_unused_buffers(model) -> None:
    """Remove the buffers nothing refers to (the float16 weights); buffer 0 stays empty."""
    holders = [*model.subgraphs[0].tensors, *(model.metadata or [])]
    used = sorted({0} | {holder.buffer for holder in holders})
    index = {old: new for new, old in enumerate(used)}
    model.buffers = [model.buffers[old] for old in used]
    for holder in holders:
        holder.buffer = index[holder.buffer]


def _signature(graph, schema):
    """A serving signature (the calibrator runs the model through one)."""
    def entry(name, tensor):
        mapped = schema.TensorMapT()
        mapped.name, mapped.tensorIndex = name, tensor
        return mapped

    signature = schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = SIGNATURE, 0
    signature.inputs = [entry("input", graph.inputs[0])]
    signature.outputs = [entry(_name(graph.tensors[t]), t) for t in graph.outputs]
    return signature


def _name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def calibration_windows(seed: int = 0) -> list[np.ndarray]:
    """128x128 RGB uint8 windows: each calibration face at each size on a photo, each photo
    alone, and a gradient of every grey level. Deterministic."""
    from skimage import data

    rng = np.random.default_rng(seed)
    faces = (data.lfw_subset()[list(CALIBRATION_FACES)] * 255).astype(np.uint8)
    photos = [_rgb(getattr(data, name)()) for name in CALIBRATION_PHOTOS]
    windows = [_window(photo, rng) for photo in photos]
    for number, face in enumerate(faces):
        for size in CALIBRATION_FACE_PX:
            window = _window(photos[(number + size) % len(photos)], rng)
            x, y = rng.integers(0, INPUT_SIZE - size, 2)
            window[y:y + size, x:x + size] = cv2.resize(_rgb(face), (size, size),
                                                        interpolation=cv2.INTER_LINEAR)
            windows.append(window)
    gradient = np.linspace(0, 255, INPUT_SIZE).astype(np.uint8)[None, :, None]
    windows.append(np.tile(gradient, (INPUT_SIZE, 1, 3)))
    return windows


def _window(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random square of `photo` (40-100% of its shorter side), scaled to the network's input."""
    side = int(min(photo.shape[:2]) * rng.uniform(0.4, 1.0))
    y, x = (int(rng.integers(0, extent - side + 1)) for extent in photo.shape[:2])
    return cv2.resize(photo[y:y + side, x:x + side], (INPUT_SIZE, INPUT_SIZE),
                      interpolation=cv2.INTER_AREA)


def _rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 gray or RGB(A) image as RGB."""
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else np.ascontiguousarray(image[..., :3])
