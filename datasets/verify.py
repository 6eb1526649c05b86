"""Check a dataset root: layout, image/mask pairs, sizes and label values, file by file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from datasets.base import DatasetError
from datasets.cityscapes import Cityscapes
from datasets.voc import VOCSegmentation


@dataclass
class VerifyReport:
    counts: dict[str, int] = field(default_factory=dict)
    class_pixels: dict[str, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


SPLITS = {"voc": ("train", "val", "trainval"), "voc_aug": ("train_aug", "val"), "cityscapes": ("train", "val")}


def verify(name: str, root: str | Path, max_problems: int = 20) -> VerifyReport:
    if name not in SPLITS:
        raise DatasetError(f"unknown dataset {name!r}; allowed: {', '.join(SPLITS)}")
    report = VerifyReport()
    cls = Cityscapes if name == "cityscapes" else VOCSegmentation
    for split in SPLITS[name]:
        try:
            ds = cls(root, split)
        except DatasetError as e:
            report.problems.append(str(e))
            continue
        report.counts[split] = len(ds)
        hist = torch.zeros(256, dtype=torch.long)
        for i in range(len(ds)):
            try:
                _, mask = ds.load(i)
            except DatasetError as e:
                report.problems.append(str(e))
                if len(report.problems) >= max_problems:
                    return report
                continue
            hist += torch.bincount(mask.flatten(), minlength=256)
        report.class_pixels[split] = hist.tolist()
    return report
