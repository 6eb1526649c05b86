"""Segmentation metrics from a confusion matrix kept on the device.

The matrix is an int64 [C, C] tensor (rows = ground truth, cols = prediction) updated with one
`bincount` per batch; under DDP the per-rank matrices are summed with one all-reduce, so the
metrics of N workers equal those of one worker seeing all the data.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

IGNORE_INDEX = 255


class ConfusionMatrix:
    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        n = self.num_classes
        # Ignored pixels go to an extra bin instead of being masked out: boolean indexing
        # copies and is 6x slower on CPU than one elementwise `where`.
        idx = torch.where(target != IGNORE_INDEX, target * n + pred, n * n)
        self.mat += torch.bincount(idx.flatten(), minlength=n * n + 1)[: n * n].reshape(n, n)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def compute(self) -> dict:
        return metrics_from_confusion(self.mat.double().cpu())


def metrics_from_confusion(mat: torch.Tensor) -> dict:
    """Overall acc, mean acc (over classes present in the ground truth), mean IoU and per-class
    IoU; a class absent from both ground truth and prediction has IoU NaN and is left out of
    the mean."""
    mat = mat.double()
    tp = mat.diag()
    gt = mat.sum(1)
    pred = mat.sum(0)
    union = gt + pred - tp
    total = mat.sum()
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    acc_c = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, math.nan))
    return {
        "overall_acc": float(tp.sum() / total) if total > 0 else math.nan,
        "mean_acc": float(acc_c.nanmean()) if (gt > 0).any() else math.nan,
        "mIoU": float(iou.nanmean()) if (union > 0).any() else math.nan,
        "per_class_iou": iou.tolist(),
    }
