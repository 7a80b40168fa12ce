"""Multi-clip DP-SGD: one clipped gradient per privacy unit, checked against the obvious way.

The brute force: for each unit, the gradient of the mean loss of its clips (one backward per
unit), clipped to C, summed over units, divided by the expected batch size. The DP optimizer
must give the same gradient with noise 0, including when clips-per-unit equals the batch size
(where folding clips into the batch and clipping per clip would go unnoticed by shape checks).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp_training import (
    SiteRandomness,
    UnitDataset,
    collate_units,
    make_private,
    pool_grad_samples,
    unit_loader,
)

pytestmark = pytest.mark.filterwarnings("ignore")


class TinyVideoNet(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, (3, 3, 3), padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3, 4)))


def loss_fn(model, clips, labels):
    return nn.functional.cross_entropy(model(clips), labels)


def bruteforce(model, units, c, expected_batch):
    """Sum over units of clip(grad of the unit's mean clip loss), over the expected batch size."""
    params = list(model.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for clips, labels in units:
        model.zero_grad()
        loss_fn(model, clips, labels).backward()
        grads = [p.grad.double().clone() for p in params]
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
        factor = min(1.0, c / (norm + 1e-6))
        total = [t + g * factor for t, g in zip(total, grads)]
    return [t / expected_batch for t in total]


@pytest.mark.parametrize("grad_sample_mode", ["functorch", "hooks"])
@pytest.mark.parametrize("clips_per_unit,units", [(3, 3), (1, 4), (2, 5), (4, 2)])
def test_the_dp_gradient_is_the_clipped_mean_of_per_unit_gradients(grad_sample_mode, clips_per_unit, units):
    torch.manual_seed(0)
    reference = TinyVideoNet()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    batch = [(torch.rand(clips_per_unit, 3, 4, 8, 8), torch.randint(0, 3, (clips_per_unit,))) for _ in range(units)]
    # The median per-unit norm as the clipping norm: about half the units are clipped.
    norms = []
    for clips, labels in batch:
        reference.zero_grad()
        loss_fn(reference, clips, labels).backward()
        norms.append(math.sqrt(sum(float((p.grad ** 2).sum()) for p in reference.parameters())))
    c = sorted(norms)[len(norms) // 2]
    expected = bruteforce(reference, batch, c, units)

    model = TinyVideoNet()
    model.load_state_dict(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    one_batch = DataLoader(TensorDataset(torch.zeros(units)), batch_size=units)  # expected batch = units
    dp_model, dp_optimizer, _ = make_private(model, optimizer, one_batch, 0.0, c, grad_sample_mode,
                                             poisson_sampling=False)
    batch = collate_units([list(zip(x, y)) for x, y in batch])
    unit_index, (clips, labels) = batch.unit_index, batch.fields
    dp_optimizer.zero_grad()
    loss_fn(dp_model, clips, labels).backward()
    pool_grad_samples(dp_model, unit_index)
    dp_optimizer.step()
    got = [p.grad.double() for p in dp_model.parameters()]
    error = math.sqrt(sum(float(((g - e) ** 2).sum()) for g, e in zip(got, expected)))
    scale = math.sqrt(sum(float((e ** 2).sum()) for e in expected))
    assert error / scale < 1e-4


@pytest.mark.parametrize("pooled", [True, False])
def test_one_unit_moves_the_model_by_at_most_the_clipping_norm_only_when_its_clips_are_pooled(pooled):
    """The trap pooling closes: clipped one by one, a unit of 3 clips moves the model up to 3C."""
    torch.manual_seed(0)
    model = TinyVideoNet()
    c = 0.01  # far below every clip's gradient norm: everything is clipped
    one_unit = DataLoader(TensorDataset(torch.zeros(1)), batch_size=1)
    dp_model, dp_optimizer, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0), one_unit, 0.0, c,
                                             "functorch", poisson_sampling=False)
    labels = torch.tensor([0, 0, 0])
    batch = collate_units([list(zip(torch.rand(3, 3, 4, 8, 8), labels))])
    unit_index, (clips, labels) = batch.unit_index, batch.fields
    loss_fn(dp_model, clips, labels).backward()
    if pooled:
        pool_grad_samples(dp_model, unit_index)
    dp_optimizer.step()
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in dp_model.parameters()))
    if pooled:
        assert norm <= c * (1 + 1e-4)
    else:
        assert norm > 2 * c


