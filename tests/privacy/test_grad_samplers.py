"""The grouped-convolution per-sample gradients against Opacus's unfold-and-einsum and against
one backward pass per example, and the DP step that skips the convolutions' batch weight
gradients: a wrong per-sample gradient is a wrong clip, so a wrong epsilon."""

import copy

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from torch import nn

from torch.utils.data import DataLoader, TensorDataset

from privacy.dp_training import check_per_sample_clipping, make_private
from privacy import grad_samplers
from privacy.grad_samplers import conv_grad_sample, group_norm_grad_sample

LAYERS = [
    lambda: nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1),
    lambda: nn.Conv3d(3, 4, (3, 5, 5), stride=(2, 1, 2), padding=(1, 2, 0), dilation=(1, 2, 1)),
    lambda: nn.Conv3d(6, 4, 3, padding=1),
    lambda: nn.Conv3d(4, 6, (1, 3, 3), stride=2, padding=(0, 1, 1), bias=False),
    lambda: nn.Conv3d(4, 6, 3, dilation=2, padding=2, groups=2),
    lambda: nn.Conv3d(6, 6, 2, groups=6),  # depthwise
    lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 8, (3, 5), dilation=(2, 1), padding=(1, 0), groups=4),
]


def per_sample_inputs(layer: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    spatial = (5, 9, 9) if isinstance(layer, nn.Conv3d) else (11, 11)
    x = torch.randn(n, layer.in_channels, *spatial)
    return x, torch.randn_like(layer(x))


@pytest.mark.parametrize("make_layer", LAYERS)
@pytest.mark.parametrize("n", [1, 5])
def test_matches_opacus_unfold_einsum(make_layer, n):
    torch.manual_seed(0)
    layer = make_layer()
    x, backprops = per_sample_inputs(layer, n)
    got = conv_grad_sample(layer, [x], backprops)
    expected = compute_conv_grad_sample(layer, [x], backprops)
    assert got.keys() == expected.keys()
    for p, g in got.items():
        assert g.shape == (n, *p.shape)
        torch.testing.assert_close(g, expected[p], rtol=1e-4, atol=1e-5)


CLIP_LAYERS = [  # on a clip's colour channels: the copied-out patches' way
    lambda: nn.Conv3d(3, 16, 3, stride=(1, 2, 2), padding=1),  # cnn3d's first layer
    lambda: nn.Conv3d(3, 8, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),  # R3D's stem
    lambda: nn.Conv3d(3, 4, (3, 5, 5), stride=(2, 1, 2), padding=(1, 2, 0)),
    lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1),
    lambda: nn.Conv2d(2, 4, 2, stride=3, padding=2),  # stride over the kernel, padding over it
]


@pytest.mark.parametrize("make_layer", CLIP_LAYERS)
def test_a_layer_on_few_channels_gets_its_gradients_from_copied_out_patches(make_layer, monkeypatch):
    """Several blocks of examples, the last one short, against Opacus's unfold-and-einsum."""
    torch.manual_seed(0)
    layer = make_layer()
    x, backprops = per_sample_inputs(layer, 7)
    per_example = x.element_size() * layer.weight[0].numel() * backprops[0, 0].numel()
    monkeypatch.setattr(grad_samplers, "UNFOLD_CHUNK_BYTES", 3 * per_example)  # blocks of 3, 3, 1
    taken = []
    unfolded = grad_samplers._unfolded_weight_grads
    monkeypatch.setattr(grad_samplers, "_unfolded_weight_grads",
                        lambda *args: taken.append(1) or unfolded(*args))
    got = conv_grad_sample(layer, [x], backprops)
    assert taken
    expected = compute_conv_grad_sample(layer, [x], backprops)
    for p, g in got.items():
        torch.testing.assert_close(g, expected[p], rtol=1e-4, atol=1e-5)


def test_a_layer_on_many_channels_stays_grouped(monkeypatch):
    monkeypatch.setattr(grad_samplers, "_unfolded_weight_grads", lambda *args: pytest.fail("unfolded"))
    layer = nn.Conv3d(16, 8, 3, stride=2, padding=1)
    x, backprops = per_sample_inputs(layer, 2)
    torch.testing.assert_close(conv_grad_sample(layer, [x], backprops)[layer.weight],
                               compute_conv_grad_sample(layer, [x], backprops)[layer.weight],
                               rtol=1e-4, atol=1e-5)


