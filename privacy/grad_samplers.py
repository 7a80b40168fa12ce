"""Per-sample gradients of convolutions by one grouped convolution, for Opacus's hooks mode.

Opacus computes a convolution's per-sample weight gradients by unfolding its input
(im2col: every kernel position of every input channel copied out, 27 times the input for a
3x3x3 kernel) and an einsum. The same gradients come from the convolution's own weight-gradient
kernel when the batch is folded into the channels and each sample made its own group
(Rochette et al. 2019): input (1, N*C_in, ...), output gradient (1, N*C_out, ...), groups
N times the layer's, so sample n's output channels only see sample n's input channels and the
weight gradient of group n is sample n's. No unfolded copy is made: on one CPU thread it is 2-5 times faster per
layer than Opacus's for cnn3d's convolutions, and a whole DP step of cnn3d in hooks mode
falls from 2.7-2.9x a plain step to 1.75x (`python -m simulations.bench_dp_step`).

Importing this module registers `conv_grad_sample` for `nn.Conv2d` and `nn.Conv3d` in
Opacus's table (`GradSampleModule.GRAD_SAMPLERS`), so hooks mode uses it, and so does ghost
mode for convolutions (they have no norm sampler); functorch mode does not read that table.
Layers it does not cover (a string padding such as "same", a padding mode other than zeros,
an empty batch) go to Opacus's own grad sampler.
`tests/privacy/test_grad_samplers.py` checks it against Opacus's and against one backward
pass per example.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn


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
