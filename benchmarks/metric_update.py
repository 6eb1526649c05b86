"""Confusion-matrix update time for a 4 x 513 x 513 batch, 21 classes: ours (one torch
bincount, on the tensors' device) against the reference's numpy bincount per image.

    python benchmarks/metric_update.py [--repeat 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from deeplab_sweep.trainable.metrics import ConfusionMatrix


def numpy_reference(hist: np.ndarray, gts: np.ndarray, preds: np.ndarray, n: int) -> None:
    """The seed project's StreamSegMetrics.update: one _fast_hist per image."""
    for lt, lp in zip(gts, preds, strict=True):
        lt, lp = lt.flatten(), lp.flatten()
        mask = (lt >= 0) & (lt < n)
        hist += np.bincount(n * lt[mask].astype(int) + lp[mask], minlength=n**2).reshape(n, n)


def timeit(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1000


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=50)
    args = p.parse_args()
    n, shape = 21, (4, 513, 513)
    g = torch.Generator().manual_seed(0)
    gt = torch.randint(0, n, shape, generator=g)
    gt[torch.rand(shape, generator=g) < 0.05] = 255
    pred = torch.randint(0, n, shape, generator=g)
    gt_np, pred_np = gt.numpy(), pred.numpy()
    hist = np.zeros((n, n), np.int64)
    ref = timeit(lambda: numpy_reference(hist, gt_np, pred_np, n), args.repeat)
    print(f"torch threads {torch.get_num_threads()}, batch {shape}, {n} classes")
    print(f"numpy bincount per image (reference): {ref:7.2f} ms")
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        cm = ConfusionMatrix(n)
        ours = timeit(lambda cm=cm: cm.update(gt, pred), args.repeat)
        print(f"ours, cpu, {threads} thread(s):       {ours:7.2f} ms  ({ref / ours:.1f}x)")
    # the training loop's predictions come as int64 argmax; uint8 targets are cheaper to move
    if torch.cuda.is_available():
        cm = ConfusionMatrix(n, "cuda")
        gtc, pc = gt.cuda(), pred.cuda()

        def step():
            cm.update(gtc, pc)
            torch.cuda.synchronize()

        print(f"ours, cuda:                  {timeit(step, args.repeat):7.2f} ms")


if __name__ == "__main__":
    main()
