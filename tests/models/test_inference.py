"""`fedvid generate` and `fedvid detect` on finished runs: playable videos out, wrong runs refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from client.cli import main
from client.run_config import RunConfig
from client.synth_detect import write_synthetic_detection_dataset
from client.video import read_frames
from models.registry import build_model
from server.run_dir import save_model

FRAMES, SIZE = 4, 32


def finished_run(path: Path, task: str, classes: tuple[str, ...]) -> Path:
    """A run directory as the ServerApp leaves it, holding an untrained model of `task`."""
    config = RunConfig.from_mapping({**RunConfig().to_mapping(), "task": task, "model-size": "tiny",
                                     "clip-frames": FRAMES, "frame-size": SIZE, "run-dir": str(path)})
    spec = config.model_spec(len(classes))
    torch.manual_seed(0)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"run-config": config.to_mapping(), "classes": list(classes)}))
    save_model(path / "model.pt", build_model(spec).state_dict(), spec, classes)
    (path / "status.json").write_text(json.dumps({"status": "completed"}))
    return path


def test_generate_writes_one_playable_clip_per_class_and_seed(tmp_path, transfer_folder):
    classes = tuple(sorted(p.name for p in transfer_folder.iterdir() if p.is_dir()))
    run = finished_run(tmp_path / "run", "generate", classes)
    out = tmp_path / "samples"
    assert main(["generate", str(run), "--out", str(out), "--per-class", "1", "--seeds", str(transfer_folder)]) == 0
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == len(classes)
    assert {v.name.rsplit("-", 1)[0] for v in videos} == set(classes)
    for video in videos:
        frames = read_frames(video)
        assert len(frames) == FRAMES and frames[0].shape[1] >= SIZE


def test_detect_writes_an_annotated_video_of_every_kept_frame(tmp_path):
    data = write_synthetic_detection_dataset(tmp_path / "data", seed=3, videos=1)
    video = next(data.glob("*.mp4"))
    run = finished_run(tmp_path / "run", "detect", ("square", "disc", "triangle"))
    out = tmp_path / "annotated.mp4"
    assert main(["detect", str(run), str(video), "--out", str(out)]) == 0
    assert len(read_frames(out)) == len(read_frames(video)) // 2  # frame-stride 2


def test_a_run_of_another_task_is_refused_naming_it(tmp_path, capsys):
    run = finished_run(tmp_path / "run", "enhance", ("a", "b"))
    assert main(["generate", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "task = 'enhance', not 'generate'" in capsys.readouterr().err
    assert main(["detect", str(run), str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "y.mp4")]) == 2
    assert "missing.mp4 does not exist" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "onnx")]) == 2
    assert "distils and quantizes classifiers only" in capsys.readouterr().err
    assert not np.any([p.suffix == ".mp4" for p in tmp_path.rglob("*")])
