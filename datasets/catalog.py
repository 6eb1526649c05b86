"""The one table of datasets, as torchvision's segmentation references keep theirs: what each
dataset is (loader, splits, classes, palette) and the functions that generate, check and fetch
it. Everything else looks a dataset up here by its `data.name`; adding a dataset is one entry
below plus its loader module.

Imports neither Ray nor MLflow nor the model: usable from any data pipeline. Nor torch, until a
loader is called: the CLI reads this table to parse its arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deeplab_sweep.datasets import download, labels, synth
from deeplab_sweep.errors import DatasetError

if TYPE_CHECKING:
    from deeplab_sweep.datasets.base import SegmentationDataset

Palette = tuple[tuple[int, int, int], ...]
Loader = Callable[..., "SegmentationDataset"]  # (root, split, transform=, limit=) -> dataset


def _voc(root, split, transform=None, limit=None):
    from deeplab_sweep.datasets.voc import VOCSegmentation

    return VOCSegmentation(root, split, transform=transform, limit=limit)


def _cityscapes(root, split, transform=None, limit=None):
    from deeplab_sweep.datasets.cityscapes import Cityscapes

    return Cityscapes(root, split, transform=transform, limit=limit)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Loader
    # The loader's split for each role a run needs ("train", "val").
    roles: Mapping[str, str]
    # What `deeplab data verify` reads, split by split.
    verify_splits: tuple[str, ...]
    class_names: tuple[str, ...]
    # 256 colours: class id -> colour, for masks and the eval images.
    palette: Palette
    # Writes a small generated copy in the real layout: fn(out, seed=, n_train=, n_val=) -> out.
    synth: Callable[..., Path]
    # Gets the real data under a root (or says which files to place there): fn(root) -> root.
    download: Callable[[Path], Path]
    # Images in the real train split: what a training epoch costs, before any data is on disk.
    train_images: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build(self, root: str | Path, split: str, transform=None, limit: int | None = None) -> SegmentationDataset:
        """`split` is a role (train, val) or one of the loader's own split names."""
        return self.loader(root, self.roles.get(split, split), transform=transform, limit=limit)


_VOC_PALETTE = tuple(labels.voc_palette())

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "voc",
            _voc,
            {"train": "train", "val": "val"},
            ("train", "val", "trainval"),
            labels.VOC_CLASSES,
            _VOC_PALETTE,
            synth.synth_voc,
            download.download_voc,
            train_images=1464,
        ),
        # VOC with the SBD-augmented train list (10,582 images): differs from voc in its train split.
        DatasetSpec(
            "voc_aug",
            _voc,
            {"train": "train_aug", "val": "val"},
            ("train_aug", "val"),
            labels.VOC_CLASSES,
            _VOC_PALETTE,
            synth.synth_voc,
            download.download_voc,
            train_images=10582,
        ),
        DatasetSpec(
            "cityscapes",
            _cityscapes,
            {"train": "train", "val": "val"},
            ("train", "val"),
            labels.CITYSCAPES_CLASSES,
            tuple(labels.cityscapes_palette()),
            synth.synth_cityscapes,
            download.prepare_cityscapes,
            train_images=2975,
        ),
    )
}


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}") from None


def build_dataset(name: str, root: str | Path, split: str, transform=None, limit: int | None = None):
    return get_dataset(name).build(root, split, transform, limit)


def dataset_for_classes(num_classes: int) -> str | None:
    """The first dataset with this many classes (21: voc, 19: cityscapes)."""
    return next((name for name, spec in DATASETS.items() if spec.num_classes == num_classes), None)
