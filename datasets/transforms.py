"""Joint image/mask transforms on torchvision.transforms.v2 (tv_tensors keep the mask exact:
nearest-neighbour resizing, padding with 255 so padding never counts as background)."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from deeplab_sweep.datasets.labels import IGNORE_INDEX

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Pad images with the mean pixel: after normalisation the padding is exactly zero.
MEAN_PIXEL = tuple(round(255 * m) for m in MEAN)


class RandomScaleCrop(v2.Transform):
    """The paper's augmentation: scale by a factor drawn from [lo, hi], then take a random
    `crop` x `crop` window, padding (image: mean pixel, mask: 255) where the scaled image is
    smaller. Fused: only the source region that lands in the window is resized, so the cost
    follows the crop size, not the (up to 4x larger) scaled image."""

    def __init__(self, crop: int, lo: float, hi: float):
        super().__init__()
        self.crop, self.lo, self.hi = crop, lo, hi

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        s = self.lo + (self.hi - self.lo) * float(torch.rand(()))
        sh, sw = max(1, round(h * s)), max(1, round(w * s))  # the scaled image's size
        ch, cw = min(self.crop, sh), min(self.crop, sw)  # the part of the window it covers
        y0 = int(torch.randint(0, sh - ch + 1, ()))
        x0 = int(torch.randint(0, sw - cw + 1, ()))
        top, left = min(int(y0 / s), h - 1), min(int(x0 / s), w - 1)
        height = max(1, min(round(ch / s), h - top))
        width = max(1, min(round(cw / s), w - left))
        pt = int(torch.randint(0, self.crop - ch + 1, ()))
        pl = int(torch.randint(0, self.crop - cw + 1, ()))
        return {
            "box": (top, left, height, width),
            "size": [ch, cw],
            "pad": [pl, pt, self.crop - cw - pl, self.crop - ch - pt],
        }

    def transform(self, inpt, params):
        out = self._call_kernel(F.resized_crop, inpt, *params["box"], size=params["size"], antialias=True)
        if any(params["pad"]):
            fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else list(MEAN_PIXEL)
            out = self._call_kernel(F.pad, out, padding=params["pad"], fill=fill)
        return out


class _Finish(v2.Transform):
    """uint8 image -> normalised float32 (one multiply-subtract, not to_dtype + normalize);
    mask -> int64 [H, W]."""

    _scale = (1.0 / (255.0 * torch.tensor(STD))).view(3, 1, 1)
    _shift = (torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return inpt.as_subclass(torch.Tensor).long()
        if isinstance(inpt, tv_tensors.Image):
            return inpt.as_subclass(torch.Tensor).float().mul_(self._scale).sub_(self._shift)
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
    return JointTransform(
        v2.Compose(
            [
                RandomScaleCrop(crop_size, scale_min, scale_max),
                v2.RandomHorizontalFlip(),
                _Finish(),
            ]
        )
    )


def val_transform(crop_size: int | None = None) -> JointTransform:
    """Whole image by default; with `crop_size`, resize the shorter side to it and centre-crop."""
    steps = [] if crop_size is None else [v2.Resize(crop_size, antialias=True), v2.CenterCrop(crop_size)]
    return JointTransform(v2.Compose([*steps, _Finish()]))


def list_collate(batch):
    """Keep whole images of different sizes apart: padding them into one tensor would change
    the predictions (convolutions and ASPP's image pooling see the padding)."""
    return list(batch)
