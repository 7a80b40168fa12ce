"""Every task trains through the same DP round (budget, ledger, Opacus) and reports its own metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from client.boxes import DetectionClipSet
from client.dataset import ClipSet
from client.node_config import NodeConfig
from client.private_round import SitePrivacy, private_round
from client.site import SiteData, privacy_units
from client.run_config import RunConfig
from models.registry import build_model
from models.tasks import TASKS, get_task
from privacy.ledger import verify_chain

def task_clips(task: str, n: int = 40) -> ClipSet:
    """Random clips (4 frames, 16 px); for `detect`, one or two boxes per clip."""
    rng = np.random.default_rng(0)
    clips, labels = rng.integers(0, 255, (n, 4, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, n)
    if task != "detect":
        return ClipSet(clips, labels)
    boxes = []
    for _ in range(n):
        corners = rng.uniform(0, 10, (rng.integers(1, 3), 2))
        boxes.append(np.column_stack([rng.integers(0, 3, len(corners)), corners, corners + 5]).astype(np.float32))
    return DetectionClipSet(clips, np.zeros(n, np.int64), boxes=boxes, num_classes=3)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_trains_a_charged_dp_round_and_reports_its_metrics(tmp_path, task):
    config = RunConfig(task=task, model_size="tiny", clip_frames=4, frame_size=16, batch_size=8, local_epochs=1,
                       num_server_rounds=2, target_epsilon=4.0, delta=1e-3)
    model = build_model(config.model_spec(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    site = SitePrivacy("site-x", tmp_path, NodeConfig(data_dir="unused", epsilon_budget=8.0, delta=1e-3))
    data = task_clips(task)
    data.sources = [f"video-{i // 2}" for i in range(len(data))]  # two clips per video
    units = privacy_units(data, "video", {s: s for s in data.sources})

    outcome = private_round(model, SiteData(("a", "b", "c"), data, units, None, []), config, site, "run-1", 1,
                            torch.device("cpu"))

    assert outcome.trained and not outcome.refused and 0 < outcome.record["epsilon_cumulative"] <= 4.0
    assert outcome.record["noise_multiplier"] > 0 and outcome.record["unit"] == "video"
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert verify_chain(tmp_path / "ledger.jsonl").ok
    metrics = get_task(task).evaluate(model, data, torch.device("cpu"))
    expected = {"loss", TASKS[task].headline} | ({TASKS[task].baseline} if TASKS[task].baseline else set())
    assert expected <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())


def test_a_model_that_is_not_the_tasks_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="model = 'cnn-transformer' is not a detect model"):
        RunConfig.from_mapping({"task": "detect", "model": "cnn-transformer"})
    with pytest.raises(ValueError, match="task = 'segment'"):
        RunConfig.from_mapping({"task": "segment"})
