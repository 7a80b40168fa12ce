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

A layer on a clip's 3 colour channels (the first) is the exception: the grouped kernel runs
3 channels a group at a quarter of its speed. Its per-sample gradients come instead from each
example's patches copied out a few examples at a time (so that they stay in the cache) and
one batched matrix product with the output gradient; the input is first split by phase
along its strided dimensions, so that every kernel offset is a window read with stride 1
(cnn3d classify, a whole DP step against a plain one, medians of 5 runs: one thread
1.54x -> 1.44x, two threads 1.67x -> 1.53x).

Importing this module registers `conv_grad_sample` for `nn.Conv2d` and `nn.Conv3d` in
Opacus's table (`GradSampleModule.GRAD_SAMPLERS`), so hooks mode uses it, and so does ghost
mode for convolutions (they have no norm sampler); functorch mode does not read that table.
It also registers `group_norm_grad_sample`, Opacus's GroupNorm sampler with one full-size
temporary instead of two (0.6-0.8 ms of a cnn3d step).
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

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn
from torch.utils.hooks import RemovableHandle


# A layer on a clip's colour channels gets its per-sample gradients from copied-out patches
# (`_unfolded_weight_grads`): the grouped kernel runs 3 channels per group at a quarter of its
# speed. Layers with 16 or more channels are faster grouped (cnn3d's second layer, batch 32,
# one thread: 7-10 ms grouped, 20-26 ms from patches).
UNFOLD_MAX_IN_CHANNELS = 4
# Patches of this many bytes at a time (4 of cnn3d's clips): whole DP steps with blocks of
# 1.5 / 3 / 6 MB measured 1.47 / 1.44 / 1.40x a plain step on one thread, 3 / 6 MB 1.48 /
# 1.47x on two (this CPU: 1 MB of L2 a core, 32 MB of L3).
UNFOLD_CHUNK_BYTES = 6 << 20


def _unfold_covers(layer: nn.Conv2d | nn.Conv3d) -> bool:
    """Whether the layer is one for `_unfolded_weight_grads`: few input channels, no groups,
    no dilation."""
    return (layer.in_channels <= UNFOLD_MAX_IN_CHANNELS and layer.groups == 1
            and all(d == 1 for d in layer.dilation))


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
    if layer.weight.requires_grad and _unfold_covers(layer):
        grads[layer.weight] = _unfolded_weight_grads(layer, x, backprops)
    elif layer.weight.requires_grad:
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


def _phase_planes(x: torch.Tensor, stride: tuple[int, ...], padding: tuple[int, ...],
                  sizes: list[int]) -> torch.Tensor:
    """The zero-padded input split by phase along each spatial dimension:
    planes[n, c, *phase, *q] = x[n, c, *(q * stride + phase - padding)] (zero outside x), with
    `sizes` q's per dimension. A strided convolution reads each plane with stride 1."""
    planes = x.new_zeros((*x.shape[:2], *stride, *sizes))
    for phase in itertools.product(*map(range, stride)):
        source, target = [], []
        for length, s, pad, ph, size in zip(x.shape[2:], stride, padding, phase, sizes):
            first = max(0, -(-(pad - ph) // s))  # the first q that lands inside x
            start = first * s + ph - pad
            count = min(size - first, len(range(start, length, s)))
            if count <= 0:
                break
            source.append(slice(start, start + (count - 1) * s + 1, s))
            target.append(slice(first, first + count))
        else:
            planes[(slice(None), slice(None), *phase, *target)] = x[(slice(None), slice(None), *source)]
    return planes


def _unfolded_weight_grads(layer: nn.Conv2d | nn.Conv3d, x: torch.Tensor,
                           backprops: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients (N, *weight.shape) of a convolution with few input channels:
    each example's patches (in_channels x kernel rows, one column per output position) copied
    out, a few examples at a time so that they stay in the cache, and one batched matrix product
    with the output gradient. The patches are copied from the input split by phase
    (`_phase_planes`), where every kernel offset is a shifted window read with stride 1."""
    n, channels = x.shape[:2]
    kernel, stride, positions = layer.kernel_size, layer.stride, backprops.shape[2:]
    planes = _phase_planes(x, stride, layer.padding,
                           [p + (k - 1) // s for p, k, s in zip(positions, kernel, stride)])
    window_strides = planes.stride()[2 + len(stride):]
    rows, columns = channels * math.prod(kernel), math.prod(positions)
    chunk = max(1, min(n, UNFOLD_CHUNK_BYTES // (rows * columns * x.element_size())))
    patches = x.new_empty((chunk, channels, *kernel, *positions))
    out_grads = backprops.reshape(n, layer.out_channels, columns)
    grads = x.new_empty((n, layer.out_channels, rows))
    phases = []  # (this phase's kernel offsets, its windows: (N, C_in, *taps, *positions))
    for phase in itertools.product(*(range(min(s, k)) for s, k in zip(stride, kernel))):
        offsets = (slice(None), slice(None), *(slice(ph, k, s) for ph, k, s in zip(phase, kernel, stride)))
        plane = planes[(slice(None), slice(None), *phase)]
        taps = patches[offsets].shape[2:2 + len(kernel)]
        phases.append((offsets, plane.as_strided(
            (n, channels, *taps, *positions),
            (*plane.stride()[:2], *window_strides, *window_strides), plane.storage_offset())))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = patches[: stop - start]
        for offsets, windows in phases:
            block[offsets] = windows[start:stop]
        block = block.view(stop - start, rows, columns)
        torch.bmm(out_grads[start:stop], block.transpose(1, 2), out=grads[start:stop])
    return grads.view(n, *layer.weight.shape)


@register_grad_sampler(nn.GroupNorm)
def group_norm_grad_sample(
    layer: nn.GroupNorm, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """{parameter: per-sample gradients} of a GroupNorm: Opacus's, with the normalised input
    multiplied by the output gradient in place and summed over positions (one full-size
    temporary instead of two, and no einsum)."""
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normalised = F.group_norm(activations[0].to(backprops.dtype), layer.num_groups, eps=layer.eps)
        grads[layer.weight] = normalised.mul_(backprops).flatten(2).sum(2)
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
