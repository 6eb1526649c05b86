"""PASCAL VOC 2012, VOC trainaug and Cityscapes in their real on-disk layouts.

Imports neither Ray nor MLflow nor the model: usable from any data pipeline.
"""
from datasets.base import DatasetError, SegmentationDataset
from datasets.cityscapes import Cityscapes
from datasets.voc import VOCSegmentation


def build_dataset(name: str, root: str, split: str, transform=None, limit: int | None = None) -> SegmentationDataset:
    """`name`: voc | voc_aug | cityscapes. voc_aug differs from voc only in its train split."""
    if name in ("voc", "voc_aug"):
        if name == "voc_aug" and split == "train":
            split = "train_aug"
        return VOCSegmentation(root, split, transform=transform, limit=limit)
    if name == "cityscapes":
        return Cityscapes(root, split, transform=transform, limit=limit)
    raise DatasetError(f"unknown dataset {name!r}; allowed: voc, voc_aug, cityscapes")


__all__ = ["Cityscapes", "DatasetError", "SegmentationDataset", "VOCSegmentation", "build_dataset"]
