"""Shared fixtures for the export and predict tests: a tiny synthetic dataset, a finished
run directory holding a briefly trained `tiny` teacher, and a small transfer folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from client.dataset import load_clips
from client.run_config import RunConfig
from client.site import cache_dir, clip_spec, federation_split, site_anonymizer
from client.synth import write_synthetic_dataset
from client.dataset import clips_to_tensor
from models.registry import build_model
from server.run_dir import save_model

FRAME_SIZE = 32  # small frames keep every test fast


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """Six videos per class of the built-in generator (deterministic)."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", seed=0, videos_per_class=6)


@pytest.fixture(scope="session")
def transfer_folder(tmp_path_factory) -> Path:
    """A small folder-per-class transfer set from another seed: no video shared with the run."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("transfer") / "data", seed=7, videos_per_class=2)


def make_run_dir(path: Path, data_dir: Path, model: str = "cnn-transformer", size: str = "tiny", steps: int = 30) -> Path:
    """A finished run directory like RunDirectory leaves, its model trained centrally for
    `steps` Adam steps on the run's shared (non-test) videos."""
    values = {**RunConfig().to_mapping(), "model": model, "model-size": size, "data-dir": str(data_dir),
              "frame-size": FRAME_SIZE, "run-dir": str(path)}
    config = RunConfig.from_mapping(values)
    classes, shared, _ = federation_split(config)
    clips = load_clips(shared, clip_spec(config), site_anonymizer(), cache_dir())
    spec = config.model_spec(len(classes))
    torch.manual_seed(0)
    net = build_model(spec)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    inputs, labels = clips_to_tensor(clips.clips), torch.from_numpy(clips.labels)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(len(labels), (16,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(net(inputs[batch]), labels[batch]).backward()
        optimizer.step()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(
        {"run-config": config.to_mapping(), "classes": list(classes), "model": spec.__dict__}
    ))
    save_model(path / "model.pt", net.state_dict(), spec, classes)
    (path / "status.json").write_text(json.dumps({"status": "completed"}))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synth_data) -> Path:
    """A finished run of a `cnn-transformer` `tiny` model on the tiny synthetic dataset."""
    return make_run_dir(tmp_path_factory.mktemp("run") / "run", synth_data)
