"""Step time of the same model, batch and data three ways, in one run:
  bare    a plain PyTorch loop (forward, CE loss, backward, SGD step) over the same DataLoader
  engine  our training procedure in-process (trainable.engine.fit with a LocalWorker)
  ray     the same procedure as a Ray Train TorchTrainer with 1 worker (and 2 workers, DDP)

    python benchmarks/train_overhead.py [--backbone mobilenet_v2] [--crop 128] [--batch 4] [--images 48]

Overhead = (time per image under Ray) / (time per image bare) - 1. Per-epoch data/eval time is
excluded: each figure is train images/s of the training epochs after a warm-up epoch.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deeplab_sweep.datasets.synth import synth_voc
from deeplab_sweep.search.compose import load_job

CONF = Path(__file__).resolve().parents[1] / "conf"


def bare_loop(cfg, epochs: int) -> float:
    from deeplab_sweep.trainable.engine import build_loaders, build_optimizer, seed_everything
    from deeplab_sweep.trainable.models import build_from_config

    seed_everything(0, 0, 0)
    model = build_from_config(cfg.model, cfg.data.num_classes)
    opt = build_optimizer(model, cfg)
    train, sampler, _ = build_loaders(cfg, 0, 1, pin=False)
    rates = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        n, t = 0, time.perf_counter()
        for x, y in train:
            loss = F.cross_entropy(model(x), y, ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += x.shape[0]
        rates.append(n / (time.perf_counter() - t))
    return sum(rates[1:]) / len(rates[1:])


def engine_local(cfg) -> float:
    from deeplab_sweep.trainable.engine import LocalWorker, fit

    reports = fit(cfg, LocalWorker())
    return sum(r["train/images_per_s"] for r in reports[1:]) / len(reports[1:])


def engine_ray(cfg, workers: int) -> float:
    import ray

    from deeplab_sweep.trainable.ray_train import build_trainer

    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"num_workers": workers, "cpus_per_worker": 1.0})}
    )
    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False, include_dashboard=True)
    with tempfile.TemporaryDirectory() as storage:
        result = build_trainer(cfg, f"bench-{workers}", storage, "val/mIoU", "max").fit()
        rates = []
        for _ckpt, metrics in sorted(result.best_checkpoints, key=lambda cm: cm[1]["epoch"]):
            rates.append(metrics["train/images_per_s"])
    # every worker reports its own images/s for its shard; rank 0's is what Ray returns
    return sum(rates[1:]) / len(rates[1:]) * workers


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = synth_voc(Path(tmp) / "voc", n_train=args.images, n_val=2, n_aug_extra=0, size=(200, 150))
        cfg = load_job(
            CONF / "train" / "demo.yaml",
            [
                f"data.root={root}",
                f"model.backbone={args.backbone}",
                f"data.crop_size={args.crop}",
                f"data.batch_size={args.batch}",
                f"train.epochs={args.epochs}",
                f"train.torch_threads={args.threads}",
                f"train.keep_checkpoints={args.epochs}",
                "data.scale_min=1.0",
                "data.scale_max=1.0",
            ],
        ).run
        print(
            f"{args.backbone} crop {args.crop} batch {args.batch}, {args.images} images/epoch, "
            f"{args.epochs} epochs (first = warm-up), torch threads {args.threads}, torch {torch.__version__}"
        )
        bare = bare_loop(cfg, args.epochs)
        local = engine_local(cfg)
        ray1 = engine_ray(cfg, 1)
        print(f"bare PyTorch loop      {bare:7.2f} img/s  ({1000 / bare:6.1f} ms/img)")
        print(f"engine in-process      {local:7.2f} img/s  overhead {bare / local - 1:+.1%}")
        print(f"Ray Train, 1 worker    {ray1:7.2f} img/s  overhead {bare / ray1 - 1:+.1%}")
        if args.threads == 1:
            ray2 = engine_ray(cfg, 2)
            print(f"Ray Train, 2 workers   {ray2:7.2f} img/s  (DDP gloo, 2 cores: speed-up {ray2 / ray1:.2f}x)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (driver)")


if __name__ == "__main__":
    main()
