"""Inference from a deployable ONNX artefact alone: no torch, no run directory.

Everything inference needs is in the model's metadata_props (written by `models.export`):
the class names and the clip geometry (frames per clip, frame stride, frame size). A video
is decoded with OpenCV into clips exactly as training did (`client.video`), its faces are
blurred by the same anonymizer when the face models are present (the model was trained on
anonymized frames; at a site whose outputs leave the site, anonymize before inference),
and ONNX Runtime runs the model on the CPU.

This module must not import torch (checked by tests/models/test_predict.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# metadata_props keys written by models.export
META_CLASSES = "fedvid.classes"  # JSON list of class names, in logit order
META_CLIP_FRAMES = "fedvid.clip_frames"
META_FRAME_STRIDE = "fedvid.frame_stride"
META_FRAME_SIZE = "fedvid.frame_size"
META_INPUT = "fedvid.input"
INPUT_LAYOUT = "clips: float32 (batch, 3, frames, size, size), RGB in [0, 1]"


def read_metadata(onnx_path: Path) -> dict[str, str]:
    """The model's metadata_props as a dict (read without loading the weights into a session)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def clip_geometry(meta: dict[str, str], onnx_path: Path | str = "model") -> tuple[list[str], int, int, int]:
    """(classes, clip_frames, frame_stride, frame_size) from metadata, or ValueError naming the file."""
    try:
        return (
            list(json.loads(meta[META_CLASSES])),
            int(meta[META_CLIP_FRAMES]),
            int(meta[META_FRAME_STRIDE]),
            int(meta[META_FRAME_SIZE]),
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{onnx_path}: not a fedvid export (metadata_props lacks {exc})") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _anonymizer_or_none(anonymize: bool | None):
    """The face anonymizer; with anonymize=None, None when the face models are missing."""
    if anonymize is False:
        return None
    from privacy.anonymize import FaceAnonymizer
    from privacy.face_models import FaceModelError

    try:
        return FaceAnonymizer()
    except FaceModelError:
        if anonymize:
            raise
        log.warning("face models missing (run `fedvid setup`): predicting on frames that were not anonymized")
        return None


def predict_video(
    onnx_path: Path, video_path: Path, anonymize: bool | None = None, threads: int = 1
) -> list[tuple[int, str, float]]:
    """[(clip_index, class_name, probability), ...]: one prediction per clip of the video.

    The video is cut into non-overlapping clips with the geometry stored in the model's
    metadata. `anonymize`: True blurs faces first (fails without the face models), False
    never does, None (default) does when the face models are installed. Raises VideoError
    for an unreadable video, ValueError for an ONNX file without fedvid metadata.
    """
    import onnxruntime as ort

    from client.video import frames_to_clips, iter_frames, square_resize

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    classes, clip_frames, stride, size = clip_geometry(dict(session.get_modelmeta().custom_metadata_map), onnx_path)
    frames = iter_frames(Path(video_path), stride)
    shrink = lambda frame: square_resize(frame, size)  # a frame at a time: long videos fit
    anonymizer = _anonymizer_or_none(anonymize)
    if anonymizer is not None:
        with anonymizer:
            small, _ = anonymizer.anonymize_frames(frames, keep=shrink)
    else:
        small = [shrink(frame) for frame in frames]
    clips = frames_to_clips(small, clip_frames, size)  # (N, T, S, S, 3) RGB uint8
    inputs = np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3), dtype=np.float32) / 255.0
    name = session.get_inputs()[0].name
    probs = softmax(np.concatenate([session.run(None, {name: inputs[i : i + 32]})[0] for i in range(0, len(inputs), 32)]))
    best = probs.argmax(axis=1)
    return [(i, classes[int(k)], float(probs[i, k])) for i, k in enumerate(best)]


def predict_command(model: Path, video: Path) -> int:
    """`fedvid predict MODEL VIDEO`: print one line per clip, `clip  class  probability`; return 0."""
    for index, name, probability in predict_video(Path(model), Path(video)):
        print(f"clip {index:4d}  {name:<24s} {probability:.3f}")
    return 0
