"""Per-sample gradients of convolutions by one grouped convolution, for Opacus's hooks mode,
and a DP step that skips the convolutions' batch weight gradients, which it does not use.

Opacus computes a convolution's per-sample weight gradients by unfolding its input
(im2col: every kernel position of every input channel copied out, 27 times the input for a
3x3x3 kernel) and an einsum. The same gradients come from the convolution's own weight-gradient
kernel when the batch is folded into the channels and each sample made its own group
(Rochette et al. 2019): input (1, N*C_in, ...), output gradient (1, N*C_out, ...), groups
N times the layer's, so sample n's output channels only see sample n's input channels and the
weight gradient of group n is sample n's. No unfolded copy is made: on one CPU thread it is
2-5 times faster per layer than Opacus's for cnn3d's convolutions, and a whole DP step of
cnn3d in hooks mode fell from 2.7-2.9x a plain step to 1.75x (`python -m
simulations.bench_dp_step`).

Importing this module registers `conv_grad_sample` for `nn.Conv2d` and `nn.Conv3d` in
Opacus's table (`GradSampleModule.GRAD_SAMPLERS`), so hooks mode uses it, and so does ghost
mode for convolutions (they have no norm sampler); functorch mode does not read that table.
Layers it does not cover (a string padding such as "same", a padding mode other than zeros,
an empty batch) go to Opacus's own grad sampler.

Under DP-SGD the batch's own weight gradient of a convolution is never used: the optimizer
replaces it with the sum of the clipped per-sample gradients. `skip_batch_weight_gradients`
makes the convolutions it covers compute only their input's gradient in the backward pass
(cnn3d classify: 1.83x a plain step -> 1.53x in one run); `privacy.dp_training.make_private`
applies it in hooks mode, until the model's hooks are removed.

Opacus's hooks compute per-sample gradients of the summed loss: with a mean loss, every hook
first multiplies its layer's whole output gradient by the batch size. `sum_loss_gradients`
makes one multiplication of the model's output gradient (batch x classes) do for all of them
(cnn3d classify: 2-3 ms of a 86-94 ms DP step); `make_private` then has Opacus's hooks
take the gradients as they come and its optimizer still average the clipped sum.
`tests/privacy/test_grad_samplers.py` checks all this against Opacus's and against one
backward pass per example.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn
from torch.utils.hooks import RemovableHandle


def _grouped_covers(layer: nn.Conv2d | nn.Conv3d) -> bool:
    """Whether the layer's padding is an explicit, zero padding (what the grouped form reproduces)."""
    return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


@register_grad_sampler([nn.Conv2d, nn.Conv3d])
def conv_grad_sample(
    layer: nn.Conv2d | nn.Conv3d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """{parameter: per-sample gradients (N, *parameter.shape)} of one convolution."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if n == 0 or not _grouped_covers(layer):
        return compute_conv_grad_sample(layer, activations, backprops)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        folded_weight = layer.weight.new_empty((n * layer.weight.shape[0], *layer.weight.shape[1:]))
        _, weight_grad, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, -1, *backprops.shape[2:]),  # (1, N*C_out, ...)
            x.reshape(1, -1, *x.shape[2:]),  # (1, N*C_in, ...)
            folded_weight,  # its shape only: the weight's value does not enter its gradient
            None, layer.stride, layer.padding, layer.dilation,
            False, [0] * (x.dim() - 2), n * layer.groups, [False, True, False],
        )
        grads[layer.weight] = weight_grad.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.flatten(2).sum(2)
    return grads


def sum_loss_gradients(model: nn.Module) -> RemovableHandle:
    """Multiply the gradient that reaches `model`'s output by its number of rows, so that the
    layers' backward hooks see the gradient of the summed loss, not of its batch mean.
    ``remove()`` on the handle undoes it."""

    def scale(module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}: "
                            "per-sample gradients need a model with one output tensor")
        if output.requires_grad:
            rows = output.shape[0]  # an int: the hook must not keep the output alive
            output.register_hook(lambda grad: grad * rows)

    return model.register_forward_hook(scale)


class _InputGradientOnly(torch.autograd.Function):
    """A convolution whose backward pass gives its input's gradient and nothing for its weight
    and bias (whose per-sample gradients the grad sampler computes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        convolve = F.conv3d if x.dim() == 5 else F.conv2d
        return convolve(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:  # the clip itself: nothing to compute
            return (None,) * 7
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        grad_input, _, _ = torch.ops.aten.convolution_backward(
            grad_output, x, weight, None, stride, padding, dilation,
            False, [0] * (x.dim() - 2), groups, [True, False, False],
        )
        return (grad_input,) + (None,) * 6


class BatchWeightGradients:
    """The handle of `skip_batch_weight_gradients`: ``remove()`` restores the layers."""

    def __init__(self, layers: list[nn.Conv2d | nn.Conv3d]):
        self.layers = layers

    def remove(self) -> None:
        for layer in self.layers:
            del layer._conv_forward  # the instance attribute: the class's method shows again
        self.layers = []


def skip_batch_weight_gradients(model: nn.Module) -> BatchWeightGradients:
    """Make every convolution of `model` that `conv_grad_sample` covers skip its batch weight
    and bias gradients in the backward pass. Only for a model whose per-sample gradients
    replace them (Opacus's hooks mode): its parameters' ``.grad`` stays None after backward."""
    layers = [layer for layer in model.modules()  # exactly these types, as Opacus's table matches
              if type(layer) in (nn.Conv2d, nn.Conv3d) and _grouped_covers(layer)]
    for layer in layers:
        geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)
        layer._conv_forward = lambda x, weight, bias, geometry=geometry: _InputGradientOnly.apply(
            x, weight, bias, *geometry)
    return BatchWeightGradients(layers)
