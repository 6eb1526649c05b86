"""Metrics equal an independent computation on random inputs."""

from __future__ import annotations

import math

import numpy as np
import torch

from deeplab_sweep.trainable.metrics import ConfusionMatrix


def _reference(gt: np.ndarray, pred: np.ndarray, n: int) -> dict:
    """Straight from the definitions, class by class, no confusion matrix."""
    valid = gt != 255
    g, p = gt[valid], pred[valid]
    ious, accs = [], []
    for c in range(n):
        inter = np.sum((g == c) & (p == c))
        union = np.sum((g == c) | (p == c))
        ious.append(inter / union if union else math.nan)
        accs.append(inter / np.sum(g == c) if np.sum(g == c) else math.nan)
    return {"overall_acc": np.mean(g == p), "mean_acc": np.nanmean(accs), "mIoU": np.nanmean(ious), "iou": ious}


def test_matches_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    n = 21
    cm = ConfusionMatrix(n)
    gts, preds = [], []
    for _ in range(4):
        gt = rng.integers(0, n - 3, size=(2, 37, 41))  # classes 18..20 never in the ground truth
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = rng.integers(0, n - 1, size=(2, 37, 41))  # class 20 never predicted either
        cm.update(torch.from_numpy(gt), torch.from_numpy(pred))
        gts.append(gt)
        preds.append(pred)
    ref = _reference(np.concatenate(gts), np.concatenate(preds), n)
    got = cm.compute()
    for k in ("overall_acc", "mean_acc", "mIoU"):
        assert math.isclose(got[k], ref[k], rel_tol=1e-12)
    assert math.isnan(got["per_class_iou"][20]) and math.isnan(ref["iou"][20])
    assert got["per_class_iou"][19] == 0.0  # predicted but absent from GT: counts as 0
    np.testing.assert_allclose(got["per_class_iou"][:20], ref["iou"][:20])


def test_perfect_and_ignored():
    cm = ConfusionMatrix(3)
    gt = torch.tensor([[0, 1, 255], [2, 2, 255]])
    pred = torch.tensor([[0, 1, 0], [2, 2, 1]])
    cm.update(gt, pred)
    m = cm.compute()
    assert m["mIoU"] == 1.0 and m["overall_acc"] == 1.0 and int(cm.mat.sum()) == 4
