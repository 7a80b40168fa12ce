"""Starting from public weights: the published video ResNets' layout, `init-from`, `trainable-layers`,
and `fedvid pretrain` on the built-in public data."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

from client.run_config import RunConfig
from client.synth import CLASSES
from client.boxes import scan_detection_folder
from client.synth_detect import DETECTION_CLASSES
from client.synth_public import (PUBLIC_CLASSES, PUBLIC_DETECTION_CLASSES, _path, _stripes, render_public_detection_video,
                                 write_public_dataset, write_public_detection_dataset)
from models.pretrained import freeze_except, load_initial_weights, pretrain
from models.registry import ModelSpec, build_model, class_dependent_keys
from models.video_resnet import VideoResNet18
from privacy.dp_training import SiteRandomness, make_private


# torchvision.models.video's published weights: num_params of R3D_18_Weights / R2Plus1D_18_Weights.
@pytest.mark.parametrize("factorised, published", [(False, 33_371_472), (True, 31_505_325)])
def test_the_full_width_network_is_torchvisions(factorised, published):
    model = VideoResNet18(400, factorised)
    assert sum(p.numel() for p in model.parameters()) == published
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["fc.weight"] == (400, 512)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1, 1)
    if factorised:  # R(2+1)D: a 45-wide spatial stem, then 1x3x3 / 3x1x1 pairs
        assert shapes["stem.0.weight"] == (45, 3, 1, 7, 7) and shapes["stem.3.weight"] == (64, 45, 3, 1, 1)
        assert shapes["layer1.0.conv1.0.0.weight"] == (144, 64, 1, 3, 3)
        assert shapes["layer1.0.conv1.0.3.weight"] == (64, 144, 3, 1, 1)
        assert shapes["layer1.0.conv2.0.0.weight"] == (144, 64, 1, 3, 3)
    else:
        assert shapes["stem.0.weight"] == (64, 3, 3, 7, 7)
        assert shapes["layer1.0.conv1.0.weight"] == (64, 64, 3, 3, 3)


@pytest.mark.parametrize("name, factorised", [("r3d-18", False), ("r2plus1d-18", True)])
def test_a_checkpoint_in_the_published_layout_loads_into_the_dp_model(tmp_path, name, factorised):
    """BatchNorm checkpoint (as torchvision saves it) -> GroupNorm model of 6 classes."""
    torch.manual_seed(0)
    published = VideoResNet18(400, factorised, width=0.125)
    with torch.no_grad():
        for p in published.parameters():
            p.add_(torch.randn_like(p))  # nothing left at its initial value
        published(torch.rand(2, 3, 4, 32, 32))  # BatchNorm running statistics, as in a real file
    path = tmp_path / "kinetics.pth"
    torch.save(published.state_dict(), path)

    model = build_model(ModelSpec("classify", name, "tiny", 6, 4, 32))
    report = load_initial_weights(model, path)
    assert report.reinitialised == ["fc.bias", "fc.weight"]  # 400 classes there, 6 here
    assert report.dropped and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")
                                  for k in report.dropped)
    mine, theirs = model.state_dict(), published.state_dict()
    assert isinstance(model.stem[1], torch.nn.GroupNorm)
    for key in ("stem.0.weight", "stem.1.weight", "stem.1.bias", "layer4.1.conv2.0.weight" if not factorised
                else "layer4.1.conv2.0.3.weight"):
        assert torch.equal(mine[key], theirs[key]), key
    assert model(torch.rand(2, 3, 4, 32, 32)).shape == (2, 6)


def test_weights_of_another_architecture_or_an_unsafe_file_are_refused(tmp_path):
    model = build_model(ModelSpec("classify", "cnn3d", "small", 6, 8, 32))
    other = tmp_path / "other.pt"
    torch.save(build_model(ModelSpec("classify", "r3d-18", "tiny", 6, 8, 32)).state_dict(), other)
    with pytest.raises(ValueError, match="another architecture"):
        load_initial_weights(model, other)
    code = tmp_path / "code.pt"
    code.write_bytes(pickle.dumps(copy.deepcopy))  # a pickle that names a function, not tensors
    with pytest.raises(ValueError, match="init-from"):
        load_initial_weights(model, code)
    with pytest.raises(FileNotFoundError, match="init-from"):
        load_initial_weights(model, tmp_path / "missing.pt")


def test_the_head_stays_fresh_when_the_file_was_trained_on_other_classes(tmp_path):
    spec = ModelSpec("classify", "cnn3d", "tiny", 6, 8, 32)
    torch.manual_seed(1)
    source = build_model(spec)
    path = tmp_path / "public.pt"
    torch.save({"state_dict": source.state_dict(), "classes": list(PUBLIC_CLASSES)}, path)
    torch.manual_seed(2)
    model = build_model(spec)
    fresh_head = model.head.weight.clone()
    report = load_initial_weights(model, path, CLASSES, class_dependent_keys(spec))
    assert report.reinitialised == ["head.bias", "head.weight"]
    assert torch.equal(model.head.weight, fresh_head) and torch.equal(model.body[0].weight, source.body[0].weight)
    load_initial_weights(model, path, PUBLIC_CLASSES, class_dependent_keys(spec))  # the same classes: all of it
    assert torch.equal(model.head.weight, source.head.weight)


def test_only_the_trainable_layers_change_under_dp_sgd():
    torch.manual_seed(0)
    model = build_model(ModelSpec("classify", "r3d-18", "tiny", 3, 4, 16))
    with pytest.raises(ValueError, match="trainable-layers.*'layer9'"):
        freeze_except(model, "layer9")
    kept = freeze_except(model, "layer4, fc")
    assert kept == sum(p.numel() for n, p in model.named_parameters() if n.startswith(("layer4.", "fc.")))
    before = copy.deepcopy(model.state_dict())
    clips, labels = torch.rand(8, 3, 4, 16, 16), torch.randint(0, 3, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(clips, labels), batch_size=4)
    randomness = SiteRandomness.for_site(torch.device("cpu"), 0)
    dp_model, optimizer, loader = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, 1.0, 1.0,
                                               "hooks", poisson_sampling=False, noise_generator=randomness.noise)
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(dp_model(x), y).backward()
        optimizer.step()
    dp_model.remove_hooks()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("layer4.", "fc.")) for k in changed)


def test_trainable_layers_take_patterns_of_parameter_names():
    model = build_model(ModelSpec("generate", "cnn3d", "small", 6, 8, 16))
    with pytest.raises(ValueError, match="trainable-layers.*'\\*.bn\\*'"):
        freeze_except(model, "*.bn*")
    kept = freeze_except(model, "film, *.norm*")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"film.weight"} | {n for n, _ in model.named_parameters() if ".norm" in n}
    assert kept == sum(p.numel() for n, p in model.named_parameters() if n in trained)
    assert any(n.startswith("up.") for n in trained) and not any(".conv" in n for n in trained)


def test_public_data_is_disjoint_from_the_sites_labels_and_moves_as_labelled():
    assert not set(PUBLIC_CLASSES) & set(CLASSES)
    for label, name in enumerate(PUBLIC_CLASSES):
        path = _path(label, np.random.default_rng(label))
        if name.startswith("drift"):
            dx, dy = path[-1] - path[0]
            assert (dx > 0) == name.endswith("right") and (dy < 0) == ("-up-" in name), name
        else:  # orbits: the signed area swept (image y points down) says the direction
            centred = path - path.mean(axis=0)
            turn = np.sum(centred[:-1, 0] * centred[1:, 1] - centred[:-1, 1] * centred[1:, 0])
            assert (turn < 0) == (name == "orbit-ccw"), name


def test_pretrain_writes_a_file_a_federation_starts_from(tmp_path):
    data = write_public_dataset(tmp_path / "public", videos_per_class=3)
    config = RunConfig.from_mapping({"model-size": "tiny", "frame-size": 24, "clip-frames": 4})
    result = pretrain(config, tmp_path / "pre.pt", data, epochs=2)
    assert result["classes"] == sorted(PUBLIC_CLASSES) and len(result["history"]) == 2
    assert 0 <= result["history"][-1]["held-out-accuracy"] <= 1
    spec = config.model_spec(len(CLASSES))
    model = build_model(spec)
    report = load_initial_weights(model, tmp_path / "pre.pt", CLASSES, class_dependent_keys(spec))
    assert report.reinitialised == ["head.bias", "head.weight"] and report.loaded_fraction > 0.9


def test_pretrain_keeps_the_epoch_that_did_best_on_held_out_public_data(tmp_path, monkeypatch):
    import dataclasses
    import models.tasks

    scores, seen = iter([0.3, 0.8, 0.5]), []

    def scripted(model, clipset, device):  # held-out accuracy 0.3, 0.8, 0.5 after epochs 1, 2, 3
        seen.append(copy.deepcopy(model.state_dict()))
        return {"loss": 1.0, "accuracy": next(scores)}

    monkeypatch.setitem(models.tasks.TASKS, "classify", dataclasses.replace(models.tasks.TASKS["classify"], evaluate=scripted))
    data = write_public_dataset(tmp_path / "public", videos_per_class=3)
    config = RunConfig.from_mapping({"model-size": "tiny", "frame-size": 24, "clip-frames": 4})
    result = pretrain(config, tmp_path / "pre.pt", data, epochs=3)
    assert result["chosen-epoch"] == 2 and result["held-out-accuracy"] == 0.8
    saved = torch.load(tmp_path / "pre.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], seen[1][k].cpu()) for k in saved)
    assert not all(torch.equal(saved[k], seen[2][k].cpu()) for k in saved)  # not the last epoch's
    with pytest.raises(ValueError, match="epochs"):
        pretrain(config, tmp_path / "none.pt", data, epochs=0)


def test_public_detection_data_is_disjoint_from_the_sites_and_its_boxes_are_tight():
    assert not set(PUBLIC_DETECTION_CLASSES) & set(DETECTION_CLASSES)
    checked = 0
    for seed in range(8):
        frames, lines = render_public_detection_video(np.random.default_rng(seed))
        background = np.clip(_stripes(np.random.default_rng(seed)), 0, 255).astype(np.uint8)  # its first draw
        boxes: dict[int, list[tuple[float, ...]]] = {}
        for line in lines:
            frame, _, x, y, w, h, _, kind, _ = line.split(",")
            assert 1 <= int(kind) <= len(PUBLIC_DETECTION_CLASSES)
            boxes.setdefault(int(frame), []).append((float(x), float(y), float(x) + float(w), float(y) + float(h)))
        for t, frame in enumerate(frames):
            rows, cols = np.nonzero(np.any(frame != background, axis=2))
            inside = np.zeros(len(rows), bool)
            for x1, y1, x2, y2 in boxes.get(t + 1, []):  # every drawn pixel lies in a box of its frame
                inside |= (cols + 1 > x1) & (cols < x2) & (rows + 1 > y1) & (rows < y2)
            assert inside.all(), (seed, t)
            if len(boxes.get(t + 1, [])) == 1 and len(rows):  # one object: its box is its pixels' box
                x1, y1, x2, y2 = boxes[t + 1][0]
                if 0 <= x1 and 0 <= y1 and x2 <= frame.shape[1] and y2 <= frame.shape[0]:
                    assert abs(cols.min() - x1) < 1 and abs(cols.max() + 1 - x2) < 1
                    assert abs(rows.min() - y1) < 1 and abs(rows.max() + 1 - y2) < 1
                    checked += 1
    assert checked > 20


def test_pretrain_detect_on_the_public_detection_set_starts_a_sites_detector(tmp_path):
    data = write_public_detection_dataset(tmp_path / "public", videos=6)
    assert scan_detection_folder(data, PUBLIC_DETECTION_CLASSES)[0] == PUBLIC_DETECTION_CLASSES
    config = RunConfig.from_mapping({"task": "detect", "model-size": "tiny", "frame-size": 32, "clip-frames": 4})
    result = pretrain(config, tmp_path / "pre.pt", data, epochs=1)
    assert result["classes"] == list(PUBLIC_DETECTION_CLASSES) and 0 <= result["history"][-1]["held-out-map50"] <= 1
    spec = config.model_spec(len(DETECTION_CLASSES))
    report = load_initial_weights(build_model(spec), tmp_path / "pre.pt", DETECTION_CLASSES, class_dependent_keys(spec))
    assert report.reinitialised == ["heatmap.1.bias", "heatmap.1.weight"] and report.loaded_fraction > 0.9


def test_privacy_utility_pretrains_at_the_pretraining_rate_not_the_dp_recipes(tmp_path, monkeypatch):
    import client.train
    from simulations.privacy_utility import pretrain_config

    rates, make_optimizer = [], client.train.make_optimizer
    monkeypatch.setattr(client.train, "make_optimizer", lambda model, lr: rates.append(lr) or make_optimizer(model, lr))
    config = pretrain_config("classify", 'learning-rate=0.1 trainable-layers="head" model-size="tiny" frame-size=24 clip-frames=4')
    pretrain(config, tmp_path / "pre.pt", write_public_dataset(tmp_path / "public", videos_per_class=3), epochs=1)
    assert config.model_size == "tiny" and rates == [0.001]
