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
        return self.draw(*v2.query_size(flat_inputs))

    def draw(self, h: int, w: int) -> dict:
        """The window for an `h` x `w` image: the only random draws of this transform."""
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
    mask -> int64 [H, W]. On the image's own device."""

    _scale = (1.0 / (255.0 * torch.tensor(STD))).view(3, 1, 1)
    _shift = (torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            return inpt.as_subclass(torch.Tensor).long()
        if isinstance(inpt, tv_tensors.Image):
            x = inpt.as_subclass(torch.Tensor).float()
            return x.mul_(self._scale.to(x.device)).sub_(self._shift.to(x.device))
        return inpt


FLIP_P = 0.5


class DeviceTrainAugment:
    """The train augmentation split in two, for training on a GPU. In the loader's workers, as
    the CPU path draws them (the same random calls in the same order, so the same seeds give the
    same crops, flips and scales), only the parameters are drawn; the loader hands over the
    image's encoded bytes and the (small, palette-decoded) mask. `apply` then decodes the JPEGs
    as a batch on the training device and crops, scales, flips and normalises there: the CPU
    reads bytes. Datasets see `encoded` and skip decoding the image."""

    encoded = True

    def __init__(self, crop: int, lo: float, hi: float):
        self.scale_crop = RandomScaleCrop(crop, lo, hi)
        self.finish = _Finish()

    def __call__(self, data: torch.Tensor, mask: torch.Tensor) -> tuple:
        params = self.scale_crop.draw(*mask.shape)
        flip = bool(torch.rand(1) < FLIP_P)  # as v2.RandomHorizontalFlip draws it
        return data, mask, params, flip

    def apply(self, batch: list[tuple], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = [], []
        for image, (_, mask, params, flip) in zip(decode_images([b[0] for b in batch], device), batch, strict=True):
            if image.shape[-2:] != mask.shape:
                raise ValueError(f"image size {tuple(image.shape[-2:])} differs from its mask's {tuple(mask.shape)}")
            pair = [tv_tensors.Image(image), tv_tensors.Mask(mask.to(device, non_blocking=True))]
            pair = [self.scale_crop.transform(x, params) for x in pair]
            if flip:
                pair = [F.horizontal_flip(x) for x in pair]
            images.append(self.finish.transform(pair[0], {}))
            masks.append(self.finish.transform(pair[1], {}))
        return torch.stack(images), torch.stack(masks)


def decode_images(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """uint8 [3, H, W] images on `device`: JPEGs decoded there as one batch (nvJPEG on a GPU),
    anything else (Cityscapes' PNGs) decoded on the CPU and moved."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    is_jpeg = [len(d) > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8 for d in data]
    jpegs = [d for d, j in zip(data, is_jpeg, strict=True) if j]
    decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
    return [
        next(decoded) if j else decode_image(d, mode=ImageReadMode.RGB).to(device)
        for d, j in zip(data, is_jpeg, strict=True)
    ]


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
                v2.RandomHorizontalFlip(FLIP_P),
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
