"""Use a finished run's model on new videos: sample clips from a generator (`fedvid generate`),
draw a detector's boxes on a video (`fedvid detect`).

Seed clips and input videos pass through the face anonymizer like every site's data, and a
run's model is only post-processed here: no privacy cost beyond the run's ledger.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from server.run_dir import load_finished_run


def load_task_run(run_dir: Path, task: str):
    """(model, spec, classes, config) of a finished run of `task`; ValueError naming the run otherwise."""
    model, spec, classes, config = load_finished_run(run_dir)
    if spec.task != task:
        raise ValueError(f"{run_dir} trained task = {spec.task!r}, not {task!r}")
    return model, spec, classes, config


def seed_clips(classes: tuple[str, ...], config, per_class: int, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` anonymized clips of each class from a public folder (default: synthetic
    videos disjoint from the built-in dataset), to start generation from."""
    from client.site import cache_dir, clip_spec, fedvid_home, site_anonymizer
    from models.distill import load_transfer_set, synthetic_transfer_dir

    folder = Path(folder) if folder else synthetic_transfer_dir(fedvid_home())
    clipset = load_transfer_set(folder, classes, clip_spec(config), site_anonymizer(), cache_dir())
    picks = [np.flatnonzero(clipset.labels == c)[:per_class] for c in range(len(classes))]
    if any(len(p) == 0 for p in picks):
        missing = [classes[c] for c, p in enumerate(picks) if len(p) == 0]
        raise ValueError(f"seed folder {folder} has no clip of class(es) {missing}")
    chosen = np.concatenate(picks)
    return clipset.clips[chosen], clipset.labels[chosen]


def generate_from_run(
    run_dir: Path, out_dir: Path, per_class: int = 2, seeds: Path | None = None, classifier_run: Path | None = None
) -> dict:
    """Write sample .mp4 clips of a generator run into `out_dir`; with `classifier_run` (a
    classify run on the same classes and clip geometry), also score the samples with it."""
    from models.video_generator import write_samples

    generator, spec, classes, config = load_task_run(run_dir, "generate")
    clips, labels = seed_clips(classes, config, per_class, seeds)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = write_samples(generator, clips, labels, classes, Path(out_dir))
    result: dict = {"samples": [str(p) for p in paths]}
    if classifier_run:
        result["class-conditional-accuracy"] = _judged(generator, spec, classes, clips, classifier_run)
    return result


def class_score(run_dir: Path, classifier_run: Path, per_class: int = 10, seeds: Path | None = None) -> float:
    """Share of a generator run's samples (each start continued under every class) that
    `classifier_run` classifies as the class they were generated for (chance: 1 / classes)."""
    generator, spec, classes, config = load_task_run(run_dir, "generate")
    clips, _ = seed_clips(classes, config, per_class, seeds)
    return _judged(generator, spec, classes, clips, classifier_run)


def _judged(generator, spec, classes: tuple[str, ...], clips: np.ndarray, classifier_run: Path) -> float:
    from models.video_generator import class_conditional_accuracy

    classifier, cspec, cclasses, _ = load_task_run(classifier_run, "classify")
    if cclasses != classes or (cspec.clip_frames, cspec.frame_size) != (spec.clip_frames, spec.frame_size):
        raise ValueError(f"classifier run {classifier_run} does not share the generator's classes and clip geometry")
    with torch.no_grad():
        return class_conditional_accuracy(generator, classifier, clips, len(classes))


def detect_from_run(run_dir: Path, video: Path, out: Path, score_threshold: float = 0.3) -> int:
    """Draw the detections of a detector run on `video` (anonymized); return the frames written."""
    from client.site import site_anonymizer
    from models.detect_video import annotate_video

    if not Path(video).is_file():
        raise FileNotFoundError(f"video {video} does not exist")
    detector, spec, classes, config = load_task_run(run_dir, "detect")
    return annotate_video(
        detector, classes, Path(video), Path(out), spec.clip_frames, config.frame_stride, spec.frame_size,
        site_anonymizer(), score_threshold=score_threshold,
    )
