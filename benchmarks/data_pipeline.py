"""Training-pipeline throughput: decode (JPEG + palette PNG) + joint train transform, in
images/s, against a PIL pipeline written the way the seed project's transforms are.

    python benchmarks/data_pipeline.py [--images 200] [--workers 0 2] [--device cuda]

Prints one line per (pipeline, crop, loader workers). Real VOC images are ~500x375: the
generated ones here have that size. With `--device`, also `data.device_augment`'s path: the
loader's workers read bytes and draw the crops, and the batch is decoded (nvJPEG on a GPU) and
augmented on that device; images/s there are what a training step would receive.
"""

from __future__ import annotations

import argparse
import random
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from deeplab_sweep.datasets.synth import synth_voc
from deeplab_sweep.datasets.transforms import MEAN, STD, DeviceTrainAugment, list_collate, train_transform
from deeplab_sweep.datasets.voc import VOCSegmentation


class SeedPILPipeline(Dataset):
    """PIL decode + the seed's ExtRandomScale / ExtRandomCrop(pad_if_needed) / ExtRandomHorizontalFlip
    / ExtToTensor / ExtNormalize, re-written here as the baseline."""

    def __init__(self, samples, crop: int):
        self.samples, self.crop = samples, crop

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img_p, mask_p = self.samples[i]
        img, mask = Image.open(img_p).convert("RGB"), Image.open(mask_p)
        s = random.uniform(0.5, 2.0)
        size = (int(img.size[1] * s), int(img.size[0] * s))
        img = img.resize(size[::-1], Image.BILINEAR)
        mask = mask.resize(size[::-1], Image.NEAREST)
        w, h = img.size
        if w < self.crop or h < self.crop:
            pw, ph = max(self.crop - w, 0), max(self.crop - h, 0)
            canvas = Image.new("RGB", (w + pw, h + ph))
            canvas.paste(img, (pw // 2, ph // 2))
            mcanvas = Image.new("L", (w + pw, h + ph), 255)
            mcanvas.paste(mask, (pw // 2, ph // 2))
            img, mask = canvas, mcanvas
        w, h = img.size
        x, y = random.randint(0, w - self.crop), random.randint(0, h - self.crop)
        img, mask = img.crop((x, y, x + self.crop, y + self.crop)), mask.crop((x, y, x + self.crop, y + self.crop))
        if random.random() < 0.5:
            img, mask = img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255
        t = (t - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        return t, torch.from_numpy(np.array(mask, dtype=np.int64))


def measure(ds, workers: int, epochs: int = 2) -> float:
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, drop_last=False)
    n, start = 0, None
    for epoch in range(epochs + 1):
        if epoch == 1:  # the first pass warms the page cache and worker start-up
            start, n = time.perf_counter(), 0
        for x, _ in loader:
            n += x.shape[0]
    return n / (time.perf_counter() - start)


def measure_on_device(ds, workers: int, device: torch.device, epochs: int = 2) -> float:
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, collate_fn=list_collate)
    n, start = 0, None
    for epoch in range(epochs + 1):
        if epoch == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, n = time.perf_counter(), 0
        for batch in loader:
            x, _ = ds.transform.apply(batch, device)
            n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--crops", type=int, nargs="+", default=[256, 513])
    p.add_argument("--device", default=None, help="also measure data.device_augment on this device (cuda)")
    args = p.parse_args()
    torch.set_num_threads(1)  # one process, one core: the figure is per loader process
    with tempfile.TemporaryDirectory() as tmp:
        root = synth_voc(Path(tmp), n_train=args.images, n_val=1, n_aug_extra=0, size=(500, 375))
        samples = VOCSegmentation(root, "train").samples
        print(f"{len(samples)} JPEG+PNG pairs of 500x375, torch {torch.__version__}, threads 1")
        for crop in args.crops:
            for workers in args.workers:
                ours = measure(VOCSegmentation(root, "train", transform=train_transform(crop)), workers)
                seed = measure(SeedPILPipeline(samples, crop), workers)
                print(
                    f"crop {crop:>3}  loader workers {workers}:  ours {ours:7.1f} img/s   "
                    f"seed-style PIL {seed:7.1f} img/s   ratio {ours / seed:4.2f}x"
                )
                if args.device:
                    device_ds = VOCSegmentation(root, "train", transform=DeviceTrainAugment(crop, 0.5, 2.0))
                    on_device = measure_on_device(device_ds, workers, torch.device(args.device))
                    print(
                        f"crop {crop:>3}  loader workers {workers}:  "
                        f"device_augment on {args.device} {on_device:7.1f} img/s"
                    )
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (main process)")


if __name__ == "__main__":
    main()
