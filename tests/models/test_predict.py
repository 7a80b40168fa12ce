"""Inference from the ONNX artefact alone (models.predict): clips from a video, class names
from the metadata, and no torch on the way."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from client.synth import _render_video, write_video
from client.video import frames_to_clips, read_frames
from client.dataset import clips_to_tensor
from models.export import clip_metadata, export_onnx
from models.predict import predict_command, predict_video
from models.registry import ModelSpec, build_model

CLASSES = ["wave", "jump", "run", "sit", "clap", "turn"]
STRIDE, FRAMES, SIZE = 2, 4, 32


@pytest.fixture(scope="module")
def model_and_onnx(tmp_path_factory):
    """A tiny random model exported with made-up class names (so they can only come from metadata)."""
    spec = ModelSpec("classify", "cnn3d", "tiny", len(CLASSES), FRAMES, SIZE)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, spec, path, clip_metadata(spec, CLASSES, STRIDE))
    return model, path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """A 32-frame synthetic .mp4 with a face in it: 32 / stride 2 / 4 frames = 4 clips."""
    frames = _render_video(0, np.random.default_rng(3), with_face=True)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, frames)
    return path


def test_predict_gives_one_prediction_per_clip_with_metadata_class_names(model_and_onnx, video):
    model, path = model_and_onnx
    predictions = predict_video(path, video, anonymize=False)
    frames = read_frames(video, STRIDE)
    clips = frames_to_clips(frames, FRAMES, SIZE)
    assert [p[0] for p in predictions] == list(range(len(clips))) and len(clips) == 4
    # the obvious way: the torch model on the same clips
    with torch.no_grad():
        probs = torch.softmax(model(clips_to_tensor(clips)), 1).numpy()
    assert [name for _, name, _ in predictions] == [CLASSES[k] for k in probs.argmax(1)]
    np.testing.assert_allclose([p for _, _, p in predictions], probs.max(1), atol=1e-4)


def test_predict_anonymizes_when_the_face_models_are_there(model_and_onnx, video):
    _, path = model_and_onnx
    predictions = predict_video(path, video, anonymize=True)
    assert len(predictions) == 4 and all(name in CLASSES and 0 < p <= 1 for _, name, p in predictions)


def test_predict_command_prints_one_line_per_clip(model_and_onnx, video, capsys):
    _, path = model_and_onnx
    assert predict_command(path, video) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.split()[2] in CLASSES for line in lines)


def test_predict_runs_without_torch(model_and_onnx, video):
    _, path = model_and_onnx
    script = (
        "import sys, json; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from models.predict import predict_video\n"
        f"out = predict_video({str(path)!r}, {str(video)!r})\n"
        "assert sys.modules['torch'] is None\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out) == 4 and {name for _, name, _ in out} <= set(CLASSES)


def test_predict_refuses_an_onnx_file_without_fedvid_metadata(model_and_onnx, video, tmp_path):
    _, path = model_and_onnx
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="not a fedvid export"):
        predict_video(tmp_path / "bare.onnx", video, anonymize=False)


def test_metadata_holds_json_class_names(model_and_onnx):
    _, path = model_and_onnx
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["fedvid.classes"]) == CLASSES and meta["fedvid.frame_stride"] == str(STRIDE)
