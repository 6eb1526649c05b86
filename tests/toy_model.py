"""A user's own model, as the reference's "construct your own model" promises: any importable
callable (num_classes, model config) -> module mapping N x 3 x H x W to N x C x H x W logits.
Used by the tests as `model.factory: tests.toy_model:build`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class TinyFCN(nn.Module):
    def __init__(self, num_classes: int, width: int, norm: str):
        super().__init__()
        layer = (lambda c: nn.GroupNorm(4, c)) if norm == "gn" else nn.BatchNorm2d
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
            layer(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2, bias=False),
            layer(width),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x):
        return F.interpolate(self.head(self.body(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


def build(num_classes: int, cfg) -> nn.Module:
    return TinyFCN(num_classes, int(cfg.options.get("width", 8)), cfg.norm)


def build_wrong_shape(num_classes: int, cfg) -> nn.Module:
    """Forgets to upsample: logits at half resolution."""
    model = TinyFCN(num_classes, 8, cfg.norm)
    model.forward = lambda x: model.head(model.body(x))
    return model


def build_broken(num_classes: int, cfg) -> nn.Module:
    raise RuntimeError("my factory is broken")
