"""Check a dataset root: layout, image/mask pairs, sizes and label values, file by file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from deeplab_sweep.datasets.catalog import get_dataset
from deeplab_sweep.errors import DatasetError


@dataclass
class VerifyReport:
    counts: dict[str, int] = field(default_factory=dict)
    class_pixels: dict[str, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(name: str, root: str | Path, max_problems: int = 20) -> VerifyReport:
    spec = get_dataset(name)
    report = VerifyReport()
    for split in spec.verify_splits:
        try:
            ds = spec.build(root, split)
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
