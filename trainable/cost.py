"""What a model costs to train and run, from its config alone: FLOPs counted by torch's
FlopCounterMode on the meta device (no memory, no weights, a second or two)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from deeplab_sweep.trainable.models import build_from_config

# Measured (benchmarks/README.md, 2026-11-27): DeepLabv3+ ResNet-50 OS 16 at crop 513 trains at
# ~340 img/s in bf16 on one H100, at 373 GFLOP per image forward + backward: ~127 TFLOP/s.
H100_TRAIN_FLOPS_PER_S = 340 * 373e9


def flops_per_image(model_cfg, num_classes: int, crop: int, train: bool) -> float:
    """FLOPs of one crop x crop image: the forward, plus the backward when `train`."""
    cfg = model_cfg.model_copy(update={"pretrained_backbone": False})
    with torch.device("meta"):
        model = build_from_config(cfg, num_classes)
        x = torch.empty(2, 3, crop, crop)  # two: BatchNorm in training mode needs more than one
        counter = FlopCounterMode(display=False)
        with counter:
            out = model.train(train)(x)
            if train:
                F.cross_entropy(out, torch.zeros(2, crop, crop, dtype=torch.long)).backward()
    return counter.get_total_flops() / 2
