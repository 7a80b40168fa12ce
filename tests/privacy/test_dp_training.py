"""DP-SGD wrapper: per-sample clipping is real, steps are guarded, settings are checked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privacy.dp_training import (
    IncompatibleModelError,
    StepLimitExceeded,
    check_per_sample_clipping,
    clip_update,
    make_private,
    round_plan,
    steps_taken,
    validate_dp_settings,
)
from privacy.accounting import calibrate_noise, filter_epsilon

pytestmark = pytest.mark.filterwarnings("ignore")


class TinyVideoNet(nn.Module):
    """(B, 3, T, H, W) -> (B, K), the registry's interface, in a few thousand weights."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv3d(3, 6, (3, 3, 3), padding=1)
        self.norm = nn.GroupNorm(3, 6)
        self.conv2 = nn.Conv3d(6, 8, (1, 3, 3), stride=(1, 2, 2))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3, 4)))


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, 10, 10, generator=g), torch.randint(0, 4, (n,), generator=g)


def bruteforce_clipped_mean(model, x, y, c):
    """The obvious implementation: micro-batches of one, clip each gradient, average."""
    params = list(model.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    norms = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = [p.grad.double().clone() for p in params]
        norm = math.sqrt(sum(float((t**2).sum()) for t in g))
        norms.append(norm)
        factor = min(1.0, c / (norm + 1e-6))
        total = [a + t * factor for a, t in zip(total, g)]
    model.zero_grad()
    return [t / len(x) for t in total], norms


def rel_err(got, expected):
    num = math.sqrt(sum(float(((g.double() - e) ** 2).sum()) for g, e in zip(got, expected)))
    return num / math.sqrt(sum(float((e**2).sum()) for e in expected))


def one_step_grads(model, x, y, c, dp: bool, mode: str = "hooks"):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = nn.CrossEntropyLoss()
    if dp:
        loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
        wrapped = make_private(model, opt, loader, noise_multiplier=0.0, max_grad_norm=c,
                               grad_sample_mode=mode, poisson_sampling=False,
                               criterion=loss_fn if mode == "ghost" else None)
        model, opt = wrapped[0], wrapped[1]
        if mode == "ghost":
            loss_fn = wrapped[2]
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_dp_optimizer_gradient_equals_bruteforce_per_example_clipping(mode):
    torch.manual_seed(0)
    x, y = batch()
    ref = TinyVideoNet()
    expected, norms = bruteforce_clipped_mean(ref, x, y, c=1.0)
    c = float(np.median(norms))  # about half the examples get clipped
    expected, _ = bruteforce_clipped_mean(ref, x, y, c)

    dp_model = TinyVideoNet()
    dp_model.load_state_dict(ref.state_dict())
    assert rel_err(one_step_grads(dp_model, x, y, c, dp=True, mode=mode), expected) < 1e-4

    # The same check on a plain (non-DP) optimizer fails: the check can tell.
    plain = TinyVideoNet()
    plain.load_state_dict(ref.state_dict())
    assert rel_err(one_step_grads(plain, x, y, c, dp=False), expected) > 1e-2


def test_check_per_sample_clipping_helper_agrees():
    x, y = batch(6, seed=1)
    assert check_per_sample_clipping(TinyVideoNet, x, y, "hooks") < 1e-4


def test_ghost_mode_requires_the_wrapped_criterion():
    model = TinyVideoNet()
    x, y = batch()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="criterion"):
        make_private(model, opt, loader, 1.0, 1.0, grad_sample_mode="ghost")


def test_incompatible_model_error_lists_the_layers():
    model = nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(*batch()), batch_size=4)
    with pytest.raises(IncompatibleModelError, match=r"1 \(BatchNorm3d\)"):
        make_private(model, opt, loader, 1.0, 1.0)


