"""PASCAL VOC 2012 segmentation and the SBD-augmented 'trainaug' split.

Layout (root is the folder that holds VOCdevkit/):
  VOCdevkit/VOC2012/JPEGImages/{id}.jpg
  VOCdevkit/VOC2012/SegmentationClass/{id}.png          palette PNG, 255 = void border
  VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
  VOCdevkit/VOC2012/SegmentationClassAug/{id}.png       trainaug masks (grey PNG, indices)
  VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt  10,582 ids (val ids are removed)
"""

from __future__ import annotations

from pathlib import Path

from deeplab_sweep.datasets.base import SegmentationDataset, read_id_list
from deeplab_sweep.errors import DatasetError

SPLITS = ("train", "val", "trainval", "train_aug")
VOC_MAX_LABEL = 20  # 21 classes; 255 = void


def voc_dir(root: str | Path) -> Path:
    return Path(root) / "VOCdevkit" / "VOC2012"


def voc_samples(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    if split not in SPLITS:
        raise DatasetError(f"unknown VOC split {split!r}; allowed: {', '.join(SPLITS)}")
    base = voc_dir(root)
    if not base.is_dir():
        raise DatasetError(f"{base}: VOC2012 folder not found (root must hold VOCdevkit/VOC2012)")
    lists = base / "ImageSets" / "Segmentation"
    if split == "train_aug":
        ids = read_id_list(lists / "train_aug.txt")
        val = set(read_id_list(lists / "val.txt"))
        ids = [i for i in ids if i not in val]
        masks = base / "SegmentationClassAug"
        if not masks.is_dir():
            raise DatasetError(
                f"{masks}: SegmentationClassAug folder not found (extract SegmentationClassAug.zip there)"
            )
    else:
        ids = read_id_list(lists / f"{split}.txt")
        masks = base / "SegmentationClass"
    return [(base / "JPEGImages" / f"{i}.jpg", masks / f"{i}.png") for i in ids]


class VOCSegmentation(SegmentationDataset):
    def __init__(self, root: str | Path, split: str = "train", transform=None, limit: int | None = None):
        self.root, self.split = Path(root), split
        super().__init__(voc_samples(root, split), VOC_MAX_LABEL, lut=None, transform=transform, limit=limit)
