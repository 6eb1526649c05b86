"""Joint image/mask transforms on torchvision.transforms.v2 (tv_tensors keep the mask exact:
nearest-neighbour resizing, padding with 255 so padding never counts as background)."""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from datasets.labels import IGNORE_INDEX

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Pad images with the mean pixel: after normalisation the padding is exactly zero.
MEAN_PIXEL = tuple(round(255 * m) for m in MEAN)


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from [lo, hi] (the paper's 0.5-2.0 scale jitter)."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        s = self.lo + (self.hi - self.lo) * float(torch.rand(()))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt, params):
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


class _Finish(v2.Transform):
    """uint8 image -> normalised float32; mask -> int64 [H, W]."""

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return inpt.as_subclass(torch.Tensor).long()
        if isinstance(inpt, tv_tensors.Image):
            x = F.to_dtype(inpt.as_subclass(torch.Tensor), torch.float32, scale=True)
            return F.normalize(x, MEAN, STD)
        return inpt


class JointTransform:
    """Wraps a v2 pipeline so it is called as `t(image_uint8, mask_int64) -> (image, mask)`."""

    def __init__(self, pipeline: v2.Transform):
        self.pipeline = pipeline

    def __call__(self, image: torch.Tensor, mask: torch.Tensor):
        return self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))

    def __repr__(self) -> str:
        return f"JointTransform({self.pipeline})"


def train_transform(crop_size: int, scale_min: float = 0.5, scale_max: float = 2.0) -> JointTransform:
    return JointTransform(v2.Compose([
        RandomScale(scale_min, scale_max),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: MEAN_PIXEL, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        _Finish(),
    ]))


def val_transform(crop_size: int | None = None) -> JointTransform:
    """Whole image by default; with `crop_size`, resize the shorter side to it and centre-crop."""
    steps = [] if crop_size is None else [v2.Resize(crop_size, antialias=True), v2.CenterCrop(crop_size)]
    return JointTransform(v2.Compose([*steps, _Finish()]))


def list_collate(batch):
    """Keep whole images of different sizes apart: padding them into one tensor would change
    the predictions (convolutions and ASPP's image pooling see the padding)."""
    return list(batch)
