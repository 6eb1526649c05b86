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


def build_dying(num_classes: int, cfg) -> nn.Module:
    """Built in a Ray actor (a trial), its process dies after `options.die_after_s`, the first
    `options.deaths` times (counted in `options.marks`): a trial killed before its first report,
    then one that trains. Built elsewhere (the driver's preflight) it is TinyFCN."""
    import os
    import time
    from pathlib import Path

    import ray

    marks = Path(cfg.options["marks"])
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        marks.mkdir(parents=True, exist_ok=True)
        if len(list(marks.iterdir())) < int(cfg.options["deaths"]):
            (marks / str(time.time())).touch()
            time.sleep(float(cfg.options["die_after_s"]))
            os._exit(1)
    return TinyFCN(num_classes, 8, cfg.norm)


class _Flaky(TinyFCN):
    """Fails once, on its `fail_at`-th training step in this process (unless `marks` says it
    already did): a run that dies mid-training, then trains on when tried again."""

    steps = 0

    def __init__(self, num_classes: int, cfg):
        super().__init__(num_classes, 8, cfg.norm)
        self.fail_at, self.marks = int(cfg.options["fail_at"]), cfg.options["marks"]

    def forward(self, x):
        from pathlib import Path

        if self.training:
            _Flaky.steps += 1
            if _Flaky.steps == self.fail_at and not Path(self.marks).exists():
                Path(self.marks).touch()
                raise RuntimeError("a flaky failure mid-training")
        return super().forward(x)


def build_flaky(num_classes: int, cfg) -> nn.Module:
    return _Flaky(num_classes, cfg)