def test_a_frozen_weight_gets_no_per_sample_gradient():
    layer = nn.Conv3d(3, 4, 3, padding=1)
    layer.weight.requires_grad_(False)
    x, backprops = per_sample_inputs(layer, 3)
    got = conv_grad_sample(layer, [x], backprops)
    assert list(got) == [layer.bias]
    torch.testing.assert_close(got[layer.bias], backprops.sum((2, 3, 4)))


def test_hooks_mode_uses_it():
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv3d] is conv_grad_sample
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is conv_grad_sample
    assert GradSampleModule.GRAD_SAMPLERS[nn.GroupNorm] is group_norm_grad_sample


@pytest.mark.parametrize("shape, groups", [((5, 16, 3, 6, 6), 2), ((4, 6, 7, 7), 3), ((3, 8, 10), 8)])
@pytest.mark.parametrize("trained", ["both", "weight", "bias"])
def test_group_norm_matches_opacus(shape, groups, trained):
    torch.manual_seed(0)
    layer = nn.GroupNorm(groups, shape[1])
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.normal_()
    layer.weight.requires_grad_(trained != "bias")
    layer.bias.requires_grad_(trained != "weight")
    x = torch.randn(*shape) * 3 + 1
    backprops = torch.randn(*shape)
    got = group_norm_grad_sample(layer, [x], backprops)
    expected = compute_group_norm_grad_sample(layer, [x], backprops)
    assert got.keys() == expected.keys()
    for p, g in got.items():
        torch.testing.assert_close(g, expected[p], rtol=1e-5, atol=1e-5)


class ConvNet(nn.Module):
    """Strided, dilated, grouped and 'same'-padded convolutions (the last goes to Opacus's own)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(2, 8), nn.GELU(),
            nn.Conv3d(8, 8, 3, dilation=2, padding=2, groups=4), nn.GELU(),
            nn.Conv3d(8, 8, 3, padding="same"), nn.GELU(),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, clips):
        return self.head(self.body(clips).mean((2, 3, 4)))


def hostile_convnet() -> ConvNet:
    """The coordinator picks the weights: convolutions scaled up a hundredfold, so every
    example's gradient is huge and every example is clipped."""
    model = ConvNet()
    with torch.no_grad():
        for layer in model.body:
            if isinstance(layer, nn.Conv3d):
                layer.weight.mul_(100.0)
    return model


@pytest.mark.parametrize("factory", [ConvNet, hostile_convnet])
def test_dp_step_clips_each_example_as_one_backward_per_example_does(factory):
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 4, 12, 12), torch.randint(0, 4, (6,))
    assert check_per_sample_clipping(factory, x, y, "hooks") < 1e-4


def test_the_dp_step_skips_the_batch_weight_gradients_until_the_hooks_are_removed():
    """Hooks mode: the convolutions' batch gradients are not computed (the optimizer replaces
    them by the clipped per-sample ones), the input's gradient still flows to the first layer,
    and a model whose hooks are removed trains as a plain model again (its output gradient no
    longer scaled to the summed loss's)."""
    torch.manual_seed(0)
    model = ConvNet()
    twin = copy.deepcopy(model)
    first, grouped, same = model.body[0], model.body[3], model.body[5]
    x, y = torch.rand(4, 3, 4, 12, 12), torch.randint(0, 4, (4,))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    dp_model, optimizer, _ = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                          loader, 0.0, 1.0, poisson_sampling=False)
    nn.functional.cross_entropy(dp_model(x), y).backward()
    assert first.weight.grad is None and grouped.weight.grad is None  # skipped
    assert same.weight.grad is not None  # 'same' padding: not covered, left as it was
    assert first.weight.grad_sample.shape == (4, *first.weight.shape)  # fed by the input gradient
    assert first.weight.grad_sample.abs().sum() > 0
    dp_model.remove_hooks()
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    nn.functional.cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
