"""Cityscapes fine annotations, labelIds mapped to the 19 train ids (everything else 255).

Layout: leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
        gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png
(_color.png, _instanceIds.png and _polygons.json beside them are not read.)
"""

from __future__ import annotations

from pathlib import Path

from deeplab_sweep.datasets.base import SegmentationDataset
from deeplab_sweep.datasets.labels import CITYSCAPES_MAX_LABEL_ID, cityscapes_lut
from deeplab_sweep.errors import DatasetError

SPLITS = ("train", "val", "test")
IMG_SUFFIX, MASK_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"


def cityscapes_samples(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    if split not in SPLITS:
        raise DatasetError(f"unknown Cityscapes split {split!r}; allowed: {', '.join(SPLITS)}")
    img_root = Path(root) / "leftImg8bit" / split
    gt_root = Path(root) / "gtFine" / split
    for d in (img_root, gt_root):
        if not d.is_dir():
            raise DatasetError(f"{d}: folder not found (root must hold leftImg8bit/ and gtFine/)")
    samples = []
    for img in sorted(img_root.glob(f"*/*{IMG_SUFFIX}")):
        stem = img.name[: -len(IMG_SUFFIX)]
        samples.append((img, gt_root / img.parent.name / f"{stem}{MASK_SUFFIX}"))
    if not samples:
        raise DatasetError(f"{img_root}: no *{IMG_SUFFIX} images found")
    return samples


class Cityscapes(SegmentationDataset):
    def __init__(self, root: str | Path, split: str = "train", transform=None, limit: int | None = None):
        self.root, self.split = Path(root), split
        super().__init__(
            cityscapes_samples(root, split),
            CITYSCAPES_MAX_LABEL_ID,
            lut=cityscapes_lut(),
            transform=transform,
            limit=limit,
        )
