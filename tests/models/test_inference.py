"""`fedvid generate` and `fedvid detect` on finished runs: playable videos out, wrong runs refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def test_a_generator_run_is_scored_by_a_classify_run_on_its_classes(tmp_path, transfer_folder):
    """`class_score` (`fedvid generate --classifier`, `privacy_utility --judge`): the share of
    samples the judge gives the class they were generated for; a judge of other classes is refused."""
    from models.inference import class_score, load_task_run, seed_clips
    from models.video_generator import class_conditional_accuracy

    classes = tuple(sorted(p.name for p in transfer_folder.iterdir() if p.is_dir()))
    generator_run = finished_run(tmp_path / "gen", "generate", classes)
    judge_run = finished_run(tmp_path / "judge", "classify", classes)
    generator, _, _, config = load_task_run(generator_run, "generate")
    judge = load_task_run(judge_run, "classify")[0]
    clips, _ = seed_clips(classes, config, 2, transfer_folder)
    with torch.no_grad():
        expected = class_conditional_accuracy(generator, judge, clips, len(classes))
    assert class_score(generator_run, judge_run, per_class=2, seeds=transfer_folder) == expected

    stranger = finished_run(tmp_path / "stranger", "classify", classes[:-1] + ("other",))
    with pytest.raises(ValueError, match="stranger"):
        class_score(generator_run, stranger, per_class=2, seeds=transfer_folder)
    with pytest.raises(ValueError, match="not 'classify'"):
        class_score(generator_run, generator_run, per_class=2, seeds=transfer_folder)


def test_the_privacy_utility_table_gives_a_class_score_column_only_with_a_judge():
    from simulations.privacy_utility import RunResult, table

    results = {("generate", "pretrained", "target-epsilon=8.0"): [RunResult(23.7, 21.7, 7.99, None, 0.6),
                                                                  RunResult(23.9, 21.9, 7.98, None, 0.7)],
               ("enhance", "scratch", "dp=false"): [RunResult(30.0, 29.0, float("inf"), None, None)]}
    lines = table(results).splitlines()
    assert lines[0].endswith("| class score |")
    assert lines[2].endswith("| 0.650 ± 0.071 (n=2) |") and "7.99" in lines[2]
    assert lines[3].endswith("| 29.000 | - |")
    plain = {key: [RunResult(r.headline, r.baseline, r.epsilon, r.unaveraged, None) for r in runs]
             for key, runs in results.items()}
    assert "class score" not in table(plain)