def test_units_are_poisson_sampled_and_their_clips_drawn_afresh_from_the_site_generator():
    examples = TensorDataset(torch.arange(40.0).view(40, 1), torch.zeros(40, dtype=torch.long))
    units = [list(range(i, i + 4)) for i in range(0, 40, 4)]  # 10 units of 4 clips
    randomness = SiteRandomness.for_site(torch.device("cpu"))
    dataset = UnitDataset(examples, units, clips_per_unit=2, generator=randomness.sampling)
    loader = unit_loader(dataset, batch_size=5, generator=randomness.sampling)
    assert len(loader) == 2  # q = 1/2
    drawn = []
    for batch in loader:
        if not batch.fields:
            continue
        unit_index, (values, _) = batch.unit_index, batch.fields
        assert len(values) == 2 * (int(unit_index.max()) + 1 if len(unit_index) else 0)
        for u in unit_index.unique():
            rows = values[unit_index == u].view(-1).long()
            assert len({int(r) // 4 for r in rows}) == 1  # both clips of a row group come from one unit
        drawn.append(values.view(-1).tolist())
    draws = {tuple(sorted(dataset[0][i][0].item() for i in range(2))) for _ in range(30)}
    assert len(draws) > 1  # drawn afresh


def test_seeded_randomness_replays_and_os_entropy_does_not():
    a, b = SiteRandomness.for_site(torch.device("cpu"), seed=7), SiteRandomness.for_site(torch.device("cpu"), seed=7)
    assert torch.equal(torch.randn(5, generator=a.noise), torch.randn(5, generator=b.noise))
    assert a.kind == "seeded"
    c, d = SiteRandomness.for_site(torch.device("cpu")), SiteRandomness.for_site(torch.device("cpu"))
    assert c.kind == "os-entropy"
    assert not torch.equal(torch.randn(5, generator=c.noise), torch.randn(5, generator=d.noise))


def test_a_step_that_samples_no_unit_still_adds_the_noise_and_counts(monkeypatch):
    """Poisson sampling at q = 1/2 over 2 units is often empty: a noise-only step, never a skipped one."""
    torch.manual_seed(0)
    examples = TensorDataset(torch.rand(4, 3, 4, 8, 8), torch.randint(0, 3, (4,)))
    randomness = SiteRandomness.for_site(torch.device("cpu"), seed=3)
    loader = unit_loader(UnitDataset(examples, [[0, 1], [2, 3]], 2, randomness.sampling), 1, randomness.sampling)
    model = TinyVideoNet()
    dp_model, dp_optimizer, loader = make_private(model, torch.optim.SGD(model.parameters(), lr=1.0), loader, 1.0,
                                                  1.0, "functorch", poisson_sampling=False, max_steps=41,
                                                  noise_generator=randomness.noise)
    import privacy.dp_training as dp_training

    empty = []
    no_rows = dp_training._no_rows
    monkeypatch.setattr(dp_training, "_no_rows", lambda *a: (empty.append(1), no_rows(*a)))
    dp_training.train_units(dp_model, loader, dp_optimizer, 20, torch.device("cpu"), loss_fn)
    assert dp_training.steps_taken(dp_optimizer) == 40  # every step, empty or not
    assert 0 < len(empty) < 40  # each step is empty with probability 1/4
    before = [p.detach().clone() for p in dp_model.parameters()]
    dp_optimizer.zero_grad()
    no_rows(dp_model)
    dp_optimizer.step()  # the 41st charged step: noise only
    assert all(not torch.equal(a, p) for a, p in zip(before, dp_model.parameters()))


def test_a_first_batch_that_samples_no_unit_is_a_noise_only_step():
    """The first batch empty: Opacus's own loader crashed here (its empty-batch template comes from
    the dataset's first item); the site's loader hands the step an empty batch instead."""
    examples = TensorDataset(torch.rand(2, 3, 4, 8, 8), torch.randint(0, 3, (2,)))
    for seed in range(40):
        randomness = SiteRandomness.for_site(torch.device("cpu"), seed=seed)
        batches = list(unit_loader(UnitDataset(examples, [[0], [1]], 1, randomness.sampling), 1, randomness.sampling))
        assert len(batches) == 2
        if batches[0].units == 0:
            return
    pytest.fail("no seed drew an empty first batch (probability 1/4 each)")
