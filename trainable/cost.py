"""What a model costs to train and run, from its config alone: FLOPs counted by torch's
FlopCounterMode on the meta device (no memory, no weights, a second or two)."""

from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deeplab_sweep.trainable.models import build_from_config

# Measured (benchmarks/README.md, 2026-11-27): DeepLabv3+ ResNet-50 OS 16 at crop 513 trains at
# ~340 img/s in bf16 on one H100, at 373 GFLOP per image forward + backward: ~127 TFLOP/s.
H100_TRAIN_FLOPS_PER_S = 340 * 373e9


def conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """A convolution's backward (aten.convolution_backward's arguments, tensors as shapes): each
    gradient asked for (input, weight) costs its forward's multiply-adds. torch's own formula
    (2.14) leaves out the groups in the weight's gradient and so counts a depthwise
    convolution's `groups` times over (MobileNetV2: 2-3x its real training FLOPs;
    pytorch/pytorch#183405 divides it by groups)."""
    _bias, _stride, _padding, _dilation, transposed, _output_padding, _groups, output_mask = args
    forward = 2 * x_shape[0] * prod((x_shape if transposed else grad_out_shape)[2:]) * prod(w_shape)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


# Normalisation layers: FlopCounterMode counts none of them, and on the meta device their
# kernels are Python decompositions (BatchNorm's took 60 % of a count's time, GroupNorm's as much).
NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def without_norms(module: nn.Module) -> nn.Module:
    """`module` with each normalisation layer an identity, in place: the count is the same,
    shapes and gradients flow the same, and the count takes less than half the time."""
    for name, child in module.named_children():
        if isinstance(child, NORMS):
            setattr(module, name, nn.Identity())
        else:
            without_norms(child)
    return module


def flops_per_image(model_cfg, num_classes: int, crop: int, train: bool) -> float:
    """FLOPs of one crop x crop image: the forward, plus the backward when `train`."""
    cfg = model_cfg.model_copy(update={"pretrained_backbone": False})
    with torch.device("meta"):
        model = without_norms(build_from_config(cfg, num_classes))
        x = torch.empty(2, 3, crop, crop)  # two: a normalisation in training mode may need more than one
        counter = FlopCounterMode(
            display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}
        )
        with counter:
            out = model.train(train)(x)
            if train:
                F.cross_entropy(out, torch.zeros(2, crop, crop, dtype=torch.long)).backward()
    return counter.get_total_flops() / 2
