"""The video classifiers: shapes, learning, and per-sample gradients Opacus can trust."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.registry import SIZES, ModelSpec, build_model
from privacy.dp_training import check_per_sample_clipping, incompatible_layers

NAMES = sorted(SIZES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_logits_shape(name, size):
    model = build_model(ModelSpec("classify", name, size, 5, 6, 32))
    assert model(torch.rand(3, 3, 6, 32, 32)).shape == (3, 5)


@pytest.mark.parametrize("name", NAMES)
def test_a_few_steps_reduce_the_loss_on_a_learnable_batch(name):
    torch.manual_seed(0)
    # 32 px: an 18-layer video ResNet has pooled 16 px down to one position before its last block
    model = build_model(ModelSpec("classify", name, "tiny", 2, 4, 32))
    x = torch.rand(8, 3, 4, 32, 32)
    y = torch.tensor([0, 1] * 4)
    x[y == 1, :, :, :16] += 0.5  # class 1: brighter top half
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(30):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert F.cross_entropy(model(x), y).item() < 0.5 * first


@pytest.mark.parametrize("name", NAMES)
def test_models_are_opacus_compatible(name):
    assert incompatible_layers(build_model(ModelSpec("classify", name, "small", 4, 8, 32))) == []


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_clipping_matches_brute_force(name, mode):
    # T == batch size is the case where folding time into the batch silently breaks clipping.
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 4, 16, 16), torch.tensor([0, 1, 2, 0])
    error = check_per_sample_clipping(lambda: build_model(ModelSpec("classify", name, "tiny", 3, 4, 16)), x, y, mode)
    # float32 through 18 layers: ~1e-4 (1e-5 for the small CNNs); clipping per batch is O(0.1-1)
    assert error < 1e-3