def test_steps_beyond_the_charge_are_refused_before_touching_the_model():
    torch.manual_seed(0)
    x, y = batch(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    q, steps = round_plan(loader, epochs=2)
    assert (q, steps) == (0.25, 8)
    model = TinyVideoNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_model, dp_opt, dp_loader = make_private(model, opt, loader, 1.0, 1.0, max_steps=steps)
    assert len(dp_loader) == round(1 / q)  # Poisson: 1/q batches per epoch, random sizes
    for _ in range(2):
        for xb, yb in dp_loader:
            dp_opt.zero_grad()
            nn.functional.cross_entropy(dp_model(xb), yb).backward()
            dp_opt.step()
    assert steps_taken(dp_opt) == steps
    before = [p.detach().clone() for p in dp_model.parameters()]
    dp_opt.zero_grad()
    nn.functional.cross_entropy(dp_model(x[:4]), y[:4]).backward()
    with pytest.raises(StepLimitExceeded):
        dp_opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, dp_model.parameters()))
    assert steps_taken(dp_opt) == steps


def test_calibrated_noise_meets_the_target_over_the_whole_plan():
    q, rounds, epochs = 0.05, 4, 2
    steps = rounds * epochs * round(1 / q)
    sigma = calibrate_noise(4.0, 1e-5, q, steps)
    eps = filter_epsilon([(sigma, q, steps)], 1e-5)  # the enforced (RDP) figure
    assert 3.9 <= eps <= 4.0


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(noise_multiplier=0.0), "noise-multiplier"),
        (dict(noise_multiplier=-1.0), "noise-multiplier"),
        (dict(max_grad_norm=0.0), "max-grad-norm"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1e-3), "delta"),  # >= 1/N for N = 1000
        (dict(target_epsilon=0.0), "target-epsilon"),
        (dict(target_epsilon=float("nan")), "target-epsilon"),
        (dict(update_clip_norm=-0.1), "update-clip-norm"),
        (dict(server_noise_multiplier=0.0), "server-noise-multiplier"),
        (dict(noise_multiplier=None, target_epsilon=None), "noise-multiplier or target-epsilon"),
    ],
)
def test_bad_dp_settings_are_refused_naming_the_key(kwargs, key):
    good = dict(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, target_epsilon=8.0,
                dataset_size=1000)
    validate_dp_settings(**good)  # the good settings pass
    with pytest.raises(ValueError, match=key):
        validate_dp_settings(**dict(good, **kwargs))


def _update_norm(new, old):
    return math.sqrt(sum(float(np.sum((n.astype(np.float64) - o.astype(np.float64)) ** 2))
                         for n, o in zip(new, old)))


def test_clip_update_never_exceeds_the_clip_norm():
    rng = np.random.default_rng(0)
    for trial in range(300):
        dtype = np.float32 if trial % 2 else np.float64
        shapes = [tuple(rng.integers(1, 6, size=rng.integers(1, 4))) for _ in
                  range(rng.integers(1, 5))]
        param_scale = 10.0 ** rng.uniform(-3, 3)
        update_scale = 10.0 ** rng.uniform(-4, 3)
        clip = float(10.0 ** rng.uniform(-3, 1))
        old = [(rng.standard_normal(s) * param_scale).astype(dtype) for s in shapes]
        new = [(o + rng.standard_normal(o.shape) * update_scale).astype(dtype) for o in old]
        out, norm = clip_update(new, old, clip)
        assert norm == pytest.approx(_update_norm(new, old), rel=1e-9)
        assert _update_norm(out, old) <= clip * (1 + 1e-9), (trial, dtype, clip)
        assert [a.shape for a in out] == [a.shape for a in old]
        assert all(a.dtype == dtype for a in out)
        if norm <= clip:
            assert all(np.array_equal(a, b) for a, b in zip(out, new))
        elif dtype == np.float64:  # clipped updates keep their direction and hit the norm
            assert _update_norm(out, old) == pytest.approx(clip, rel=1e-5)


def test_clip_update_refuses_bad_input():
    a = [np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match="update-clip-norm"):
        clip_update(a, a, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        clip_update([np.array([np.nan, 0, 0], np.float32)], a, 1.0)
    with pytest.raises(TypeError):
        clip_update([np.zeros(3, np.int64)], [np.zeros(3, np.int64)], 1.0)
    with pytest.raises(ValueError, match="shape"):
        clip_update([np.zeros(4, np.float32)], a, 1.0)
